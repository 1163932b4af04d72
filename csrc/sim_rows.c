/* Fused fp16 row programs; see sim_rows.h for the contract and the numerics argument. */
#include "sim_rows.h"
#include "fp16.h"
#include "fastmath.h"
#include "sim_ops.h"

#include <stdlib.h>

/* numpy/_core/src/umath/loops_utils.h.src, pairwise_sum: the order numpy's float add.reduce
 * uses on a contiguous row (tests/test_sim_rows.py compares bit for bit against numpy). */
enum { PW_BLOCK = 128 };

RN_SIMD_CLONES
float rn_pairwise_sum_f32(const float *x, size_t n)
{
    if (n < 8) {
        float s = 0.0f;
        for (size_t i = 0; i < n; i++) s += x[i];
        return s;
    }
    if (n <= PW_BLOCK) {
        float r[8];
        for (int j = 0; j < 8; j++) r[j] = x[j];
        size_t i = 8;
        for (; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++) r[j] += x[i + j];
        float s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) s += x[i];
        return s;
    }
    size_t n2 = n / 2;
    n2 -= n2 % 8;
    return rn_pairwise_sum_f32(x, n2) + rn_pairwise_sum_f32(x + n2, n - n2);
}

/* fp32 -> fp16 -> fp32: the value an fp16 tensor would hold. */
static void round16(float *v, size_t n) { rustane_round_f16(v, n); }

static inline void load(float *dst, const rn_row_arg *g, size_t r, size_t w, uint16_t *tmp)
{
    const int64_t off = g->row_off[r];
    if (g->f16) {
        const uint16_t *src = (const uint16_t *)g->base + off;
        if (g->col_stride == 1) {
            rustane_f16_to_f32(dst, src, w);
        } else {
            for (size_t i = 0; i < w; i++) tmp[i] = src[(ptrdiff_t)i * g->col_stride];
            rustane_f16_to_f32(dst, tmp, w);
        }
    } else {
        const float *src = (const float *)g->base + off;
        for (size_t i = 0; i < w; i++) dst[i] = src[(ptrdiff_t)i * g->col_stride];
    }
}

static inline void store(const rn_row_arg *g, size_t r, const float *v, size_t w, uint16_t *tmp)
{
    const int64_t off = g->row_off[r];
    if (g->f16) {
        uint16_t *dst = (uint16_t *)g->base + off;
        if (g->col_stride == 1) {
            rustane_f32_to_f16(dst, v, w);
        } else {
            rustane_f32_to_f16(tmp, v, w);
            for (size_t i = 0; i < w; i++) dst[(ptrdiff_t)i * g->col_stride] = tmp[i];
        }
    } else {
        float *dst = (float *)g->base + off;
        for (size_t i = 0; i < w; i++) dst[(ptrdiff_t)i * g->col_stride] = v[i];
    }
}

/* out = a op b over w elements, a scalar operand (width 1) broadcast; one loop per case so
 * each vectorises. No FMA can form: every result is rounded through fp16 before other use. */
#define RN_BINARY_LOOPS(OP)                                                              \
    if (wa != 1 && wb != 1)                                                              \
        for (size_t i = 0; i < w; i++) out[i] = a[i] OP b[i];                            \
    else if (wa != 1)                                                                    \
        for (size_t i = 0; i < w; i++) out[i] = a[i] OP b[0];                            \
    else if (wb != 1)                                                                    \
        for (size_t i = 0; i < w; i++) out[i] = a[0] OP b[i];                            \
    else                                                                                 \
        out[0] = a[0] OP b[0];

static inline void binary(int op, float *restrict out, const float *a, size_t wa, const float *b, size_t wb,
                   size_t w)
{
    switch (op) {
    case RN_ROW_ADD: RN_BINARY_LOOPS(+) break;
    case RN_ROW_SUB: RN_BINARY_LOOPS(-) break;
    case RN_ROW_MUL: RN_BINARY_LOOPS(*) break;
    default: RN_BINARY_LOOPS(/) break;
    }
}

RN_SIMD_CLONES
int rn_row_program(const rn_row_op *prog, size_t nops, const rn_row_arg *args, const int32_t *reg_width,
                   size_t nregs, size_t row0, size_t row1, size_t n)
{
    if (n == 0 || row1 <= row0) return 0;
    /* one row per register plus a conversion buffer: a few KB at n = 1024, so they stay in L1 */
    float *regs = malloc(sizeof(float) * n * nregs);
    uint16_t *tmp = malloc(sizeof(uint16_t) * n);
    if (regs == NULL || tmp == NULL) {
        free(regs);
        free(tmp);
        return -1;
    }
    for (size_t r = row0; r < row1; r++) {
        for (size_t k = 0; k < nops; k++) {
            const rn_row_op *p = &prog[k];
            float *d = regs + (size_t)p->dst * n;
            const size_t wd = (size_t)reg_width[p->dst];
            switch (p->op) {
            case RN_ROW_LOAD:
                load(d, &args[p->a], r, wd, tmp);
                break;
            case RN_ROW_STORE:
                store(&args[p->a], r, regs + (size_t)p->b * n, (size_t)reg_width[p->b], tmp);
                break;
            case RN_ROW_SUM:
                d[0] = rn_pairwise_sum_f32(regs + (size_t)p->a * n, (size_t)reg_width[p->a]);
                round16(d, 1);
                break;
            case RN_ROW_SOFTMAX:
                rn_softmax_rows_f32(regs + (size_t)p->a * n, 0, d, 0, 1, wd);
                round16(d, wd);
                break;
            case RN_ROW_SILU:
                rn_silu_f32(regs + (size_t)p->a * n, 0, d, 0, 1, wd);
                round16(d, wd);
                break;
            case RN_ROW_SIGMOID:
                rn_sigmoid_f32(regs + (size_t)p->a * n, 0, d, 0, 1, wd);
                round16(d, wd);
                break;
            default:
                /* the compiler (rustane/mil/fuse_rows.py) gives every value its own register,
                 * so d never aliases an operand */
                binary(p->op, d, regs + (size_t)p->a * n, (size_t)reg_width[p->a],
                       regs + (size_t)p->b * n, (size_t)reg_width[p->b], wd);
                round16(d, wd);
                break;
            }
        }
    }
    free(regs);
    free(tmp);
    return 0;
}
