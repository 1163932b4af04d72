"""MIL text parser and emitter: constructs, errors with positions, round trips, fuzzing."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustane.mil import (
    BlobRef,
    Function,
    Literal,
    Loc,
    MilSyntaxError,
    Param,
    Program,
    Ref,
    TARGETS,
    Statement,
    TensorType,
    TupleValue,
    check,
    emit,
    parse,
    same_program,
)
from rustane.mil.lexer import MAX_TEXT_CHARS

SAMPLES = Path(__file__).parent / "mil_samples"
SAMPLE_TEXTS = {p.name: p.read_text() for p in sorted(SAMPLES.glob("*.mil"))}

HEADER = 'program(1.3)\n[buildInfo = dict<string, string>({{"coremlc-version", "3505.4.1"}})]\n{\n'


def prog(body: str, params: str = "tensor<fp16, [1, 4, 1, 8]> x", ret: str = "y") -> str:
    return HEADER + f"    func main<ios18>({params}) {{\n{body}\n    }} -> ({ret});\n}}\n"


def stmts(p: Program) -> dict[str, Statement]:
    return {s.name: s for s in p.main.body}


def val(p: Program, name: str):
    return stmts(p)[name].attrs["val"]


# ---- positive: every construct -----------------------------------------------------------------
@pytest.fixture(scope="module")
def allc() -> Program:
    return parse(SAMPLE_TEXTS["all_constructs.mil"])


def test_header_and_signature(allc):
    assert allc.version == "1.3"
    assert allc.build_info_form == "short"
    assert allc.build_info == {"coremlc-version": "3505.4.1", "note": 'a "quoted" \\ value'}
    fn = allc.main
    assert (fn.name, fn.opset) == ("main", "ios18")
    assert [(p.name, p.type) for p in fn.params] == [
        ("a", TensorType("fp16", (1, 4, 1, 8))),
        ("b", TensorType("fp16", (1, 4, 1, 8))),
        ("s", TensorType("fp16", (), False)),
    ]
    assert [r.name for r in fn.returns] == ["k", "z"]
    # comments and line breaks inside the parameter list do not disturb positions
    assert fn.params[1].loc == Loc(6, 22)


def test_scalar_consts(allc):
    expect = {
        "bF": ("bool", False), "bT": ("bool", True), "ax": ("int32", 1), "neg": ("int32", -3),
        "h": ("fp16", 0.125), "hn": ("fp16", -3.0), "f": ("fp32", np.float32(-1.5e-3)), "big": ("fp16", -65504.0),
    }
    for name, (dtype, value) in expect.items():
        lit = val(allc, name)
        assert lit.type == TensorType(dtype, (), True), name
        assert lit.value.shape == () and lit.value.dtype == np.dtype({"bool": bool}.get(dtype, dtype.replace("fp", "float"))), name
        assert lit.value == value, name
    assert val(allc, "h").text == "0x1p-3"
    assert val(allc, "pt").value == "valid" and val(allc, "pt").type.dtype == "string"


def test_verbose_scalars(allc):
    vi = val(allc, "vi")
    assert vi.type == TensorType("int32", (), False) and int(vi.value) == 7
    assert stmts(allc)["vi"].attrs["name"].value == "vi"
    assert stmts(allc)["vi"].type.scalar_form is False
    assert bool(val(allc, "vb").value) is False


def test_tensor_literals(allc):
    np.testing.assert_array_equal(val(allc, "perm").value, np.array([0, 1, 3, 2], np.int32))
    m = val(allc, "m").value
    assert m.dtype == np.float16 and m.shape == (2, 3)
    np.testing.assert_array_equal(m, np.array([[1, -2.5, 1 / 16], [4, 5, -6]], np.float16))
    assert val(allc, "empty").value.shape == (0,)
    q8 = val(allc, "q8").value
    assert q8.dtype == np.int8 and q8.tolist() == [-128, 127]


def test_blobfile_and_constexpr(allc):
    w = val(allc, "W")
    assert w.value == BlobRef("@model_path/weights/w.bin", 64)
    assert w.type == TensorType("fp16", (4, 4, 1, 1))
    wq = stmts(allc)["Wq"]
    assert wq.op == "constexpr_affine_dequantize" and wq.args == {}
    assert set(wq.attrs) == {"axis", "name", "quantized_data", "scale", "zero_point"}
    assert wq.attrs["quantized_data"].value == BlobRef("@model_path/weights/wq8.bin", 64)
    assert wq.attrs["quantized_data"].type.dtype == "int8"
    assert float(wq.attrs["scale"].value) == 0.125 and int(wq.attrs["zero_point"].value) == 0


def test_args_refs_tuples_inline(allc):
    s = stmts(allc)
    k = s["k"]
    assert k.op == "concat" and list(k.args) == ["axis", "interleave", "values"]
    assert isinstance(k.args["values"], TupleValue)
    assert [i.name for i in k.args["values"].items] == ["c", "d"]
    g = s["g"]
    assert isinstance(g.args["transpose_x"], Literal) and bool(g.args["transpose_x"].value) is False
    assert bool(g.args["transpose_y"].value) is True
    d = s["d"]
    assert isinstance(d.args["y"], Literal) and d.args["y"].type.dtype == "fp16" and float(d.args["y"].value) == 2
    assert d.args["x"] == Ref("c", d.args["x"].loc)
    cv = s["cv"]
    np.testing.assert_array_equal(cv.args["dilations"].value, [1, 1])
    # statement location is where its type starts
    assert s["c"].loc.col == 9


def test_verbose_dialect():
    p = parse(SAMPLE_TEXTS["verbose_ios16.mil"])
    assert (p.version, p.build_info_form, p.main.opset) == ("1.0", "verbose", "ios16")
    assert val(p, "W").value == BlobRef("@model_path/weights/w.bin", 64)
    assert val(p, "pt").value == "valid" and val(p, "pt").type.scalar_form is False
    text = emit(p)
    assert "offset = tensor<uint64, []>(64)" in text
    assert "dict<tensor<string, []>, tensor<string, []>>" in text


def test_optional_buildinfo_empty_dict_and_compact_spacing():
    p = parse("program(1.3){func main<ios18>(tensor<fp16,[1,2,1,2]> x){tensor<fp16,[1,2,1,2]> y=add(x=x,y=x);}->(y);}")
    assert p.build_info == {} and stmts(p)["y"].args["y"].name == "x"
    q = parse('program(1.3)\n[buildInfo = dict<string, string>({})]\n{\n' + p_body_min())
    assert q.build_info == {}


def p_body_min() -> str:
    return "func main<ios18>(tensor<fp16, [1, 2, 1, 2]> x) {\n} -> (x);\n}\n"


def test_special_floats_and_signs():
    p = parse(prog(
        '        tensor<fp32, [4]> v = const()[name = string("v"), val = tensor<fp32, [4]>([inf, -inf, +1.5, -0.0])];\n'
        "        tensor<fp16, [1, 4, 1, 8]> y = mul(x = x, y = x)[name = string(\"y\")];"
    ))
    v = val(p, "v").value
    assert np.isinf(v[0]) and v[0] > 0 and np.isinf(v[1]) and v[1] < 0 and v[2] == 1.5
    assert np.signbit(v[3])


# ---- errors: message, line, column, excerpt ------------------------------------------------------
def err(text: str) -> MilSyntaxError:
    with pytest.raises(MilSyntaxError) as ei:
        parse(text)
    return ei.value


def test_error_format_points_at_token():
    text = prog("        tensor<fp16, [1, 4, 1, 8]> y = add(x = x y = x)[name = string(\"y\")];")
    e = err(text)
    line = text.splitlines()[e.line - 1]
    assert e.line == 5 and line[e.col - 1 :].startswith("y = x)")
    assert "expected ',' or ')' in the argument list" in e.msg
    s = str(e)
    head, shown, caret = s.split("\n")
    assert head.startswith(f"line 5, column {e.col}: expected")
    assert shown == "    " + line
    assert caret.index("^") == 4 + e.col - 1


def test_error_excerpt_window_for_long_lines():
    pad = "        " + " " * 300
    text = prog(pad + "tensor<fp16, [1, 4, 1, 8]> y = add(x = x, y = nope)[name = string(\"y\")];")
    e = err(text)
    assert "undefined name 'nope'" in e.msg
    _, shown, caret = str(e).split("\n")
    assert len(shown) < 120 and shown.lstrip().startswith("...")
    assert shown[caret.index("^") :].startswith("nope")


@pytest.mark.parametrize(
    "body, needle",
    [
        ("        tensor<fp16, [1, 4, 1, 8]> y = add(x = x, y = x)[name = string(\"y\")]", "expected ';'"),
        ("        tensor<fp16, [1, 4, 1, 8]> y = add(x = x, y = q)[name = string(\"y\")];", "undefined name 'q'"),
        ("        tensor<fp16, [1, 4, 1, 8]> y = add(x = x, y = z)[name = string(\"y\")];\n"
         "        tensor<fp16, [1, 4, 1, 8]> z = add(x = x, y = x)[name = string(\"z\")];", "undefined name 'z'"),
        ("        tensor<fp16, [1, 4, 1, 8]> x = add(x = x, y = x)[name = string(\"x\")];", "duplicate name 'x'"),
        ("        tensor<fp16, [1, 4, 1, 8]> y = add(x = x, x = x)[name = string(\"y\")];", "duplicate argument 'x'"),
        ("        tensor<fp16, [1, 4, 1, 8]> y = add(x = x, y = x)[name = string(\"y\"), name = string(\"y\")];",
         "duplicate attribute 'name'"),
        ("        tensor<fp16, [1, 4, 1, 8]> y = add(x = x, y = x)[name = int32(1)];", "'name' attribute must be a string"),
        ("        tensor<int32, [4]> y = const()[name = string(\"y\"), val = tensor<int32, [4]>([1, 2, 3])];",
         "has 3 elements but tensor<int32, [4]> needs 4"),
        ("        tensor<int32, [2, 2]> y = const()[name = string(\"y\"), val = tensor<int32, [2, 2]>([[1, 2, 3], [4]])];",
         "ragged"),
        ("        tensor<int32, [2, 2]> y = const()[name = string(\"y\"), val = tensor<int32, [2, 2]>([[1], [2], [3], [4]])];",
         "nested shape [4, 1]"),
        ("        tensor<int32, [3]> y = const()[name = string(\"y\"), val = tensor<int32, [4]>([1, 2, 3, 4])];",
         "declared tensor<int32, [3]> but its val is tensor<int32, [4]>"),
        ("        int32 y = const()[name = string(\"y\")];", "has no 'val' attribute"),
        ("        int32 y = const(x = x)[name = string(\"y\"), val = int32(1)];", "takes no arguments"),
        ("        int32 y = const()[name = string(\"y\"), val = int32(2147483648)];", "out of range for int32"),
        ("        int32 y = const()[name = string(\"y\"), val = int32(1.5)];", "must be integers"),
        ("        fp16 y = const()[name = string(\"y\"), val = fp16(70000)];", "out of range for fp16"),
        ("        fp16 y = const()[name = string(\"y\"), val = fp16(1e999)];", "out of range"),
        ("        fp16 y = const()[name = string(\"y\"), val = fp16(0x1p99999999)];", "out of range"),
        ("        bool y = const()[name = string(\"y\"), val = bool(1)];", "true or false"),
        ("        tensor<fp16, [1, 4, 1, 8]> y = mul(x = x, y = 2)[name = string(\"y\")];", "bare number"),
        ("        tensor<fp16, [1, 4, 1, 8]> y = mul(x = x, y = \"a\")[name = string(\"y\")];", "bare string"),
        ("        tensor<fp17, [1, 4, 1, 8]> y = mul(x = x, y = x)[name = string(\"y\")];", "unknown dtype 'fp17'"),
        ("        tensor<fp16, [1, -4, 1, 8]> y = mul(x = x, y = x)[name = string(\"y\")];", "non-negative integer dimension"),
        ("        tensor<fp16, [1, 4, 1, 8]> fp16 = mul(x = x, y = x)[name = string(\"y\")];", "reserved word"),
        ("        tensor<fp16, [1, 4, 1, 8]> y = mul(x = x, y = x)[name = string(\"y)];", "unterminated string"),
        ("        tensor<fp16, [1, 4, 1, 8]> y = mul(x = x, y = x)[name = string(\"\\q\")];", "unknown escape"),
        ("        tensor<fp16, [1, 4, 1, 8]> y = mul(x = x, y = x) # [name = string(\"y\")];", "unexpected character '#'"),
        ("        tensor<fp16, [1, 4, 1, 8]> y = mul(x = x, y = x)[name = string(\"y\")];\n"
         "        tensor<fp16, [4]> w = const()[name = string(\"w\"), val = tensor<fp16, [4]>(BLOBFILE(path = string(\"a.bin\")))];",
         "missing 'offset'"),
        ("        tensor<fp16, [4]> y = const()[name = string(\"y\"), val = tensor<fp16, [4]>(BLOBFILE(path = int32(1), offset = uint64(64)))];",
         "BLOBFILE path must be a string"),
        ("        int32 y = const()[name = string(\"y\"), val = int32(12ab)];", "malformed number"),
    ],
)
def test_errors(body, needle):
    e = err(prog(body))
    assert needle in e.msg, str(e)
    assert e.line >= 5 and e.col >= 1


def test_name_attr_error_points_at_the_attribute_and_placeholders_are_named():
    text = prog("        tensor<fp16, [1, 4, 1, 8]> y = add(x = x, y = x)[name = int32(1)];")
    e = err(text)
    assert text.splitlines()[e.line - 1][e.col - 1 :].startswith("int32(1)")
    raw = (Path(__file__).parent / "mil_samples" / "templates" / "rmsnorm_tpl.mil").read_text()
    e = err(raw)
    assert "unrendered template placeholder $DIM" in e.msg and e.line == 4


def test_errors_outside_functions():
    assert "expected 'program'" in err("prog(1.3)").msg
    assert "program version" in err("program(x)").msg
    assert "no functions" in err("program(1.3)\n{\n}\n").msg
    e = err(prog("") + "extra")
    assert "after the end of the program" in e.msg and e.line == 8
    assert "duplicate buildInfo key" in err('program(1.3)[buildInfo = dict<string, string>({{"a", "1"}, {"a", "2"}})]{').msg
    assert "mixes" in err('program(1.3)[buildInfo = dict<string, tensor<string, []>>({})]{').msg
    two = HEADER + "    func f<ios18>() {\n    } -> (a);\n    func f<ios18>() {\n    } -> (a);\n}\n"
    e = err(two)
    assert "duplicate function 'f'" in e.msg and e.line == 6
    assert "end of input" in err(HEADER + "    func main<ios18>(").msg


def test_nesting_and_size_limits_raise_cleanly():
    deep_tuple = prog("        tensor<fp16, [1, 4, 1, 8]> y = f(v = " + "(" * 5000 + ")" * 5000 + ");")
    assert "nested deeper" in err(deep_tuple).msg
    deep_list = prog("        tensor<int32, [1]> y = const()[val = tensor<int32, [1]>(" + "[" * 5000 + "1" + "]" * 5000 + ")];")
    assert "nested deeper" in err(deep_list).msg
    e = err("x" * (MAX_TEXT_CHARS + 1))
    assert "too large" in e.msg
    assert "longer than" in err(prog("        int32 y = const()[val = int32(" + "9" * 5000 + ")];")).msg


def test_large_program_parses_fast():
    # 4000 statements (about 20x the largest kernel): linear time, no quadratic blowups.
    lines = ["        tensor<fp16, [1, 4, 1, 8]> y0 = add(x = x, y = x)[name = string(\"y0\")];"]
    lines += [f"        tensor<fp16, [1, 4, 1, 8]> y{i} = add(x = y{i - 1}, y = x)[name = string(\"y{i}\")];"
              for i in range(1, 4000)]
    text = prog("\n".join(lines), ret="y3999")
    t = time.perf_counter()
    p = parse(text)
    assert len(p.main.body) == 4000
    assert time.perf_counter() - t < 5.0


# ---- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SAMPLE_TEXTS))
def test_sample_round_trip(name):
    p = parse(SAMPLE_TEXTS[name])
    text = emit(p)
    p2 = parse(text)
    assert same_program(p, p2)
    assert emit(p2) == text


def test_emit_canonical_spacing():
    p = parse("program(1.3){func main<ios18>(tensor<fp16,[1,2,1,2]> x){"
              "tensor<int32,[4]> b=const()[name=string(\"b\"),val=tensor<int32,[4]>([0,0,0,256])];"
              "tensor<fp16,[1,2,1,2]> y=add(x=x,y=x)[name=string(\"y\")];}->(y);}")
    assert emit(p).splitlines() == [
        "program(1.3)",
        "[buildInfo = dict<string, string>({})]",
        "{",
        "    func main<ios18>(tensor<fp16, [1, 2, 1, 2]> x) {",
        '        tensor<int32, [4]> b = const()[name = string("b"), val = tensor<int32, [4]>([0, 0, 0, 256])];',
        '        tensor<fp16, [1, 2, 1, 2]> y = add(x = x, y = x)[name = string("y")];',
        "    } -> (y);",
        "}",
    ]


def test_same_program_detects_differences():
    base = parse(SAMPLE_TEXTS["kernel_linear.mil"])
    changed = parse(SAMPLE_TEXTS["kernel_linear.mil"].replace("fp16(0x1p-3)", "fp16(0x1p-2)"))
    assert not same_program(base, changed)
    renamed = parse(SAMPLE_TEXTS["kernel_linear.mil"].replace("(p, y)", "(y, p)"))
    assert not same_program(base, renamed)


# AST-level generator: programs built directly (not via the parser), emitted, and parsed back.
_RESERVED = {"fp16", "fp32", "fp64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
             "bool", "string", "tensor", "true", "false", "BLOBFILE", "dict", "func", "program", "inf", "nan"}
_FIRST = "ABCXYZabcxyz_"
_REST = "ABCabc019_@"
idents = st.builds(lambda a, b: a + b, st.sampled_from(_FIRST), st.text(st.sampled_from(_REST), max_size=5)).filter(
    lambda s: s not in _RESERVED
)
strings = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)


@st.composite
def literals(draw):
    dtype = draw(st.sampled_from(["fp16", "fp32", "int32", "int8", "uint8", "bool", "string", "blob"]))
    if dtype == "string":
        return Literal(TensorType("string", (), draw(st.booleans())), draw(strings))
    if dtype == "blob":
        path = "@model_path/weights/" + draw(idents) + ".bin"
        return Literal(TensorType("fp16", (4, 4, 1, 1)), BlobRef(path, draw(st.integers(0, 2**40))))
    shape = draw(shapes)
    scalar_form = not shape and draw(st.booleans())
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == "bool":
        elems = st.booleans()
    elif dtype in ("fp16", "fp32"):
        elems = st.floats(width=16 if dtype == "fp16" else 32, allow_nan=False)
    else:
        info = np.iinfo(dtype)
        elems = st.integers(int(info.min), int(info.max))
    values = draw(st.lists(elems, min_size=n, max_size=n))
    np_dt = {"fp16": np.float16, "fp32": np.float32, "bool": np.bool_}.get(dtype, dtype)
    return Literal(TensorType(dtype, shape, scalar_form), np.array(values, dtype=np_dt).reshape(shape))


@st.composite
def programs(draw):
    names = draw(st.lists(idents, min_size=2, max_size=8, unique=True))
    params = (Param(TensorType("fp16", (1, 4, 1, 8)), names[0], Loc(1, 1)),)
    body = []
    defined = [names[0]]
    for name in names[1:]:
        if draw(st.booleans()):
            lit = draw(literals())
            attrs = {"name": Literal(TensorType("string", (), True), name), "val": lit}
            body.append(Statement(lit.type, name, "const", {}, attrs, Loc(1, 1)))
        else:
            refs = st.sampled_from(defined).map(lambda n: Ref(n))
            value = st.one_of(refs, literals(), st.lists(refs, max_size=3).map(lambda xs: TupleValue(tuple(xs))))
            args = draw(st.dictionaries(idents, value, max_size=3))
            extra = draw(st.dictionaries(idents.filter(lambda k: k != "name"), literals(), max_size=2))
            attrs = {"name": Literal(TensorType("string", (), True), name), **extra}
            op = draw(st.sampled_from(["add", "mul", "concat", "matmul", "weird_op"]))
            body.append(Statement(TensorType("fp16", (1, 4, 1, 8)), name, op, args, attrs, Loc(1, 1)))
        defined.append(name)
    returns = tuple(Ref(n) for n in draw(st.lists(st.sampled_from(defined), min_size=1, max_size=3)))
    fn = Function("main", "ios18", params, tuple(body), returns, Loc(1, 1))
    info = draw(st.dictionaries(strings, strings, max_size=3))
    return Program(draw(st.sampled_from(["1.3", "1.0"])), info, {"main": fn}, Loc(1, 1),
                   draw(st.sampled_from(["short", "verbose"])))


@settings(max_examples=100)
@given(programs())
def test_generated_programs_round_trip(p):
    text = emit(p)
    p2 = parse(text)
    assert same_program(p, p2)
    assert emit(p2) == text
    assert all(d.line >= 1 for d in check(p2, "m1"))  # the checker copes with odd programs


# ---- fuzzing: never anything but MilSyntaxError, never slow -------------------------------------
_TOKEN_RE = re.compile(r'"(?:[^"\\\n]|\\.)*"|[A-Za-z_][A-Za-z0-9_@.]*|[0-9][0-9A-Za-z.+-]*|->|\S')
_SAMPLE_TOKENS = {k: _TOKEN_RE.findall(v) for k, v in SAMPLE_TEXTS.items()}
_MIL_ALPHABET = "()[]{}<>,=;-+\"\\/. \n\t0123456789abefpxABEFPX_@$fp16int32tensorboolstring"


def _assert_parse_is_clean(text: str) -> None:
    t = time.perf_counter()
    try:
        p = parse(text)
    except MilSyntaxError as e:
        assert e.line >= 1 and e.col >= 1 and str(e).startswith(f"line {e.line}, column {e.col}: ")
    else:
        text2 = emit(p)
        assert same_program(p, parse(text2))
        for target in TARGETS:
            check(p, target)  # the checker must cope with whatever parses
    assert time.perf_counter() - t < 2.0


@st.composite
def char_mutants(draw):
    text = draw(st.sampled_from(sorted(SAMPLE_TEXTS.values())))
    for _ in range(draw(st.integers(1, 4))):
        n = len(text)
        i = draw(st.integers(0, n - 1))
        j = min(n, i + draw(st.integers(1, 8)))
        op = draw(st.sampled_from(["delete", "insert", "duplicate", "swap"]))
        if op == "delete":
            text = text[:i] + text[j:]
        elif op == "insert":
            text = text[:i] + draw(st.text(st.sampled_from(_MIL_ALPHABET), min_size=1, max_size=4)) + text[i:]
        elif op == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        else:
            k = draw(st.integers(0, n - 1))
            chars = list(text)
            chars[i], chars[k] = chars[k], chars[i]
            text = "".join(chars)
    return text


@st.composite
def token_mutants(draw):
    toks = list(draw(st.sampled_from(sorted(_SAMPLE_TOKENS.values(), key=len))))
    for _ in range(draw(st.integers(1, 4))):
        n = len(toks)
        i = draw(st.integers(0, n - 1))
        k = draw(st.integers(0, n - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "replace"]))
        if op == "delete":
            del toks[i]
        elif op == "duplicate":
            toks.insert(i, toks[k])
        elif op == "swap":
            toks[i], toks[k] = toks[k], toks[i]
        else:
            toks[i] = toks[k]
    return " ".join(toks)


@settings(max_examples=250)
@given(char_mutants())
def test_fuzz_character_mutations(text):
    _assert_parse_is_clean(text)


@settings(max_examples=250)
@given(token_mutants())
def test_fuzz_token_mutations(text):
    _assert_parse_is_clean(text)


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=300), st.text(st.sampled_from(_MIL_ALPHABET), max_size=300)))
def test_fuzz_random_text(text):
    _assert_parse_is_clean(text)


@settings(max_examples=100)
@given(st.text(st.sampled_from(_MIL_ALPHABET), max_size=120))
def test_fuzz_inside_a_statement(fragment):
    _assert_parse_is_clean(prog(f"        tensor<fp16, [1, 4, 1, 8]> y = add({fragment})[name = string(\"y\")];"))
