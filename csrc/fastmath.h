/* Vectorisable fp32 helpers shared by the CPU training ops and the simulator's MIL ops. */
#ifndef RUSTANE_FASTMATH_H
#define RUSTANE_FASTMATH_H

#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
/* exp loops are compute-bound: an AVX2 clone (picked at load time by a glibc ifunc) runs it
 * 8 wide instead of SSE2's 4. ISO C mode (-std=c11) keeps -ffp-contract=off, so both clones
 * round identically (no FMA contraction in either). */
#define RN_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define RN_SIMD_CLONES
#endif

/* exp(x) for x <= 0 without calls or branches, so the CE loop over positions vectorises
 * (libm expf is a scalar call: 8M of them dominated CE at V = 32000).
 * x = n*ln2 + r with n = round(x/ln2), |r| <= ln2/2; exp(r) by its degree-7 Taylor polynomial
 * (truncation < 5e-9 relative, so fp32 rounding in Horner, ~1 ulp, dominates); 2^n is built in
 * the exponent bits. ln2 is split in two (Cody-Waite): n*LN2_HI is exact in fp32 for |n| < 2^15,
 * which keeps r accurate without FMA.
 * Out-of-range inputs are masked with integer compares on the bits: gcc will not if-convert a
 * float compare under the default -ftrapping-math, and the branch would stop vectorisation.
 * Finite x < -87.33 and -inf give 0 (expf would give a subnormal; it only feeds sums >= 1 here);
 * NaN propagates through r, so the CE loss stays NaN for NaN or +inf logits. Valid for x <= 88. */
static inline float exp_nonpos(float x)
{
    const float LOG2E = 1.44269504088896341f;
    const float LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
    /* 1.5 * 2^23: adding it rounds to an integer (to nearest even) held in the low mantissa bits. */
    const float ROUNDER = 12582912.0f;
    const uint32_t ROUNDER_BITS = 0x4B400000u;
    const uint32_t CUT_BITS = 0xC2AEA8F6u;    /* -87.33f: above it n >= -126, 2^n is normal */
    const uint32_t NEG_INF_BITS = 0xFF800000u; /* larger bit patterns are negative NaNs */
    const float t = x * LOG2E + ROUNDER;
    const float n = t - ROUNDER;
    uint32_t tb, xb;
    memcpy(&tb, &t, sizeof tb);
    memcpy(&xb, &x, sizeof xb);
    /* The low mantissa bits of t hold 2^22 + n, so tb - ROUNDER_BITS = n (mod 2^32); adding the
     * bias and shifting builds 2^n with a clear mantissa. */
    const uint32_t sbits = (tb - ROUNDER_BITS + 127u) << 23;
    float scale;
    memcpy(&scale, &sbits, sizeof scale);
    const float r = (x - n * LN2_HI) - n * LN2_LO;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const float e = p * scale;
    /* Sign-magnitude bits: for negative x, a larger pattern is a more negative value. */
    const uint32_t underflow = (uint32_t)(xb > CUT_BITS) & (uint32_t)(xb <= NEG_INF_BITS);
    uint32_t eb;
    memcpy(&eb, &e, sizeof eb);
    eb &= underflow - 1u; /* all ones keeps e, zero gives +0 */
    float out;
    memcpy(&out, &eb, sizeof out);
    return out;
}

#endif /* RUSTANE_FASTMATH_H */
