"""A model ready to train: a family's step math over a compiled kernel set.

``Model`` owns the fp32 master weights and gradient accumulators (dicts keyed by the family's
parameter names), the compiled kernels and their buffers (``KernelSet``), the workspace of
micro-steps, the dW queue (``rustane.native.DWQueue``: every weight gradient is an sgemm that
overlaps the next kernel evaluations, waited on only before the optimizer) and the CPU thread
policy. The family (``rustane.models.family_for(cfg)``) supplies the plan, the parameters and the
step; nothing here names one.

Weights live in two places — the fp32 masters and their staged copies in the kernels' input
buffers — so every change to the masters goes through :meth:`Model.optimizer_step` (or is followed
by :meth:`Model.params_changed`), which re-stages them: a loop cannot train on stale weights.

Fine-tuning (docs/finetune.md) trains a subset: ``trainable`` names the parameters that get
gradients (the others get none, and their dW is never computed); with ``keep_frozen=False`` the
fp32 masters of frozen layer matrices are dropped once staged, layer by layer, so the staged
buffers are their only copy; ``ring=K`` keeps the backward's arrays for K layers instead of all
(``Workspace``), for runs whose dW queue carries only small jobs.
"""

from __future__ import annotations

import ctypes
import sys
import time

import numpy as np

from rustane import ane_guard, cpu_ops, cpu_threads, models, native, selfcheck
from rustane.runtime.kernel_set import KernelSet
from rustane.runtime.timing import PhaseTimer
from rustane.runtime.workspace import Workspace


def program_dtype(backend) -> str:
    """fp32 programs only for the simulator's exact mode; everything else runs fp16 (the ANE's)."""
    return "fp32" if getattr(backend, "precision", "fp16") == "fp32" else "fp16"


def return_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc only; elsewhere nothing to do). An imported
    model's fp32 arrays mostly sit on glibc's heap (its mmap threshold rises as big temporaries
    are freed), where freeing keeps the pages resident: without this, the fp32 masters dropped
    after staging stayed in the RSS (a 0.6B-parameter LoRA run: build peak 4.7 GB instead of 3.1;
    ``python -m rustane.bench finetune --part memory`` re-measures)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl)
        pass


class Model:
    """Kernels, buffers, fp32 master weights and gradient accumulators of one model."""

    def __init__(self, cfg, backend, params: dict[str, np.ndarray] | None = None, *, seed: int = 0,
                 trainable=None, keep_frozen: bool = True, ring: int | None = None):
        self.cfg = cfg.validate()
        self.family = models.family_for(cfg)  # the package that knows what is computed
        self.backend = backend
        self.shape = self.family.kernel_shape(cfg, program_dtype(backend))
        self.plan = self.family.plan_for(self.shape)
        # refuse before any compile what would break an ANE rule on the backend's chip profile
        profile = ane_guard.backend_profile(backend)
        self.ane_warnings = ane_guard.require_config(cfg, profile) if profile is not None else []
        self.params = params if params is not None else self.family.init_params(cfg, seed)
        for k, shp in self.family.param_shapes(cfg).items():
            a = self.params.get(k)
            if a is None or a.shape != shp:
                raise ValueError(f"parameter {k}: expected shape {shp}, got {None if a is None else a.shape}")
            if a.dtype != np.float32 or not a.flags.c_contiguous:
                self.params[k] = np.ascontiguousarray(a, dtype=np.float32)
        self.trainable = frozenset(self.params if trainable is None else trainable)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items() if k in self.trainable}
        self.queue = native.DWQueue()
        self.threads = cpu_threads.StepThreads(getattr(backend, "runs_on_cpu", False),
                                               splitter=getattr(backend, "splitter", None))
        # ring: backward arrays shared by every ``ring``-th layer, one set for all micro-steps
        # (LoRA: the queue holds only small adapter jobs; rustane/runtime/workspace.py)
        self.ws = Workspace() if ring is None else Workspace(ring=ring, sets=1)
        self.timer = PhaseTimer()
        self.kernels_set = KernelSet(self.plan, backend, cfg.n_layers, self.ws, self.timer)
        self.kernels = self.kernels_set.kernels
        try:
            # the first run of these kernels on this chip + OS is compared with the fp16 simulator
            # (silent corruption stops here, before a step; rustane/selfcheck.py)
            self.selfcheck = selfcheck.ensure(self.plan, self.kernels, backend)
        except BaseException:
            self.kernels_set.close()
            raise
        self.compile_seconds = self.kernels_set.compile_seconds
        self.math = self.family.Step(self)
        if keep_frozen:
            self.stage_weights()
        else:
            for layer in range(cfg.n_layers):
                self.kernels_set.stage_weights(self.math.layer_param, layers=(layer,))
                self._release_frozen(layer)
                return_freed_memory()

    # ---- weights ---------------------------------------------------------------------------------

    def layer_param(self, layer: int, name: str) -> np.ndarray | None:
        return self.math.layer_param(layer, name)

    def _release_frozen(self, layer: int) -> None:
        """Drop the fp32 masters of this layer's frozen matrices (staged already; the CPU never
        reads them)."""
        for k in self.math.release_frozen(layer, self.trainable):
            del self.params[k]

    def layer_grad(self, layer: int, name: str) -> np.ndarray:
        return self.math.layer_grad(layer, name)

    def stage_weights(self) -> None:
        """Write every layer's weights into its kernel inputs (memory-bound copies, spread over the
        step's threads where it has a helper)."""
        self.kernels_set.stage_weights(self.math.layer_param, self.threads.run_halves)

    def params_changed(self) -> None:
        """Call after changing ``params`` in place by hand: the kernels see the new values."""
        self.stage_weights()

    def optimizer_step(self, optimizer, scaler, lr: float, *, max_norm: float | None = 1.0, accum: int = 1):
        """Finish the gradients, apply one update (``rustane.optim.apply_update``: overflow check,
        unscale, clip, AdamW) and re-stage the weights it changed; a skipped update (overflow)
        zeroes the gradients instead. Returns the ``UpdateInfo``."""
        from rustane.optim import apply_update

        grads = self.finish_gradients()
        with self.timer.phase("optimizer"):
            info = apply_update(optimizer, grads, scaler, lr, max_norm=max_norm, accum=accum, zero_grads=True)
            if info.applied:
                self.stage_weights()
            else:
                self.zero_grads()
        return info

    def close(self) -> None:
        self.queue.wait()
        self.threads.close()
        self.kernels_set.close()

    # ---- the dW queue ----------------------------------------------------------------------------

    def dw(self, grad: np.ndarray, dy: np.ndarray, x: np.ndarray) -> None:
        """Queue ``grad += dy · xᵀ``. dy and x are arrays nobody writes again before the next wait,
        so the queue needs no snapshot (it keeps references to them until the wait)."""
        self.queue.submit(grad, dy, x, copy=False)

    def _wait_queue(self) -> None:
        t0 = time.perf_counter()
        self.queue.wait()
        self.timer.seconds["dw_wait"] += time.perf_counter() - t0

    # ---- forward ---------------------------------------------------------------------------------

    def logits(self, tokens) -> np.ndarray:
        """Forward only: logits ``[V, S]`` (fp32) for one sequence of exactly ``seq_len`` tokens.
        Under the step's BLAS thread policy, like ``forward_backward``: numpy's own BLAS threads
        spin-wait on a busy machine (a SmolLM2-135M forward of 40 tokens took 1.15 s instead of
        ~0.3 s under load 3; ``pytest tests/test_finetune_real.py --durations=1`` shows it)."""
        tokens = self._check_tokens(tokens, "tokens")
        with self.threads.step():
            return self.math.logits(tokens)

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

    # ---- one micro-step --------------------------------------------------------------------------

    def forward_backward(self, tokens, targets, loss_scale: float = 1.0, weights=None) -> float:
        """Forward and backward of one sequence; gradients of ``loss·loss_scale`` are ADDED to
        ``self.grads`` (dW sgemms may still be running on the queue). Returns the unscaled loss.
        With per-position ``weights`` the loss is ``Σ weights·CE`` (loss masks)."""
        tokens = self._check_tokens(tokens, "tokens")
        targets = self._check_tokens(targets, "targets")
        self.ws.begin_micro_step(self._wait_queue)
        self.ws.active = True
        try:
            with self.threads.step():
                if weights is None:
                    return self.math.forward_backward(tokens, targets, loss_scale)
                w = np.ascontiguousarray(weights, dtype=np.float32)
                if w.shape != tokens.shape:
                    raise ValueError(f"weights: expected {tokens.shape[0]} values (seq_len), got {w.shape}")
                return self.math.forward_backward(tokens, targets, loss_scale, weights=w)
        finally:
            self.ws.active = False

    # ---- gradients -------------------------------------------------------------------------------

    def finish_gradients(self) -> dict[str, np.ndarray]:
        """Wait for the dW queue and fold in what the step kept apart; returns ``self.grads``."""
        self._wait_queue()
        self.ws.end_accumulation()
        self.math.fold_gradients()
        return self.grads

    def zero_grads(self) -> None:
        for gr in self.grads.values():
            gr.fill(0)
        self.math.zero_gradients()

    @property
    def evals_per_step_per_sequence(self) -> int:
        return self.family.evals_per_layer(self.shape) * self.cfg.n_layers
