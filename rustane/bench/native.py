"""Benchmark of rustane.native: conversion, Stories110M weight staging, dW queue overlap.

    python -m rustane.bench native --json    # one JSON object on stdout (bench/native.py: same)

All figures come from one process, side by side. Bandwidths count fp32 bytes (the larger side).
Main-thread numpy BLAS and the queue's BLAS are both limited to one thread (OPENBLAS_NUM_THREADS=1
before numpy loads, DWQueue(blas_threads=1)) so that the overlap figure measures overlap, not two
libraries fighting over the same cores.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from rustane import native  # noqa: E402

D, H, S, NH = 768, 2048, 256, 12  # Stories110M: dim, hidden, seq, heads (MHA: QD = KVD = D)


def best_of(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_conversion(n, reps):
    rng = np.random.default_rng(0)
    x32 = rng.standard_normal(n).astype(np.float32)
    x16 = x32.astype(np.float16)
    o16 = np.empty_like(x16)
    o32 = np.empty_like(x32)
    c32 = np.empty_like(x32)
    fp32_gb = x32.nbytes / 1e9
    for a in (o16, o32, c32):  # fault the pages in before timing
        a.fill(0)
    t = {
        "ours_f32_to_f16": best_of(lambda: native.f32_to_f16(x32, out=o16), reps),
        "ours_f16_to_f32": best_of(lambda: native.f16_to_f32(x16, out=o32), reps),
        "numpy_astype_f32_to_f16": best_of(lambda: x32.astype(np.float16), reps),
        "numpy_astype_f16_to_f32": best_of(lambda: x16.astype(np.float32), reps),
        "numpy_copyto_f32_to_f16": best_of(lambda: np.copyto(o16, x32, casting="unsafe"), reps),
        "memcpy_f32": best_of(lambda: np.copyto(c32, x32), reps),
    }
    previous = native.set_simd("scalar")
    try:
        t["ours_scalar_f32_to_f16"] = best_of(lambda: native.f32_to_f16(x32, out=o16), reps)
        t["ours_scalar_f16_to_f32"] = best_of(lambda: native.f16_to_f32(x16, out=o32), reps)
    finally:
        native.set_simd(previous)
    out = {"elements": n, "fp32_bytes": x32.nbytes}
    out.update({f"{k}_GBps": round(fp32_gb / v, 2) for k, v in t.items()})
    out["speedup_vs_numpy_astype_f32_to_f16"] = round(t["numpy_astype_f32_to_f16"] / t["ours_f32_to_f16"], 1)
    out["speedup_vs_numpy_astype_f16_to_f32"] = round(t["numpy_astype_f16_to_f32"] / t["ours_f16_to_f32"], 1)
    return out


def layer_plan(rng):
    """Weights of one layer and the (surface, matrix, column, transpose) list of the kernel plan."""
    w = {k: (rng.standard_normal(shape) * 0.02).astype(np.float32) for k, shape in
         [("wq", (D, D)), ("wk", (D, D)), ("wv", (D, D)), ("wo", (D, D)),
          ("w1", (H, D)), ("w3", (H, D)), ("w2", (D, H))]}
    surf = {  # kernel inputs [C, SP] fp16, zero-filled (faulted in)
        "sdpaFwd": np.zeros((D, 2 * S + 4 * D), np.float16),
        "ffnFused": np.zeros((D, 2 * S + 3 * H), np.float16),
        "ffnBwdW2t": np.zeros((D, S + H), np.float16),
        "ffnBwdW13t": np.zeros((H, 3 * S + 2 * D), np.float16),
        "wotBwd": np.zeros((D, S + D), np.float16),
        "qkvBwd": np.zeros((D, 3 * S + 3 * D), np.float16),
    }
    plan = [
        ("sdpaFwd", "wq", 2 * S, True), ("sdpaFwd", "wk", 2 * S + D, True),
        ("sdpaFwd", "wv", 2 * S + 2 * D, True), ("sdpaFwd", "wo", 2 * S + 3 * D, False),
        ("ffnFused", "w1", 2 * S, True), ("ffnFused", "w3", 2 * S + H, True),
        ("ffnFused", "w2", 2 * S + 2 * H, False),
        ("ffnBwdW2t", "w2", S, False),
        ("ffnBwdW13t", "w1", 3 * S, False), ("ffnBwdW13t", "w3", 3 * S + D, False),
        ("wotBwd", "wo", S, False),
        ("qkvBwd", "wq", 3 * S, False), ("qkvBwd", "wk", 3 * S + D, False), ("qkvBwd", "wv", 3 * S + 2 * D, False),
    ]
    return w, surf, plan


def bench_staging(layers, reps):
    rng = np.random.default_rng(1)
    model = [layer_plan(rng) for _ in range(layers)]
    # memcpy baselines of the same data: every staged matrix copied as fp32, and its fp16 bytes copied
    f32_copies = [[(w[m], np.zeros_like(w[m])) for _, m, _, _ in plan] for w, _, plan in model]
    f16_copies = [[(w[m].astype(np.float16), np.zeros(w[m].shape, np.float16)) for _, m, _, _ in plan]
                  for w, _, plan in model]

    def stage_all():
        for w, surf, plan in model:
            for s, m, col, t in plan:
                native.stage(surf[s], w[m], col, transpose=t)

    def copy_all(copies):
        for layer in copies:
            for src, dst in layer:
                np.copyto(dst, src)

    stage_all()  # correctness spot check of one transposed and one plain block
    w, surf, _ = model[-1]
    assert np.array_equal(surf["ffnFused"][:, 2 * S:2 * S + H], w["w1"].T.astype(np.float16))
    assert np.array_equal(surf["qkvBwd"][:, 3 * S + D:3 * S + 2 * D], w["wk"].astype(np.float16))
    n_elems = sum(w[m].size for w, _, plan in model for _, m, _, _ in plan)
    t_stage = best_of(stage_all, reps)

    def stage_some(transposed):
        for w, surf, plan in model:
            for s, m, col, t in plan:
                if t == transposed:
                    native.stage(surf[s], w[m], col, transpose=t)

    n_t = sum(w[m].size for w, _, plan in model for _, m, _, t in plan if t)
    t_t = best_of(lambda: stage_some(True), reps)
    t_p = best_of(lambda: stage_some(False), reps)
    t_f32 = best_of(lambda: copy_all(f32_copies), reps)
    t_f16 = best_of(lambda: copy_all(f16_copies), reps)
    previous = native.set_simd("scalar")
    try:
        t_scalar = best_of(stage_all, max(1, reps // 2))
    finally:
        native.set_simd(previous)
    return {
        "layers": layers,
        "elements": n_elems,
        "fp32_MB": round(n_elems * 4 / 1e6, 1),
        "stage_ms": round(t_stage * 1e3, 2),
        "stage_scalar_ms": round(t_scalar * 1e3, 2),
        "memcpy_fp32_src_ms": round(t_f32 * 1e3, 2),
        "memcpy_fp16_dst_ms": round(t_f16 * 1e3, 2),
        "ratio_vs_memcpy_fp32": round(t_stage / t_f32, 2),
        "ratio_vs_memcpy_fp16": round(t_stage / t_f16, 2),
        "stage_GBps_fp32": round(n_elems * 4 / 1e9 / t_stage, 2),
        "transposed_blocks_GBps_fp32": round(n_t * 4 / 1e9 / t_t, 2),
        "plain_blocks_GBps_fp32": round((n_elems - n_t) * 4 / 1e9 / t_p, 2),
    }


def bench_overlap(layers, reps):
    """Wall time of (main-thread work || queued dW sgemms) against each alone.

    Three kinds of main-thread work: numpy matmul (as the brief asks; on a machine whose two vCPUs
    share FMA units this cannot overlap with another sgemm at all, see ``ceiling``), a sleep standing
    in for waiting on an ANE eval, and fp16 conversion (memory-bound, like staging). ``ceiling`` runs
    the matmul loop on two plain Python threads: the best any queue could do with matmul here.
    """
    import threading

    rng = np.random.default_rng(2)
    # dW jobs of one step (per layer: W2 <- (dffn, gate), W1/W3 <- (dh, x2n), Wo, Wq, Wk, Wv)
    shapes = [(D, H), (H, D), (H, D), (D, D), (D, D), (D, D), (D, D)]
    jobs = []
    for _ in range(layers):
        for out, inn in shapes:
            jobs.append((np.zeros((out, inn), np.float32), rng.standard_normal((out, S)).astype(np.float32),
                         rng.standard_normal((inn, S)).astype(np.float32)))
    flops = sum(2 * dw.size * S for dw, _, _ in jobs)
    q = native.DWQueue(blas_threads=1)

    def queued():
        for dw, dy, x in jobs:
            q.submit(dw, dy, x)
        q.wait()

    queued()
    t_q = best_of(queued, reps)

    a = rng.standard_normal((D, D)).astype(np.float32)
    b = rng.standard_normal((D, 4 * S)).astype(np.float32)
    c = np.empty((D, 4 * S), np.float32)
    x32 = rng.standard_normal(1 << 22).astype(np.float32)
    x16 = np.empty(x32.shape, np.float16)

    def matmul_once():
        np.matmul(a, b, out=c)

    def convert_once():
        native.f32_to_f16(x32, out=x16)

    def calibrated(once):
        t1 = best_of(lambda: [once() for _ in range(4)], reps) / 4
        n = max(1, round(t_q / t1))  # main-thread work about as long as the queue's
        return lambda: [once() for _ in range(n)]

    def measure(main_work):
        t_m = best_of(main_work, reps)

        def both():
            for dw, dy, x in jobs:
                q.submit(dw, dy, x)
            main_work()
            q.wait()

        t_b = best_of(both, reps)
        return {"main_alone_ms": round(t_m * 1e3, 2), "wall_both_ms": round(t_b * 1e3, 2),
                "ratio_wall_over_max_parts": round(t_b / max(t_q, t_m), 3),
                "ratio_wall_over_sum_parts": round(t_b / (t_q + t_m), 3)}

    mm = calibrated(matmul_once)
    result = {
        "layers": layers,
        "jobs": len(jobs),
        "queue_GFLOPs": round(flops / 1e9, 2),
        "queue_alone_ms": round(t_q * 1e3, 2),
        "main_matmul": measure(mm),
        "main_sleep": measure(lambda: time.sleep(t_q)),
        "main_fp16_conversion": measure(calibrated(convert_once)),
    }

    def two_threads():
        th = threading.Thread(target=mm)
        th.start()
        mm()
        th.join()

    t_m = best_of(mm, reps)
    t_two = best_of(two_threads, reps)
    result["ceiling_two_numpy_matmul_threads_ratio_wall_over_max_parts"] = round(t_two / t_m, 3)
    result.update({
        "queue_blas_threads": 1,
        "queue_blas_thread_scope": q.blas_thread_scope,
        "main_numpy_blas_threads_env": os.environ.get("OPENBLAS_NUM_THREADS"),
        "snapshot_copies": True,
    })
    q.close()
    return result


HELP = "fp16 conversion, Stories110M weight staging, dW queue overlap (rustane.native)"


def add_arguments(ap) -> None:
    ap.add_argument("--json", action="store_true", help="print one JSON object (default: indented)")
    ap.add_argument("--elements", type=int, default=1 << 24, help="conversion size (default 16M = 64 MiB fp32)")
    ap.add_argument("--layers", type=int, default=12, help="transformer layers staged / dW-queued (default 12)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", default="conversion,staging,dw_overlap",
                    help="comma-separated subset of: conversion, staging, dw_overlap")


def run(args) -> int:
    parts = {
        "conversion": lambda: bench_conversion(args.elements, args.reps),
        "staging": lambda: bench_staging(args.layers, args.reps),
        "dw_overlap": lambda: bench_overlap(args.layers, args.reps),
    }
    wanted = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(wanted) - set(parts)
    if unknown:
        raise ValueError(f"--only: unknown part(s) {sorted(unknown)}; choose from {sorted(parts)}")
    if args.elements < 1 or args.layers < 1 or args.reps < 1:
        raise ValueError("--elements, --layers and --reps must be >= 1")
    result = {"simd": native.simd(), "cpu_count": os.cpu_count(),
              "load_average_before": [round(v, 2) for v in os.getloadavg()]}
    result.update({name: parts[name]() for name in wanted})
    json.dump(result, sys.stdout, indent=None if args.json else 2)
    sys.stdout.write("\n")
    return 0


