/* CPU-side training ops; see cpu_ops.h for the contracts.
 *
 * Loop order: buffers are channel-first [C, S], so a position's values are strided by S.
 * Reductions over channels therefore keep one accumulator per position in an [S] row and walk
 * the matrix row by row (contiguous), instead of walking each strided column. */
#include "cpu_ops.h"
#include "fastmath.h"

#include <math.h>
#include <pthread.h>
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
    double *f = malloc((half > 0 ? (size_t)half : 1) * sizeof(double));
    if (!f) return -1;
    for (int i = 0; i < half; i++) f[i] = pow(theta, -2.0 * i / (double)hd);
    const int rc = rn_rope_freq(x, out, n_heads, hd, S, f, inverse);
    free(f);
    return rc;
}

/* inv_freq [hd/2] comes from the caller (rustane.formats.arch.inv_freq) so rope scaling
 * (llama3, linear) is defined once, in Python, for the kernels' tables and this backward alike. */
int rn_rope_freq(const float *x, float *out, int n_heads, int hd, int S, const double *inv_freq, int inverse)
{
    const int half = hd / 2;
    /* cos/sin table [half, S], shared by all heads. Angles in double: pos*freq loses
     * precision in fp32 at long sequences. */
    float *cs = malloc(((size_t)half * S * 2 > 0 ? (size_t)half * S * 2 : 1) * sizeof(float));
    if (!cs) return -1;
    float *sn = cs + (size_t)half * S;
    for (int i = 0; i < half; i++) {
        const double freq = inv_freq[i];
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

/* Both loops below vectorise only with -fno-math-errno (meson.build): otherwise sqrtf keeps a
 * scalar call for errno on negative input, which v >= 0 never is. */
static void adamw_range(float *w, float *grad, float *m, float *v, size_t n, const struct rn_adamw_hyper *h,
                        float weight_decay, int zero_grad)
{
    const double bc1 = 1.0 - pow((double)h->beta1, (double)h->t);
    const double bc2 = 1.0 - pow((double)h->beta2, (double)h->t);
    const float step = (float)(h->lr / bc1);
    const float inv_sqrt_bc2 = (float)(1.0 / sqrt(bc2));
    const float decay = 1.0f - h->lr * weight_decay;
    const float beta1 = h->beta1, beta2 = h->beta2, eps = h->eps, grad_scale = h->grad_scale;
    const float omb1 = 1.0f - beta1, omb2 = 1.0f - beta2;
    for (size_t i = 0; i < n; i++) {
        const float g = grad[i] * grad_scale;
        const float mi = beta1 * m[i] + omb1 * g;
        const float vi = beta2 * v[i] + omb2 * g * g;
        m[i] = mi;
        v[i] = vi;
        w[i] = w[i] * decay - step * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
    }
    if (zero_grad) memset(grad, 0, n * sizeof *grad);
}

void rn_adamw_step(float *w, const float *grad, float *m, float *v, size_t n,
                   float lr, float beta1, float beta2, float eps, float weight_decay,
                   float grad_scale, int64_t t)
{
    const struct rn_adamw_hyper h = {lr, beta1, beta2, eps, grad_scale, t};
    adamw_range(w, (float *)grad, m, v, n, &h, weight_decay, 0);
}

/* ---- many tensors on several threads ---------------------------------------------------------
 * The element range [0, total) over all tensors in order is cut into `threads` equal parts; the
 * caller's thread runs part 0 and one pthread each runs the rest. Every element gets the same
 * arithmetic whichever thread runs it, so results do not depend on the thread count. */

struct adamw_part {
    const struct rn_adamw_tensor *ts;
    int count, zero_grad;
    size_t lo, hi; /* global element range */
    const struct rn_adamw_hyper *h;
};

static void *adamw_part_run(void *arg)
{
    const struct adamw_part *p = arg;
    size_t base = 0;
    for (int k = 0; k < p->count && base < p->hi; k++) {
        const struct rn_adamw_tensor *T = &p->ts[k];
        const size_t a = p->lo > base ? p->lo - base : 0;
        const size_t b = p->hi - base < T->n ? p->hi - base : T->n;
        if (a < b)
            adamw_range(T->w + a, T->grad + a, T->m + a, T->v + a, b - a, p->h, T->weight_decay, p->zero_grad);
        base += T->n;
    }
    return NULL;
}

enum { MAX_THREADS = 16 };

/* Runs fn over parts[0..n): parts 1.. on new threads, part 0 here; a thread that cannot be
 * started runs its part here too, so the work is always done. */
static void run_parts(void *(*fn)(void *), void *parts, size_t part_size, int n)
{
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 1; i < n; i++)
        started[i] = pthread_create(&tid[i], NULL, fn, (char *)parts + (size_t)i * part_size) == 0;
    fn(parts);
    for (int i = 1; i < n; i++) {
        if (started[i]) pthread_join(tid[i], NULL);
        else fn((char *)parts + (size_t)i * part_size);
    }
}

static int clamp_threads(int threads, size_t total, size_t min_per_thread)
{
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    const size_t useful = total / min_per_thread;
    if ((size_t)threads > useful) threads = useful > 0 ? (int)useful : 1;
    return threads;
}

/* Below this many elements per thread, starting a thread costs more than it saves. */
enum { MIN_ELEMS_PER_THREAD = 1 << 17 };

void rn_adamw_tensors(const struct rn_adamw_tensor *ts, int count, const struct rn_adamw_hyper *h,
                      int zero_grad, int threads)
{
    size_t total = 0;
    for (int k = 0; k < count; k++) total += ts[k].n;
    const int nt = clamp_threads(threads, total, MIN_ELEMS_PER_THREAD);
    struct adamw_part parts[MAX_THREADS];
    for (int i = 0; i < nt; i++) {
        parts[i] = (struct adamw_part){ts, count, zero_grad, total * i / nt, total * (i + 1) / nt, h};
    }
    run_parts(adamw_part_run, parts, sizeof parts[0], nt);
}

/* Sum of squares of one chunk in double, four partial sums (breaks the add dependency chain). */
static double sumsq_chunk(const float *x, size_t n)
{
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

/* Every tensor is cut into SUMSQ_CHUNK-element chunks; each chunk's sum goes to its own slot and
 * the slots are added in order at the end, so the result is the same for any thread count. */
enum { SUMSQ_CHUNK = 1 << 16 };

double rn_sumsq(const float *x, size_t n)
{
    double s = 0.0; /* the chunk order of rn_sumsq_tensors, so one tensor gives the same value */
    for (size_t off = 0; off < n; off += SUMSQ_CHUNK)
        s += sumsq_chunk(x + off, n - off < SUMSQ_CHUNK ? n - off : SUMSQ_CHUNK);
    return s;
}

struct sumsq_part {
    const float *const *xs;
    const size_t *ns;
    int count;
    size_t lo, hi; /* global chunk range */
    double *slots;
};

static void *sumsq_part_run(void *arg)
{
    const struct sumsq_part *p = arg;
    size_t chunk = 0;
    for (int k = 0; k < p->count && chunk < p->hi; k++) {
        const size_t nchunks = (p->ns[k] + SUMSQ_CHUNK - 1) / SUMSQ_CHUNK;
        for (size_t c = 0; c < nchunks; c++, chunk++) {
            if (chunk < p->lo || chunk >= p->hi) continue;
            const size_t off = c * SUMSQ_CHUNK;
            const size_t len = p->ns[k] - off < SUMSQ_CHUNK ? p->ns[k] - off : SUMSQ_CHUNK;
            p->slots[chunk] = sumsq_chunk(p->xs[k] + off, len);
        }
    }
    return NULL;
}

double rn_sumsq_tensors(const float *const *xs, const size_t *ns, int count, int threads)
{
    size_t nchunks = 0, total = 0;
    for (int k = 0; k < count; k++) {
        nchunks += (ns[k] + SUMSQ_CHUNK - 1) / SUMSQ_CHUNK;
        total += ns[k];
    }
    if (nchunks == 0) return 0.0;
    double *slots = malloc(nchunks * sizeof *slots);
    if (!slots) return NAN;
    const int nt = clamp_threads(threads, total, MIN_ELEMS_PER_THREAD);
    struct sumsq_part parts[MAX_THREADS];
    for (int i = 0; i < nt; i++)
        parts[i] = (struct sumsq_part){xs, ns, count, nchunks * i / nt, nchunks * (i + 1) / nt, slots};
    run_parts(sumsq_part_run, parts, sizeof parts[0], nt);
    double s = 0.0;
    for (size_t c = 0; c < nchunks; c++) s += slots[c];
    free(slots);
    return s;
}

/* ---- softmax cross-entropy ------------------------------------------------------------------ */

/* CE blocking: a block of CE_ROWS rows x CE_COLS positions (<= 128 KB, fits L2) stays in cache
 * from its max to its exp pass, so the logits stream from memory once for max, exp and sum, and
 * once more to normalise (32 rows measured 8% slower at V = 32000, S = 256). */
enum { CE_ROWS = 64, CE_COLS = 512 };

/* CE of S columns (positions) of [V, ld]-strided logits: writes dlogits of those columns (scaled
 * by k) and each column's loss to col_loss. Columns are independent, so a block of them gives
 * the same bits as the whole matrix. Returns -1 on allocation failure. */
RN_SIMD_CLONES
static int ce_cols(const float *logits, const int32_t *targets, float *dlogits, int V, int S, size_t ld,
                   float k, const float *w, double *col_loss)
{
    const int nblk = (V + CE_ROWS - 1) / CE_ROWS;
    /* Per-position rows: running max, block max / final factor, target logit; sum of
     * exp(logit - running max) in double (big V); bmx [nblk, S]: the running max each row
     * block's exps were taken against, to rebase them on the final max. */
    float *mx = malloc((size_t)S * 3 * sizeof(float));
    double *sum = calloc((size_t)S, sizeof(double));
    float *bmx = malloc((size_t)(nblk > 0 ? nblk : 1) * S * sizeof(float));
    if (!mx || !sum || !bmx) { free(mx); free(sum); free(bmx); return -1; }
    float *bm = mx + S, *tl = mx + 2 * (size_t)S;
    for (int s = 0; s < S; s++) {
        mx[s] = -INFINITY;
        tl[s] = logits[(size_t)targets[s] * ld + s]; /* read before dlogits may overwrite it */
    }
    for (int s0 = 0; s0 < S; s0 += CE_COLS) {
        const int s1 = s0 + CE_COLS < S ? s0 + CE_COLS : S;
        for (int b = 0; b < nblk; b++) {
            const int v0 = b * CE_ROWS, v1 = v0 + CE_ROWS < V ? v0 + CE_ROWS : V;
            for (int s = s0; s < s1; s++) bm[s] = mx[s];
            for (int v = v0; v < v1; v++) {
                const float *lr = logits + (size_t)v * ld;
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
                    const float *lr = logits + (size_t)(v + i) * ld;
                    float *dr = dlogits + (size_t)(v + i) * ld;
                    for (int s = s0; s < s1; s++) dr[s] = exp_nonpos(lr[s] - mx[s]);
                }
                const float *d0 = dlogits + (size_t)v * ld, *d1 = d0 + ld, *d2 = d1 + ld, *d3 = d2 + ld;
                for (int s = s0; s < s1; s++)
                    sum[s] += ((double)d0[s] + (double)d1[s]) + ((double)d2[s] + (double)d3[s]);
            }
            for (; v < v1; v++) {
                const float *lr = logits + (size_t)v * ld;
                float *dr = dlogits + (size_t)v * ld;
                for (int s = s0; s < s1; s++) {
                    const float e = exp_nonpos(lr[s] - mx[s]);
                    dr[s] = e;
                    sum[s] += e;
                }
            }
        }
    }
    for (int s = 0; s < S; s++) col_loss[s] = log(sum[s]) + (double)mx[s] - (double)tl[s];
    for (int b = 0; b < nblk; b++) {
        const int v0 = b * CE_ROWS, v1 = v0 + CE_ROWS < V ? v0 + CE_ROWS : V;
        /* Factor k/sum, times exp(block max - final max) where the max rose after the block;
         * bm holds it so the row loop is one multiply. */
        const float *br = bmx + (size_t)b * S;
        for (int s = 0; s < S; s++) {
            double f = (double)(w ? k * w[s] : k) / sum[s];
            if (br[s] != mx[s]) f *= exp((double)br[s] - (double)mx[s]);
            bm[s] = (float)f;
        }
        for (int v = v0; v < v1; v++) {
            float *dr = dlogits + (size_t)v * ld;
            for (int s = 0; s < S; s++) dr[s] *= bm[s];
        }
    }
    for (int s = 0; s < S; s++) dlogits[(size_t)targets[s] * ld + s] -= w ? k * w[s] : k;
    free(mx);
    free(sum);
    free(bmx);
    return 0;
}

struct ce_part {
    const float *logits;
    const int32_t *targets;
    float *dlogits;
    int V, S;
    size_t ld;
    float k;
    const float *w;
    double *col_loss;
    int rc;
};

static void *ce_part_run(void *arg)
{
    struct ce_part *p = arg;
    p->rc = p->S > 0 ? ce_cols(p->logits, p->targets, p->dlogits, p->V, p->S, p->ld, p->k, p->w, p->col_loss) : 0;
    return NULL;
}

static double cross_entropy(const float *logits, const int32_t *targets, float *dlogits, int V, int S,
                            float k, const float *w, int threads)
{
    if (S <= 0) return 0.0;
    double *col_loss = malloc((size_t)S * sizeof(double));
    if (!col_loss) return NAN;
    /* column blocks of a multiple of 8 positions (whole vectors), at least 32 each */
    const int nt = clamp_threads(threads, (size_t)S, 32);
    struct ce_part parts[MAX_THREADS];
    int c0 = 0;
    for (int i = 0; i < nt; i++) {
        int c1 = i == nt - 1 ? S : (int)(((long long)S * (i + 1) / nt) & ~7LL);
        if (c1 < c0) c1 = c0;
        parts[i] = (struct ce_part){logits + c0, targets + c0, dlogits + c0, V, c1 - c0, (size_t)S,
                                    k, w ? w + c0 : NULL, col_loss + c0, 0};
        c0 = c1;
    }
    run_parts(ce_part_run, parts, sizeof parts[0], nt);
    int failed = 0;
    for (int i = 0; i < nt; i++) failed |= parts[i].rc;
    double loss = 0.0;
    /* in position order: any thread count; a zero weight drops the position even if its loss
     * is infinite */
    for (int s = 0; s < S; s++) {
        if (!w) loss += col_loss[s];
        else if (w[s] != 0.0f) loss += (double)w[s] * col_loss[s];
    }
    free(col_loss);
    return failed ? NAN : loss;
}

double rn_cross_entropy(const float *logits, const int32_t *targets, float *dlogits,
                        int V, int S, float grad_scale, int threads)
{
    return S <= 0 ? 0.0 : cross_entropy(logits, targets, dlogits, V, S, grad_scale / (float)S, NULL, threads) / S;
}

double rn_cross_entropy_weighted(const float *logits, const int32_t *targets, const float *weights,
                                 float *dlogits, int V, int S, float grad_scale, int threads)
{
    return cross_entropy(logits, targets, dlogits, V, S, grad_scale, weights, threads);
}

