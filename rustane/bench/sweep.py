"""``python -m rustane.bench sweep --preset P [--seq-len S]``: the simulator against PyTorch eager
at one size, measured two ways that a shared 2-core machine cannot fake.

Four sides of the same model and token batch, interleaved per round (sim fp32, sim fp16, PyTorch
at its default threads, PyTorch at one thread):

- **wall** ratios, tokens/s of the simulator over PyTorch eager (its default OpenMP threads),
  taken only from *quiet* rounds: other processes used less than ``QUIET_SHARE`` of the CPUs
  during the round. PyTorch's threads collapse when a neighbour holds a core (one contended run
  once read "5.3x PyTorch"), so a contended round says nothing about either side.
- **cpu** ratios, the CPU seconds one PyTorch step takes at ``torch.set_num_threads(1)`` over the
  CPU seconds of one simulator step (all of its threads: kernels, split helpers, the dW queue).
  The work each side needs, which a neighbour stretches in wall time but hardly in CPU time.

Every round keeps all four sides' wall and CPU seconds and the other processes' share, so the
JSON can be re-read with another threshold. Sizes past the ANE rules (Stories15M at seq 1024: a
dimension of 24,576 > 16,384) need ``--research`` (``ane_rules=False``, simulator only).
"""

from __future__ import annotations

import json
import statistics

from rustane.ane_guard import AneRuleError
from rustane.bench import metrics as M
from rustane.bench.train import TorchSide, _batch
from rustane.config import preset, preset_names

HELP = "sim fp32/fp16 vs PyTorch eager at one size: quiet-round wall ratios and 1-thread CPU-time ratios"
#: a round is quiet when other processes used less than this share of the CPUs during it
QUIET_SHARE = 0.15


class _Engine:
    def __init__(self, cfg, precision: str, batch, steps: int, research: bool):
        from rustane.engine import Engine, TrainConfig

        self.batch = batch
        self.eng = Engine(cfg, backend="sim", precision=precision, seed=0, ane_rules=not research,
                          train=TrainConfig(steps=steps + 8, warmup=1, lr=1e-4, accum=len(batch[0])))
        self.phases: list[dict] = []

    def step(self) -> None:
        self.phases.append(self.eng.train_step(self.batch).ms)

    def close(self) -> None:
        self.eng.close()


class _TorchThreads:
    """One PyTorch step at a fixed intra-op thread count (restored after)."""

    def __init__(self, side: TorchSide, threads: int | None):
        self.side, self.threads = side, threads

    def step(self) -> None:
        torch = self.side.torch
        saved = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            self.side.step()
        finally:
            torch.set_num_threads(saved)


def _ratios(rounds: list[dict], num_side: str, den_side: str, clock: str, quiet_only: bool) -> list[float]:
    """Per-round tokens/s ratio ``num_side / den_side`` (= den time over num time)."""
    out = []
    for r in rounds:
        share = r["_others_share"]
        if quiet_only and (share is None or share >= QUIET_SHARE):
            continue
        rep = r["_repeats"]
        out.append(rep[den_side][clock] / rep[num_side][clock])
    return out


def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3), "values": [round(v, 3) for v in values]}


def bench_sweep(preset_name: str, seq_len: int | None, rounds: int, warmup: int, research: bool) -> dict:
    cfg = preset(preset_name, **({"seq_len": seq_len} if seq_len else {}))
    batch = _batch(cfg, 1)
    tag = f"{preset_name}.s{cfg.seq_len}"
    sides: dict = {}
    engines: list = []
    try:
        for prec in ("fp32", "fp16"):
            try:
                e = _Engine(cfg, prec, batch, rounds + warmup + 2, research)
            except AneRuleError as exc:
                first = (str(exc).splitlines()[1:2] or [str(exc)])[0].strip()
                raise ValueError(f"{preset_name} at seq_len {cfg.seq_len} in {prec} breaks an ANE rule ({first}); "
                                 "add --research to measure it on the simulator") from None
            engines.append(e)
            sides[f"sim_{prec}"] = e.step
        torch_side = TorchSide(cfg, batch)
        default_threads = torch_side.torch.get_num_threads()
        sides["torch"] = _TorchThreads(torch_side, None).step
        sides["torch_1t"] = _TorchThreads(torch_side, 1).step
        for _ in range(warmup):
            for fn in sides.values():
                fn()
        res = M.interleaved(sides, rounds, clock="wall", retries=0)
        policy = engines[0].eng.model.threads.describe()
        phases = {f"sim_{p}": {k: round(statistics.median(ph[k] for ph in e.phases[warmup:]), 1)
                               for k in e.phases[0]} for p, e in zip(("fp32", "fp16"), engines)}
    finally:
        for e in engines:
            e.close()
    mets, summary = [], {}
    for prec in ("fp32", "fp16"):
        side = f"sim_{prec}"
        wall = _ratios(res, side, "torch", "wall_s", quiet_only=True)
        cpu = _ratios(res, side, "torch_1t", "cpu_s", quiet_only=False)
        summary[f"{side}_vs_torch_wall_quiet"] = _summary(wall)
        summary[f"{side}_vs_torch_wall_all"] = _summary(_ratios(res, side, "torch", "wall_s", quiet_only=False))
        summary[f"{side}_vs_torch_1t_cpu"] = _summary(cpu)
        # both on one core's worth of time: meaningful when a neighbour holds the other core
        summary[f"{side}_vs_torch_1t_wall_all"] = _summary(_ratios(res, side, "torch_1t", "wall_s", quiet_only=False))
        if wall:
            mets.append(M.metric(f"sweep.{tag}.{side}_vs_torch.wall", wall, "x", "higher", "ratio",
                                 vs="torch", note=f"tokens/s ratio, quiet rounds only (others < {QUIET_SHARE} of the CPUs)"))
        mets.append(M.metric(f"sweep.{tag}.{side}_vs_torch_1t.cpu", cpu, "x", "higher", "ratio", vs="torch_1t",
                             note="CPU seconds per step of PyTorch at 1 thread over the simulator's (all its threads)"))
    for side in sides:
        for clock, unit in (("wall_s", "ms"), ("cpu_s", "ms")):
            vals = [1e3 * r["_repeats"][side][clock] for r in res]
            mets.append(M.metric(f"sweep.{tag}.{side}.{clock[:-2]}_ms_per_step", vals, unit, "lower", "absolute",
                                 [r["_others_share"] is None or r["_others_share"] >= QUIET_SHARE for r in res]))
    details = {"preset": preset_name, "seq_len": cfg.seq_len, "params": cfg.n_params, "tokens_per_step": cfg.seq_len,
               "rounds": rounds, "warmup": warmup, "ane_rules": not research, "quiet_share": QUIET_SHARE,
               "torch_threads_default": default_threads, "cpu_policy": policy, "phases_ms_median": phases,
               "summary": summary,
               "per_round": [{"others_share": r["_others_share"],
                              **{k: {"wall_s": v["wall_s"], "cpu_s": v["cpu_s"]} for k, v in r["_repeats"].items()}}
                             for r in res]}
    return M.document("sweep", mets, details)


def add_arguments(p) -> None:
    p.add_argument("--preset", default="stories15m", choices=preset_names())
    p.add_argument("--seq-len", type=int, default=None, help="override the preset's seq_len")
    p.add_argument("--rounds", type=int, default=5, help="interleaved measured rounds")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    p.add_argument("--research", action="store_true",
                   help="ane_rules=False: admit sizes past the ANE rules on the simulator (e.g. Stories15M at seq 1024 in fp16)")
    p.add_argument("--out", default=None, help="write the JSON here (default: stdout)")


def run(args) -> int:
    if args.rounds < 1 or args.warmup < 0:
        raise ValueError("--rounds must be >= 1 and --warmup >= 0")
    doc = bench_sweep(args.preset, args.seq_len, args.rounds, args.warmup, args.research)
    text = json.dumps(doc, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        s = doc["details"]["summary"]
        for k, v in s.items():
            print(f"{k:32s} " + (f"{v['min']:.3f}-{v['max']:.3f} (median {v['median']:.3f}, n={v['n']})" if v["n"] else "no rounds"))
    else:
        print(text)
    return 0
