"""Metric records of the bench JSON, and how a repeat is measured on a shared machine.

Every metric carries a stable name, a unit, a direction (``higher``/``lower`` is better), a kind
(``ratio``: against a baseline measured in the same process, interleaved with it; ``absolute``: a
bare time or rate, which only means something on the machine that measured it), all repeats, the
median and the spread. ``rustane.bench.compare`` gates on ratios only (docs/benchmarks.md).

Each repeat also records how much CPU time *other* processes used on the CPUs this process may
run on while it ran (busy jiffies of those CPUs in /proc/stat minus this process's own rusage). A
repeat where others took more than ``CONTENDED_SHARE`` of those CPUs is marked ``contended``; the
median and spread are taken over the uncontended repeats when at least ``MIN_CLEAN`` remain, else
over all of them (and the metric says so), so a loaded machine degrades the evidence, visibly,
instead of silently.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence

SCHEMA = "rustane-bench/1"
CONTENDED_SHARE = 0.5  # of the CPUs this process may use, taken by other processes
MIN_CLEAN = 3

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _allowed_cpus() -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _busy_seconds(cpus: Sequence[int] | None) -> float | None:
    """Busy (non-idle, non-iowait) CPU seconds of ``cpus`` since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    want = {f"cpu{c}" for c in cpus} if cpus is not None else {"cpu"}
    busy = 0
    for line in lines:
        parts = line.split()
        if parts and parts[0] in want:
            v = [int(x) for x in parts[1:]]
            # user nice system idle iowait irq softirq steal (guest is inside user)
            busy += sum(v[:3]) + sum(v[5:8])
    return busy / _CLK_TCK


def _own_cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class Repeat:
    """Measures one repeat: wall, this process's CPU time, other processes' CPU time."""

    def __init__(self):
        self.cpus = _allowed_cpus()

    def __enter__(self) -> Repeat:
        self._busy0 = _busy_seconds(self.cpus)
        self._own0 = _own_cpu_seconds()
        self._cpu0 = time.process_time()
        self._wall0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._wall0
        self.cpu_s = time.process_time() - self._cpu0
        own = _own_cpu_seconds() - self._own0
        busy1 = _busy_seconds(self.cpus)
        if self._busy0 is None or busy1 is None:
            self.others_cpu_s = None
            self.others_share = None
        else:
            # jiffy granularity (10 ms) makes short repeats imprecise: clamp at zero
            self.others_cpu_s = max(0.0, (busy1 - self._busy0) - own)
            n = len(self.cpus) if self.cpus else (os.cpu_count() or 1)
            self.others_share = self.others_cpu_s / max(self.wall_s * n, 1e-9)

    @property
    def contended(self) -> bool:
        return self.others_share is not None and self.others_share > CONTENDED_SHARE

    def record(self, value: float) -> dict:
        return {"value": value, "wall_s": round(self.wall_s, 6), "cpu_s": round(self.cpu_s, 6),
                "others_cpu_s": None if self.others_cpu_s is None else round(self.others_cpu_s, 3),
                "others_share": None if self.others_share is None else round(self.others_share, 3),
                "contended": self.contended}


def measure(fn: Callable[[], object], clock: str = "cpu") -> tuple[float, Repeat]:
    """Run ``fn`` once; its seconds on ``clock`` (``cpu``: this process's CPU time, ``wall``)."""
    with Repeat() as r:
        fn()
    return (r.cpu_s if clock == "cpu" else r.wall_s), r


def interleaved(sides: dict[str, Callable[[], object]], repeats: int, clock: str = "cpu",
                retries: int = 1, burn: dict[str, float] | None = None) -> list[dict]:
    """``repeats`` rounds of every side in turn (A B A B …), so a noisy neighbour hits all sides.

    Returns one dict per round: ``{side: seconds}`` plus ``_contended`` (any side contended) and
    ``_repeats`` (the per-side records). A contended round is run again up to ``retries`` times in
    total over the whole call (bounded, so a loaded machine cannot stretch the bench unboundedly);
    the contended rounds are kept and marked. ``burn`` adds that fraction of a side's measured time
    as extra CPU work inside its measurement (``RUSTANE_BENCH_INJECT_SLOWDOWN``; proof only).
    """
    rounds: list[dict] = []
    retries_left = retries
    while len(rounds) < repeats:
        rnd: dict = {"_repeats": {}}
        for name, fn in sides.items():
            frac = (burn or {}).get(name, 0.0)
            with Repeat() as r:
                t0 = time.process_time()
                fn()
                if frac > 0:
                    _spin(frac * (time.process_time() - t0))
            rnd[name] = r.cpu_s if clock == "cpu" else r.wall_s
            rnd["_repeats"][name] = r.record(rnd[name])
        # judged over the whole round: short sides are below /proc/stat's 10 ms resolution
        others = [v["others_cpu_s"] for v in rnd["_repeats"].values()]
        if None in others:
            rnd["_others_share"] = None
        else:
            n = len(_allowed_cpus() or [0])
            wall = sum(v["wall_s"] for v in rnd["_repeats"].values())
            rnd["_others_share"] = round(sum(others) / max(wall * n, 1e-9), 3)
        rnd["_contended"] = rnd["_others_share"] is not None and rnd["_others_share"] > CONTENDED_SHARE
        if rnd["_contended"] and retries_left > 0:
            retries_left -= 1
            rnd["_retried"] = True
            rounds.append(rnd)
            repeats += 1  # the retry replaces this round in the decision, which keeps it on record
            continue
        rounds.append(rnd)
    return rounds


def _spin(seconds: float) -> None:
    """Burn ``seconds`` of this thread's CPU time (an injected slowdown that CPU clocks see)."""
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        for i in range(1000):
            x += i * i


def metric(name: str, values: Sequence[float], unit: str, direction: str, kind: str,
           contended: Sequence[bool] | None = None, vs: str | None = None, note: str | None = None,
           records: list | None = None) -> dict:
    """One metric record. ``values`` are all repeats; ``contended`` marks the ones to leave out of
    the median and spread when enough clean ones remain."""
    if direction not in ("higher", "lower"):
        raise ValueError(f"direction must be 'higher' or 'lower', got {direction!r}")
    if kind not in ("ratio", "absolute"):
        raise ValueError(f"kind must be 'ratio' or 'absolute', got {kind!r}")
    if not values:
        raise ValueError(f"metric {name}: no repeats")
    contended = list(contended) if contended is not None else [False] * len(values)
    clean = [v for v, c in zip(values, contended) if not c]
    basis = "uncontended" if len(clean) >= MIN_CLEAN else "all (too few uncontended repeats)"
    used = clean if len(clean) >= MIN_CLEAN else list(values)
    med = statistics.median(used)
    out = {"name": name, "unit": unit, "direction": direction, "kind": kind,
           "repeats": [float(v) for v in values], "contended": contended,
           "median": float(med), "spread": spread(used), "basis": basis}
    if vs is not None:
        out["vs"] = vs
    if note is not None:
        out["note"] = note
    if records is not None:
        out["records"] = records
    return out


def spread(values: Sequence[float]) -> float:
    """Relative spread of repeats: half their range over their median (0 for one repeat).

    Half the range, not a standard deviation: with 5–9 repeats a deviation estimate is itself
    noisy, and the gate wants a conservative 'how far apart do unchanged runs land'."""
    if len(values) < 2:
        return 0.0
    med = statistics.median(values)
    return float((max(values) - min(values)) / 2 / abs(med)) if med else 0.0


def ratio_metric(name: str, rounds: list[dict], num: str, den: str, unit: str, direction: str,
                 vs: str, note: str | None = None) -> dict:
    """Per-round ratio ``rounds[i][num] / rounds[i][den]`` (sides measured in the same round);
    ``vs`` names the same-process baseline side."""
    values = [r[num] / r[den] for r in rounds]
    return metric(name, values, unit, direction, "ratio", [r["_contended"] for r in rounds],
                  vs=vs, note=note)


def machine_class(backend: str) -> str:
    """``os-arch-backend``, e.g. ``linux-x86_64-sim``, ``macos-arm64-ane``: the baseline file name."""
    system = {"Darwin": "macos"}.get(platform.system(), platform.system().lower())
    arch = platform.machine().lower()
    arch = {"amd64": "x86_64", "aarch64": "arm64"}.get(arch, arch)
    return f"{system}-{arch}-{backend}"


def machine_info() -> dict:
    import numpy as np

    return {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__,
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def document(bench: str, metrics: Sequence[dict], details: dict | None = None, backend: str = "sim",
             suite: str | None = None) -> dict:
    """The bench JSON: metrics keyed by name, plus the raw details of the run."""
    names = [m["name"] for m in metrics]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate metric names in {names}")
    return {"schema": SCHEMA, "bench": bench, "suite": suite, "machine_class": machine_class(backend),
            "machine": machine_info(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metrics": {m["name"]: m for m in metrics}, "details": details or {}}
