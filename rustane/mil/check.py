"""ANE rule checker: Program -> list of Diagnostics (docs/ane-runtime.md and docs/ane-rules.md;
each rule names its section).

Each rule has a stable id, a severity and the fact it comes from (``RULES``). Errors are things the
ANE compiler rejects, that fail at eval, or that silently compute something else; warnings are
unproven or fragile constructs (or facts that conflict between sources).

Interpretations worth knowing:

* ``rank``: every proven kernel uses rank <= 4 tensors and rank-4 ``[1, C, 1, S]`` I/O (§2.3, §3.5);
  no source gives a hard limit, so rank > 4 anywhere and I/O rank != 4 are warnings.
* ``surface-size``: Orion's ~49 KB minimum (§13) conflicts with small maderix tests that ran (§2.5),
  so it is a warning at 49152 bytes; inputs (or outputs) of different byte sizes are an error (0x1d).
* ``dead-return``: Orion reports "dead names in the return tuple" as a compile failure (§13); we read
  that as returning a name no operation computes, i.e. a function parameter or a ``const``.
* ``blob-offset``: offset != 64 means a multi-chunk file — an error on M1 (rejected there, §3.3),
  a warning elsewhere.
* Target-specific rules (``cast-target``, ``target-op``, ``dim-limit``) use the chip generation
  ``m1`` .. ``m5``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from . import ane_rules
from .ast import STRING, BlobRef, Function, Literal, Loc, Program, Ref, Statement, TensorType, TupleValue, Value
from .errors import ERROR, WARNING, Diagnostic, MilCheckError

TARGETS = ane_rules.CHIPS
IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_@]*\Z")
#: Input channel count at which a conv was seen rejected (docs/ane-runtime.md#ops, classifier backward).
CONV_MAX_IN_CHANNELS = 32000
#: The minimum surface size (docs/ane-rules.md, min-surface).
MIN_SURFACE_BYTES = ane_rules.CONSERVATIVE.min_surface_bytes


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str  # default severity; target-dependent rules may differ
    fact: str
    summary: str


RULES: dict[str, Rule] = {
    r.id: r
    for r in (
        Rule("sdpa-mask", ERROR, "docs/ane-runtime.md#attention: ANE ignores SDPA attn_mask",
             "scaled_dot_product_attention with attn_mask: the mask is silently ignored; decompose attention"),
        Rule("concat-interleave", ERROR, "docs/ane-runtime.md#ops: concat needs interleave = bool(false)",
             "concat without an interleave argument"),
        Rule("concat-axis", ERROR, "docs/ane-runtime.md#ops (PR#40): concat axis must be an int32 scalar",
             "concat axis that is not an int32 scalar constant"),
        Rule("unsupported-op", ERROR, "docs/ane-runtime.md#ops: op absent from or rejected by ANE MIL text",
             "ops the ANE compiler rejects (reduce_mean, gelu, silu)"),
        Rule("unproven-op", WARNING, "docs/ane-runtime.md#ops: ops used by the shipped kernels",
             "ops never seen working on the ANE in the sources"),
        Rule("conv-bias", ERROR, "docs/ane-runtime.md#ops (Orion): ANE compiler rejects conv with bias=",
             "conv with bias; use a separate add"),
        Rule("conv-weight", ERROR, "docs/ane-runtime.md#ops: conv weight must be a const (BLOBFILE)",
             "conv whose weight is a runtime tensor; use matmul for dynamic weights"),
        Rule("conv-in-channels", ERROR, "docs/ane-runtime.md#ops: a conv with 32000 input channels is rejected (classifier backward)",
             "conv with >= 32000 input channels; split it or use matmul"),
        Rule("inline-bool", ERROR, "docs/ane-runtime.md#ops (Orion): matmul transpose_x/transpose_y need named consts",
             "matmul transpose flag given inline"),
        Rule("cast-target", ERROR, "docs/ane-rules.md#cast-op (PR#6): M1/M2 cannot compile cast",
             "cast on an M1/M2 target; use fp16 I/O"),
        Rule("target-op", WARNING, "docs/ane-rules.md#matmul-op (PR#6): matmul and SDPA reported failing on M1/M2 (macOS 26)",
             "matmul / SDPA on M1/M2: probe at startup"),
        Rule("undefined-return", ERROR, "docs/ane-runtime.md#mil-text: the return tuple names values of the function",
             "return of a name that is not defined"),
        Rule("dead-return", ERROR, "docs/ane-runtime.md#mil-text (Orion): dead names in the return tuple fail to compile",
             "return of a parameter or const that no operation computes"),
        Rule("identifier-charset", ERROR, "docs/ane-runtime.md#mil-text (MIL.proto): identifiers match [A-Za-z_][A-Za-z0-9_@]*",
             "name outside the MIL.proto identifier charset"),
        Rule("surface-size", WARNING, "docs/ane-rules.md#min-surface (Orion): surfaces below ~49 KB / of non-uniform size fail (0x1d)",
             "I/O tensor below ~49 KB (warning) or I/O tensors of different byte sizes (error)"),
        Rule("io-dtype", WARNING, "docs/ane-runtime.md#fp16-io: use fp16 I/O",
             "function input/output that is not fp16"),
        Rule("io-order", WARNING, "docs/ane-rules.md#io-order (Orion): multi-input/output surfaces bind in alphabetical name order",
             "inputs or outputs not declared in alphabetical order"),
        Rule("axis-range", ERROR, "docs/ane-runtime.md#ops: axes lie in [-rank, rank); perm is a permutation",
             "axis/axes/perm outside the tensor's rank"),
        Rule("reshape-size", ERROR, "docs/ane-runtime.md#ops: reshape keeps the element count",
             "reshape whose shape has a different element count"),
        Rule("rank", WARNING, "docs/ane-runtime.md#surfaces, docs/ane-runtime.md#attention: proven kernels use rank <= 4 and [1, C, 1, S] I/O",
             "tensor of rank > 4, or function I/O of rank != 4"),
        Rule("blob-offset", WARNING, "docs/ane-runtime.md#blob-files: one matrix per blob file, offset 64 (M1 rejects multi-chunk)",
             "BLOBFILE offset other than 64"),
        Rule("blob-path", WARNING, "docs/ane-runtime.md#blob-files, docs/design.md: blob keys are @model_path/weights/<name>.bin",
             "BLOBFILE path outside @model_path/weights/*.bin"),
        Rule("name-attr", WARNING, "docs/ane-runtime.md#mil-text: statements carry [name = string(\"<name>\")]",
             "statement without a name attribute, or whose name attribute differs from its output name"),
        Rule("main-function", ERROR, "docs/ane-runtime.md#mil-text: the ANE compiles function main",
             "program without a main function"),
        Rule("dim-limit", WARNING, "docs/ane-rules.md#max-dim: dims cap at 16384 (shipped for every chip)",
             "tensor dimension above the reported hardware cap"),
        Rule("io-width", WARNING, "docs/ane-rules.md#width-multiple, #min-width, #zero-width, #max-width",
             "I/O spatial width below 64 / not a multiple of 16 / above 16384 (the plan guards refuse it)"),
        Rule("matmul-inner", WARNING, "docs/ane-rules.md#matmul-inner (low confidence)",
             "matmul contraction dimension not a multiple of 32"),
    )
}

#: Ops the shipped training/benchmark kernels use (docs/ane-runtime.md#ops).
PROVEN_OPS = frozenset({
    "const", "conv", "matmul", "slice_by_size", "reshape", "transpose", "softmax", "add", "sub", "mul",
    "reduce_sum", "pow", "sigmoid", "concat", "cast", "quantize", "dequantize", "constexpr_affine_dequantize",
    "scaled_dot_product_attention",
})
#: Ops reported working only in an unmerged PR (PR#40, docs/ane-runtime.md#ops).
REPORTED_OPS = frozenset({"relu", "layer_norm", "linear", "real_div", "slice_by_index"})
#: Ops the ANE text path rejects or lacks, with the fact and the fix.
UNSUPPORTED_OPS: dict[str, str] = {
    "reduce_mean": "absent from raw MIL text (docs/ane-runtime.md#ops, hollance/neural-engine#44); use reduce_sum then mul by 1/n",
    "gelu": "rejected by the ANE compiler (docs/ane-runtime.md#ops, Orion); decompose it",
    "silu": "no silu op on the ANE text path (docs/ane-runtime.md#ops); write mul(x, sigmoid(x))",
}
#: Arguments that name axes, per op family (others are left alone).
_AXIS_ARGS = ("axis", "axes")


def check(program: Program | str, target: str = "m4") -> list[Diagnostic]:
    """All diagnostics for ``program`` (a Program or MIL text) on ``target`` (m1..m5), sorted by position."""
    if isinstance(program, str):
        from .parser import parse

        program = parse(program)
    if target not in TARGETS:
        raise ValueError(f"unknown ANE target {target!r}; expected one of {', '.join(TARGETS)}")
    out: list[Diagnostic] = []
    if "main" not in program.functions:
        out.append(_diag("main-function", f"no function 'main' (functions: {', '.join(program.functions)})",
                         program.loc))
    for fn in program.functions.values():
        _Checker(fn, target, out).run()
    out.sort(key=lambda d: (d.line, d.col, d.rule))
    return out


def check_or_raise(program: Program | str, target: str = "m4", name: str | None = None) -> list[Diagnostic]:
    """Like ``check`` but raise MilCheckError listing every error; returns the warnings otherwise."""
    diags = check(program, target)
    if any(d.is_error for d in diags):
        raise MilCheckError(diags, name)
    return diags


def _diag(rule: str, message: str, loc: Loc | None, severity: str | None = None) -> Diagnostic:
    r = RULES[rule]
    loc = loc or Loc(1, 1)
    return Diagnostic(rule, severity or r.severity, message, loc.line, loc.col, r.fact)


def _nbytes(t: TensorType) -> int | None:
    if t.dtype == STRING:
        return None
    return math.prod(t.shape) * t.np_dtype.itemsize


def _loc_of(v: Value | None, fallback: Loc) -> Loc:
    return getattr(v, "loc", None) or fallback


class _Checker:
    def __init__(self, fn: Function, target: str, out: list[Diagnostic]):
        self.fn = fn
        self.target = target
        self.out = out
        self.types: dict[str, TensorType] = {p.name: p.type for p in fn.params}
        self.consts: dict[str, Literal] = {}
        self.params = {p.name for p in fn.params}

    def add(self, rule: str, message: str, loc: Loc | None, severity: str | None = None) -> None:
        self.out.append(_diag(rule, message, loc, severity))

    def const_value(self, v: Value | None) -> Literal | None:
        """The Literal a value stands for (inline or through a const), else None."""
        if isinstance(v, Literal):
            return v
        if isinstance(v, Ref):
            return self.consts.get(v.name)
        return None

    def ints_of(self, v: Value | None) -> list[int] | None:
        lit = self.const_value(v)
        if lit is None or not isinstance(lit.value, np.ndarray) or lit.value.dtype.kind not in "iu":
            return None
        return [int(x) for x in np.asarray(lit.value).reshape(-1).tolist()]

    def type_of(self, v: Value | None) -> TensorType | None:
        if isinstance(v, Ref):
            return self.types.get(v.name)
        if isinstance(v, Literal):
            return v.type
        return None

    # ---- driver -----------------------------------------------------------------------------
    def run(self) -> None:
        fn = self.fn
        self.check_name(fn.name, fn.loc, "function")
        for p in fn.params:
            self.check_name(p.name, p.loc, "parameter")
            self.check_type(p.type, p.loc, p.name)
        for st in fn.body:
            self.types[st.name] = st.type
            if st.is_const and "val" in st.attrs:
                self.consts[st.name] = st.attrs["val"]
            self.statement(st)
        self.io()

    def check_name(self, name: str, loc: Loc, what: str) -> None:
        if not IDENTIFIER_RE.match(name):
            self.add("identifier-charset", f"{what} name '{name}' is outside [A-Za-z_][A-Za-z0-9_@]*", loc)

    def check_type(self, t: TensorType, loc: Loc, name: str) -> None:
        if t.rank > 4:
            self.add("rank", f"'{name}' has rank {t.rank}; every proven ANE kernel uses rank <= 4", loc)
        cap = ane_rules.profile(self.target).max_dim
        big = [d for d in t.shape if d > cap]
        if big:
            self.add("dim-limit", f"'{name}' has dimension {big[0]} above the reported {self.target} cap {cap}", loc)

    # ---- statements -------------------------------------------------------------------------
    def statement(self, st: Statement) -> None:
        op = st.op
        self.check_name(st.name, st.loc, "value")
        self.check_type(st.type, st.loc, st.name)
        self.name_attr(st)
        self.literals(st)
        if op in UNSUPPORTED_OPS:
            self.add("unsupported-op", f"'{op}' ({st.name}): {UNSUPPORTED_OPS[op]}", st.loc)
        elif op not in PROVEN_OPS:
            why = "reported working only in unmerged PR#40" if op in REPORTED_OPS else "not used by any proven ANE kernel"
            self.add("unproven-op", f"'{op}' ({st.name}) is {why}; verify it on hardware", st.loc)
        if op == "scaled_dot_product_attention" and "attn_mask" in st.args:
            self.add("sdpa-mask", f"'{st.name}': the ANE ignores attn_mask (output equals the unmasked one); "
                     "build attention from matmul + mask add + softmax (docs/ane-runtime.md#attention)",
                     _loc_of(st.args["attn_mask"], st.loc))
        if op in ("matmul", "scaled_dot_product_attention") and self.target in ("m1", "m2"):
            self.add("target-op", f"'{op}' ({st.name}) is reported to fail on {self.target} under macOS 26; "
                     "probe it at startup", st.loc)
        if op == "concat":
            self.concat(st)
        if op == "conv":
            if "bias" in st.args:
                self.add("conv-bias", f"conv '{st.name}' has bias=; the ANE compiler rejects it, add the bias "
                         "with a separate add", _loc_of(st.args["bias"], st.loc))
            w = st.args.get("weight")
            if isinstance(w, Ref) and w.name not in self.consts and not self._is_constexpr(w.name):
                self.add("conv-weight", f"conv '{st.name}' weight '{w.name}' is not a const; conv weights must be "
                         "BLOBFILE consts (use matmul for runtime weights)", w.loc or st.loc)
            x_type = self.type_of(st.args.get("x"))
            if x_type is not None and x_type.rank >= 2 and x_type.shape[1] >= CONV_MAX_IN_CHANNELS:
                self.add("conv-in-channels", f"conv '{st.name}' has {x_type.shape[1]} input channels; the ANE "
                         f"rejected a conv with {CONV_MAX_IN_CHANNELS} (output channels that large work)", st.loc)
        if op == "matmul":
            from rustane.ane_guard import matmul_inner_dim

            consts = {n: lit.value for n, lit in self.consts.items()}
            k = matmul_inner_dim(st, self.types, consts)
            mult = ane_rules.profile(self.target).matmul_inner_multiple
            if k is not None and k % mult:
                self.add("matmul-inner", f"matmul '{st.name}' contracts over {k}, not a multiple of {mult}; "
                         "reported to give zeros", st.loc)
            for flag in ("transpose_x", "transpose_y"):
                v = st.args.get(flag)
                if isinstance(v, Literal):
                    self.add("inline-bool", f"matmul '{st.name}' gives {flag} inline; define a named const "
                             f"(bool bF = const()[name = string(\"bF\"), val = bool(false)]) and pass it",
                             v.loc or st.loc)
        if op == "cast" and self.target in ("m1", "m2"):
            self.add("cast-target", f"cast '{st.name}' does not compile on {self.target}; declare fp16 I/O instead",
                     st.loc)
        self.axes(st)
        if op == "reshape":
            self.reshape(st)

    def _is_constexpr(self, name: str) -> bool:
        return any(s.name == name and s.op.startswith("constexpr_") for s in self.fn.body)

    def name_attr(self, st: Statement) -> None:
        attr = st.attrs.get("name")
        if attr is None:
            self.add("name-attr", f"statement '{st.name}' has no [name = string(\"{st.name}\")] attribute", st.loc)
        elif isinstance(attr.value, str) and attr.value != st.name:
            self.add("name-attr", f"statement '{st.name}' is named {attr.value!r} in its name attribute; "
                     "coremlc output always matches", attr.loc or st.loc)

    def literals(self, st: Statement) -> None:
        """BLOBFILE rules, for every literal of the statement (args and attrs)."""
        stack: list[Value] = list(st.args.values()) + list(st.attrs.values())
        while stack:
            v = stack.pop()
            if isinstance(v, TupleValue):
                stack.extend(v.items)
                continue
            if not isinstance(v, Literal) or not isinstance(v.value, BlobRef):
                continue
            blob = v.value
            loc = v.loc or st.loc
            if blob.offset != 64:
                sev = ERROR if self.target == "m1" else WARNING
                self.add("blob-offset", f"'{st.name}' reads BLOBFILE offset {blob.offset}; write one matrix per file "
                         "(offset 64) — multi-chunk files are rejected on M1", loc, sev)
            if not (blob.path.startswith("@model_path/weights/") and blob.path.endswith(".bin")):
                self.add("blob-path", f"'{st.name}' BLOBFILE path {blob.path!r} is not @model_path/weights/<name>.bin",
                         loc)

    def concat(self, st: Statement) -> None:
        if "interleave" not in st.args:
            self.add("concat-interleave", f"concat '{st.name}' has no interleave argument; pass a bool const "
                     "false (interleave = cid)", st.loc)
        axis = st.args.get("axis")
        lit = self.const_value(axis)
        if axis is None:
            self.add("concat-axis", f"concat '{st.name}' has no axis argument", st.loc)
        elif lit is None or lit.type.dtype != "int32" or lit.type.shape:
            self.add("concat-axis", f"concat '{st.name}' axis must be an int32 scalar const", _loc_of(axis, st.loc))

    def axes(self, st: Statement) -> None:
        x_type = self.type_of(st.args.get("x"))
        rank = x_type.rank if (x_type is not None and st.op != "concat") else st.type.rank
        sources: list[tuple[str, Value]] = [(k, st.args[k]) for k in _AXIS_ARGS if k in st.args]
        # constexpr_* ops carry their arguments as attributes (docs/ane-runtime.md#ops).
        if st.op.startswith("constexpr_") and "axis" in st.attrs:
            sources.append(("axis", st.attrs["axis"]))
        if st.op in ("expand_dims",):
            return  # axes refer to the output rank plus inserted dims; not modelled
        for key, v in sources:
            vals = self.ints_of(v)
            if vals is None:
                continue
            bad = [a for a in vals if not -rank <= a < rank]
            if bad:
                self.add("axis-range", f"{st.op} '{st.name}' {key} {bad[0]} is outside [-{rank}, {rank}) for a "
                         f"rank-{rank} tensor", _loc_of(v, st.loc))
        if st.op == "transpose" and "perm" in st.args:
            perm = self.ints_of(st.args["perm"])
            if perm is not None:
                in_range = all(-rank <= p < rank for p in perm)
                if len(perm) != rank or not in_range or sorted(p % rank for p in perm) != list(range(rank)):
                    self.add("axis-range", f"transpose '{st.name}' perm {perm} is not a permutation of the "
                             f"{rank} axes", _loc_of(st.args["perm"], st.loc))

    def reshape(self, st: Statement) -> None:
        shape = self.ints_of(st.args.get("shape"))
        x_type = self.type_of(st.args.get("x"))
        if shape is None or x_type is None:
            return
        known = math.prod(d for d in shape if d != -1)
        n = math.prod(x_type.shape)
        wild = shape.count(-1)
        ok = (known == n) if wild == 0 else (wild == 1 and known > 0 and n % known == 0)
        if not ok or any(d < -1 for d in shape):
            self.add("reshape-size", f"reshape '{st.name}' to {shape} cannot hold the {n} elements of "
                     f"{list(x_type.shape)}", _loc_of(st.args.get("shape"), st.loc))

    # ---- function I/O -----------------------------------------------------------------------
    def io(self) -> None:
        fn = self.fn
        out_types: list[tuple[str, TensorType, Loc]] = []
        seen_ret: set[str] = set()
        for r in fn.returns:
            loc = r.loc or fn.loc
            if r.name not in self.types:
                self.add("undefined-return", f"return names '{r.name}', which is not defined in '{fn.name}'", loc)
                continue
            if r.name in self.params:
                self.add("dead-return", f"'{r.name}' is a function input returned as is; no operation computes it",
                         loc)
            elif r.name in self.consts:
                self.add("dead-return", f"'{r.name}' is a const returned as is; no operation computes it", loc)
            if r.name not in seen_ret:
                seen_ret.add(r.name)
                out_types.append((r.name, self.types[r.name], loc))
        in_types = [(p.name, p.type, p.loc) for p in fn.params]
        for kind, items in (("input", in_types), ("output", out_types)):
            for name, t, loc in items:
                if t.dtype != "fp16":
                    self.add("io-dtype", f"{kind} '{name}' is {t.dtype}; declare fp16 I/O and convert on the CPU", loc)
                if t.rank != 4:
                    self.add("rank", f"{kind} '{name}' has rank {t.rank}; ANE I/O is laid out as [1, C, 1, S]", loc)
                prof = ane_rules.profile(self.target)
                w = t.shape[-1] if t.rank else 1
                if w < prof.min_width or w % prof.width_multiple or w > prof.max_width:
                    self.add("io-width", f"{kind} '{name}' has spatial width {w}; the ANE needs "
                             f"{prof.min_width}..{prof.max_width} in multiples of {prof.width_multiple}", loc)
                nb = _nbytes(t)
                if nb is not None and nb < MIN_SURFACE_BYTES:
                    self.add("surface-size", f"{kind} '{name}' is {nb} bytes, below the ~49 KB ({MIN_SURFACE_BYTES}) "
                             "minimum reported by Orion", loc)
            sizes = {_nbytes(t) for _, t, _ in items}
            if len(items) > 1 and len(sizes) > 1:
                desc = ", ".join(f"{n}={_nbytes(t)}" for n, t, _ in items)
                first = _nbytes(items[0][1])
                odd = next(loc for _, t, loc in items if _nbytes(t) != first)
                self.add("surface-size", f"{kind}s have different byte sizes ({desc}); multi-{kind} requests need "
                         "uniform sizes (status 0x1d) — pack them into one tensor", odd, ERROR)
            names = [n for n, _, _ in items]
            if len(names) > 1 and names != sorted(names):
                self.add("io-order", f"{kind}s {names} are not in alphabetical order; the ANE binds surfaces in "
                         f"alphabetical order {sorted(names)}", items[0][2])
