/* CPU-side training ops for rustane: RMSNorm, RoPE, softmax cross-entropy, embedding,
 * AdamW, sum of squares.
 *
 * Layout: activations are channel-first fp32 `[C, S]`, element (c, s) at `c*S + s`, the same
 * layout as an ANE buffer `[1, C, 1, S]` (docs/design.md). Every pointer is to packed,
 * C-contiguous fp32 (or int32 for token ids). Functions never allocate more than an `[S]`
 * scratch row; those that do return 0 on success and -1 when malloc fails.
 *
 * None of these functions touch Python objects, so callers run them without the GIL.
 */
#ifndef RUSTANE_CPU_OPS_H
#define RUSTANE_CPU_OPS_H

#include <stddef.h>
#include <stdint.h>

/* RMSNorm forward.
 *   x [C, S], w [C]  ->  out [C, S] = x * rrms[s] * w[c],  rrms [S] = 1/sqrt(mean_c x^2 + eps).
 * `out` may alias `x`. */
void rn_rmsnorm_fwd(const float *x, const float *w, float *out, float *rrms,
                    int C, int S, float eps);

/* RMSNorm backward, given the forward's input x and its rrms.
 *   dx[c,s] = r[s] * (w[c]*dy[c,s] - x[c,s] * r[s]^2/C * sum_c' dy*w*x)   (written, not added)
 *   dw[c]  += sum_s dy[c,s] * x[c,s] * r[s]                               (accumulated)
 * The upstream ANE code multiplies the whole bracket by w, which is wrong when w != 1.
 * `dx` may alias `dy`. Returns -1 on allocation failure. */
int rn_rmsnorm_bwd(const float *dy, const float *x, const float *w, const float *rrms,
                   float *dx, float *dw, int C, int S);

/* Rotary embedding on `[n_heads*hd, S]`, interleaved pairs (llama2.c convention): rows
 * (h*hd + 2i, h*hd + 2i + 1) rotate by angle s * inv_freq[i] at position s = 0..S-1
 * (inv_freq [hd/2]: theta^(-2i/hd), rope scaling applied by the caller).
 * `inverse` != 0 rotates by the negative angle, which is the backward (the rotation is
 * orthogonal, so its vector-Jacobian product is the inverse rotation).
 * `out` may alias `x`. hd must be even. Returns -1 on allocation failure. */
int rn_rope_freq(const float *x, float *out, int n_heads, int hd, int S, const double *inv_freq, int inverse);
/* rn_rope_freq with the plain frequencies theta^(-2i/hd). */
int rn_rope(const float *x, float *out, int n_heads, int hd, int S, double theta, int inverse);

/* Fused softmax cross-entropy over the full vocabulary, logits channel-first `[V, S]`.
 * Returns the mean over positions of -log softmax(logits[:, s])[targets[s]] and writes
 *   dlogits[v,s] = (softmax[v,s] - [v == targets[s]]) * grad_scale / S.
 * `dlogits` may alias `logits` (saves a [V, S] buffer at large vocabularies). Targets must
 * lie in [0, V) (checked by the caller). Returns NaN on allocation failure.
 * Numerics: exp is a vectorisable polynomial (relative error <= 1.1e-7 on [-87.33, 0]); terms
 * with logit - max < -87.33 count as 0 (expf would give subnormals); per-position sums and the
 * loss are in double. NaN or +inf in a column makes the loss NaN; a -inf logit is probability
 * 0 (loss +inf if it is the target's).
 * Positions are independent: `threads` threads (the caller's included) take blocks of them, and
 * the result is the same bits for any thread count (per-position losses summed in order). */
double rn_cross_entropy(const float *logits, const int32_t *targets, float *dlogits,
                        int V, int S, float grad_scale, int threads);

/* Weighted cross-entropy (loss masks): returns sum_s weights[s] * loss[s] and writes
 *   dlogits[v,s] = (softmax[v,s] - [v == targets[s]]) * grad_scale * weights[s].
 * A weight of 0 drops its position (zero gradient column, no loss term). Otherwise as
 * rn_cross_entropy (aliasing, numerics, thread independence). */
double rn_cross_entropy_weighted(const float *logits, const int32_t *targets, const float *weights,
                                 float *dlogits, int V, int S, float grad_scale, int threads);

/* Embedding forward: out [D, S], out[d, s] = E[tokens[s], d] with E [V, D] row-major. */
void rn_embedding_fwd(const float *E, const int32_t *tokens, float *out, int D, int S);

/* Embedding backward: dE[tokens[s], d] += dx[d, s] (accumulated; repeated tokens add up). */
void rn_embedding_bwd(const float *dx, const int32_t *tokens, float *dE, int D, int S);

/* One AdamW step in place over n elements (PyTorch AdamW semantics):
 *   g  = grad * grad_scale            (grad_scale folds loss-scale unscaling and clipping in)
 *   w *= 1 - lr*weight_decay          (decoupled decay, on the pre-update weight)
 *   m  = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g^2
 *   w -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
 * t is the 1-based optimizer step. `grad` is only read.
 * Equal to the upstream `w -= lr*(mhat/(sqrt(vhat)+eps) + wd*w)` (decay uses the pre-update w).
 * Differs from torch.optim.AdamW only in rounding: torch divides sqrt(v) by sqrt(1-b2^t), this
 * multiplies by the reciprocal (agreement ~1e-7 relative, tests/test_cpu_ops.py). */
void rn_adamw_step(float *w, const float *grad, float *m, float *v, size_t n,
                   float lr, float beta1, float beta2, float eps, float weight_decay,
                   float grad_scale, int64_t t);

/* Sum of squares in double. A finite fp32 squared cannot overflow double, so the result is
 * non-finite exactly when some element is inf or NaN: one pass serves both global-norm
 * clipping and loss-scale overflow detection. */
double rn_sumsq(const float *x, size_t n);

/* ---- the optimizer step over many tensors, on several threads ----
 * Memory-bound passes over every parameter (16M elements of Stories15M: tens of ms on one core),
 * split by element count over `threads` threads (the caller's included; fewer when there is too
 * little work, >= 128K elements per thread). Results do not depend on the thread count. If a
 * thread cannot be started, its part runs on the caller's thread. */

struct rn_adamw_hyper {
    float lr, beta1, beta2, eps, grad_scale;
    int64_t t; /* 1-based optimizer step */
};

struct rn_adamw_tensor {
    float *w, *grad, *m, *v;
    size_t n;
    float weight_decay;
};

/* rn_adamw_step on every tensor; with zero_grad != 0 each gradient is zeroed once read (the
 * next accumulation starts from it, and the separate zeroing pass would read it all again). */
void rn_adamw_tensors(const struct rn_adamw_tensor *ts, int count, const struct rn_adamw_hyper *h,
                      int zero_grad, int threads);

/* Σ over tensors of Σx² in double, in fixed 64K-element chunks added in order, so the value does
 * not depend on `threads`. Non-finite exactly when an element is; NaN on allocation failure. */
double rn_sumsq_tensors(const float *const *xs, const size_t *ns, int count, int threads);

#endif /* RUSTANE_CPU_OPS_H */
