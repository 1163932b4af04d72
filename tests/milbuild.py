"""Test helper: write small MIL text programs (single ops, short chains) for interpreter tests.

    b = MilBuilder()
    x = b.input("x", "fp16", (1, 4, 1, 8))
    ax = b.const("ax", np.array([1], np.int32))
    kd = b.const("kd", True)
    b.op("y", "reduce_sum", "fp16", (1, 1, 1, 8), x=x, axes=ax, keep_dims=kd)
    text = b.text(["y"])

Arguments given as ``str`` are value names; tuples of names become MIL tuples.
"""

from __future__ import annotations

import numpy as np

_NP_TO_MIL = {
    np.dtype(np.float16): "fp16",
    np.dtype(np.float32): "fp32",
    np.dtype(np.int8): "int8",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.int16): "int16",
    np.dtype(np.int32): "int32",
    np.dtype(np.uint32): "uint32",
    np.dtype(np.int64): "int64",
    np.dtype(np.bool_): "bool",
}

HEADER = (
    "program(1.3)\n"
    '[buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}, '
    '{"coremlc-version", "3505.4.1"}, {"coremltools-component-milinternal", ""}, '
    '{"coremltools-version", "9.0"}})]\n'
)


def ttype(dtype: str, shape) -> str:
    return f"tensor<{dtype}, [{', '.join(str(int(s)) for s in shape)}]>"


def _scalar(v, dtype: str) -> str:
    if dtype == "bool":
        return "true" if bool(v) else "false"
    if dtype.startswith("fp"):
        f = float(v)
        if np.isnan(f):
            return "nan"
        if np.isinf(f):
            return "inf" if f > 0 else "-inf"
        return repr(f)
    return str(int(v))


def literal(value, dtype: str | None = None, scalar_form: bool = True) -> str:
    """MIL literal text for a Python/numpy value (strings -> string("...")."""
    if isinstance(value, str):
        return f'string("{value}")'
    if isinstance(value, bool) and dtype is None:
        dtype = "bool"
    a = np.asarray(value)
    if dtype is None:
        dtype = _NP_TO_MIL[a.dtype] if a.dtype in _NP_TO_MIL else ("fp32" if a.dtype.kind == "f" else "int32")
    if a.ndim == 0 and scalar_form:
        return f"{dtype}({_scalar(a.item(), dtype)})"
    elems = ", ".join(_scalar(v, dtype) for v in a.reshape(-1).tolist())
    if a.ndim == 0:
        return f"{ttype(dtype, ())}({elems})"
    return f"{ttype(dtype, a.shape)}([{elems}])"


def decl(value, dtype: str | None = None) -> tuple[str, tuple[int, ...]]:
    if isinstance(value, str):
        return "string", ()
    if isinstance(value, bool) and dtype is None:
        return "bool", ()
    a = np.asarray(value)
    if dtype is None:
        dtype = _NP_TO_MIL.get(a.dtype, "fp32" if a.dtype.kind == "f" else "int32")
    return dtype, tuple(a.shape)


class MilBuilder:
    def __init__(self, opset: str = "ios18"):
        self.opset = opset
        self.params: list[str] = []
        self.lines: list[str] = []

    def input(self, name: str, dtype: str, shape) -> str:
        self.params.append(f"{ttype(dtype, shape)} {name}")
        return name

    def const(self, name: str, value, dtype: str | None = None) -> str:
        dt, shape = decl(value, dtype)
        if dt == "string" or (shape == () and not isinstance(value, np.ndarray)):
            t = dt
        else:
            t = ttype(dt, shape)
        lit = literal(value, dt if dt != "string" else None, scalar_form=(t == dt))
        self.lines.append(f'        {t} {name} = const()[name = string("{name}"), val = {lit}];')
        return name

    def raw(self, line: str) -> None:
        self.lines.append("        " + line)

    def op(self, name: str, op: str, dtype: str, shape, /, _attrs: dict | None = None, **args) -> str:
        parts = []
        for k, v in args.items():
            if isinstance(v, tuple):
                parts.append(f"{k} = ({', '.join(v)})")
            else:
                parts.append(f"{k} = {v}")
        extra = "".join(f", {k} = {v}" for k, v in (_attrs or {}).items())
        t = dtype if shape is None else ttype(dtype, shape)
        self.lines.append(f'        {t} {name} = {op}({", ".join(parts)})[name = string("{name}"){extra}];')
        return name

    def text(self, outputs) -> str:
        body = "\n".join(self.lines)
        return (
            HEADER
            + "{\n"
            + f"    func main<{self.opset}>({', '.join(self.params)}) {{\n"
            + body
            + "\n"
            + f"    }} -> ({', '.join(outputs)});\n"
            + "}\n"
        )


def single_op(op: str, inputs: dict, consts: dict, out_dtype: str, out_shape, extra_args: dict | None = None) -> str:
    """A program with function inputs ``inputs`` (name -> (dtype, shape)), consts
    (name -> value, passed as arguments of the same name), one op ``res``, returning ``res``."""
    b = MilBuilder()
    args = {}
    for n, (dt, shp) in inputs.items():
        args[n] = b.input(n, dt, shp)
    for n, v in consts.items():
        args[n] = b.const(f"c_{n}", v)
    args.update(extra_args or {})
    b.op("res", op, out_dtype, out_shape, **args)
    return b.text(["res"])
