/* Test driver for the NEON paths of csrc/fp16.c and csrc/staging.c, cross-compiled for arm64 and run
 * under qemu-aarch64 by tests/test_native_neon.py. Binary data on stdin/stdout, native endianness.
 *
 *   driver path                          print the conversion path in use (must be "neon")
 *   driver f2h                           stdin float32[n]  -> stdout uint16[n]
 *   driver h2f                           stdin uint16[n]   -> stdout float32[n]
 *   driver stage C SP c0 col Cb N T      stdin float32 block ([Cb, N], or [N, Cb] when T = 1)
 *                                        -> stdout the uint16 [C, SP] buffer (zero-filled, then staged)
 *
 * Every mode first checks that the NEON path is the one selected, so a build that silently fell back
 * to scalar code fails the test instead of passing it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "driver_io.h"
#include "fp16.h"
#include "staging.h"

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: driver path|f2h|h2f|stage ...\n");
        return 2;
    }
    if (rustane_simd_current() != RUSTANE_SIMD_NEON) {
        fprintf(stderr, "NEON path not compiled in (current path: %s)\n", rustane_simd_name(rustane_simd_current()));
        return 3;
    }
    if (!strcmp(argv[1], "path")) {
        printf("%s\n", rustane_simd_name(rustane_simd_current()));
        return 0;
    }
    size_t len;
    unsigned char *in = read_all(&len);
    if (!in)
        return 4;
    int rc = 2;
    if (!strcmp(argv[1], "f2h")) {
        size_t n = len / 4;
        uint16_t *out = malloc(n * 2 + 2);
        rustane_f32_to_f16(out, (const float *)in, n);
        rc = write_all(out, n * 2);
        free(out);
    } else if (!strcmp(argv[1], "h2f")) {
        size_t n = len / 2;
        float *out = malloc(n * 4 + 4);
        rustane_f16_to_f32(out, (const uint16_t *)in, n);
        rc = write_all(out, n * 4);
        free(out);
    } else if (!strcmp(argv[1], "stage") && argc == 9) {
        size_t C = strtoul(argv[2], NULL, 10), SP = strtoul(argv[3], NULL, 10);
        size_t c0 = strtoul(argv[4], NULL, 10), col = strtoul(argv[5], NULL, 10);
        size_t cb = strtoul(argv[6], NULL, 10), nb = strtoul(argv[7], NULL, 10);
        int transpose = atoi(argv[8]);
        if (len != cb * nb * 4 || c0 + cb > C || col + nb > SP) {
            fprintf(stderr, "stage: bad sizes\n");
            free(in);
            return 2;
        }
        uint16_t *dst = calloc(C * SP + 1, 2);
        if (transpose)
            rustane_stage_t(dst + c0 * SP + col, SP, (const float *)in, nb, cb);
        else
            rustane_stage(dst + c0 * SP + col, SP, (const float *)in, cb, nb);
        rc = write_all(dst, C * SP * 2);
        free(dst);
    }
    free(in);
    return rc;
}
