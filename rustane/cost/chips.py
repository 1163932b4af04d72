"""Per-chip figures the cost model uses, each with where it comes from (docs/cost-model.md).

Figures published by Apple are marketing peaks; the measured ones come from projects that ran the
same private API on real Macs (the references are expanded in docs/cost-model.md, "Sources").
A figure nobody has published for a chip is copied from its closest sibling and marked so.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chip:
    name: str
    ane_peak_tflops: float  # fp16
    dispatch_ms: float  # per kernel eval, host side + ANE start/finish
    mem_gbs: float  # unified memory bandwidth
    cpu_sgemm_tflops: float  # fp32 sgemm (Accelerate / AMX), what dW and the classifier run at
    sources: tuple[str, ...]


#: Apple's ANE figures are int8-convention TOPS (docs/cost-model.md): fp16 TFLOPS = TOPS / 2, which
#: matches what maderix reports for M4 (~19 TFLOPS fp16 for "38 TOPS") and M5 Max (19.27 TFLOPS);
#: those are other projects' Macs, quoted with their sources in docs/cost-model.md.
CHIPS: dict[str, Chip] = {
    "m1": Chip("m1", 5.5, 0.2, 68.25, 1.17,
               ("ANE 11 TOPS (Apple) / 2", "dispatch as M4 (no M1 figure)", "68.25 GB/s (Apple)",
                "CPU sgemm as M4 (no M1 figure)")),
    "m2": Chip("m2", 7.9, 0.2, 100.0, 1.17,
               ("ANE 15.8 TOPS (Apple) / 2", "dispatch as M4", "100 GB/s (Apple)", "CPU sgemm as M4")),
    "m3": Chip("m3", 9.0, 0.2, 100.0, 1.17,
               ("ANE 18 TOPS (Apple) / 2", "dispatch as M4", "100 GB/s (Apple)", "CPU sgemm as M4")),
    "m4": Chip("m4", 19.0, 0.2, 120.0, 1.17,
               ("ANE ~19 TFLOPS fp16 measured (maderix Part 2; 38 TOPS int8 convention)",
                "~0.2 ms per eval at 768x256 (maderix PR#40, M4 Max; 0.1-0.2 ms in maderix issues)",
                "120 GB/s (Apple)",
                "classifier forward 2*256*768*32000 FLOP in 10.77 ms on the CPU = 1.17 TFLOPS (ANEgpt README)")),
    "m4-max": Chip("m4-max", 19.0, 0.2, 546.0, 1.17,
                   ("same 16-core ANE as M4 (Apple: 38 TOPS)", "0.2 ms per eval measured on M4 Max (maderix PR#40)",
                    "546 GB/s (Apple)", "CPU sgemm as M4 (no published M4 Max figure)")),
    "m5": Chip("m5", 19.27, 0.2, 153.0, 1.17,
               ("19.27 TFLOPS fp16 measured on M5 Max (maderix m5result)", "dispatch as M4",
                "153 GB/s (Apple)", "CPU sgemm as M4")),
}


def chip(name: str) -> Chip:
    key = name.lower()
    if key not in CHIPS:
        raise ValueError(f"unknown chip {name!r}; choose one of {', '.join(CHIPS)}")
    return CHIPS[key]
