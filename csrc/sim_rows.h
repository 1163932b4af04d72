/* Fused fp16 row programs: a run of the simulator's fp16 elementwise ops (add, sub, mul,
 * real_div, softmax, silu, sigmoid, reduce_sum over the last axis) executed row by row, with
 * every intermediate kept in a row-sized fp32 register instead of a whole fp16 tensor.
 *
 * Why: in fp16 mode each MIL op widens its fp16 operands into fp32 scratch, computes, and rounds
 * the result back (rustane/mil/ops.py). Over the [heads, S, S] attention scores that is three or
 * four full passes per op; at Stories15M seq 1024 those passes were ~30% of the training step
 * (docs/benchmarks.md#fp16-row-programs; re-measure with python -m rustane.bench sweep).
 *
 * Numerics: the same bits as the unfused ops, by construction. Every computing instruction
 * rounds its fp32 result to fp16 (round to nearest even, fp16.h) exactly where the unfused op
 * stored an fp16 tensor; binary ops compute in fp32 on exactly widened operands (what numpy does
 * on the widened scratch); softmax/silu/sigmoid call the row functions of sim_ops.c that the
 * unfused ops call; reduce_sum adds in numpy's pairwise order (numpy's add.reduce over a
 * contiguous fp32 row: blocks of <= 128 summed in eight lanes, halves split at multiples of 8).
 *
 * Operands (rn_row_arg) are read or written through per-row element offsets, so broadcasts
 * (stride 0) and slices of wider buffers need no copies. Rows are independent: any split of
 * [row0, row1) over threads gives the same bits. No Python objects are touched (call nogil). */
#ifndef RUSTANE_SIM_ROWS_H
#define RUSTANE_SIM_ROWS_H

#include <stddef.h>
#include <stdint.h>

enum {
    RN_ROW_LOAD = 0,    /* reg[dst] = arg[a] (fp16 widened exactly, or fp32) */
    RN_ROW_STORE = 1,   /* arg[a] = reg[b] (fp16 args take the already-rounded values) */
    RN_ROW_ADD = 2,     /* reg[dst] = round16(reg[a] + reg[b]); a scalar register broadcasts */
    RN_ROW_SUB = 3,
    RN_ROW_MUL = 4,
    RN_ROW_DIV = 5,
    RN_ROW_SUM = 6,     /* reg[dst] (scalar) = round16(pairwise sum of reg[a]) */
    RN_ROW_SOFTMAX = 7, /* reg[dst] = round16(softmax(reg[a])) */
    RN_ROW_SILU = 8,
    RN_ROW_SIGMOID = 9,
};

typedef struct {
    int32_t op, dst, a, b;
} rn_row_op;

typedef struct {
    void *base;             /* fp16 (uint16_t bits) or fp32 elements */
    int32_t f16;            /* 1: fp16, 0: fp32 */
    int32_t width;          /* n (a row vector) or 1 (one value per row) */
    ptrdiff_t col_stride;   /* elements between a row's values (0 for a broadcast row) */
    const int64_t *row_off; /* element offset of row r's first value */
} rn_row_arg;

/* Run `prog` (nops instructions over nregs registers; reg_width[i] is n or 1) on rows
 * [row0, row1) of length n. Returns 0, or -1 when the scratch registers cannot be allocated. */
int rn_row_program(const rn_row_op *prog, size_t nops, const rn_row_arg *args, const int32_t *reg_width,
                   size_t nregs, size_t row0, size_t row1, size_t n);

/* numpy's pairwise sum of x[0..n) in fp32 (exported for tests). */
float rn_pairwise_sum_f32(const float *x, size_t n);

#endif /* RUSTANE_SIM_ROWS_H */
