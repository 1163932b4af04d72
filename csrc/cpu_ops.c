/* CPU-side training ops; see cpu_ops.h for the contracts.
 *
 * Loop order: buffers are channel-first [C, S], so a position's values are strided by S.
 * Reductions over channels therefore keep one accumulator per position in an [S] row and walk
 * the matrix row by row (contiguous), instead of walking each strided column. */
#include "cpu_ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void rn_rmsnorm_fwd(const float *x, const float *w, float *out, float *rrms,
                    int C, int S, float eps)
{
    for (int s = 0; s < S; s++) rrms[s] = 0.0f;
    for (int c = 0; c < C; c++) {
        const float *xr = x + (size_t)c * S;
        for (int s = 0; s < S; s++) rrms[s] += xr[s] * xr[s];
    }
    for (int s = 0; s < S; s++) rrms[s] = 1.0f / sqrtf(rrms[s] / (float)C + eps);
    for (int c = 0; c < C; c++) {
        const float *xr = x + (size_t)c * S;
        float *orow = out + (size_t)c * S;
        const float wc = w[c];
        for (int s = 0; s < S; s++) orow[s] = xr[s] * rrms[s] * wc;
    }
}

int rn_rmsnorm_bwd(const float *dy, const float *x, const float *w, const float *rrms,
                   float *dx, float *dw, int C, int S)
{
    /* coef[s] = r^2/C * sum_c dy*w*x, the part of the gradient that flows through rrms. */
    float *coef = calloc(S > 0 ? (size_t)S : 1, sizeof(float));
    if (!coef) return -1;
    for (int c = 0; c < C; c++) {
        const float *dyr = dy + (size_t)c * S, *xr = x + (size_t)c * S;
        const float wc = w[c];
        float dwc = 0.0f;
        for (int s = 0; s < S; s++) {
            const float g = dyr[s] * xr[s];
            coef[s] += g * wc;
            dwc += g * rrms[s];
        }
        dw[c] += dwc;
    }
    for (int s = 0; s < S; s++) coef[s] *= rrms[s] * rrms[s] / (float)C;
    for (int c = 0; c < C; c++) {
        const float *dyr = dy + (size_t)c * S, *xr = x + (size_t)c * S;
        float *dxr = dx + (size_t)c * S;
        const float wc = w[c];
        for (int s = 0; s < S; s++) dxr[s] = rrms[s] * (wc * dyr[s] - xr[s] * coef[s]);
    }
    free(coef);
    return 0;
}

int rn_rope(const float *x, float *out, int n_heads, int hd, int S, double theta, int inverse)
{
    const int half = hd / 2;
    /* cos/sin table [half, S], shared by all heads. Angles in double: pos*freq loses
     * precision in fp32 at long sequences. */
    float *cs = malloc(((size_t)half * S * 2 > 0 ? (size_t)half * S * 2 : 1) * sizeof(float));
    if (!cs) return -1;
    float *sn = cs + (size_t)half * S;
    for (int i = 0; i < half; i++) {
        const double freq = pow(theta, -2.0 * i / (double)hd);
        for (int s = 0; s < S; s++) {
            const double a = (double)s * freq;
            cs[(size_t)i * S + s] = (float)cos(a);
            sn[(size_t)i * S + s] = inverse ? (float)-sin(a) : (float)sin(a);
        }
    }
    for (int h = 0; h < n_heads; h++) {
        for (int i = 0; i < half; i++) {
            const size_t r0 = ((size_t)h * hd + 2 * (size_t)i) * S, r1 = r0 + S;
            const float *c = cs + (size_t)i * S, *sv = sn + (size_t)i * S;
            for (int s = 0; s < S; s++) {
                const float a = x[r0 + s], b = x[r1 + s];
                out[r0 + s] = a * c[s] - b * sv[s];
                out[r1 + s] = a * sv[s] + b * c[s];
            }
        }
    }
    free(cs);
    return 0;
}

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

/* CE blocking: a block of CE_ROWS rows x CE_COLS positions (<= 128 KB, fits L2) stays in cache
 * from its max to its exp pass, so the logits stream from memory once for max, exp and sum, and
 * once more to normalise (32 rows measured 8% slower at V = 32000, S = 256). */
enum { CE_ROWS = 64, CE_COLS = 512 };

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
/* The exp loop is compute-bound: an AVX2 clone (picked at load time by a glibc ifunc) runs it
 * 8 wide instead of SSE2's 4. ISO C mode (-std=c11) keeps -ffp-contract=off, so both clones
 * round identically (no FMA contraction in either). */
#define RN_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define RN_SIMD_CLONES
#endif

RN_SIMD_CLONES
double rn_cross_entropy(const float *logits, const int32_t *targets, float *dlogits,
                        int V, int S, float grad_scale)
{
    if (S <= 0) return 0.0;
    const int nblk = (V + CE_ROWS - 1) / CE_ROWS;
    /* Per-position rows: running max, block max / final factor, target logit; sum of
     * exp(logit - running max) in double (big V); bmx [nblk, S]: the running max each row
     * block's exps were taken against, to rebase them on the final max. */
    float *mx = malloc((size_t)S * 3 * sizeof(float));
    double *sum = calloc((size_t)S, sizeof(double));
    float *bmx = malloc((size_t)(nblk > 0 ? nblk : 1) * S * sizeof(float));
    if (!mx || !sum || !bmx) { free(mx); free(sum); free(bmx); return NAN; }
    float *bm = mx + S, *tl = mx + 2 * (size_t)S;
    for (int s = 0; s < S; s++) {
        mx[s] = -INFINITY;
        tl[s] = logits[(size_t)targets[s] * S + s]; /* read before dlogits may overwrite it */
    }
    for (int s0 = 0; s0 < S; s0 += CE_COLS) {
        const int s1 = s0 + CE_COLS < S ? s0 + CE_COLS : S;
        for (int b = 0; b < nblk; b++) {
            const int v0 = b * CE_ROWS, v1 = v0 + CE_ROWS < V ? v0 + CE_ROWS : V;
            for (int s = s0; s < s1; s++) bm[s] = mx[s];
            for (int v = v0; v < v1; v++) {
                const float *lr = logits + (size_t)v * S;
                for (int s = s0; s < s1; s++) bm[s] = lr[s] > bm[s] ? lr[s] : bm[s];
            }
            /* A new maximum rescales the sum so far, in double so that a max rising block by
             * block (sorted logits) adds no error beyond the sums' own rounding. */
            float *br = bmx + (size_t)b * S;
            for (int s = s0; s < s1; s++) {
                if (bm[s] > mx[s]) {
                    sum[s] *= exp((double)mx[s] - (double)bm[s]);
                    mx[s] = bm[s];
                }
                br[s] = mx[s];
            }
            int v = v0;
            /* Four rows per sweep of the double sums (a quarter of their loads and stores); the
             * exps go to dlogits first and are summed from there (in L1), which keeps each loop
             * simple enough for the vectoriser's alias checks (dlogits may alias logits). */
            for (; v + 4 <= v1; v += 4) {
                for (int i = 0; i < 4; i++) {
                    const float *lr = logits + (size_t)(v + i) * S;
                    float *dr = dlogits + (size_t)(v + i) * S;
                    for (int s = s0; s < s1; s++) dr[s] = exp_nonpos(lr[s] - mx[s]);
                }
                const float *d0 = dlogits + (size_t)v * S, *d1 = d0 + S, *d2 = d1 + S, *d3 = d2 + S;
                for (int s = s0; s < s1; s++)
                    sum[s] += ((double)d0[s] + (double)d1[s]) + ((double)d2[s] + (double)d3[s]);
            }
            for (; v < v1; v++) {
                const float *lr = logits + (size_t)v * S;
                float *dr = dlogits + (size_t)v * S;
                for (int s = s0; s < s1; s++) {
                    const float e = exp_nonpos(lr[s] - mx[s]);
                    dr[s] = e;
                    sum[s] += e;
                }
            }
        }
    }
    double loss = 0.0;
    const float k = grad_scale / (float)S;
    for (int s = 0; s < S; s++) loss += log(sum[s]) + (double)mx[s] - (double)tl[s];
    for (int b = 0; b < nblk; b++) {
        const int v0 = b * CE_ROWS, v1 = v0 + CE_ROWS < V ? v0 + CE_ROWS : V;
        /* Factor k/sum, times exp(block max - final max) where the max rose after the block;
         * bm holds it so the row loop is one multiply. */
        const float *br = bmx + (size_t)b * S;
        for (int s = 0; s < S; s++) {
            double f = (double)k / sum[s];
            if (br[s] != mx[s]) f *= exp((double)br[s] - (double)mx[s]);
            bm[s] = (float)f;
        }
        for (int v = v0; v < v1; v++) {
            float *dr = dlogits + (size_t)v * S;
            for (int s = 0; s < S; s++) dr[s] *= bm[s];
        }
    }
    for (int s = 0; s < S; s++) dlogits[(size_t)targets[s] * S + s] -= k;
    free(mx);
    free(sum);
    free(bmx);
    return loss / S;
}

/* Embedding rows are contiguous in D while [D, S] columns are strided; a block of positions
 * keeps both sides' cache lines live while the block is transposed. */
enum { EMB_BLOCK = 16 };

void rn_embedding_fwd(const float *E, const int32_t *tokens, float *out, int D, int S)
{
    for (int s0 = 0; s0 < S; s0 += EMB_BLOCK) {
        const int s1 = s0 + EMB_BLOCK < S ? s0 + EMB_BLOCK : S;
        for (int d = 0; d < D; d++) {
            float *orow = out + (size_t)d * S;
            for (int s = s0; s < s1; s++) orow[s] = E[(size_t)tokens[s] * D + d];
        }
    }
}

void rn_embedding_bwd(const float *dx, const int32_t *tokens, float *dE, int D, int S)
{
    for (int s0 = 0; s0 < S; s0 += EMB_BLOCK) {
        const int s1 = s0 + EMB_BLOCK < S ? s0 + EMB_BLOCK : S;
        for (int d = 0; d < D; d++) {
            const float *xr = dx + (size_t)d * S;
            for (int s = s0; s < s1; s++) dE[(size_t)tokens[s] * D + d] += xr[s];
        }
    }
}

void rn_adamw_step(float *w, const float *grad, float *m, float *v, size_t n,
                   float lr, float beta1, float beta2, float eps, float weight_decay,
                   float grad_scale, int64_t t)
{
    const double bc1 = 1.0 - pow((double)beta1, (double)t);
    const double bc2 = 1.0 - pow((double)beta2, (double)t);
    const float step = (float)(lr / bc1);
    const float inv_sqrt_bc2 = (float)(1.0 / sqrt(bc2));
    const float decay = 1.0f - lr * weight_decay;
    const float omb1 = 1.0f - beta1, omb2 = 1.0f - beta2;
    for (size_t i = 0; i < n; i++) {
        const float g = grad[i] * grad_scale;
        const float mi = beta1 * m[i] + omb1 * g;
        const float vi = beta2 * v[i] + omb2 * g * g;
        m[i] = mi;
        v[i] = vi;
        w[i] = w[i] * decay - step * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
    }
}

double rn_sumsq(const float *x, size_t n)
{
    /* Four partial sums: breaks the add dependency chain and halves rounding growth. */
    double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        a0 += (double)x[i] * x[i];
        a1 += (double)x[i + 1] * x[i + 1];
        a2 += (double)x[i + 2] * x[i + 2];
        a3 += (double)x[i + 3] * x[i + 3];
    }
    for (; i < n; i++) a0 += (double)x[i] * x[i];
    return (a0 + a1) + (a2 + a3);
}
