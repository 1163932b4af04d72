"""``python -m rustane.plan --preset P | --model SRC [--chip m4] [--seq-len S] [--json] [--calibrate]``

What a training step of a model costs on the Neural Engine, before running it (docs/cost-model.md):
per kernel its FLOPs, surface bytes and shapes, evals per step and the ANE rules it is near; for
the step the projected ms on a chip (ANE path, CPU path, optimizer) and the projected peak memory.
``--calibrate`` prints the model against the published figures it was fitted to and predicts.
"""

from __future__ import annotations

import json
import sys

from rustane.cli import ArgumentParser, debug_enabled, run
from rustane.cost import calibrate
from rustane.cost.chips import CHIPS
from rustane.cost.memory import MB, process_base_bytes, project_memory
from rustane.cost.model import ANE_EFFICIENCY, kernel_costs, project


def _config(args):
    from rustane.config import preset

    over = {"seq_len": args.seq_len} if args.seq_len else {}
    if args.preset:
        return preset(args.preset, **over), args.preset
    from rustane import models
    from rustane.formats import load_model, resolve_source

    m = load_model(resolve_source(args.model))
    cfg = models.config_from_hf(m.config)
    return cfg.replace(seq_len=args.seq_len or min(m.spec.max_position, 256)), str(args.model)


def build(args) -> dict:
    cfg, label = _config(args)
    costs, plan = kernel_costs(cfg)
    p = project(cfg, args.chip, accum=args.accum)
    L = cfg.n_layers
    kernels = {}
    for name, c in costs.items():
        spec = plan[name]
        kernels[name] = {
            "flops": c.matmul_flops, "vector_elems": c.vector_elems, "in_bytes": c.in_bytes,
            "out_bytes": c.out_bytes, "in_shape": list(c.in_shape), "out_shape": list(c.out_shape),
            "in_width": c.in_shape[-1], "out_width": c.out_shape[-1],
            "evals_per_step": L * args.accum, "surfaces": (L if spec.weight_bearing else 1) + (L if spec.per_layer_output else 1),
            "near_rules": c.near_rules}
    mem = project_memory(cfg, "ane", "fp16", process_base_bytes())
    return {"model": label, "chip": args.chip, "seq_len": cfg.seq_len, "n_layers": L, "params": cfg.n_params,
            "accum": args.accum, "kernels": kernels, "evals_per_step": p.evals_per_step,
            "step_ms": {"pipelined": p.ms_per_step, "serial_upper_bound": p.serial_ms_per_step,
                        "ane_path": p.ane_ms, "cpu_path": p.cpu_ms, "optimizer": p.ms.get("optimizer", 0.0)},
            "flops": p.flops, "ane_efficiency": ANE_EFFICIENCY, "chip_sources": list(CHIPS[args.chip].sources),
            "memory_bytes": mem}


def _print(r: dict) -> None:
    print(f"{r['model']}: {r['params'] / 1e6:.1f}M params, {r['n_layers']} layers, seq {r['seq_len']}, "
          f"chip {r['chip']}, {r['evals_per_step']} evals/step")
    print(f"{'kernel':11} {'GFLOP':>7} {'in MB':>7} {'out MB':>7} {'in [C, W]':>14} {'out [C, W]':>14} "
          f"{'evals':>6}  near rules")
    for n, k in r["kernels"].items():
        shp = lambda s: f"[{s[1]}, {s[3]}]"  # noqa: E731
        print(f"{n:11} {k['flops'] / 1e9:7.3f} {k['in_bytes'] / MB:7.2f} {k['out_bytes'] / MB:7.2f} "
              f"{shp(k['in_shape']):>14} {shp(k['out_shape']):>14} {k['evals_per_step']:6d}  "
              + ("; ".join(k["near_rules"]) or "-"))
    s = r["step_ms"]
    print(f"projected ms/step: {s['pipelined']:.1f} (ANE and CPU overlapped), {s['serial_upper_bound']:.1f} "
          "if nothing overlaps")
    print("  ANE path: " + ", ".join(f"{k} {v:.1f}" for k, v in s["ane_path"].items()))
    print("  CPU path: " + ", ".join(f"{k} {v:.1f}" for k, v in s["cpu_path"].items())
          + f"; optimizer {s['optimizer']:.1f}")
    print(f"  ANE efficiency {r['ane_efficiency']:.1%} of peak (fitted, docs/cost-model.md); chip figures: "
          + "; ".join(r["chip_sources"]))
    m = r["memory_bytes"]
    print("projected peak memory: " + ", ".join(f"{k} {v / MB:.0f} MB" for k, v in m.items() if k != "total")
          + f"; total {m['total'] / MB:.0f} MB")


def _print_calibration(rows: list[dict], eff: float) -> None:
    print(f"ANE efficiency fitted: {eff:.4f} of peak")
    print("| anchor | chip | published ms/step | projected (pipelined) | error | serial bound | error "
          "| evals/step: theirs, ours | our plan, same model |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        tag = " (fitted)" if r["fitted"] else ""
        theirs = r["anchor_plan_evals"] or "not published"
        print(f"| {r['anchor']}{tag} | {r['chip']} | {r['published_ms']:.0f} | {r['projected_ms']:.1f} | "
              f"{r['error']:+.1%} | {r['serial_ms']:.1f} | {r['serial_error']:+.1%} | {theirs}, "
              f"{r['our_plan_evals']} | {r['our_plan_ms']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    from rustane.config import preset_names

    ap = ArgumentParser(prog="python -m rustane.plan", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=preset_names())
    src.add_argument("--model", help="a model source: HF folder, .gguf, llama2.c .bin, rustane checkpoint")
    ap.add_argument("--chip", default="m4", choices=list(CHIPS))
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--accum", type=int, default=1, help="sequences per step")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--calibrate", action="store_true", help="the model against published ms/step")
    args = ap.parse_args(argv)
    try:
        if args.calibrate:
            eff = calibrate.fit()
            rows = calibrate.table(eff)
            if args.json:
                print(json.dumps({"ane_efficiency": eff, "anchors": rows}, indent=1))
            else:
                _print_calibration(rows, eff)
            return 0
        if not args.preset and not args.model:
            ap.error("give --preset or --model (or --calibrate)")
        if args.accum < 1 or (args.seq_len is not None and args.seq_len < 1):
            raise ValueError("--accum and --seq-len must be >= 1")
        r = build(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        if debug_enabled():
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        _print(r)
    return 0


if __name__ == "__main__":
    run(main)
