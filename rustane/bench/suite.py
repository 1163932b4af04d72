"""``python -m rustane.bench --suite ci [--out FILE]``: the quick fixed set the CI gate compares.

Designed for a shared 2-core machine (docs/benchmarks.md, "Why the gate does not flake"):

- The measurements run in a child process pinned to one CPU with every BLAS/OpenMP pool at one
  thread, and each side is timed in *CPU seconds of this process*, not wall seconds. Another
  process taking the core stretches wall time but not the CPU time our work needs; PyTorch's two
  OpenMP threads collapsing under contention (a swing to "5.3× PyTorch" in one wall-clock run)
  cannot happen with one thread.
- Sides interleave (sim fp32, sim fp16, PyTorch, sgemm yardstick, sim fp32, …), and the gated
  figures are per-round ratios: what slows the whole machine (frequency, a neighbour thrashing
  the shared cache) hits both sides of a ratio alike.
- Every repeat records the CPU time other processes took on our CPU; contended rounds are marked,
  retried a bounded number of times, and left out of the median when enough clean rounds remain.

``RUSTANE_BENCH_INJECT_SLOWDOWN=0.3`` burns an extra 30 % CPU time inside each simulator step's
measurement: the proof that the gate catches a slowdown (docs/benchmarks.md). Nothing else reads it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

SUITES = {
    # the gate's set: ~1 s of CPU per round; 13 rounds keep the median steady on a loaded machine.
    # "long": sim fp16 again at a long sequence (a research size past the ANE rules, simulator
    # only), where the S x S element-wise work of attention dominates: losing the fp16 row programs
    # (rustane/mil/fuse_rows.py) costs ~5 % at seq 256, inside the tolerance, and +19-23 % in sgemm
    # units here (RUSTANE_FUSE_ROWS=0 python -m rustane.bench --suite ci; docs/benchmarks.md)
    "ci": {"preset": "stories15m", "seq_len": 256, "rounds": 13, "retries": 3, "warmup": 3, "null_steps": 5,
           "long": {"seq_len": 1024, "rounds": 7, "retries": 2, "warmup": 2}},
    # the same measurements at the tiny preset in seconds: for tests of the machinery, not a gate
    "smoke": {"preset": "tiny", "seq_len": 192, "rounds": 3, "retries": 0, "warmup": 1, "null_steps": 1,
              "long": {"seq_len": 384, "rounds": 2, "retries": 0, "warmup": 0}},
}
_ONE_THREAD = {k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")}
# glibc malloc keeps freed memory instead of returning it to the kernel: PyTorch's eager step
# frees and re-allocates ~100 MB of activations, and with the default thresholds each step took
# 30k-120k page faults whose system time swung 0.005-0.57 s with the neighbours' memory traffic
# (the step's user time stayed 0.31-0.35 s). With these, steady-state steps take no page faults.
_KEEP_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
              "MALLOC_TOP_PAD_": str(256 << 20)}


def _pin_one_cpu() -> int | None:
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
        return cpus[-1]
    except (AttributeError, OSError):
        return None  # macOS: no affinity API; the CPU clock still measures our own work


def resolve_backend(backend: str) -> str:
    """``auto``: the ANE where it runs, else the simulator (the machine class follows)."""
    if backend != "auto":
        return backend
    from rustane.backends import available

    return "ane" if available().get("ane") == "" else "sim"


def run_suite(name: str, out: str | None, debug: bool = False, backend: str = "sim") -> int:
    """Parent: run the suite's child with one-thread pools, add the wall time, write the JSON."""
    backend = resolve_backend(backend)
    env = {**os.environ, **_ONE_THREAD, **_KEEP_HEAP, "RUSTANE_BENCH_DEBUG": "1" if debug else ""}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rustane.bench", "_suite-child", name, backend],
                          env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"error: the {name} suite's benchmark process failed (exit {proc.returncode}); "
              "rerun with --debug for its traceback", file=sys.stderr)
        return 2
    doc = json.loads(proc.stdout)
    doc["details"]["suite_wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(doc, indent=1) + "\n"
    if out:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, out)
        print(f"wrote {out} ({len(doc['metrics'])} metrics, {doc['details']['suite_wall_s']} s)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _sgemm_yardstick():
    """A fixed single-thread sgemm (~2.8 GFLOP, ~25 ms here; ``python -m rustane.bench --suite ci`` times it):
    the unit the step is expressed in."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((384, 384)).astype(np.float32)
    b = rng.standard_normal((384, 640)).astype(np.float32)
    c = np.empty((384, 640), np.float32)

    def run():
        for _ in range(15):
            np.matmul(a, b, out=c)
    return run, 15 * 2 * 384 * 384 * 640


def child_main(name: str, backend: str = "sim") -> int:
    try:
        return _child(name, backend)
    except Exception as exc:
        if os.environ.get("RUSTANE_BENCH_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _child(name: str, backend: str) -> int:
    cpu = _pin_one_cpu()
    import numpy as np

    from rustane.bench import metrics as M
    from rustane.bench.train import EngineSide, TorchSide, _batch, null_orchestration
    from rustane.config import preset

    spec = SUITES[name]
    inject = float(os.environ.get("RUSTANE_BENCH_INJECT_SLOWDOWN", "0") or 0)
    cfg = preset(spec["preset"], seq_len=spec["seq_len"])
    batch = _batch(cfg, 1)
    import torch

    torch.set_num_threads(1)
    sgemm, sgemm_flops = _sgemm_yardstick()
    rounds, summaries = _interleave_steps(
        M, {"sim_fp32": lambda: EngineSide(cfg, "sim", "fp32", batch, 64),
            "sim_fp16": lambda: EngineSide(cfg, "sim", "fp16", batch, 64),
            "torch_eager_fp32": lambda: TorchSide(cfg, batch)},
        sgemm, spec, inject)
    tag = f"ci.train.{spec['preset']}.s{spec['seq_len']}"
    cont = [r["_contended"] for r in rounds]
    mets = _step_metrics(M, tag, rounds, ("fp32", "fp16"))
    mets.append(M.metric("ci.sgemm.gflops_1thread", [sgemm_flops / r["sgemm"] / 1e9 for r in rounds], "GFLOP/s",
                         "higher", "absolute", cont))
    mets += _conversion_metrics(M)
    long_mets, long_details = _long_context_metrics(M, spec, inject)
    mets += long_mets
    ane = _ane_metrics(M, cfg, batch, spec, tag) if backend == "ane" else None
    if ane is not None:
        mets += ane[0]
    null = null_orchestration(cfg, 1, spec["null_steps"], 1)
    mets.append(M.metric(f"ci.null.{spec['preset']}.us_per_eval", [null["us_per_eval_orchestration"]], "us",
                         "lower", "absolute", note="best median of 3 on the null backend"))
    details = {"suite": spec, "pinned_cpu": cpu, "inject_slowdown": inject, "sides": summaries, "null": null,
               "rounds": [{k: v for k, v in r.items() if k != "_repeats"} for r in rounds],
               "round_records": [r["_repeats"] for r in rounds], "numpy": np.__version__,
               "torch": torch.__version__, "long": long_details}
    if ane is not None:
        details["ane"] = ane[1]
    doc = M.document("suite", mets, details, backend=backend, suite=name)
    sys.stdout.write(json.dumps(doc))
    return 0


def _interleave_steps(M, make_sides: dict, sgemm, part: dict, inject: float) -> tuple[list[dict], dict]:
    """Build the training sides (``make_sides``: name -> a factory of an EngineSide/TorchSide, built
    in order, and those built closed again if a later one fails), warm them up,
    run ``part["rounds"]`` interleaved rounds of them and the sgemm yardstick in CPU seconds, and
    close them. ``inject`` burns that fraction extra inside each simulator side's measurement.
    Returns the rounds and each side's summary."""
    sides: dict = {}
    try:
        for k, make in make_sides.items():
            sides[k] = make()
        fns = {k: s.step for k, s in sides.items()}
        fns["sgemm"] = sgemm
        for _ in range(part["warmup"]):
            for f in fns.values():
                f()
        burn = {k: inject for k in sides if k.startswith("sim_")} if inject else None
        rounds = M.interleaved(fns, part["rounds"], clock="cpu", retries=part["retries"], burn=burn)
        return rounds, {k: s.summary(part["warmup"]) for k, s in sides.items()}
    finally:
        for s in sides.values():
            s.close()


def _step_metrics(M, tag: str, rounds: list[dict], precisions: tuple[str, ...]) -> list[dict]:
    """Per precision the gated ratios (against PyTorch eager, and in sgemm units), then every
    side's CPU ms/step (reported, not gated)."""
    cont = [r["_contended"] for r in rounds]
    mets = []
    for prec in precisions:
        mets.append(M.ratio_metric(f"{tag}.sim_{prec}_vs_torch", rounds, "torch_eager_fp32", f"sim_{prec}", "x",
                                   "higher", vs="torch_eager_fp32",
                                   note="tokens/s ratio sim / PyTorch eager (1 thread), CPU seconds per round"))
        mets.append(M.ratio_metric(f"{tag}.sim_{prec}_in_sgemm_units", rounds, f"sim_{prec}", "sgemm", "sgemm",
                                   "lower", vs="sgemm yardstick",
                                   note="CPU time of one step over one fixed single-thread sgemm, per round"))
    for k in [f"sim_{p}" for p in precisions] + ["torch_eager_fp32"]:
        mets.append(M.metric(f"{tag}.{k}.cpu_ms_per_step", [1e3 * r[k] for r in rounds], "ms", "lower",
                             "absolute", cont))
    return mets


def _long_context_metrics(M, spec: dict, inject: float) -> tuple[list[dict], dict | None]:
    """The fp16 simulator against PyTorch eager at ``spec["long"]["seq_len"]``, CPU seconds per
    interleaved round, like the main part (same pinned CPU, one thread each)."""
    long = spec.get("long")
    if not long:
        return [], None
    from rustane.bench.train import EngineSide, TorchSide, _batch
    from rustane.config import preset

    cfg = preset(spec["preset"], seq_len=long["seq_len"])
    batch = _batch(cfg, 1)
    rounds, summaries = _interleave_steps(
        M, {"sim_fp16": lambda: EngineSide(cfg, "sim", "fp16", batch, 32, ane_rules=False),
            "torch_eager_fp32": lambda: TorchSide(cfg, batch)},
        _sgemm_yardstick()[0], long, inject)
    mets = _step_metrics(M, f"ci.train.{spec['preset']}.s{long['seq_len']}", rounds, ("fp16",))
    details = {"seq_len": long["seq_len"], "sides": summaries,
               "rounds": [{k: v for k, v in r.items() if k != "_repeats"} for r in rounds]}
    return mets, details


def _conversion_metrics(M) -> list[dict]:
    """fp16 conversion (rustane.native) against numpy's astype, interleaved, CPU seconds."""
    import numpy as np

    from rustane import native

    rng = np.random.default_rng(0)
    # 64 Ki elements (256 KiB fp32 + 128 KiB fp16) stay in L2: the SIMD conversion is measured, not
    # the memory bus, which neighbours share (with 8 MiB arrays the ratio swung 19x-29x run to run;
    # python -m rustane.bench --suite ci re-measures it)
    x32 = rng.standard_normal(1 << 16).astype(np.float32)
    x16 = x32.astype(np.float16)
    o16, o32 = np.empty_like(x16), np.empty_like(x32)
    reps = 200
    fns = {"ours_f32_to_f16": lambda: [native.f32_to_f16(x32, out=o16) for _ in range(reps)],
           "numpy_f32_to_f16": lambda: [np.copyto(o16, x32, casting="unsafe") for _ in range(reps)],
           "ours_f16_to_f32": lambda: [native.f16_to_f32(x16, out=o32) for _ in range(reps)],
           "numpy_f16_to_f32": lambda: [np.copyto(o32, x16, casting="unsafe") for _ in range(reps)]}
    for f in fns.values():
        f()
    rounds = M.interleaved(fns, 9, clock="cpu", retries=2)
    return [M.ratio_metric(f"ci.native.{d}_vs_numpy", rounds, f"numpy_{d}", f"ours_{d}", "x", "higher",
                           vs="numpy copyto (same arrays)", note="conversion speed, ours / numpy, per round")
            for d in ("f32_to_f16", "f16_to_f32")]


def _ane_metrics(M, cfg, batch, spec, tag) -> tuple[list[dict], dict]:
    """On a Mac with a working ANE: the engine on the ANE against the fp16 simulator step, both
    in wall seconds (ANE work is not CPU time), interleaved. The simulator side is the CPU
    yardstick: the ratio says how much the Neural Engine buys over computing the same kernels."""
    from rustane.bench.train import EngineSide

    sides = {}
    try:
        sides["ane_fp16"] = EngineSide(cfg, "ane", "fp16", batch, 64)
        sides["sim_fp16"] = EngineSide(cfg, "sim", "fp16", batch, 64)
        for _ in range(spec["warmup"]):
            for s in sides.values():
                s.step()
        rounds = M.interleaved({k: s.step for k, s in sides.items()}, spec["rounds"], clock="wall",
                               retries=spec["retries"])
        summary = {k: s.summary(spec["warmup"]) for k, s in sides.items()}
    finally:
        for s in sides.values():
            s.close()
    mets = [M.ratio_metric(f"{tag}.ane_fp16_vs_sim_fp16", rounds, "sim_fp16", "ane_fp16", "x", "higher",
                           vs="sim_fp16 (wall)", note="step speed, ANE / fp16 simulator, wall seconds per round"),
            M.metric(f"{tag}.ane_fp16.ms_per_step", [1e3 * r["ane_fp16"] for r in rounds], "ms", "lower",
                     "absolute", [r["_contended"] for r in rounds])]
    return mets, {"sides": summary, "rounds": [{k: v for k, v in r.items() if k != "_repeats"} for r in rounds]}
