"""The ANE rules as data: one entry per rule of docs/ane-rules.md, plus chip/OS profiles.

This module is the single source for the limits that ``rustane.mil.check``, the plan guards
(``rustane.ane_guard``), the probe and the test fake framework use. Every number here is
explained, with its sources and confidence, in docs/ane-rules.md; change both together.

A ``Profile`` is one chip generation (m1..m5) on one macOS major (15 or 26). Where sources
conflict or do not say which chips a rule covers, the profile takes the conservative side (the
rule applies everywhere); the probe can later record what a given Mac really accepts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

CHIPS = ("m1", "m2", "m3", "m4", "m5")
OS_MAJORS = (15, 26)

# Effects: what the hardware does when a rule is broken.
COMPILE_ERROR = "compile error"
EVAL_ERROR = "eval error"
LOAD_FAILURE = "load failure"
SILENT_ZEROS = "silent zeros"
SILENT_CORRUPTION = "silent corruption"

#: Status the ANE reports when a request cannot run (Orion, m0at, ncdrone; docs/ane-rules.md).
STATUS_PROGRAM_INFERENCE = 0x1D
#: Load failure once the per-process compile budget is spent (ANEgpt; docs/ane-rules.md).
STATUS_LOAD_EXHAUSTED = 0x50004
#: No source gives the NSError code of a compiler rejection; the fake uses this one (our choice).
FAKE_COMPILE_REJECTED = 0x3


@dataclass(frozen=True)
class Rule:
    id: str
    summary: str
    applies: str  # chips / OS, in words (the profiles below hold the machine-readable side)
    effect: str
    code: int | None
    confidence: str  # high / medium / low
    fix: str


RULES: dict[str, Rule] = {r.id: r for r in (
    Rule("model-id", "-hexStringIdentifier is three 64-digit upper-hex SHA-256 digests joined by '_' "
         "(194 characters); the compiler works in NSTemporaryDirectory()/<id>",
         "all (iOS 26.1 decompile, macOS 26 Macs)", COMPILE_ERROR, None, "high",
         "keep the id at its full length"),
    Rule("min-surface", "every input/output tensor holds at least 49,152 bytes",
         "reported on M4 Max and M-series (conflicting: 12 KB surfaces ran in maderix's tests); shipped for all",
         EVAL_ERROR, STATUS_PROGRAM_INFERENCE, "medium",
         "grow seq_len or the channel count so every kernel tensor reaches 49,152 bytes"),
    Rule("min-width", "the spatial (last) dimension of every input/output is at least 64",
         "reported by ncdrone/ane (MIN_SPATIAL_WIDTH); shipped for all", EVAL_ERROR, STATUS_PROGRAM_INFERENCE,
         "medium", "use seq_len >= 64"),
    Rule("zero-width", "an fp16 input/output narrower than 32 comes back as zeros",
         "reported on M-series incl. M5 (m0at/ANEtransformers); shipped for all", SILENT_ZEROS, None, "medium",
         "use seq_len >= 64"),
    Rule("width-multiple", "the spatial width of every input/output is a multiple of 16",
         "reported on M4 (whiskeypolitik/rustane); shipped for all", SILENT_CORRUPTION, None, "medium",
         "round seq_len and the model dims to multiples of 16"),
    Rule("max-width", "no input/output is wider than 16,384",
         "measured on M4 Max (whiskeypolitik/rustane); third-party cap 16,384 through M2; shipped for all",
         COMPILE_ERROR, FAKE_COMPILE_REJECTED, "medium",
         "lower seq_len or hidden_dim (the fused FFN input is 2*seq_len + 3*hidden_dim wide)"),
    Rule("max-dim", "no tensor dimension inside a program exceeds 16,384",
         "third-party cap 16,384 through M2 and 65,536 later; shipped as 16,384 for all", COMPILE_ERROR,
         FAKE_COMPILE_REJECTED, "low", "lower seq_len * head_dim / 2 (the RoPE pair axis)"),
    Rule("matmul-inner", "the contraction dimension of a matmul is a multiple of 32",
         "reported in maderix/ANE issue #47 (chip not stated; we could not read the thread); warned, "
         "refused only by a strict profile", SILENT_ZEROS, None, "low",
         "use a head_dim and model dims that are multiples of 32"),
    Rule("uniform-io-sizes", "the inputs (and the outputs) of one request have equal byte sizes",
         "reported on M4 Max (Orion); maderix's multi-input tests used equal sizes", EVAL_ERROR,
         STATUS_PROGRAM_INFERENCE, "medium", "pack inputs into one tensor (every training kernel has one)"),
    Rule("io-order", "a request's surfaces bind to the inputs (outputs) in alphabetical order of their MIL "
         "names, not in declaration order", "reported on M4 Max, macOS 15 (Orion); a framework rule, kept for all",
         SILENT_CORRUPTION, None, "medium", "pass buffers in the order of kernel.inputs / kernel.outputs"),
    Rule("cast-op", "cast does not compile", "M1/M2 (maderix PR#6, macOS 26.3)", COMPILE_ERROR,
         FAKE_COMPILE_REJECTED, "medium", "declare fp16 I/O and convert on the CPU"),
    Rule("matmul-op", "matmul (and SDPA) do not compile", "M1/M2 on macOS 26 (maderix PR#6)", COMPILE_ERROR,
         FAKE_COMPILE_REJECTED, "low", "train with --backend sim on this Mac"),
    Rule("dialect", "program(1.3)/<ios18> text is rejected; program(1.0)/<ios16> compiles",
         "M1/M2 on macOS 26 (maderix PR#6)", COMPILE_ERROR, FAKE_COMPILE_REJECTED, "low",
         "let the probe pick the dialect (rustane converts the templates)"),
    Rule("compile-budget", "about 119 compiles per process, then load fails", "all (maderix, ANEgpt, Orion)",
         LOAD_FAILURE, STATUS_LOAD_EXHAUSTED, "high", "compile each kernel once; restart the process"),
)}


@dataclass(frozen=True)
class Profile:
    """The limits of one chip generation on one macOS major."""

    chip: str
    os: int
    min_surface_bytes: int = 49152
    min_width: int = 64
    zero_width: int = 32
    width_multiple: int = 16
    max_width: int = 16384
    max_dim: int = 16384
    matmul_inner_multiple: int = 32
    compile_budget: int = 119
    rejected_ops: frozenset = frozenset()
    dialects: tuple = ("ios18", "ios16")  # accepted, preferred first
    #: rules whose breach refuses a config/plan; the others are warnings
    enforced: frozenset = field(default_factory=lambda: frozenset(
        {"min-surface", "min-width", "zero-width", "width-multiple", "max-width", "max-dim", "uniform-io-sizes",
         "cast-op", "matmul-op", "dialect"}))

    @property
    def name(self) -> str:
        return f"{self.chip}-macos{self.os}"

    def strict(self) -> "Profile":
        """The same profile refusing every rule, low-confidence ones included."""
        return dataclasses.replace(self, enforced=self.enforced | {"matmul-inner"})

    def enforces(self, rule: str) -> bool:
        return rule in self.enforced


def profile(chip: str = "m4", os: int = 26) -> Profile:
    """The profile for ``chip`` (m1..m5) on macOS ``os`` (15 or 26)."""
    if chip not in CHIPS:
        raise ValueError(f"unknown chip {chip!r}; expected one of {', '.join(CHIPS)}")
    if os not in OS_MAJORS:
        raise ValueError(f"unknown macOS major {os!r}; expected one of {', '.join(map(str, OS_MAJORS))}")
    old = chip in ("m1", "m2")
    rejected = set()
    dialects: tuple = ("ios18", "ios16")
    if old:
        rejected.add("cast")  # docs/ane-rules.md, cast-op
        if os >= 26:
            rejected |= {"matmul", "scaled_dot_product_attention"}  # matmul-op
            dialects = ("ios16",)  # dialect
    # max-dim: 16,384 through M2, 65,536 later (third-party caps); the unprobed default keeps 16,384
    return Profile(chip=chip, os=os, max_dim=16384 if old else 65536, rejected_ops=frozenset(rejected),
                   dialects=dialects)


def all_profiles() -> list[Profile]:
    return [profile(c, o) for c in CHIPS for o in OS_MAJORS]


#: What the simulator and an unprobed Mac use: every shape rule of every profile (they are the same
#: numbers today), no op rejections (those depend on the chip and are checked once it is known).
CONSERVATIVE = Profile(chip="any", os=0)


def profile_from_probe(result: dict | None) -> Profile:
    """The profile a cached probe result selects: its chip generation and macOS major (CONSERVATIVE
    when it names no known chip/OS), tightened by every limit the probe measured stricter
    (``tighten``)."""
    if not result or not result.get("ane"):
        return CONSERVATIVE
    return tighten(_chip_profile(result), result.get("rules") or {})


def _chip_profile(result: dict) -> Profile:
    chip = chip_generation(str((result.get("machine") or {}).get("chip", "")))
    try:
        os_major = int(str((result.get("machine") or {}).get("os", "")).split(".")[0])
    except ValueError:
        return CONSERVATIVE
    if chip is None:
        return CONSERVATIVE
    return profile(chip, 26 if os_major >= 26 else 15)


def tighten(p: Profile, rules: dict) -> Profile:
    """``p`` made stricter wherever the probe's per-rule record (``rustane.probe.summarize_rules``)
    saw this Mac refuse or miscompute what ``p`` allows. Never looser: the probe tries a few shapes,
    and a shape that worked there proves nothing about the ones it did not try."""
    import math

    ch: dict = {}
    ok = "ok"
    accepted = (rules.get("dialect") or {}).get("accepted")
    if accepted:
        d = tuple(x for x in p.dialects if x in accepted) or tuple(accepted)
        if d != p.dialects:
            ch["dialects"] = d
    ms = (rules.get("min-surface") or {}).get("accepted_min")
    if ms is not None and ms > p.min_surface_bytes:
        ch["min_surface_bytes"] = ms
    zeros = (rules.get("zero-width") or {}).get("zeros_at") or []
    zero_width = max([p.zero_width] + [w + 1 for w in zeros])
    if zero_width != p.zero_width:
        ch["zero_width"] = zero_width
    mw = (rules.get("min-width") or {}).get("accepted_min")
    min_width = max(p.min_width, mw or 0, zero_width)
    if min_width != p.min_width:
        ch["min_width"] = min_width
    wm = (rules.get("width-multiple") or {}).get("accepted_multiple")
    if wm is not None and p.width_multiple % wm:
        ch["width_multiple"] = p.width_multiple * wm // math.gcd(p.width_multiple, wm)
    mx = rules.get("max-width") or {}
    if mx.get("refused_from") is not None:
        top = mx.get("accepted_max")
        if top is None:  # even the smallest tested width was refused: keep to the widths seen working
            top = max([t["value"] for key in ("min-width", "width-multiple") for t in (rules.get(key) or {}).get("tested", [])
                       if t["result"] == ok] or [p.min_width])
        if top < p.max_width:
            ch["max_width"] = top
    rejected = set(p.rejected_ops)
    if (rules.get("matmul-op") or {}).get("result", ok) != ok:
        rejected |= {"matmul", "scaled_dot_product_attention"}
    if (rules.get("cast-op") or {}).get("result", ok) != ok:
        rejected.add("cast")
    if rejected != set(p.rejected_ops):
        ch["rejected_ops"] = frozenset(rejected)
    inner = rules.get("matmul-inner") or {}
    im = inner.get("accepted_multiple")
    if any(t["result"] != ok for t in inner.get("tested", [])) and im is not None and im > 1:
        # a contraction dim off the multiple went wrong here: the low-confidence rule is real on this Mac
        ch["matmul_inner_multiple"] = max(p.matmul_inner_multiple, im)
        ch["enforced"] = p.enforced | {"matmul-inner"}
    return dataclasses.replace(p, **ch) if ch else p


def chip_generation(brand: str) -> str | None:
    """'Apple M3 Pro' -> 'm3'; None when the brand names no M-series chip."""
    import re

    m = re.search(r"\bM(\d)\b", brand)
    if not m or f"m{m.group(1)}" not in CHIPS:
        return None
    return f"m{m.group(1)}"
