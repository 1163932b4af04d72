/* fp32 <-> fp16 staging into channel-major buffers; see staging.h. */
#include "staging.h"

#include <string.h>

#include "fp16.h"

#include "simd.h"

/* Transposed staging works on tiles of TILE_N source rows x TILE_C channels (8 KB of fp32 read,
 * TILE_C destination rows of 128 bytes written), so both sides stay in L1 whatever the pitches.
 * Inside a tile the kernels walk n fastest for each group of channels, which fills destination
 * lines one after another (measured ~1.4x faster here than walking channels fastest; re-measure
 * with python -m rustane.bench native --only staging, transposed_blocks_GBps_fp32, for each order). */
#define TILE_N 64
#define TILE_C 32

void rustane_stage(uint16_t *dst, size_t dst_ld, const float *src, size_t C, size_t N)
{
    if (dst_ld == N) {
        rustane_f32_to_f16(dst, src, C * N);
        return;
    }
    for (size_t c = 0; c < C; c++)
        rustane_f32_to_f16(dst + c * dst_ld, src + c * N, N);
}

/* Scalar transpose of the window rows [n0, n1) x channels [c0, c1) (tile edges, scalar path). */
static void scalar_t(uint16_t *dst, size_t ld, const float *src, size_t C, size_t n0, size_t n1, size_t c0,
                     size_t c1)
{
    for (size_t c = c0; c < c1; c++)
        for (size_t n = n0; n < n1; n++)
            dst[c * ld + n] = rustane_f32_to_f16_one(src[n * C + c]);
}

/* A tile kernel transposes rows [n0, n1) x channels [c0, c1) and returns how far it got in each
 * direction with whole blocks; the caller finishes the ragged edges with scalar_t. */
typedef void (*tile_fn)(uint16_t *dst, size_t ld, const float *src, size_t C, size_t n0, size_t n1, size_t c0,
                        size_t c1, size_t *n_done, size_t *c_done);

static void scalar_tile(uint16_t *dst, size_t ld, const float *src, size_t C, size_t n0, size_t n1, size_t c0,
                        size_t c1, size_t *n_done, size_t *c_done)
{
    scalar_t(dst, ld, src, C, n0, n1, c0, c1);
    *n_done = n1;
    *c_done = c1;
}

#ifdef RUSTANE_HAVE_X86
/* 8 rows x 8 channels: in-register 8x8 transpose, then each column (one channel, 8 consecutive n)
 * converts to 8 halves and lands as one 16-byte store in its destination row. */
__attribute__((target("avx,f16c"))) static void f16c_tile(uint16_t *dst, size_t ld, const float *src, size_t C,
                                                         size_t n0, size_t n1, size_t c0, size_t c1,
                                                         size_t *n_done, size_t *c_done)
{
    size_t nb = n0 + ((n1 - n0) & ~(size_t)7);
    size_t cb = c0 + ((c1 - c0) & ~(size_t)7);
    for (size_t c = c0; c < cb; c += 8) {
        for (size_t n = n0; n < nb; n += 8) {
            const float *s = src + n * C + c;
            __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + C);
            __m256 r2 = _mm256_loadu_ps(s + 2 * C), r3 = _mm256_loadu_ps(s + 3 * C);
            __m256 r4 = _mm256_loadu_ps(s + 4 * C), r5 = _mm256_loadu_ps(s + 5 * C);
            __m256 r6 = _mm256_loadu_ps(s + 6 * C), r7 = _mm256_loadu_ps(s + 7 * C);
            __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
            __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
            __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
            __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
            __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
            __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
            __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
            __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
            __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
            __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
            __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
            __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
            __m256 col[8];
            col[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
            col[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
            col[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
            col[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
            col[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
            col[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
            col[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
            col[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
            uint16_t *d = dst + c * ld + n;
            for (int j = 0; j < 8; j++)
                _mm_storeu_si128((__m128i *)(d + j * ld), _mm256_cvtps_ph(col[j], _MM_FROUND_TO_NEAREST_INT));
        }
    }
    *n_done = nb;
    *c_done = cb;
}
#endif

#ifdef RUSTANE_HAVE_NEON
/* 4 rows x 4 channels: two-level trn transpose, each column converts to 4 halves (one 8-byte store). */
static void neon_tile(uint16_t *dst, size_t ld, const float *src, size_t C, size_t n0, size_t n1, size_t c0,
                      size_t c1, size_t *n_done, size_t *c_done)
{
    size_t nb = n0 + ((n1 - n0) & ~(size_t)3);
    size_t cb = c0 + ((c1 - c0) & ~(size_t)3);
    for (size_t c = c0; c < cb; c += 4) {
        for (size_t n = n0; n < nb; n += 4) {
            const float *s = src + n * C + c;
            float32x4_t r0 = vld1q_f32(s), r1 = vld1q_f32(s + C), r2 = vld1q_f32(s + 2 * C), r3 = vld1q_f32(s + 3 * C);
            float64x2_t t0 = vreinterpretq_f64_f32(vtrn1q_f32(r0, r1));
            float64x2_t t1 = vreinterpretq_f64_f32(vtrn2q_f32(r0, r1));
            float64x2_t t2 = vreinterpretq_f64_f32(vtrn1q_f32(r2, r3));
            float64x2_t t3 = vreinterpretq_f64_f32(vtrn2q_f32(r2, r3));
            uint16_t *d = dst + c * ld + n;
            vst1_u16(d, vreinterpret_u16_f16(vcvt_f16_f32(vreinterpretq_f32_f64(vtrn1q_f64(t0, t2)))));
            vst1_u16(d + ld, vreinterpret_u16_f16(vcvt_f16_f32(vreinterpretq_f32_f64(vtrn1q_f64(t1, t3)))));
            vst1_u16(d + 2 * ld, vreinterpret_u16_f16(vcvt_f16_f32(vreinterpretq_f32_f64(vtrn2q_f64(t0, t2)))));
            vst1_u16(d + 3 * ld, vreinterpret_u16_f16(vcvt_f16_f32(vreinterpretq_f32_f64(vtrn2q_f64(t1, t3)))));
        }
    }
    *n_done = nb;
    *c_done = cb;
}
#endif

static tile_fn pick_tile(void)
{
    switch (rustane_simd_current()) {
#ifdef RUSTANE_HAVE_X86
    case RUSTANE_SIMD_F16C: return f16c_tile;
#endif
#ifdef RUSTANE_HAVE_NEON
    case RUSTANE_SIMD_NEON: return neon_tile;
#endif
    default: return scalar_tile;
    }
}

void rustane_stage_t(uint16_t *dst, size_t dst_ld, const float *src, size_t N, size_t C)
{
    tile_fn tile = pick_tile();
    for (size_t n0 = 0; n0 < N; n0 += TILE_N) {
        size_t n1 = n0 + TILE_N < N ? n0 + TILE_N : N;
        for (size_t c0 = 0; c0 < C; c0 += TILE_C) {
            size_t c1 = c0 + TILE_C < C ? c0 + TILE_C : C;
            size_t nd, cd;
            tile(dst, dst_ld, src, C, n0, n1, c0, c1, &nd, &cd);
            scalar_t(dst, dst_ld, src, C, nd, n1, c0, c1); /* leftover rows, all channels */
            scalar_t(dst, dst_ld, src, C, n0, nd, cd, c1); /* leftover channels of the block rows */
        }
    }
}

void rustane_unstage(float *dst, size_t dst_ld, const uint16_t *src, size_t src_ld, size_t rows, size_t cols)
{
    if (dst_ld == cols && src_ld == cols) {
        rustane_f16_to_f32(dst, src, rows * cols);
        return;
    }
    for (size_t r = 0; r < rows; r++)
        rustane_f16_to_f32(dst + r * dst_ld, src + r * src_ld, cols);
}

void rustane_copy16(uint16_t *dst, size_t dst_ld, const uint16_t *src, size_t src_ld, size_t rows, size_t cols)
{
    if (dst_ld == cols && src_ld == cols) {
        memcpy(dst, src, rows * cols * sizeof(uint16_t));
        return;
    }
    for (size_t r = 0; r < rows; r++)
        memcpy(dst + r * dst_ld, src + r * src_ld, cols * sizeof(uint16_t));
}
