/* Simulator MIL ops in fp32; see sim_ops.h for the contracts. */
#include "sim_ops.h"
#include "fastmath.h"

#include <stdint.h>
#include <string.h>

/* sigmoid on the bits: e = exp(-|x|) needs |x| with the sign forced negative, and the numerator
 * (1 where the sign bit is clear, else e) is a bit select, so the loop has no float compare
 * (which gcc will not if-convert under -ftrapping-math) and vectorises. x = -0.0 takes the e
 * branch: e = 1, the same 1/2. */
static inline float sigmoid1(float x)
{
    uint32_t xb;
    memcpy(&xb, &x, sizeof xb);
    const uint32_t nb = xb | 0x80000000u;
    float neg_abs;
    memcpy(&neg_abs, &nb, sizeof neg_abs);
    const float e = exp_nonpos(neg_abs);
    uint32_t eb;
    memcpy(&eb, &e, sizeof eb);
    const uint32_t neg = (uint32_t)0 - (xb >> 31); /* all ones when the sign bit is set */
    const uint32_t numb = (0x3F800000u & ~neg) | (eb & neg);
    float num;
    memcpy(&num, &numb, sizeof num);
    return num / (1.0f + e);
}

RN_SIMD_CLONES
void rn_sigmoid_f32(const float *x, ptrdiff_t x_row, float *out, ptrdiff_t out_row, size_t rows, size_t n)
{
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + (ptrdiff_t)r * x_row;
        float *o = out + (ptrdiff_t)r * out_row;
        for (size_t i = 0; i < n; i++) o[i] = sigmoid1(xr[i]);
    }
}

RN_SIMD_CLONES
void rn_silu_f32(const float *x, ptrdiff_t x_row, float *out, ptrdiff_t out_row, size_t rows, size_t n)
{
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + (ptrdiff_t)r * x_row;
        float *o = out + (ptrdiff_t)r * out_row;
        for (size_t i = 0; i < n; i++) {
            const float xi = xr[i];
            o[i] = xi * sigmoid1(xi);
        }
    }
}

/* Eight independent lanes for the row reductions: a single float accumulator is a serial
 * dependency the vectoriser may not reorder (no -ffast-math), eight explicit ones map onto one
 * AVX register. */
enum { LANES = 8 };

static inline float row_max(const float *x, size_t n)
{
    float a[LANES];
    size_t i = 0;
    for (int j = 0; j < LANES; j++) a[j] = x[0];
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) a[j] = x[i + j] > a[j] ? x[i + j] : a[j];
    for (; i < n; i++) a[0] = x[i] > a[0] ? x[i] : a[0];
    float m = a[0];
    for (int j = 1; j < LANES; j++) m = a[j] > m ? a[j] : m;
    return m;
}

static inline float row_sum(const float *x, size_t n)
{
    float a[LANES] = {0};
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) a[j] += x[i + j];
    for (; i < n; i++) a[0] += x[i];
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

RN_SIMD_CLONES
void rn_softmax_rows_f32(const float *x, ptrdiff_t x_row, float *out, ptrdiff_t out_row, size_t rows, size_t n)
{
    if (n == 0) return;
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + (ptrdiff_t)r * x_row;
        float *o = out + (ptrdiff_t)r * out_row;
        /* A NaN never wins a > compare, so it may not reach the max; it still reaches the sum
         * through its own exp and so makes the whole row NaN, as numpy's softmax does. */
        const float mx = row_max(xr, n);
        for (size_t i = 0; i < n; i++) o[i] = exp_nonpos(xr[i] - mx);
        const float s = row_sum(o, n);
        for (size_t i = 0; i < n; i++) o[i] = o[i] / s;
    }
}
