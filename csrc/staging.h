/* Staging between fp32 host matrices and fp16 channel-major ANE buffers ([C, SP], element (c, w) at
 * c*SP + w). Callers pass pointers already offset to the first element touched and the row pitch (in
 * elements) of each side; bounds are the caller's job. Conversion follows fp16.h (current SIMD path). */
#ifndef RUSTANE_STAGING_H
#define RUSTANE_STAGING_H

#include <stddef.h>
#include <stdint.h>

/* dst[c*dst_ld + n] = f16(src[c*N + n]) for c < C, n < N: an fp32 [C, N] block into an fp16 window. */
void rustane_stage(uint16_t *dst, size_t dst_ld, const float *src, size_t C, size_t N);

/* dst[c*dst_ld + n] = f16(src[n*C + c]): the transpose of an fp32 [N, C] block, cache-blocked, one pass. */
void rustane_stage_t(uint16_t *dst, size_t dst_ld, const float *src, size_t N, size_t C);

/* dst[r*dst_ld + j] = f32(src[r*src_ld + j]) for r < rows, j < cols. */
void rustane_unstage(float *dst, size_t dst_ld, const uint16_t *src, size_t src_ld, size_t rows, size_t cols);

/* Row-wise fp16 copy (no conversion); one memcpy when both windows are contiguous. */
void rustane_copy16(uint16_t *dst, size_t dst_ld, const uint16_t *src, size_t src_ld, size_t rows, size_t cols);

#endif
