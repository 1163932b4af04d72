/* CPU-side training ops; see cpu_ops.h for the contracts.
 *
 * Loop order: buffers are channel-first [C, S], so a position's values are strided by S.
 * Reductions over channels therefore keep one accumulator per position in an [S] row and walk
 * the matrix row by row (contiguous), instead of walking each strided column. */
#include "cpu_ops.h"

#include <math.h>
#include <stdlib.h>

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

double rn_cross_entropy(const float *logits, const int32_t *targets, float *dlogits,
                        int V, int S, float grad_scale)
{
    if (S <= 0) return 0.0;
    /* Per-position rows: running max, target logit, and sum of exp (double for big V). */
    float *mx = malloc((size_t)S * 2 * sizeof(float));
    double *sum = calloc((size_t)S, sizeof(double));
    if (!mx || !sum) { free(mx); free(sum); return NAN; }
    float *tl = mx + S;
    for (int s = 0; s < S; s++) {
        mx[s] = -INFINITY;
        tl[s] = logits[(size_t)targets[s] * S + s]; /* read before dlogits may overwrite it */
    }
    for (int v = 0; v < V; v++) {
        const float *lr = logits + (size_t)v * S;
        for (int s = 0; s < S; s++) mx[s] = lr[s] > mx[s] ? lr[s] : mx[s];
    }
    for (int v = 0; v < V; v++) {
        const float *lr = logits + (size_t)v * S;
        float *dr = dlogits + (size_t)v * S;
        for (int s = 0; s < S; s++) {
            const float e = expf(lr[s] - mx[s]);
            dr[s] = e;
            sum[s] += e;
        }
    }
    double loss = 0.0;
    const float k = grad_scale / (float)S;
    /* Reuse mx as the per-position factor k/sum so the normalising pass is one multiply. */
    for (int s = 0; s < S; s++) {
        loss += log(sum[s]) + (double)mx[s] - (double)tl[s];
        mx[s] = (float)(k / sum[s]);
    }
    for (int v = 0; v < V; v++) {
        float *dr = dlogits + (size_t)v * S;
        for (int s = 0; s < S; s++) dr[s] *= mx[s];
    }
    for (int s = 0; s < S; s++) dlogits[(size_t)targets[s] * S + s] -= k;
    free(mx);
    free(sum);
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
