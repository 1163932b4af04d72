"""Compiled kernels of one plan with their buffers and requests: how a plan runs on a backend.

A :class:`KernelSet` compiles every kernel of a plan once (weights are runtime inputs, so every
layer shares the compiled program), gives each layer its own input buffer for weight-bearing
kernels (weights staged once per optimizer step, activations per micro-step) and its own output
buffer for kernels whose taps are read again later (``KernelSpec.per_layer_output``), and one
shared buffer for everything else. Staging, reading taps and buffer-to-buffer copies go through
the plan's blocks and taps; the copies and reads of each distinct call site are resolved once.

Buffers hold fp16 (the ANE, the simulator in fp16) or fp32 (the simulator's exact mode);
:func:`put`/:func:`get` hide the difference. Nothing here knows which model family it runs.
"""

from __future__ import annotations

import time

import numpy as np

from rustane import native
from rustane.runtime.plan import Block, KernelSpec, Tap, compile_spec
from rustane.runtime.timing import PhaseTimer
from rustane.runtime.workspace import Workspace


def put(view: np.ndarray, src: np.ndarray, blk: Block) -> None:
    """Write fp32 ``src`` (the block's source shape) into its block of a locked input view."""
    if view.dtype == np.float16:
        native.stage(view, src, blk.col0, c0=blk.c0, transpose=blk.transpose)
    else:
        view[blk.c0:blk.c1, blk.col0:blk.col1] = src.T if blk.transpose else src


def get(view: np.ndarray, tap: Tap, out: np.ndarray | None = None) -> np.ndarray:
    """One tap ``[c1-c0, S]`` of a locked output view as fp32, in ``out`` or a new array."""
    if view.dtype == np.float16:
        return native.unstage(view, tap.c0, tap.c1 - tap.c0, out=out)
    if out is None:
        return np.array(view[tap.c0:tap.c1], dtype=np.float32)
    np.copyto(out, view[tap.c0:tap.c1])
    return out


class KernelSet:
    """The kernels of ``plan`` compiled on ``backend`` for ``n_layers`` layers."""

    def __init__(self, plan: dict[str, KernelSpec], backend, n_layers: int, workspace: Workspace,
                 timer: PhaseTimer):
        self.plan = plan
        self.n_layers = n_layers
        self.ws = workspace
        self.timer = timer
        t0 = time.perf_counter()
        self.kernels = {name: compile_spec(backend, spec) for name, spec in plan.items()}
        self.compile_seconds = time.perf_counter() - t0
        self._blocks = {n: {b.name: b for b in sp.blocks} for n, sp in plan.items()}
        self._taps = {n: {t.name: t for t in sp.taps} for n, sp in plan.items()}
        self._copy_plans: dict = {}
        self._read_plans: dict = {}
        self.inb: dict[str, list] = {}
        self.outb: dict[str, list] = {}
        self.req: dict[str, list] = {}
        L = n_layers
        for name, spec in plan.items():
            k = self.kernels[name]
            if len(k.inputs) != 1 or len(k.outputs) != 1:
                raise RuntimeError(f"kernel {name}: expected one input and one output tensor, got "
                                   f"{[s.name for s in k.inputs]} -> {[s.name for s in k.outputs]}")
            n_in = L if spec.weight_bearing else 1
            n_out = L if spec.per_layer_output else 1
            ins = [k.alloc(k.inputs[0]) for _ in range(n_in)]
            outs = [k.alloc(k.outputs[0]) for _ in range(n_out)]
            self.inb[name], self.outb[name] = ins, outs
            self.req[name] = [k.request([ins[min(i, n_in - 1)]], [outs[min(i, n_out - 1)]])
                              for i in range(max(n_in, n_out))]
        # per layer: the request, input and output buffer it uses (shared ones repeated)
        self._req_at = {name: _per_layer(r, L) for name, r in self.req.items()}
        self._in_at = {name: _per_layer(b, L) for name, b in self.inb.items()}
        self._out_at = {name: _per_layer(b, L) for name, b in self.outb.items()}

    # ---- weights ------------------------------------------------------------------------------

    def stage_weights(self, param_of, run=None, layers=None) -> None:
        """Write every layer's weight blocks from ``param_of(layer, block.param)`` (fp32, natural
        orientation; a vector fills a one-row or one-column block; None leaves the block as it
        is). ``run(fn, jobs)`` may split the jobs over threads (memory-bound copies); ``layers``
        limits the staging to those layers."""
        jobs = []
        for name, spec in self.plan.items():
            wblocks = spec.weight_blocks
            if wblocks:
                jobs += [(buf, layer, wblocks) for layer, buf in enumerate(self.inb[name])
                         if layers is None or layer in layers]

        def stage(jobs) -> None:
            for buf, layer, wblocks in jobs:
                with buf.lock() as view:
                    for b in wblocks:
                        w = param_of(layer, b.param)
                        if w is not None:
                            put(view, w if w.ndim == 2 else w.reshape(b.source_shape), b)

        if run is None:
            stage(jobs)
        else:
            run(stage, jobs)

    # ---- one kernel call ------------------------------------------------------------------------

    def eval(self, name: str, layer: int = 0) -> None:
        req = self._req_at[name][layer]
        t0 = time.perf_counter()
        req.eval()
        self.timer.seconds["evals"] += time.perf_counter() - t0
        self.timer.evals += 1

    def stage(self, name: str, layer: int, **acts: np.ndarray) -> None:
        """Write activation blocks of ``name``'s input for ``layer``."""
        blocks = self._blocks[name]
        t0 = time.perf_counter()
        with self._in_at[name][layer].lock() as view:
            for bname, a in acts.items():
                put(view, a, blocks[bname])
        self.timer.seconds["staging"] += time.perf_counter() - t0

    def read(self, name: str, layer: int, *taps: str, slot: int | None = None) -> list[np.ndarray]:
        """Taps of ``name``'s output for ``layer`` as fp32 arrays (for kernels with one shared
        output buffer, the layer still selects the workspace arrays: the dW queue holds them per
        layer; ``slot``, from ``Workspace.backward_slot``, selects them instead). The buffer and
        taps of each distinct call are resolved once, as in ``copy``."""
        key = (name, layer, taps)
        plan = self._read_plans.get(key)
        if plan is None:
            tapd = self._taps[name]
            tl = tuple(tapd[t] for t in taps)
            seq = self.plan[name].out_shape[3]
            plan = self._read_plans[key] = (self._out_at[name][layer], tl, tuple((t.c1 - t.c0, seq) for t in tl))
        buf, tl, shapes = plan
        outs = self.ws.arrays(key if slot is None else (name, ("slot", slot), taps), shapes)
        t0 = time.perf_counter()
        with buf.lock(readonly=True) as view:
            out = [get(view, t, o) for t, o in zip(tl, outs)]
        self.timer.seconds["staging"] += time.perf_counter() - t0
        return out

    def copy(self, dst_name: str, dst_layer: int, moves: tuple[tuple[str, int, str, str], ...]) -> None:
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
        items = []
        for src_name, src_layer, tap, blk in moves:
            b, t = self._blocks[dst_name][blk], self._taps[src_name][tap]
            sbuf = self._out_at[src_name][src_layer]
            items.append((sbuf, (slice(b.c0, b.c1), slice(b.col0, b.col1)), slice(t.c0, t.c1)))
        return self._in_at[dst_name][dst_layer], tuple(items)

    def close(self) -> None:
        for k in self.kernels.values():
            k.close()


def _per_layer(items: list, n_layers: int) -> list:
    """``items`` indexed by layer: one per layer, or a single shared one repeated."""
    return [items[min(i, len(items) - 1)] for i in range(n_layers)]
