"""Guards before compile: refuse model configs and kernel plans that break an ANE rule.

A plan is checked kernel by kernel against a chip profile (``rustane.mil.ane_rules``); each
breach of an enforced rule becomes one line naming the config field, the kernel, the limit, the
effect on the hardware and a fix, e.g.::

    seq_len 40: kernel sdpaBwd1 output width 40 is not a multiple of 16 (silent corruption on m4,
    see docs/ane-rules.md); use 48 or 64

Rules that are not enforced on the profile (low confidence) come back as warnings. The ANE
backend always guards; the simulator guards too unless it was built with ``ane_rules=False``
(research configs that will never run on a Neural Engine).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from rustane.config import ConfigError
from rustane.mil import ane_rules
from rustane.mil.ane_rules import Profile

__all__ = ["AneRuleError", "Breach", "plan_breaches", "config_breaches", "require_config", "backend_profile"]

#: Every ANE program computes in fp16; fp32 renders (the simulator's exact mode) are checked as fp16.
FP16_BYTES = 2
#: Config fields a breach can be blamed on, in the order they are tried.
FIELDS = ("seq_len", "dim", "hidden_dim", "head_dim", "n_heads", "n_kv_heads")


class AneRuleError(ConfigError):
    """A config whose kernels would break an ANE rule on the target chip."""


@dataclass(frozen=True)
class Breach:
    rule: str
    kernel: str
    tensor: str  # "input" / "output" / a MIL value name
    what: str  # e.g. "output width 40"
    limit: str  # e.g. "is not a multiple of 16"
    enforced: bool

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.rule, self.kernel, self.tensor)


def _io(spec) -> list[tuple[str, tuple[int, ...]]]:
    return [("input", tuple(spec.in_shape)), ("output", tuple(spec.out_shape))]


def plan_breaches(plan, profile: Profile, inner_dims: bool = True) -> list[Breach]:
    """Every rule ``plan`` (name -> KernelSpec) breaks on ``profile``.

    I/O rules read the kernels' tensor shapes; ``inner_dims`` also renders each kernel to check
    its matmul contraction dims and inner tensor dims (docs/ane-rules.md, matmul-inner, max-dim)."""
    out: list[Breach] = []
    p = profile

    def add(rule, kernel, tensor, what, limit):
        out.append(Breach(rule, kernel, tensor, what, limit, p.enforces(rule)))

    for name, spec in plan.items():
        for kind, shape in _io(spec):
            width, nbytes = shape[-1], math.prod(shape) * FP16_BYTES
            if nbytes < p.min_surface_bytes:
                add("min-surface", name, kind, f"{kind} {list(shape)} holds {nbytes} bytes",
                    f"is below the {p.min_surface_bytes}-byte minimum")
            if width < p.zero_width:
                add("zero-width", name, kind, f"{kind} width {width}", f"is below {p.zero_width}")
            elif width < p.min_width:
                add("min-width", name, kind, f"{kind} width {width}", f"is below {p.min_width}")
            if width % p.width_multiple:
                add("width-multiple", name, kind, f"{kind} width {width}",
                    f"is not a multiple of {p.width_multiple}")
            if width > p.max_width:
                add("max-width", name, kind, f"{kind} width {width}", f"is above {p.max_width}")
        if inner_dims:
            out.extend(_program_breaches(name, spec, p))
    return out


def _program_breaches(name, spec, p: Profile) -> list[Breach]:
    found: dict[tuple, Breach] = {}
    for st_name, op, dims, inner in _program_facts(spec):
        big = [d for d in dims if d > p.max_dim]
        if big and ("max-dim", st_name) not in found:
            found[("max-dim", st_name)] = Breach("max-dim", name, st_name, f"dimension {big[0]} of {st_name}",
                                                 f"is above {p.max_dim}", p.enforces("max-dim"))
        if op in p.rejected_ops:
            rule = "cast-op" if op == "cast" else "matmul-op"
            found.setdefault((rule, op), Breach(rule, name, st_name, f"op {op}", f"is rejected on {p.name}",
                                                p.enforces(rule)))
        if inner is not None and inner % p.matmul_inner_multiple:
            found.setdefault(("matmul-inner", inner), Breach(
                "matmul-inner", name, st_name, f"matmul {st_name} contraction dim {inner}",
                f"is not a multiple of {p.matmul_inner_multiple}", p.enforces("matmul-inner")))
    return list(found.values())


_FACTS: dict[tuple, tuple] = {}


def _program_facts(spec) -> tuple:
    """(value name, op, shape, matmul contraction dim or None) per statement of the rendered
    kernel: the profile-independent part, parsed once per template and parameters."""
    key = (str(spec.template_dir), spec.template, tuple(sorted(spec.params.items())))
    if key not in _FACTS:
        if len(_FACTS) > 512:
            _FACTS.clear()
        _FACTS[key] = _parse_facts(spec)
    return _FACTS[key]


def _parse_facts(spec) -> tuple:
    from rustane.mil.parser import parse
    from rustane.runtime.plan import render

    fn = parse(render(spec)).functions["main"]
    types = {q.name: q.type for q in fn.params}
    consts: dict = {}
    facts = []
    for st in fn.body:
        types[st.name] = st.type
        if st.is_const and "val" in st.attrs:
            consts[st.name] = st.attrs["val"].value
        inner = matmul_inner_dim(st, types, consts) if st.op == "matmul" else None
        facts.append((st.name, st.op, tuple(st.type.shape), inner))
    return tuple(facts)


def matmul_inner_dim(st, types, consts) -> int | None:
    """The contraction dimension of a matmul statement (None if its operand types are unknown)."""
    from rustane.mil.ast import Literal, Ref

    x = st.args.get("x")
    xt = types.get(x.name) if isinstance(x, Ref) else None
    if xt is None or xt.rank < 1:
        return None
    if xt.rank == 1:
        return xt.shape[0]
    tx = st.args.get("transpose_x")
    flag = consts.get(tx.name) if isinstance(tx, Ref) else (tx.value if isinstance(tx, Literal) else False)
    return xt.shape[-2] if bool(flag) else xt.shape[-1]


def config_breaches(cfg, profile: Profile, inner_dims: bool = True) -> list[Breach]:
    """The breaches of the training kernels ``cfg`` needs (fp16, as the ANE runs them)."""
    from rustane import models

    family = models.family_for(cfg)
    return list(_shape_breaches(family, family.kernel_shape(cfg, "fp16"), profile, inner_dims))


@functools.lru_cache(maxsize=256)
def _shape_breaches(family, shape, profile: Profile, inner_dims: bool) -> tuple[Breach, ...]:
    return tuple(plan_breaches(family.plan_for(shape), profile, inner_dims))


#: Config fields that can clear a breach of each rule, most likely first (none for the rules that
#: depend on the chip alone: no config change helps there).
BLAME = {
    "min-surface": ("seq_len", "dim", "hidden_dim"),
    "min-width": ("seq_len", "hidden_dim", "dim"),
    "zero-width": ("seq_len",),
    "width-multiple": ("seq_len", "hidden_dim", "dim", "head_dim"),
    "max-width": ("seq_len", "hidden_dim"),
    "max-dim": ("seq_len", "head_dim"),
    "matmul-inner": ("head_dim", "dim", "hidden_dim"),
}
#: How many nearby values are tried per field before giving up on a suggestion.
MAX_TRIES = 24


def _fixes(cfg, profile: Profile, breach: Breach) -> tuple[str | None, list[int]]:
    """(field to blame, up to two nearby values of it that clear every enforced breach)."""
    fields = BLAME.get(breach.rule, ())
    for f in fields:
        v = getattr(cfg, f)
        found: list[int] = []
        for cand in _candidates(v, profile)[:MAX_TRIES]:
            trial = _replaced(cfg, f, cand)
            if trial is None:
                continue
            try:
                left = [b for b in config_breaches(trial, profile, inner_dims=breach.rule in ("matmul-inner", "max-dim"))
                        if b.enforced]
            except (ValueError, ConfigError):
                continue
            if not left:
                found.append(cand)
            if len(found) == 2:
                break
        if found:
            return f, found
    return (fields[0] if fields else None), []


def _candidates(v: int, profile: Profile) -> list[int]:
    """Nearby multiples of 16 (the width multiple), nearest first, larger first at equal distance;
    then doublings, for limits far away (the surface minimum)."""
    m = profile.width_multiple
    near = [x for x in range(max(m, m * (v // m) - 4 * m), m * math.ceil(v / m) + 8 * m, m) if x != v]
    near.sort(key=lambda x: (abs(x - v), -x))
    far = [m * math.ceil(v * f / m) for f in (1.5, 2, 3, 4, 6, 8)]
    return list(dict.fromkeys(near[:12] + [x for x in far if x != v]))


def _replaced(cfg, field_name: str, value: int):
    d = dataclasses.asdict(cfg)
    d[field_name] = value
    if field_name in ("dim", "n_heads") and cfg.head_dim == cfg.dim // cfg.n_heads:
        d["head_dim"] = None
    try:
        return type(cfg)(**d).validate()
    except (ValueError, ConfigError, TypeError):
        return None


def describe(cfg, profile: Profile, b: Breach) -> str:
    rule = ane_rules.RULES[b.rule]
    field_name, values = _fixes(cfg, profile, b) if b.enforced else (None, [])
    head = f"{field_name} {getattr(cfg, field_name)}: " if field_name else ""
    where = "" if profile.chip == "any" else f" on {profile.chip.upper()}"
    msg = f"{head}kernel {b.kernel} {b.what} {b.limit} ({rule.effect}{where}, see docs/ane-rules.md#{b.rule})"
    if values:
        msg += f"; use {' or '.join(map(str, values))}"
    else:
        msg += f"; {rule.fix}"
    return msg


def require_config(cfg, profile: Profile) -> list[str]:
    """Raise AneRuleError naming every enforced breach; return the warnings (low-confidence rules)."""
    breaches = config_breaches(cfg, profile)
    errors = [b for b in breaches if b.enforced]
    if errors:
        lines = sorted({describe(cfg, profile, b) for b in errors})
        raise AneRuleError(f"this model config breaks ANE rules on {profile.name}:\n  " + "\n  ".join(lines)
                           + "\n(on the simulator only, research configs run with ane_rules=False)")
    return sorted({describe(cfg, profile, b) for b in breaches})


def backend_profile(backend) -> Profile | None:
    """The profile a backend guards with, or None when it does not guard (research simulator, null)."""
    p = getattr(backend, "ane_profile", None)
    return p if isinstance(p, Profile) else None
