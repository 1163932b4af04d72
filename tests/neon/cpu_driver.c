/* Test driver for csrc/cpu_ops.c and csrc/sim_ops.c built for arm64 (the Mac's CPU side) and run
 * under qemu-aarch64 by tests/test_native_arm64_cpu_ops.py. Binary data on stdin/stdout.
 *
 *   cpu_driver sigmoid|silu            stdin float32[n]              -> stdout float32[n]
 *   cpu_driver softmax N               stdin float32[rows * N]       -> stdout float32[rows * N]
 *   cpu_driver ce V S T grad_scale     stdin float32[V*S], int32[S]  -> stdout float64 loss, float32[V*S]
 *   cpu_driver adamw T                 stdin float32 w, g, m, v (4 equal parts, split into two tensors
 *                                      at a third) -> stdout w, m, v, g after one step (zero_grad on)
 *   cpu_driver sumsq T                 stdin float32[n]              -> stdout float64
 *   cpu_driver rowsds N                stdin fp16 P[rows*N], dP[rows*N] -> stdout fp16 dS[rows*N], the
 *                                      row program of sdpaBwd2: dS = P*(dP - rowsum(P*dP))*0.125,
 *                                      rounded through fp16 after every op (csrc/sim_rows.h)
 * T is the thread count. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "driver_io.h"
#include "cpu_ops.h"
#include "sim_ops.h"
#include "sim_rows.h"

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: cpu_driver sigmoid|silu|softmax|ce|adamw|sumsq ...\n");
        return 2;
    }
    size_t len;
    unsigned char *in = read_all(&len);
    if (!in)
        return 4;
    int rc = 2;
    float *x = (float *)in;
    if ((!strcmp(argv[1], "sigmoid") || !strcmp(argv[1], "silu")) && argc == 2) {
        size_t n = len / 4;
        if (!strcmp(argv[1], "sigmoid"))
            rn_sigmoid_f32(x, (ptrdiff_t)n, x, (ptrdiff_t)n, 1, n);
        else
            rn_silu_f32(x, (ptrdiff_t)n, x, (ptrdiff_t)n, 1, n);
        rc = write_all(x, n * 4);
    } else if (!strcmp(argv[1], "softmax") && argc == 3) {
        size_t n = strtoul(argv[2], NULL, 10), rows = n ? len / 4 / n : 0;
        rn_softmax_rows_f32(x, (ptrdiff_t)n, x, (ptrdiff_t)n, rows, n);
        rc = write_all(x, rows * n * 4);
    } else if (!strcmp(argv[1], "ce") && argc == 6) {
        int V = atoi(argv[2]), S = atoi(argv[3]), T = atoi(argv[4]);
        float scale = strtof(argv[5], NULL);
        if (len != (size_t)V * S * 4 + (size_t)S * 4)
            return 5;
        const int32_t *t = (const int32_t *)(in + (size_t)V * S * 4);
        double loss = rn_cross_entropy(x, t, x, V, S, scale, T); /* in place, as the engine does */
        rc = write_all(&loss, sizeof loss) || write_all(x, (size_t)V * S * 4);
    } else if (!strcmp(argv[1], "adamw") && argc == 3) {
        size_t n = len / 16, a = n / 3;
        float *w = x, *g = x + n, *m = x + 2 * n, *v = x + 3 * n;
        struct rn_adamw_tensor ts[2] = {{w, g, m, v, a, 0.1f}, {w + a, g + a, m + a, v + a, n - a, 0.0f}};
        struct rn_adamw_hyper h = {3e-3f, 0.9f, 0.95f, 1e-8f, 0.5f, 7};
        rn_adamw_tensors(ts, 2, &h, 1, atoi(argv[2]));
        rc = write_all(w, n * 4) || write_all(m, n * 4) || write_all(v, n * 4) || write_all(g, n * 4);
    } else if (!strcmp(argv[1], "rowsds") && argc == 3) {
        size_t n = strtoul(argv[2], NULL, 10), rows = n ? len / 4 / n : 0;
        uint16_t *p = (uint16_t *)in, *dp = p + rows * n, scale = 0x3000; /* 0.125 in fp16 */
        uint16_t *ds = malloc(rows * n * 2 + 2);
        int64_t *off = malloc(rows * 8 + 8), *zero = calloc(rows + 1, 8);
        if (!ds || !off || !zero)
            return 4;
        for (size_t r = 0; r < rows; r++) off[r] = (int64_t)(r * n);
        const rn_row_arg args[4] = {{p, 1, (int32_t)n, 1, off}, {dp, 1, (int32_t)n, 1, off},
                                    {&scale, 1, 1, 0, zero}, {ds, 1, (int32_t)n, 1, off}};
        const int32_t widths[9] = {(int32_t)n, (int32_t)n, 1, (int32_t)n, 1, (int32_t)n, (int32_t)n, (int32_t)n, 0};
        const rn_row_op prog[10] = {{RN_ROW_LOAD, 0, 0, 0}, {RN_ROW_LOAD, 1, 1, 0}, {RN_ROW_LOAD, 2, 2, 0},
                                    {RN_ROW_MUL, 3, 0, 1},  {RN_ROW_SUM, 4, 3, 0},  {RN_ROW_SUB, 5, 1, 4},
                                    {RN_ROW_MUL, 6, 0, 5},  {RN_ROW_MUL, 7, 6, 2},  {RN_ROW_STORE, 0, 3, 7}};
        /* two calls over a row split, as the interpreter's helper thread does */
        rc = rn_row_program(prog, 9, args, widths, 8, rows / 3, rows, n) ||
             rn_row_program(prog, 9, args, widths, 8, 0, rows / 3, n) || write_all(ds, rows * n * 2);
        free(ds);
        free(off);
        free(zero);
    } else if (!strcmp(argv[1], "sumsq") && argc == 3) {
        const float *xs[1] = {x};
        size_t ns[1] = {len / 4};
        double s = rn_sumsq_tensors(xs, ns, 1, atoi(argv[2]));
        rc = write_all(&s, sizeof s);
    }
    free(in);
    return rc;
}
