"""One Llama training step over the fused kernels (docs/design.md, "One training step").

The model owns the compiled kernels (compiled once, shared by every layer), one input buffer per
layer for every weight-bearing kernel (weights staged once per optimizer step, activations per
micro-step), one output buffer per layer for the two forward kernels (their taps feed the
backward), and shared buffers for everything consumed straight away. CPU work — RMSNorm, RoPE
backward, the classifier, cross-entropy, embeddings — runs in C (``rustane.cpu_ops``); every weight
gradient is an sgemm on the dW queue (``rustane.native.DWQueue``) that overlaps the next kernel
evaluations, and the queue is only waited on before the optimizer step, so the overlap also
carries across micro-steps.

Parameters are fp32 master weights in a dict keyed by Hugging Face Llama names, with q/k rows in
our interleaved-pair RoPE convention (``rustane.checkpoint`` permutes at the HF boundary).

Buffers hold fp16 (the ANE, the simulator in fp16) or fp32 (the simulator's exact mode, used to
check gradients against PyTorch); ``_put``/``_get`` hide the difference.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from rustane import ane_guard, cpu_ops, cpu_threads, kernels, native
from rustane.config import ModelConfig

# kernel input block name -> HF parameter suffix (within model.layers.{i}.)
_WEIGHT_OF = {
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "w1": "mlp.gate_proj.weight",
    "w3": "mlp.up_proj.weight",
    "w2": "mlp.down_proj.weight",
}
# forward kernels keep one output buffer per layer: their taps are read again in the backward
_PER_LAYER_OUTPUT = frozenset(kernels.FORWARD_KERNELS)


def kernel_shape(cfg: ModelConfig, dtype: str = "fp16") -> kernels.KernelShape:
    return kernels.KernelShape(
        dim=cfg.dim, hidden=cfg.hidden_dim, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, seq=cfg.seq_len, rope_theta=float(cfg.rope_theta),
        residual_alpha=cfg.residual_alpha, dtype=dtype,
    )


def program_dtype(backend) -> str:
    """fp32 programs only for the simulator's exact mode; everything else runs fp16 (the ANE's)."""
    return "fp32" if getattr(backend, "precision", "fp16") == "fp32" else "fp16"


def init_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh fp32 weights: N(0, 0.02) matrices and embedding, output projections (o_proj,
    down_proj) further scaled by 1/sqrt(2·n_layers) as in GPT-2, norm weights 1."""
    rng = np.random.Generator(np.random.PCG64(seed))
    out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
    params = {}
    for name, shape in cfg.param_shapes().items():
        if name.endswith("norm.weight"):
            params[name] = np.ones(shape, dtype=np.float32)
            continue
        std = 0.02 * (out_scale if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)
        params[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)
    return params


def _put(view: np.ndarray, src: np.ndarray, blk: kernels.Block) -> None:
    """Write fp32 ``src`` (the block's source shape) into its block of a locked input view."""
    if view.dtype == np.float16:
        native.stage(view, src, blk.col0, c0=blk.c0, transpose=blk.transpose)
    else:
        view[blk.c0:blk.c1, blk.col0:blk.col1] = src.T if blk.transpose else src


def _get(view: np.ndarray, tap: kernels.Tap, out: np.ndarray | None = None) -> np.ndarray:
    """One tap ``[c1-c0, S]`` of a locked output view as fp32, in ``out`` or a new array."""
    if view.dtype == np.float16:
        return native.unstage(view, tap.c0, tap.c1 - tap.c0, out=out)
    if out is None:
        return np.array(view[tap.c0:tap.c1], dtype=np.float32)
    np.copyto(out, view[tap.c0:tap.c1])
    return out


class _Workspace:
    """The fp32 arrays of a training micro-step, kept and reused by later steps.

    Fresh multi-megabyte arrays cost a page fault per 4 KB on first touch (glibc returns freed
    ones to the OS): copying a [768, 256] tap took 430 us into fresh memory and 34 us into
    reused memory, ~25 ms of the simulator's Stories15M step. The dW queue keeps references to
    some of these arrays until it is waited on (before the optimizer), so micro-steps alternate
    between two sets, and a micro-step about to reuse a set the queue may still read waits for
    the queue first (the third, fifth, ... micro-step; by then it had a whole micro-step to
    drain)."""

    def __init__(self):
        self._sets: tuple[dict, dict] = ({}, {})
        self._cur = self._sets[0]
        self.micro = 0  # micro-steps since the queue was last drained

    def next_micro_step(self) -> bool:
        """Switch sets; True when the caller must drain the dW queue before writing (the set was
        written two micro-steps ago). After that drain only the current micro-step's arrays are
        in the queue's hands, so the count restarts at 1 and the next micro-step (the other set)
        need not wait: with long accumulation every second micro-step drains, not every one."""
        self._cur = self._sets[self.micro % 2]
        self.micro += 1
        if self.micro > 2:
            self.micro = 1
            return True
        return False

    def drained(self) -> None:
        self.micro = 0

    def get(self, key, shape: tuple[int, ...]) -> np.ndarray:
        a = self._cur.get(key)
        if a is None or a.shape != shape:
            a = self._cur[key] = np.empty(shape, dtype=np.float32)
        return a

    def arrays(self, key, shapes: tuple[tuple[int, ...], ...]) -> list[np.ndarray]:
        """Several arrays under one key (one tap read): one lookup on the hot path."""
        a = self._cur.get(key)
        if a is None:
            a = self._cur[key] = [np.empty(sh, dtype=np.float32) for sh in shapes]
        return a


class PhaseTimer:
    """Wall time per phase of a step (kernel evals, staging, cpu ops, dW wait, optimizer)."""

    PHASES = ("evals", "staging", "cpu", "dw_wait", "optimizer")

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.evals = 0

    def reset(self) -> None:
        self.seconds.clear()
        self.evals = 0

    def ms(self) -> dict[str, float]:
        return {p: 1e3 * self.seconds.get(p, 0.0) for p in self.PHASES}


@dataclass
class _Saved:
    """What one layer's backward needs from its forward (all fp32 ``[C, S]`` / ``[S]``)."""

    x: np.ndarray
    xn: np.ndarray
    r1: np.ndarray
    x2: np.ndarray
    x2n: np.ndarray
    r2: np.ndarray


class Model:
    """Kernels, buffers, fp32 master weights and gradient accumulators of one model."""

    def __init__(self, cfg: ModelConfig, backend, params: dict[str, np.ndarray] | None = None, *, seed: int = 0):
        self.cfg = cfg.validate()
        self.backend = backend
        self.shape = kernel_shape(cfg, program_dtype(backend))
        self.plan = kernels.plan_for(self.shape)
        # refuse before any compile what would break an ANE rule on the backend's chip profile
        profile = ane_guard.backend_profile(backend)
        self.ane_warnings = ane_guard.require_config(cfg, profile) if profile is not None else []
        self.params = params if params is not None else init_params(cfg, seed)
        want = cfg.param_shapes()
        for k, shp in want.items():
            a = self.params.get(k)
            if a is None or a.shape != shp:
                raise ValueError(f"parameter {k}: expected shape {shp}, got {None if a is None else a.shape}")
            if a.dtype != np.float32 or not a.flags.c_contiguous:
                self.params[k] = np.ascontiguousarray(a, dtype=np.float32)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.embed_name = "model.embed_tokens.weight"
        self.head_name = self.embed_name if cfg.tie_embeddings else "lm_head.weight"
        # the embedding scatter-add runs on this thread while the dW queue may be writing the
        # classifier's dE: with tied weights they accumulate apart and meet after the wait
        self._g_embed_in = np.zeros_like(self.params[self.embed_name]) if cfg.tie_embeddings else self.grads[self.embed_name]
        self.queue = native.DWQueue()
        self.threads = cpu_threads.StepThreads(getattr(backend, "runs_on_cpu", False))
        self._ws = _Workspace()
        self._training = False  # forward_backward running: buffers come from the workspace
        self.timer = PhaseTimer()
        self._index_layers()
        self._compile()
        self.stage_weights()

    # ---- setup ----------------------------------------------------------------------------

    def _compile(self) -> None:
        t0 = time.perf_counter()
        self.kernels = {name: kernels.compile_spec(self.backend, spec) for name, spec in self.plan.items()}
        self.compile_seconds = time.perf_counter() - t0
        self._blocks = {n: {b.name: b for b in sp.blocks} for n, sp in self.plan.items()}
        self._taps = {n: {t.name: t for t in sp.taps} for n, sp in self.plan.items()}
        self._copy_plans: dict = {}
        self._read_plans: dict = {}
        L = self.cfg.n_layers
        self.inb: dict[str, list] = {}
        self.outb: dict[str, list] = {}
        self.req: dict[str, list] = {}
        for name, spec in self.plan.items():
            k = self.kernels[name]
            if len(k.inputs) != 1 or len(k.outputs) != 1:
                raise RuntimeError(f"kernel {name}: expected one input and one output tensor, got "
                                   f"{[s.name for s in k.inputs]} -> {[s.name for s in k.outputs]}")
            n_in = L if spec.weight_bearing else 1
            n_out = L if name in _PER_LAYER_OUTPUT else 1
            ins = [k.alloc(k.inputs[0]) for _ in range(n_in)]
            outs = [k.alloc(k.outputs[0]) for _ in range(n_out)]
            self.inb[name], self.outb[name] = ins, outs
            self.req[name] = [k.request([ins[min(i, n_in - 1)]], [outs[min(i, n_out - 1)]]) for i in range(max(n_in, n_out))]
        # the request each layer evaluates (shared-buffer kernels have one for all)
        self._req_at = {name: [r[min(i, len(r) - 1)] for i in range(L)] for name, r in self.req.items()}

    def layer_param(self, layer: int, suffix: str) -> np.ndarray:
        return self._layer_params[layer][suffix]

    def layer_grad(self, layer: int, suffix: str) -> np.ndarray:
        return self._layer_grads[layer][suffix]

    def _index_layers(self) -> None:
        """Per-layer views of the parameter and gradient dicts keyed by name suffix: the step looks
        them up dozens of times per layer, and formatting full names each time showed up."""
        self._layer_params, self._layer_grads = [], []
        for layer in range(self.cfg.n_layers):
            pre = f"model.layers.{layer}."
            self._layer_params.append({k[len(pre):]: v for k, v in self.params.items() if k.startswith(pre)})
            self._layer_grads.append({k[len(pre):]: v for k, v in self.grads.items() if k.startswith(pre)})

    def stage_weights(self) -> None:
        """Write every layer's weights into its kernel inputs (after init and each optimizer step;
        memory-bound copies, spread over the step's threads where it has a helper)."""
        jobs = []
        for name, spec in self.plan.items():
            wblocks = [b for b in spec.blocks if b.kind == "weight"]
            jobs += [(buf, layer, wblocks) for layer, buf in enumerate(self.inb[name]) if wblocks]
        self.threads.run_halves(self._stage_weight_jobs, jobs)

    def _stage_weight_jobs(self, jobs) -> None:
        for buf, layer, wblocks in jobs:
            with buf.lock() as view:
                for b in wblocks:
                    _put(view, self.layer_param(layer, _WEIGHT_OF[b.name]), b)

    def close(self) -> None:
        self.queue.wait()
        self.threads.close()
        for k in self.kernels.values():
            k.close()

    # ---- helpers -----------------------------------------------------------------------------

    def _eval(self, name: str, layer: int = 0) -> None:
        req = self._req_at[name][layer]
        t0 = time.perf_counter()
        req.eval()
        self.timer.seconds["evals"] += time.perf_counter() - t0
        self.timer.evals += 1

    def _stage(self, name: str, layer: int, **acts: np.ndarray) -> None:
        blocks = self._blocks[name]
        t0 = time.perf_counter()
        with self.inb[name][min(layer, len(self.inb[name]) - 1)].lock() as view:
            for bname, a in acts.items():
                _put(view, a, blocks[bname])
        self.timer.seconds["staging"] += time.perf_counter() - t0

    def _buf(self, key, shape: tuple[int, ...]) -> np.ndarray:
        """An fp32 output array: the workspace's while training, else a new one (forward-only
        calls may run between micro-steps, whose arrays the dW queue may still read)."""
        return self._ws.get(key, shape) if self._training else np.empty(shape, dtype=np.float32)

    def _read(self, name: str, layer: int, *taps: str) -> list[np.ndarray]:
        """Taps of ``name``'s output for ``layer`` as fp32 arrays (for kernels with one shared
        output buffer, the layer still selects the workspace arrays: the dW queue holds them per
        layer). The buffer and taps of each distinct call are resolved once, as in ``_copy``."""
        key = (name, layer, taps)
        plan = self._read_plans.get(key)
        if plan is None:
            tapd = self._taps[name]
            tl = tuple(tapd[t] for t in taps)
            plan = self._read_plans[key] = (self.outb[name][min(layer, len(self.outb[name]) - 1)], tl,
                                            tuple((t.c1 - t.c0, self.cfg.seq_len) for t in tl))
        buf, tl, shapes = plan
        outs = self._ws.arrays(key, shapes) if self._training else (None,) * len(tl)
        t0 = time.perf_counter()
        with buf.lock(readonly=True) as view:
            out = [_get(view, t, o) for t, o in zip(tl, outs)]
        self.timer.seconds["staging"] += time.perf_counter() - t0
        return out

    def _copy(self, dst_name: str, dst_layer: int, moves: tuple[tuple[str, int, str, str], ...]) -> None:
        """Buffer-to-buffer copies of taps into ``dst_name``'s input: (src kernel, src layer, tap, block).

        The buffers and slices of each distinct call are resolved once and memoised: these copies
        run several times per layer and step, and their Python overhead is the engine's own cost.
        """
        key = (dst_name, dst_layer, moves)
        plan = self._copy_plans.get(key)
        if plan is None:
            plan = self._copy_plans[key] = self._plan_copy(dst_name, dst_layer, moves)
        dbuf, items = plan
        t0 = time.perf_counter()
        with dbuf.lock() as dview:
            for sbuf, dsl, ssl in items:
                with sbuf.lock(readonly=True) as sview:
                    dview[dsl] = sview[ssl]
        self.timer.seconds["staging"] += time.perf_counter() - t0

    def _plan_copy(self, dst_name: str, dst_layer: int, moves) -> tuple:
        dbuf = self.inb[dst_name][min(dst_layer, len(self.inb[dst_name]) - 1)]
        items = []
        for src_name, src_layer, tap, blk in moves:
            b, t = self._blocks[dst_name][blk], self._taps[src_name][tap]
            sbuf = self.outb[src_name][min(src_layer, len(self.outb[src_name]) - 1)]
            items.append((sbuf, (slice(b.c0, b.c1), slice(b.col0, b.col1)), slice(t.c0, t.c1)))
        return dbuf, tuple(items)

    def _wait_queue(self) -> None:
        t0 = time.perf_counter()
        self.queue.wait()
        self.timer.seconds["dw_wait"] += time.perf_counter() - t0

    def _dw(self, grad: np.ndarray, dy: np.ndarray, x: np.ndarray) -> None:
        """Queue ``grad += dy · xᵀ``. dy and x are arrays nobody writes again before the next wait,
        so the queue needs no snapshot (it keeps references to them until the wait)."""
        self.queue.submit(grad, dy, x, copy=False)

    # ---- forward ------------------------------------------------------------------------------

    def _forward_layers(self, tokens: np.ndarray, keep: bool) -> tuple[np.ndarray, list[_Saved]]:
        cfg, T = self.cfg, self.timer
        t0 = time.perf_counter()
        D, S = cfg.dim, cfg.seq_len
        x = cpu_ops.embedding_forward(self.params[self.embed_name], tokens, out=self._buf("x0", (D, S)))  # [D, S]
        T.seconds["cpu"] += time.perf_counter() - t0
        saved: list[_Saved] = []
        for layer in range(cfg.n_layers):
            t0 = time.perf_counter()
            xn, r1 = cpu_ops.rmsnorm_forward(x, self.layer_param(layer, "input_layernorm.weight"), cfg.norm_eps,
                                             out=self._buf(("xn", layer), (D, S)), rrms=self._buf(("r1", layer), (S,)))
            T.seconds["cpu"] += time.perf_counter() - t0
            self._stage("sdpaFwd", layer, xn=xn, x=x)
            self._eval("sdpaFwd", layer)
            (x2,) = self._read("sdpaFwd", layer, "x2")
            t0 = time.perf_counter()
            x2n, r2 = cpu_ops.rmsnorm_forward(x2, self.layer_param(layer, "post_attention_layernorm.weight"), cfg.norm_eps,
                                              out=self._buf(("x2n", layer), (D, S)), rrms=self._buf(("r2", layer), (S,)))
            T.seconds["cpu"] += time.perf_counter() - t0
            self._stage("ffnFused", layer, x2n=x2n, x2=x2)
            self._eval("ffnFused", layer)
            if keep:
                saved.append(_Saved(x, xn, r1, x2, x2n, r2))
            (x,) = self._read("ffnFused", layer, "x_next")
        return x, saved

    def logits(self, tokens) -> np.ndarray:
        """Forward only: logits ``[V, S]`` (fp32) for one sequence of exactly ``seq_len`` tokens."""
        tokens = self._check_tokens(tokens, "tokens")
        x, _ = self._forward_layers(tokens, keep=False)
        xf, _ = cpu_ops.rmsnorm_forward(x, self.params["model.norm.weight"], self.cfg.norm_eps)
        return self.params[self.head_name] @ xf

    def loss(self, tokens, targets) -> float:
        """Mean next-token cross-entropy of one sequence, forward only."""
        targets = self._check_tokens(targets, "targets")
        loss, _ = cpu_ops.cross_entropy(self.logits(tokens), targets)
        return loss

    def _check_tokens(self, t, what: str) -> np.ndarray:
        t = cpu_ops.as_tokens(t)
        S, V = self.cfg.seq_len, self.cfg.vocab_size
        if t.shape != (S,):
            raise ValueError(f"{what}: expected {S} token ids (seq_len), got {t.shape[0]}")
        if t.size and int(t.max()) >= V:
            raise ValueError(f"{what}: id {int(t.max())} is >= vocab_size {V}")
        return t

    # ---- one micro-step ---------------------------------------------------------------------

    def forward_backward(self, tokens, targets, loss_scale: float = 1.0) -> float:
        """Forward and backward of one sequence; gradients of ``loss·loss_scale`` are ADDED to
        ``self.grads`` (dW sgemms may still be running on the queue). Returns the unscaled loss."""
        tokens = self._check_tokens(tokens, "tokens")
        targets = self._check_tokens(targets, "targets")
        if self._ws.next_micro_step():
            self._wait_queue()
        self._training = True
        try:
            with self.threads.step():
                return self._forward_backward(tokens, targets, loss_scale)
        finally:
            self._training = False

    def _forward_backward(self, tokens, targets, loss_scale: float) -> float:
        cfg, T = self.cfg, self.timer
        D, S, V = cfg.dim, cfg.seq_len, cfg.vocab_size
        alpha = np.float32(cfg.residual_alpha)
        x, saved = self._forward_layers(tokens, keep=True)

        # head: final norm, classifier, full-vocabulary cross-entropy (all CPU, fp32)
        t0 = time.perf_counter()
        w_head = self.params[self.head_name]
        xf, rf = cpu_ops.rmsnorm_forward(x, self.params["model.norm.weight"], cfg.norm_eps,
                                         out=self._buf("xf", (D, S)), rrms=self._buf("rf", (S,)))
        # no dW of this micro-step is queued yet, so the classifier and the CE may use every core
        # (CE: positions over up to 4 threads, the same bits for any count)
        logits = self.threads.matmul_rows(w_head, xf, out=self._buf("logits", (V, S)))  # [V, S]
        loss, dlogits = cpu_ops.cross_entropy(logits, targets, grad_scale=loss_scale, dlogits=logits,
                                              threads=cpu_ops.optimizer_threads())
        # dx before the classifier's dW is queued: on the simulator the second core is still free
        # for it then, and the queue absorbs the dW while the layers' backward runs
        dxf = self.threads.matmul_rows(w_head.T, dlogits, out=self._buf("dxf", (D, S)))
        self._dw(self.grads[self.head_name], dlogits, xf)
        dy = cpu_ops.rmsnorm_backward(dxf, x, self.params["model.norm.weight"], rf,
                                      self.grads["model.norm.weight"], dx=dxf)
        T.seconds["cpu"] += time.perf_counter() - t0

        for layer in reversed(range(cfg.n_layers)):
            dy = self._backward_layer(layer, saved[layer], dy, alpha)

        t0 = time.perf_counter()
        cpu_ops.embedding_backward(dy, tokens, self._g_embed_in)
        T.seconds["cpu"] += time.perf_counter() - t0
        return loss

    def _backward_layer(self, layer: int, s: _Saved, dy: np.ndarray, alpha: np.float32) -> np.ndarray:
        """dy = dL/d(layer output) -> dL/d(layer input); queues this layer's dW sgemms."""
        cfg, T = self.cfg, self.timer
        g = self._layer_grads[layer].__getitem__

        # FFN: x_next = x2 + α·W2·(silu(W1·x2n) ⊙ W3·x2n)
        df = np.multiply(dy, alpha, out=self._buf(("df", layer), dy.shape)) if alpha != 1 else dy
        self._stage("ffnBwdW2t", layer, df=df)
        self._eval("ffnBwdW2t", layer)
        self._copy("ffnBwdW13t", layer, (("ffnBwdW2t", 0, "dgate", "dgate"),
                                         ("ffnFused", layer, "h1", "h1"), ("ffnFused", layer, "h3", "h3")))
        (gate,) = self._read("ffnFused", layer, "gate")
        self._dw(g(_WEIGHT_OF["w2"]), df, gate)
        self._eval("ffnBwdW13t", layer)
        dx2n, dh1, dh3 = self._read("ffnBwdW13t", layer, "dx2n", "dh1", "dh3")
        self._dw(g(_WEIGHT_OF["w1"]), dh1, s.x2n)
        self._dw(g(_WEIGHT_OF["w3"]), dh3, s.x2n)
        t0 = time.perf_counter()
        dx2 = cpu_ops.rmsnorm_backward(dx2n, s.x2, self.layer_param(layer, "post_attention_layernorm.weight"),
                                       s.r2, g("post_attention_layernorm.weight"), dx=dx2n)
        dx2 += dy
        T.seconds["cpu"] += time.perf_counter() - t0

        # attention: x2 = x + α·Wo·attn(rope(Wq·xn), rope(Wk·xn), Wv·xn)
        # nothing writes dx2 after this point
        dx2s = np.multiply(dx2, alpha, out=self._buf(("dx2s", layer), dx2.shape)) if alpha != 1 else dx2
        self._stage("wotBwd", layer, dx2s=dx2s)
        self._eval("wotBwd", layer)
        (attn,) = self._read("sdpaFwd", layer, "attn")
        self._dw(g(_WEIGHT_OF["wo"]), dx2s, attn)
        self._copy("sdpaBwd1", 0, (("sdpaFwd", layer, "q_rope", "q_rope"), ("sdpaFwd", layer, "k_rope", "k_rope"),
                                   ("sdpaFwd", layer, "v", "v"), ("wotBwd", 0, "da", "da")))
        self._eval("sdpaBwd1", layer)
        self._copy("sdpaBwd2", 0, (("sdpaBwd1", 0, "P", "P"), ("sdpaBwd1", 0, "dP", "dP"),
                                   ("sdpaFwd", layer, "q_rope", "q_rope"), ("sdpaFwd", layer, "k_rope", "k_rope")))
        self._eval("sdpaBwd2", layer)
        (dv,) = self._read("sdpaBwd1", layer, "dv")
        dq_r, dk_r = self._read("sdpaBwd2", layer, "dq_rope", "dk_rope")
        t0 = time.perf_counter()
        dq = cpu_ops.rope_backward(dq_r, cfg.n_heads, cfg.head_dim, cfg.rope_theta, out=dq_r)
        dk = cpu_ops.rope_backward(dk_r, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta, out=dk_r)
        T.seconds["cpu"] += time.perf_counter() - t0
        self._dw(g(_WEIGHT_OF["wq"]), dq, s.xn)
        self._dw(g(_WEIGHT_OF["wk"]), dk, s.xn)
        self._dw(g(_WEIGHT_OF["wv"]), dv, s.xn)
        if self.shape.is_mha:
            self._stage("qkvBwd", layer, dq=dq, dk=dk, dv=dv)
            self._eval("qkvBwd", layer)
            (dxa,) = self._read("qkvBwd", layer, "dx")
        else:
            self._stage("qBwd", layer, dq=dq)
            self._eval("qBwd", layer)
            self._stage("kvBwd", layer, dk=dk, dv=dv)
            self._eval("kvBwd", layer)
            (dxa,) = self._read("qBwd", layer, "dxq")
            (dxkv,) = self._read("kvBwd", layer, "dxkv")
            dxa += dxkv
        t0 = time.perf_counter()
        dx = cpu_ops.rmsnorm_backward(dxa, s.x, self.layer_param(layer, "input_layernorm.weight"), s.r1,
                                      g("input_layernorm.weight"), dx=dxa)
        dx += dx2
        T.seconds["cpu"] += time.perf_counter() - t0
        return dx

    # ---- gradients ---------------------------------------------------------------------------

    def finish_gradients(self) -> dict[str, np.ndarray]:
        """Wait for the dW queue and fold the embedding-input gradient in; returns ``self.grads``."""
        self._wait_queue()
        self._ws.drained()
        if self._g_embed_in is not self.grads[self.embed_name]:
            self.grads[self.embed_name] += self._g_embed_in
            self._g_embed_in.fill(0)
        return self.grads

    def zero_grads(self) -> None:
        for gr in self.grads.values():
            gr.fill(0)
        if self._g_embed_in is not self.grads[self.embed_name]:
            self._g_embed_in.fill(0)

    @property
    def evals_per_step_per_sequence(self) -> int:
        return kernels.evals_per_layer(self.shape) * self.cfg.n_layers
