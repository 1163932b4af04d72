"""What one kernel costs, read from its MIL program (not from a second description of the plan).

The kernel's rendered MIL text is parsed; every ``matmul`` contributes 2·(output elements)·K FLOPs
(K from the operand's declared shape and ``transpose_x``), every other non-const, non-layout op
contributes its output elements as vector work. Bytes in and out are the one input and the one
output surface. The ANE rules a kernel is *near* come from the profile limits in
``rustane.mil.ane_rules`` (docs/ane-rules.md): within a factor ``NEAR`` of a minimum or maximum,
or a matmul contraction off the 32 multiple (the low-confidence matmul-inner report).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rustane.mil import ane_rules
from rustane.mil.ast import Literal, Ref
from rustane.mil.parser import parse
from rustane.runtime.plan import KernelSpec, render

NEAR = 1.5  # a surface within 1.5x of the minimum (or a width within 1/1.5 of the maximum) is "near"

#: ops that only move or relabel data (no arithmetic on the ANE's vector units worth counting)
LAYOUT_OPS = frozenset({"const", "reshape", "transpose", "slice_by_index", "slice_by_size", "concat",
                        "identity", "expand_dims", "squeeze"})


@dataclass
class KernelCost:
    name: str
    matmul_flops: int
    vector_elems: int
    layout_elems: int
    in_bytes: int
    out_bytes: int
    in_shape: tuple
    out_shape: tuple
    matmuls: list = field(default_factory=list)  # (out shape, K)
    near_rules: list = field(default_factory=list)  # one line each

    @property
    def io_bytes(self) -> int:
        return self.in_bytes + self.out_bytes


def _const_value(stmts: dict, value):
    if isinstance(value, Literal):
        return value.value
    if isinstance(value, Ref) and value.name in stmts and stmts[value.name].op == "const":
        lit = stmts[value.name].attrs.get("val")
        return None if lit is None else lit.value
    return None


def kernel_cost(spec: KernelSpec, profile: ane_rules.Profile = ane_rules.CONSERVATIVE,
                elem_bytes: int = 2) -> KernelCost:
    prog = parse(render(spec))
    (fn,) = prog.functions.values()
    types = {p.name: p.type for p in fn.params}
    stmts = {}
    flops = vec = layout = 0
    matmuls = []
    for st in fn.body:
        types[st.name] = st.type
        stmts[st.name] = st
        n_out = int(np.prod(st.type.shape, dtype=np.int64)) if st.type.shape else 1
        if st.op == "matmul":
            x = st.args["x"]
            xt = types[x.name] if isinstance(x, Ref) else x.type
            tx = bool(np.asarray(_const_value(stmts, st.args.get("transpose_x"))).item()) \
                if st.args.get("transpose_x") is not None else False
            k = xt.shape[-2] if tx else xt.shape[-1]
            flops += 2 * n_out * k
            matmuls.append((tuple(st.type.shape), int(k)))
        elif st.op in LAYOUT_OPS:
            layout += 0 if st.op == "const" else n_out
        else:
            vec += n_out
    in_bytes = int(np.prod(spec.in_shape)) * elem_bytes
    out_bytes = int(np.prod(spec.out_shape)) * elem_bytes
    cost = KernelCost(spec.name, int(flops), int(vec), int(layout), in_bytes, out_bytes,
                      tuple(spec.in_shape), tuple(spec.out_shape), matmuls)
    cost.near_rules = near_rules(cost, profile)
    return cost


def near_rules(c: KernelCost, p: ane_rules.Profile) -> list[str]:
    """The shape rules this kernel is close to breaking (or breaks), one line each."""
    out = []
    for side, shape, nbytes in (("input", c.in_shape, c.in_bytes), ("output", c.out_shape, c.out_bytes)):
        width = shape[-1]
        if nbytes < p.min_surface_bytes * NEAR:
            verb = "breaks" if nbytes < p.min_surface_bytes else "near"
            out.append(f"min-surface ({verb}): {side} {nbytes} B vs minimum {p.min_surface_bytes} B")
        if width < p.min_width * NEAR:
            verb = "breaks" if width < p.min_width else "near"
            out.append(f"min-width ({verb}): {side} width {width} vs minimum {p.min_width}")
        if width * NEAR > p.max_width:
            verb = "breaks" if width > p.max_width else "near"
            out.append(f"max-width ({verb}): {side} width {width} vs maximum {p.max_width}")
        if width % p.width_multiple:
            out.append(f"width-multiple (breaks): {side} width {width} is not a multiple of {p.width_multiple}")
        big = max(shape)
        if big * NEAR > p.max_dim:
            verb = "breaks" if big > p.max_dim else "near"
            out.append(f"max-dim ({verb}): {side} dimension {big} vs maximum {p.max_dim}")
    off = sorted({k for _, k in c.matmuls if k % p.matmul_inner_multiple})
    if off:
        out.append(f"matmul-inner (low confidence): contraction {off} not a multiple of {p.matmul_inner_multiple}")
    return out
