"""ANE rule checker: a failing example for every rule, and clean programs that pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from rustane.mil import RULES, TARGETS, MilCheckError, check, check_or_raise, parse

SAMPLES = Path(__file__).parent / "mil_samples"
CLEAN = (SAMPLES / "kernel_linear.mil").read_text()
END = "    } -> (out);"

CONV_CONSTS = """
        string pt = const()[name = string("pt"), val = string("valid")];
        tensor<int32, [2]> st = const()[name = string("st"), val = tensor<int32, [2]>([1, 1])];
        tensor<int32, [4]> pd = const()[name = string("pd"), val = tensor<int32, [4]>([0, 0, 0, 0])];
        tensor<int32, [2]> dl = const()[name = string("dl"), val = tensor<int32, [2]>([1, 1])];
        int32 gr = const()[name = string("gr"), val = int32(1)];
        tensor<fp16, [64, 64, 1, 1]> W = const()[name = string("W"), val = tensor<fp16, [64, 64, 1, 1]>(BLOBFILE(path = string("@model_path/weights/w.bin"), offset = uint64(OFFSET)))];
"""
CONV = '        tensor<fp16, [1, 64, 1, 64]> cv = conv(dilations = dl, groups = gr, pad = pd, pad_type = pt, strides = st, weight = WEIGHT, x = XIN{extra})[name = string("cv")];\n'
WIDE = ('        tensor<fp16, [1, CH, 1, 2]> xw = const()[name = string("xw"), val = tensor<fp16, [1, CH, 1, 2]>('
        'BLOBFILE(path = string("@model_path/weights/xw.bin"), offset = uint64(64)))];\n')


def add_before_return(text: str, lines: str) -> str:
    assert END in text
    return text.replace(END, lines.rstrip("\n") + "\n" + END)


def conv_program(weight: str = "W", extra: str = "", offset: int = 64, path: str = "@model_path/weights/w.bin",
                 in_channels: int | None = None) -> str:
    """The clean sample plus a 1x1 conv of ``act`` (or of a const with ``in_channels`` channels)."""
    consts = CONV_CONSTS.replace("OFFSET", str(offset)).replace("@model_path/weights/w.bin", path)
    if in_channels is not None:
        consts += WIDE.replace("CH", str(in_channels))
    conv = CONV.replace("WEIGHT", weight).replace("XIN", "act" if in_channels is None else "xw").format(extra=extra)
    return add_before_return(CLEAN, consts + conv)


def small(params: str, body: str, ret: str) -> str:
    head = 'program(1.3)\n[buildInfo = dict<string, string>({})]\n{\n'
    return head + f"    func main<ios18>({params}) {{\n{body}\n    }} -> ({ret});\n}}\n"


def found(text: str, target: str = "m4") -> dict[str, set[str]]:
    """rule -> severities, for the diagnostics the clean sample does not already have on target."""
    base = {(d.rule, d.severity, d.message) for d in check(parse(CLEAN), target)}
    out: dict[str, set[str]] = {}
    for d in check(parse(text), target):
        if (d.rule, d.severity, d.message) not in base:
            out.setdefault(d.rule, set()).add(d.severity)
    return out


def expect(text: str, rules: dict[str, set[str]], target: str = "m4") -> None:
    assert found(text, target) == rules


# ---- clean programs -------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_clean_sample_has_no_errors(target):
    diags = check(parse(CLEAN), target)
    assert not [d for d in diags if d.is_error]
    if target in ("m1", "m2"):
        assert {d.rule for d in diags} == {"target-op"}  # matmul is reported to fail there
    else:
        assert diags == []
    assert check_or_raise(CLEAN, target) == diags


def test_verbose_conv_sample_is_clean():
    assert check(parse((SAMPLES / "verbose_ios16.mil").read_text()), "m1") == []


def test_shipped_kernel_templates_have_no_errors():
    from rustane import kernels

    plan = kernels.plan_for(dim=64, hidden_dim=128, n_heads=4, n_kv_heads=2, head_dim=16, seq_len=32)
    plan.update(kernels.plan_for(dim=64, hidden_dim=128, n_heads=4, n_kv_heads=4, head_dim=16, seq_len=32))
    assert len(plan) >= 10
    for name, spec in plan.items():
        errors = [str(d) for d in check(parse(kernels.render(spec)), "m4") if d.is_error]
        assert errors == [], name


# ---- one failing example per rule ---------------------------------------------------------------
def test_sdpa_mask():
    sdpa = ('        tensor<fp16, [1, 1, 64, 64]> at = scaled_dot_product_attention(query = act4, key = act4, '
            'value = act4, attn_mask = act4)[name = string("at")];')
    expect(add_before_return(CLEAN, sdpa), {"sdpa-mask": {"error"}})
    # without the mask the op itself is fine
    assert found(add_before_return(CLEAN, sdpa.replace(", attn_mask = act4", ""))) == {}


def test_concat_interleave():
    expect(CLEAN.replace("interleave = cid, ", ""), {"concat-interleave": {"error"}})


def test_concat_axis():
    expect(CLEAN.replace("concat(axis = cax", "concat(axis = fp16(1)"), {"concat-axis": {"error"}})


@pytest.mark.parametrize("op", ["gelu", "silu", "reduce_mean"])
def test_unsupported_op(op):
    expect(CLEAN.replace("sigmoid(x = yn)", f"{op}(x = yn)"), {"unsupported-op": {"error"}})


def test_unproven_op():
    expect(CLEAN.replace("sigmoid(x = yn)", "relu(x = yn)"), {"unproven-op": {"warning"}})
    assert "PR#40" in str(check(CLEAN.replace("sigmoid(x = yn)", "relu(x = yn)"))[0])


def test_conv_clean_then_bias():
    assert found(conv_program()) == {}
    bias = ('        tensor<fp16, [64]> cb = const()[name = string("cb"), val = tensor<fp16, [64]>(BLOBFILE('
            'path = string("@model_path/weights/cb.bin"), offset = uint64(64)))];\n')
    text = conv_program(extra=", bias = cb").replace('        tensor<fp16, [1, 64, 1, 64]> cv', bias + '        tensor<fp16, [1, 64, 1, 64]> cv')
    expect(text, {"conv-bias": {"error"}})


def test_conv_weight_must_be_const():
    expect(conv_program(weight="w"), {"conv-weight": {"error"}})


def test_conv_in_channels():
    expect(conv_program(in_channels=32000), {"conv-in-channels": {"error"}})
    assert found(conv_program(in_channels=31999)) == {}


def test_inline_bool():
    expect(CLEAN.replace("transpose_x = bF", "transpose_x = false"), {"inline-bool": {"error"}})
    expect(CLEAN.replace("transpose_y = bF", "transpose_y = bool(true)"), {"inline-bool": {"error"}})


def test_cast_target():
    cast = ('        string to16 = const()[name = string("to16"), val = string("fp16")];\n'
            '        tensor<fp16, [1, 384, 1, 64]> yc = cast(dtype = to16, x = y)[name = string("yc")];')
    text = add_before_return(CLEAN, cast)
    for target in ("m1", "m2"):
        expect(text, {"cast-target": {"error"}}, target)
    for target in ("m3", "m4", "m5"):
        assert found(text, target) == {}


def test_target_op():
    diags = check(CLEAN, "m1")
    assert {(d.rule, d.severity) for d in diags} == {("target-op", "warning")}


def test_undefined_return():
    expect(CLEAN.replace("-> (out);", "-> (out, nope);"), {"undefined-return": {"error"}})


def test_dead_return():
    # returning the input unchanged: dead name (and two outputs of different byte sizes)
    expect(CLEAN.replace("-> (out);", "-> (out, x);"), {"dead-return": {"error"}, "surface-size": {"error"}})
    text = small("tensor<fp16, [1, 64, 1, 512]> x",
                 '        tensor<fp16, [1, 64, 1, 512]> c = const()[name = string("c"), val = tensor<fp16, [1, 64, 1, 512]>'
                 '(BLOBFILE(path = string("@model_path/weights/c.bin"), offset = uint64(64)))];', "c")
    assert {d.rule for d in check(text)} == {"dead-return"}


def test_identifier_charset():
    expect(CLEAN.replace("gate", "ga.te"), {"identifier-charset": {"error"}})
    diags = check(CLEAN.replace("gate", "ga$te"))
    assert [d.rule for d in diags] == ["identifier-charset"] and "ga$te" in diags[0].message


def test_surface_size_small_is_warning():
    text = small("tensor<fp16, [1, 4, 1, 8]> x", '        tensor<fp16, [1, 4, 1, 8]> y = add(x = x, y = x)[name = string("y")];', "y")
    diags = check(text)
    # width 8 is also below the ANE's minimum I/O width (docs/ane-rules.md#min-width): a warning here,
    # refused by the plan guards
    assert {(d.rule, d.severity) for d in diags} == {("surface-size", "warning"), ("io-width", "warning")}
    assert sum(d.rule == "surface-size" for d in diags) == 2


def test_surface_size_non_uniform_inputs_is_error():
    text = CLEAN.replace("> x) {", "> x, tensor<fp16, [1, 64, 1, 512]> x2) {")
    expect(text, {"surface-size": {"error"}})
    same = CLEAN.replace("> x) {", "> x, tensor<fp16, [1, 64, 1, 448]> x2) {")
    assert found(same) == {}


def test_io_dtype():
    body = ('        string to16 = const()[name = string("to16"), val = string("fp16")];\n'
            '        tensor<fp16, [1, 64, 1, 512]> y = cast(dtype = to16, x = x)[name = string("y")];')
    text = small("tensor<fp32, [1, 64, 1, 512]> x", body, "y")
    assert {(d.rule, d.severity) for d in check(text)} == {("io-dtype", "warning")}


def test_io_order():
    text = CLEAN.replace("> x) {", "> x, tensor<fp16, [1, 64, 1, 448]> a) {")
    expect(text, {"io-order": {"warning"}})


@pytest.mark.parametrize(
    "old, new",
    [
        ("val = int32(-1)", "val = int32(4)"),  # softmax axis on rank 4
        ("val = tensor<int32, [1]>([1])", "val = tensor<int32, [1]>([-5])"),  # reduce_sum axes
        ('val = int32(1)];\n        bool cid', 'val = int32(7)];\n        bool cid'),  # concat axis
        ("([0, 1, 3, 2])", "([0, 1, 3, 3])"),  # transpose perm
        ('tensor<int32, [4]> pm = const()[name = string("pm"), val = tensor<int32, [4]>([0, 1, 3, 2])]',
         'tensor<int32, [3]> pm = const()[name = string("pm"), val = tensor<int32, [3]>([0, 1, 3])]'),
    ],
)
def test_axis_range(old, new):
    assert old in CLEAN
    expect(CLEAN.replace(old, new), {"axis-range": {"error"}})


def test_reshape_size():
    expect(CLEAN.replace("([1, 1, 64, 64])", "([1, 1, 64, 65])"), {"reshape-size": {"error"}})
    # one -1 wildcard that divides evenly is fine
    assert found(CLEAN.replace("([1, 1, 64, 64])", "([1, 1, -1, 64])")) == {}


def test_rank():
    five = '        tensor<int32, [1, 1, 1, 1, 2]> r5 = const()[name = string("r5"), val = tensor<int32, [1, 1, 1, 1, 2]>([[[[[1, 2]]]]])];'
    expect(add_before_return(CLEAN, five), {"rank": {"warning"}})
    text = small("tensor<fp16, [64, 512]> x", '        tensor<fp16, [64, 512]> y = add(x = x, y = x)[name = string("y")];', "y")
    assert {d.rule for d in check(text)} == {"rank"}


def test_blob_offset():
    text = conv_program(offset=192)
    expect(text, {"blob-offset": {"warning"}}, "m4")
    expect(text, {"blob-offset": {"error"}}, "m1")


def test_blob_path():
    expect(conv_program(path="weights/w.dat"), {"blob-path": {"warning"}})


def test_name_attr():
    expect(CLEAN.replace('[name = string("ys")]', ""), {"name-attr": {"warning"}})
    expect(CLEAN.replace('[name = string("ys")]', '[name = string("other")]'), {"name-attr": {"warning"}})


def test_main_function():
    expect(CLEAN.replace("func main<", "func fwd<"), {"main-function": {"error"}})


def test_dim_limit():
    big = ('        tensor<fp16, [1, 1, 1, 20000]> big = const()[name = string("big"), val = tensor<fp16, [1, 1, 1, 20000]>('
           'BLOBFILE(path = string("@model_path/weights/big.bin"), offset = uint64(64)))];')
    text = add_before_return(CLEAN, big)
    expect(text, {"dim-limit": {"warning"}}, "m2")
    assert found(text, "m4") == {}


# One minimal trigger per rule (independent of test order); the tests above pin the details.
EXAMPLES = {
    "sdpa-mask": lambda: add_before_return(CLEAN, '        tensor<fp16, [1, 1, 64, 64]> at = scaled_dot_product_attention('
                                           'query = act4, key = act4, value = act4, attn_mask = act4)[name = string("at")];'),
    "concat-interleave": lambda: CLEAN.replace("interleave = cid, ", ""),
    "concat-axis": lambda: CLEAN.replace("concat(axis = cax", "concat(axis = fp16(1)"),
    "unsupported-op": lambda: CLEAN.replace("sigmoid(x = yn)", "gelu(x = yn)"),
    "unproven-op": lambda: CLEAN.replace("sigmoid(x = yn)", "erf(x = yn)"),
    "conv-bias": lambda: conv_program(extra=", bias = sc"),
    "conv-weight": lambda: conv_program(weight="w"),
    "conv-in-channels": lambda: conv_program(in_channels=40000),
    "inline-bool": lambda: CLEAN.replace("transpose_x = bF", "transpose_x = false"),
    "cast-target": lambda: add_before_return(CLEAN, '        string to16 = const()[name = string("to16"), val = string("fp16")];\n'
                                             '        tensor<fp16, [1, 384, 1, 64]> yc = cast(dtype = to16, x = y)[name = string("yc")];'),
    "target-op": lambda: CLEAN,
    "undefined-return": lambda: CLEAN.replace("-> (out);", "-> (out, nope);"),
    "dead-return": lambda: CLEAN.replace("-> (out);", "-> (out, x);"),
    "identifier-charset": lambda: CLEAN.replace("gate", "ga.te"),
    "surface-size": lambda: CLEAN.replace("> x) {", "> x, tensor<fp16, [1, 64, 1, 512]> x2) {"),
    "io-dtype": lambda: CLEAN.replace("tensor<fp16, [1, 64, 1, 448]> x", "tensor<fp32, [1, 64, 1, 448]> x"),
    "io-order": lambda: CLEAN.replace("> x) {", "> x, tensor<fp16, [1, 64, 1, 448]> a) {"),
    "axis-range": lambda: CLEAN.replace("val = int32(-1)", "val = int32(4)"),
    "reshape-size": lambda: CLEAN.replace("([1, 1, 64, 64])", "([1, 1, 64, 65])"),
    "rank": lambda: CLEAN.replace("tensor<int32, [1]> rax = const()[name = string(\"rax\"), val = tensor<int32, [1]>([1])]",
                                  "tensor<int32, [1, 1, 1, 1, 1]> rax = const()[name = string(\"rax\"), val = tensor<int32, [1, 1, 1, 1, 1]>([[[[[1]]]]])]"),
    "blob-offset": lambda: conv_program(offset=192),
    "blob-path": lambda: conv_program(path="w.bin"),
    "name-attr": lambda: CLEAN.replace('[name = string("ys")]', ""),
    "main-function": lambda: CLEAN.replace("func main<", "func fwd<"),
    "io-width": lambda: CLEAN.replace("tensor<fp16, [1, 64, 1, 448]> x", "tensor<fp16, [1, 64, 1, 440]> x"),
    "matmul-inner": lambda: small("tensor<fp16, [1, 1, 64, 48]> a, tensor<fp16, [1, 1, 48, 64]> b",
                                  '        bool bF = const()[name = string("bF"), val = bool(false)];\n'
                                  '        tensor<fp16, [1, 1, 64, 64]> y = matmul(transpose_x = bF, transpose_y = bF, '
                                  'x = a, y = b)[name = string("y")];', "y"),
    "dim-limit": lambda: add_before_return(CLEAN, '        tensor<fp16, [1, 1, 1, 20000]> big = const()[name = string("big"), '
                                           'val = tensor<fp16, [1, 1, 1, 20000]>(BLOBFILE(path = string("@model_path/weights/big.bin"), offset = uint64(64)))];'),
}


def test_every_rule_has_a_failing_example():
    assert set(EXAMPLES) == set(RULES)
    for rule, make in EXAMPLES.items():
        target = "m1" if rule in ("cast-target", "target-op", "dim-limit") else "m4"
        rules = {d.rule for d in check(parse(make()), target)}
        assert rule in rules, rule


# ---- API ----------------------------------------------------------------------------------------
def test_check_or_raise_lists_every_error():
    text = CLEAN.replace("interleave = cid, ", "").replace("transpose_x = bF", "transpose_x = false")
    with pytest.raises(MilCheckError) as ei:
        check_or_raise(parse(text), "m4", name="kernel_linear")
    msg = str(ei.value)
    assert msg.startswith("2 ANE rule error(s) in kernel_linear:")
    assert "[concat-interleave]" in msg and "[inline-bool]" in msg and "docs/ane-runtime.md#ops" in msg
    assert len(ei.value.diagnostics) == 2


def test_diagnostic_positions_and_format():
    text = CLEAN.replace("transpose_x = bF", "transpose_x = false")
    (d,) = check(text)
    line = text.splitlines()[d.line - 1]
    assert line[d.col - 1 :].startswith("false")
    assert str(d).startswith(f"line {d.line}, column {d.col}: error [inline-bool] ")
    assert d.fact.startswith("docs/ane-runtime.md#ops")


def test_unknown_target():
    with pytest.raises(ValueError, match="m1, m2, m3, m4, m5"):
        check(CLEAN, "m9")


def test_every_rule_cites_a_fact():
    """Each rule's fact starts with a section of a document in this repository that exists."""
    from test_doc_citations import REPO, missing_target

    for r in RULES.values():
        assert r.severity in ("error", "warning")
        cite = r.fact.split(":")[0].split(" ")[0].rstrip(",")
        assert cite.startswith("docs/") and missing_target(cite, REPO) is None, (r.id, r.fact)


def test_matmul_inner_dim_follows_transpose_x():
    """The contraction dim is x's last axis, or its second-to-last when transpose_x is a true const."""
    body = ('        bool bT = const()[name = string("bT"), val = bool(true)];\n'
            '        bool bF = const()[name = string("bF"), val = bool(false)];\n'
            '        tensor<fp16, [1, 1, 48, 64]> y = matmul(transpose_x = TX, transpose_y = bF, '
            'x = a, y = b)[name = string("y")];')
    params = "tensor<fp16, [1, 1, 64, 48]> a, tensor<fp16, [1, 1, 64, 64]> b"
    flagged = {d.rule for d in check(small(params, body.replace("TX", "bT"), "y"))}
    assert "matmul-inner" not in flagged  # contracts over 64
    params = "tensor<fp16, [1, 1, 48, 64]> a, tensor<fp16, [1, 1, 48, 64]> b"
    body2 = body.replace("[1, 1, 48, 64]> y", "[1, 1, 64, 64]> y")
    assert "matmul-inner" in {d.rule for d in check(small(params, body2.replace("TX", "bT"), "y"))}  # over 48
