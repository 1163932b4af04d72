/* fp32 <-> fp16 conversion; see fp16.h for the shared semantics of all paths. */
#include "fp16.h"

#include <stdatomic.h>
#include <string.h>

#include "simd.h"

#ifdef RUSTANE_HAVE_X86
#include <cpuid.h> /* runtime F16C detection */
#endif

/* ---- portable scalar reference (integer only, independent of the FPU rounding mode) ---------- */

static inline uint32_t f32_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float bits_f32(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

static inline uint16_t scalar_f32_to_f16(uint32_t x)
{
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    uint32_t e = ax >> 23;
    if (e == 0xffu) /* inf, or NaN made quiet with its top 9 payload bits kept, as F16C/NEON do */
        return (uint16_t)(sign | (ax == 0x7f800000u ? 0x7c00u : 0x7e00u | ((ax >> 13) & 0x3ffu)));
    if (e >= 143) /* >= 2^16: beyond the largest finite half even before rounding */
        return (uint16_t)(sign | 0x7c00u);
    if (e >= 113) { /* normal half range: rebias the exponent, round the 13 dropped bits */
        uint32_t h = (ax - (112u << 23)) >> 13;
        uint32_t rem = ax & 0x1fffu;
        h += (rem > 0x1000u) | ((rem == 0x1000u) & (h & 1u)); /* a carry may reach inf: correct */
        return (uint16_t)(sign | h);
    }
    if (e < 102) /* below 2^-25 (half of the smallest subnormal): rounds to zero */
        return (uint16_t)sign;
    /* half subnormal: value = m * 2^(e-150), unit 2^-24, so h = m >> (126 - e), rounded to even */
    uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    uint32_t sh = 126u - e; /* 14..24 */
    uint32_t h = m >> sh;
    uint32_t rem = m & ((1u << sh) - 1u);
    uint32_t half = 1u << (sh - 1u);
    h += (rem > half) | ((rem == half) & (h & 1u)); /* may carry into the smallest normal: correct */
    return (uint16_t)(sign | h);
}

static inline uint32_t scalar_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    if (e == 0x1fu) /* inf, or NaN made quiet (hardware converters set the quiet bit too) */
        return sign | 0x7f800000u | (m ? 0x400000u | (m << 13) : 0u);
    if (e == 0) {
        if (m == 0)
            return sign;
        /* subnormal: shift the leading one up to the implicit position */
        int32_t ex = 113;
        while (!(m & 0x400u)) {
            m <<= 1;
            ex--;
        }
        return sign | ((uint32_t)ex << 23) | ((m & 0x3ffu) << 13);
    }
    return sign | ((e + 112u) << 23) | (m << 13);
}

uint16_t rustane_f32_to_f16_one(float x) { return scalar_f32_to_f16(f32_bits(x)); }
float rustane_f16_to_f32_one(uint16_t h) { return bits_f32(scalar_f16_to_f32(h)); }

static void scalar_to_f16(uint16_t *dst, const float *src, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = scalar_f32_to_f16(f32_bits(src[i]));
}

static void scalar_to_f32(float *dst, const uint16_t *src, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = bits_f32(scalar_f16_to_f32(src[i]));
}

/* ---- F16C (x86-64): compiled for avx+f16c by attribute so the rest of the file stays baseline ---- */

#ifdef RUSTANE_HAVE_X86
__attribute__((target("avx,f16c"))) static void f16c_to_f16(uint16_t *dst, const float *src, size_t n)
{
    size_t i = 0;
    for (; i + 32 <= n; i += 32) { /* 4 independent converts in flight hide the 4-cycle latency */
        __m128i a = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        __m128i b = _mm256_cvtps_ph(_mm256_loadu_ps(src + i + 8), _MM_FROUND_TO_NEAREST_INT);
        __m128i c = _mm256_cvtps_ph(_mm256_loadu_ps(src + i + 16), _MM_FROUND_TO_NEAREST_INT);
        __m128i d = _mm256_cvtps_ph(_mm256_loadu_ps(src + i + 24), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(dst + i), a);
        _mm_storeu_si128((__m128i *)(dst + i + 8), b);
        _mm_storeu_si128((__m128i *)(dst + i + 16), c);
        _mm_storeu_si128((__m128i *)(dst + i + 24), d);
    }
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    scalar_to_f16(dst + i, src + i, n - i);
}

__attribute__((target("avx,f16c"))) static void f16c_to_f32(float *dst, const uint16_t *src, size_t n)
{
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i)));
        __m256 b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i + 8)));
        __m256 c = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i + 16)));
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i + 24)));
        _mm256_storeu_ps(dst + i, a);
        _mm256_storeu_ps(dst + i + 8, b);
        _mm256_storeu_ps(dst + i + 16, c);
        _mm256_storeu_ps(dst + i + 24, d);
    }
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    scalar_to_f32(dst + i, src + i, n - i);
}

__attribute__((target("avx,f16c"))) static void f16c_round(float *v, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT));
        __m256 b = _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(v + i + 8), _MM_FROUND_TO_NEAREST_INT));
        _mm256_storeu_ps(v + i, a);
        _mm256_storeu_ps(v + i + 8, b);
    }
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(v + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT)));
    for (; i < n; i++) v[i] = bits_f32(scalar_f16_to_f32(scalar_f32_to_f16(f32_bits(v[i]))));
}

static int x86_has_f16c(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    /* OSXSAVE (27), AVX (28), F16C (29); then the OS must save the YMM state (XCR0 bits 1 and 2) */
    if ((c & (7u << 27)) != (7u << 27))
        return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    return (lo & 6u) == 6u;
}
#endif

/* ---- NEON (arm64) ------------------------------------------------------------------------------ */

#ifdef RUSTANE_HAVE_NEON
static void neon_to_f16(uint16_t *dst, const float *src, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        float16x8_t a = vcvt_high_f16_f32(vcvt_f16_f32(vld1q_f32(src + i)), vld1q_f32(src + i + 4));
        float16x8_t b = vcvt_high_f16_f32(vcvt_f16_f32(vld1q_f32(src + i + 8)), vld1q_f32(src + i + 12));
        vst1q_u16(dst + i, vreinterpretq_u16_f16(a));
        vst1q_u16(dst + i + 8, vreinterpretq_u16_f16(b));
    }
    for (; i + 4 <= n; i += 4)
        vst1_u16(dst + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(src + i))));
    scalar_to_f16(dst + i, src + i, n - i);
}

static void neon_to_f32(float *dst, const uint16_t *src, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        float16x8_t a = vreinterpretq_f16_u16(vld1q_u16(src + i));
        float16x8_t b = vreinterpretq_f16_u16(vld1q_u16(src + i + 8));
        vst1q_f32(dst + i, vcvt_f32_f16(vget_low_f16(a)));
        vst1q_f32(dst + i + 4, vcvt_high_f32_f16(a));
        vst1q_f32(dst + i + 8, vcvt_f32_f16(vget_low_f16(b)));
        vst1q_f32(dst + i + 12, vcvt_high_f32_f16(b));
    }
    for (; i + 4 <= n; i += 4)
        vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + i))));
    scalar_to_f32(dst + i, src + i, n - i);
}
#endif

#ifdef RUSTANE_HAVE_NEON
static void neon_round(float *v, size_t n)
{
    size_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(v + i, vcvt_f32_f16(vcvt_f16_f32(vld1q_f32(v + i))));
    for (; i < n; i++) v[i] = bits_f32(scalar_f16_to_f32(scalar_f32_to_f16(f32_bits(v[i]))));
}
#endif

/* ---- dispatch ---------------------------------------------------------------------------------- */

static atomic_int g_path = -1; /* -1: not decided yet */

rustane_simd rustane_simd_best(void)
{
#if defined(RUSTANE_HAVE_NEON)
    return RUSTANE_SIMD_NEON;
#elif defined(RUSTANE_HAVE_X86)
    return x86_has_f16c() ? RUSTANE_SIMD_F16C : RUSTANE_SIMD_SCALAR;
#else
    return RUSTANE_SIMD_SCALAR;
#endif
}

rustane_simd rustane_simd_current(void)
{
    int p = atomic_load_explicit(&g_path, memory_order_relaxed);
    if (p < 0) { /* racing first callers all store the same answer */
        p = (int)rustane_simd_best();
        atomic_store_explicit(&g_path, p, memory_order_relaxed);
    }
    return (rustane_simd)p;
}

int rustane_simd_select(rustane_simd path)
{
    rustane_simd best = rustane_simd_best();
    if (path != RUSTANE_SIMD_SCALAR && path != best)
        return -1;
    atomic_store_explicit(&g_path, (int)path, memory_order_relaxed);
    return 0;
}

const char *rustane_simd_name(rustane_simd path)
{
    switch (path) {
    case RUSTANE_SIMD_F16C: return "f16c";
    case RUSTANE_SIMD_NEON: return "neon";
    default: return "scalar";
    }
}

void rustane_f32_to_f16(uint16_t *dst, const float *src, size_t n)
{
    switch (rustane_simd_current()) {
#ifdef RUSTANE_HAVE_X86
    case RUSTANE_SIMD_F16C: f16c_to_f16(dst, src, n); return;
#endif
#ifdef RUSTANE_HAVE_NEON
    case RUSTANE_SIMD_NEON: neon_to_f16(dst, src, n); return;
#endif
    default: scalar_to_f16(dst, src, n); return;
    }
}

void rustane_f16_to_f32(float *dst, const uint16_t *src, size_t n)
{
    switch (rustane_simd_current()) {
#ifdef RUSTANE_HAVE_X86
    case RUSTANE_SIMD_F16C: f16c_to_f32(dst, src, n); return;
#endif
#ifdef RUSTANE_HAVE_NEON
    case RUSTANE_SIMD_NEON: neon_to_f32(dst, src, n); return;
#endif
    default: scalar_to_f32(dst, src, n); return;
    }
}

void rustane_round_f16(float *v, size_t n)
{
    switch (rustane_simd_current()) {
#ifdef RUSTANE_HAVE_X86
    case RUSTANE_SIMD_F16C: f16c_round(v, n); return;
#endif
#ifdef RUSTANE_HAVE_NEON
    case RUSTANE_SIMD_NEON: neon_round(v, n); return;
#endif
    default:
        for (size_t i = 0; i < n; i++) v[i] = bits_f32(scalar_f16_to_f32(scalar_f32_to_f16(f32_bits(v[i]))));
        return;
    }
}
