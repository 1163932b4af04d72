/* fp32 kernels behind the simulator's composite MIL ops (rustane.mil.ops): sigmoid, silu and
 * softmax over the last axis. numpy spells each as four to six full passes with temporaries;
 * these are one or two passes over fp32 data. Each takes `rows` rows of n contiguous elements,
 * row r of x at x + r*x_row (strides in elements: the simulator hands in slices of wider
 * buffers), and writes out likewise. `out` may alias `x` (same strides).
 *
 * Numerics: exp is the polynomial of fastmath.h (<= 1.1e-7 relative on [-87.33, 0]), so results
 * agree with numpy's to a few fp32 ulp; exp of arguments below -87.33 is 0 (numpy gives a
 * subnormal), so sigmoid(x) for x < -87.33 and softmax terms that far below the row maximum are
 * 0 instead of < 1.2e-38. NaN propagates (a NaN anywhere in a softmax row makes the row NaN);
 * sigmoid(+inf) = 1, sigmoid(-inf) = 0. None of these touch Python objects (call without the GIL).
 */
#ifndef RUSTANE_SIM_OPS_H
#define RUSTANE_SIM_OPS_H

#include <stddef.h>

/* out[i] = 1 / (1 + exp(-x[i])), computed as (x >= 0 ? 1 : e) / (1 + e) with e = exp(-|x|),
 * which cannot overflow. */
void rn_sigmoid_f32(const float *x, ptrdiff_t x_row, float *out, ptrdiff_t out_row, size_t rows, size_t n);

/* out[i] = x[i] * sigmoid(x[i]). */
void rn_silu_f32(const float *x, ptrdiff_t x_row, float *out, ptrdiff_t out_row, size_t rows, size_t n);

/* Softmax of each row: out = exp(x - max) / sum(exp(x - max)). */
void rn_softmax_rows_f32(const float *x, ptrdiff_t x_row, float *out, ptrdiff_t out_row, size_t rows, size_t n);

#endif /* RUSTANE_SIM_OPS_H */
