"""CPU cost of Qwen3's per-head q/k RMSNorm backward, per layer, at Qwen3-0.6B sizes.

    python -m rustane.bench qk-norm [--repeats N] [--seq S]    (bench/qk_norm.py: same)

Prints one JSON object: the q+k norm backward (``rustane.models.qwen3.step``) and, for scale, the
RoPE backward the Llama step already runs on the same arrays; minimum and median over repeats
(the minimum is the least noisy on a shared machine).
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np

from rustane import cpu_ops
from rustane.models.qwen3.step import Qwen3Step
from rustane.runtime.workspace import Workspace

NH, NKV, HD, THETA = 16, 8, 128, 1e6  # Qwen3-0.6B


def _times(fn, repeats: int) -> dict:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(1e3 * (time.perf_counter() - t0))
    return {"min_ms": round(min(ts), 3), "median_ms": round(float(np.median(ts)), 3)}


HELP = "CPU cost of Qwen3's per-head q/k RMSNorm backward per layer (Qwen3-0.6B sizes)"


def add_arguments(ap) -> None:
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--seq", type=int, default=256)



def run(args) -> int:
    if args.repeats < 1 or args.seq < 1:
        raise ValueError("--repeats and --seq must be >= 1")
    S = args.seq
    ws = Workspace()
    ws.active = True
    step = Qwen3Step.__new__(Qwen3Step)  # only the norm helper is exercised: no kernels needed
    step.cfg = SimpleNamespace(head_dim=HD, seq_len=S, norm_eps=1e-6, n_heads=NH, n_kv_heads=NKV)
    step.rt = SimpleNamespace(ws=ws)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((NH * HD, S), dtype=np.float32), rng.standard_normal((NKV * HD, S), dtype=np.float32)
    dq, dk = q.copy(), k.copy()
    w, g = np.ones(HD, np.float32), np.zeros(HD, np.float32)

    def norm():
        step._head_norm_backward(("q", 0), dq, q, w, g, NH)
        step._head_norm_backward(("k", 0), dk, k, w, g, NKV)

    def rope():
        cpu_ops.rope_backward(dq, NH, HD, THETA, out=dq)
        cpu_ops.rope_backward(dk, NKV, HD, THETA, out=dk)

    print(json.dumps({"shape": {"n_heads": NH, "n_kv_heads": NKV, "head_dim": HD, "seq_len": S},
                      "qk_norm_backward_per_layer": _times(norm, args.repeats),
                      "rope_backward_per_layer": _times(rope, args.repeats)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
