"""``python -m rustane.bench plot RESULTS... [-o bench.png]``: one PNG of bench results.

Left: the per-phase ms/step split of every engine run found in the files (stacked bars; the
phases are the engine's ``StepStats.ms`` keys). Right: every ratio metric's median with its
spread as an error bar, one bar per file, so several runs or machines read side by side.
matplotlib is optional (``pip install 'rustane[plot]'``).
"""

from __future__ import annotations

from pathlib import Path

from rustane.bench.compare import load

HELP = "draw the per-phase ms/step split and the ratio metrics of result files as a PNG"


def add_arguments(p) -> None:
    p.add_argument("results", nargs="+", help="bench result JSON files")
    p.add_argument("-o", "--output", default="bench.png", help="PNG to write (default bench.png)")


def phase_splits(doc: dict) -> dict[str, dict[str, float]]:
    """``{run label: {phase: ms}}`` of every engine run in a result (train bench or suite)."""
    out = {}
    details = doc.get("details") or {}
    sources = [doc, details] + [v for v in details.values() if isinstance(v, dict)]
    for src in sources:
        for key, val in src.items():
            if (isinstance(val, dict) and isinstance(val.get("ms"), dict) and "ms_per_step" in val
                    and key != "null"):  # the null backend's ~1 ms steps only measure orchestration
                label = f"{src.get('preset', doc.get('preset', ''))} {key}".strip()
                out[label] = {p: float(v) for p, v in val["ms"].items()}
    return out


def ratios(doc: dict) -> dict[str, tuple[float, float]]:
    return {n: (m["median"], m["median"] * m.get("spread", 0.0))
            for n, m in doc["metrics"].items() if m["kind"] == "ratio"}


def draw(docs: list[tuple[str, dict]], output: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plot needs matplotlib, an optional extra: pip install 'rustane[plot]' "
                         "(or pip install matplotlib)") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    labels, stacks = [], []
    for fname, doc in docs:
        for run, phases in phase_splits(doc).items():
            labels.append(f"{fname}\n{run}" if len(docs) > 1 else run)
            stacks.append(phases)
    phases = sorted({p for s in stacks for p in s})
    bottom = [0.0] * len(stacks)
    for ph in phases:
        vals = [s.get(ph, 0.0) for s in stacks]
        ax1.bar(range(len(stacks)), vals, bottom=bottom, label=ph)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax1.set_xticks(range(len(stacks)), labels, rotation=30, ha="right", fontsize=7)
    ax1.set_ylabel("ms / step (median)")
    ax1.set_title("per-phase split of a training step")
    if stacks:
        ax1.legend(fontsize=7)
    names = sorted({n for _, d in docs for n in ratios(d)})
    width = 0.8 / max(1, len(docs))
    for i, (fname, doc) in enumerate(docs):
        r = ratios(doc)
        xs = [j + i * width for j, n in enumerate(names) if n in r]
        ax2.bar(xs, [r[n][0] for n in names if n in r], width, yerr=[r[n][1] for n in names if n in r],
                label=fname, capsize=3)
    ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax2.set_yscale("log")  # ratios of different metrics span 1x..100x
    ax2.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30, ha="right", fontsize=7)
    ax2.set_title("ratio metrics (median, ± spread)")
    if len(docs) > 1:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    out = Path(output)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _labels(paths: list[str]) -> list[str]:
    """File names, or parent/name where names repeat (several runs' ci.json)."""
    names = [Path(p).name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(p).parent.name}/{Path(p).name}" for p in paths]


def run(args) -> int:
    docs = [(label, load(p)) for label, p in zip(_labels(args.results), args.results)]
    out = draw(docs, args.output)
    print(f"wrote {out}")
    return 0
