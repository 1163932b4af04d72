"""MIL template rendering: substitution, clear errors, render -> parse -> emit round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustane.mil import MilTemplateError, emit, parse, render, render_text, same_program, strip_comments

TEMPLATES = Path(__file__).parent / "mil_samples" / "templates"


def test_render_sample_template_and_round_trip():
    text = render("rmsnorm_tpl", template_dir=TEMPLATES, DIM=64, SEQ=32, INV_DIM=1 / 64, EPS=1e-5, UNUSED=7)
    p = parse(text)
    x = p.main.params[0]
    assert x.type.shape == (1, 64, 1, 32)
    body = {s.name: s for s in p.main.body}
    assert body["ss"].type.shape == (1, 1, 1, 32)
    assert float(body["invd"].attrs["val"].value) == float(np.float16(1 / 64))
    assert float(body["eps"].attrs["val"].value) == float(np.float16(1e-5))
    again = emit(p)
    assert same_program(parse(again), p) and emit(parse(again)) == again


def test_name_with_extension_and_template_dir_as_str():
    a = render("rmsnorm_tpl.mil", template_dir=str(TEMPLATES), DIM=8, SEQ=4, INV_DIM=0.125, EPS=1e-5)
    b = render("rmsnorm_tpl", template_dir=TEMPLATES, DIM=8, SEQ=4, INV_DIM=0.125, EPS=1e-5)
    assert a == b and "tensor<fp16, [1, 8, 1, 4]> x" in a


def test_missing_placeholder_names_template_placeholder_and_line():
    with pytest.raises(MilTemplateError) as ei:
        render("rmsnorm_tpl", template_dir=TEMPLATES, DIM=8, INV_DIM=0.125, EPS=1e-5)
    msg = str(ei.value)
    lines = (TEMPLATES / "rmsnorm_tpl.mil").read_text().splitlines()
    first = next(i for i, line in enumerate(lines, 1) if "${SEQ}" in line)
    assert "rmsnorm_tpl.mil" in msg and f"$SEQ (line {first})" in msg
    assert "given: DIM, EPS, INV_DIM" in msg


def test_render_text_rules():
    assert render_text("a $X ${Y}z $$ b", X=1, Y="q") == "a 1 qz $ b"
    assert render_text("bool($B)", B=False) == "bool(false)"
    assert render_text("fp16($F)", F=0.1) == "fp16(0.1)"
    assert render_text("[$N]", N=np.int64(5)) == "[5]"
    with pytest.raises(MilTemplateError, match=r"line 2, column 3: '\$' not followed"):
        render_text("ok\nx $1 y", X=1)
    with pytest.raises(MilTemplateError, match=r"\$A \(line 1\), \$B \(line 3\)"):
        render_text("$A\n\n$B $A")


def test_unknown_template_lists_available(tmp_path):
    (tmp_path / "one.mil").write_text("x")
    with pytest.raises(MilTemplateError, match="no MIL template 'two.mil'.*available: one"):
        render("two", template_dir=tmp_path)


def test_family_templates_dir_holds_the_kernel_templates():
    from rustane.models.llama.plan import TEMPLATES, plan_for

    assert TEMPLATES.is_dir()
    spec = plan_for(dim=8, hidden_dim=8, n_heads=2, n_kv_heads=1, head_dim=4, seq_len=4)["qBwd"]
    assert spec.template_dir == TEMPLATES and (TEMPLATES / f"{spec.template}.mil").is_file()


def test_render_without_a_template_dir_names_the_fix():
    with pytest.raises(MilTemplateError, match="pass template_dir="):
        render("linearDx", template_dir=None)


def test_comments_are_stripped_before_substitution():
    text = ('// header: y = W·x, no placeholders needed here\n'
            'a = f($X) // trailing, cut with its spaces\n'
            '\n'
            'b = string("keep // this")\n'
            '    // indented comment line\n'
            'c')
    assert render_text(text, X=1) == 'a = f(1)\n\nb = string("keep // this")\nc'
    assert strip_comments("no comments\n") == "no comments\n"


def test_every_kernel_template_opens_with_its_header():
    """Each template states its equation, its input blocks and its output taps (issue 10)."""
    from rustane.models.llama.plan import TEMPLATES

    for path in sorted(TEMPLATES.glob("*.mil")):
        head = path.read_text().split("program(", 1)[0]
        assert head.startswith("// "), f"{path.name}: no // header"
        assert "input" in head and "output" in head and "=" in head, f"{path.name}: header lacks equation/layout"


@settings(max_examples=60)
@given(st.integers(1, 4096), st.integers(1, 4096), st.floats(1e-6, 1.0))
def test_rendered_shapes_parse_back(dim, seq, eps):
    p = parse(render("rmsnorm_tpl", template_dir=TEMPLATES, DIM=dim, SEQ=seq, INV_DIM=1.0 / dim, EPS=eps))
    assert p.main.params[0].type.shape == (1, dim, 1, seq)
    y = {s.name: s for s in p.main.body}["y"]
    assert y.type.shape == (1, dim, 1, seq)
    assert float(p.main.body[4].attrs["val"].value) == float(np.float16(1.0 / dim))
