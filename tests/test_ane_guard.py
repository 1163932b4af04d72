"""Guards before compile (rustane.ane_guard): configs whose kernels break an ANE rule are refused
with a message naming field, kernel, limit and fix; every preset passes on every profile.

Expected limits come from docs/ane-rules.md (outside evidence); the widths and byte sizes a config
produces are computed here from the kernel layout of docs/design.md, not read back from the guard.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from rustane import ane_guard
from rustane.ane_guard import AneRuleError
from rustane.config import ModelConfig, preset, preset_names
from rustane.mil import ane_rules
from rustane.mil.ane_rules import CONSERVATIVE, all_profiles, profile

PROFILES = [CONSERVATIVE] + all_profiles()
#: the M1/M2 + macOS 26 profiles reject matmul itself (docs/ane-rules.md#matmul-op): no config
#: can train there, and the guard says so
NO_MATMUL = {p.name for p in PROFILES if "matmul" in p.rejected_ops}


def enforced(cfg, prof):
    return [b for b in ane_guard.config_breaches(cfg, prof) if b.enforced]


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_passes_every_rule_on_every_profile(name):
    cfg = preset(name)
    for prof in PROFILES:
        rules = {b.rule for b in enforced(cfg, prof)}
        if prof.name in NO_MATMUL:
            assert rules == {"matmul-op"}, (prof.name, rules)
        else:
            assert rules == set(), (name, prof.name, rules)


def test_tiny_is_above_the_conservative_minimum_surface():
    """The default preset's smallest kernel tensor is a dim x seq_len fp16 output (dx of the
    projections): it must reach 49,152 bytes (docs/ane-rules.md#min-surface)."""
    cfg = preset("tiny")
    assert cfg.dim * cfg.seq_len * 2 >= 49152
    assert cfg.seq_len % 16 == 0 and cfg.seq_len >= 64 and cfg.head_dim % 32 == 0


def _research(**over) -> ModelConfig:
    return dataclasses.replace(preset("tiny"), **over).validate()


# (rule, config that breaks it) -- the breach is derived by hand from the kernel layout:
# every kernel output is [C, seq_len]; ffnFused's input is [dim, 2*seq_len + 3*hidden_dim];
# sdpaFwd's RoPE pair axis is seq_len*head_dim/2; the scores matmul contracts over head_dim.
BREAKERS = {
    "min-surface": dict(dim=96, seq_len=64),          # dx output 96*64*2 = 12,288 B
    "min-width": dict(seq_len=48),                    # output width 48 < 64
    "zero-width": dict(seq_len=16),                   # output width 16 < 32
    "width-multiple": dict(seq_len=200),              # 200 % 16 = 8
    "max-width": dict(hidden_dim=5504),               # 2*192 + 3*5504 = 16,896 > 16,384
    "max-dim": dict(seq_len=1056, head_dim=32),       # 1056*32/2 = 16,896 > 16,384 (M1/M2, sim)
}


def _expected_hit(rule, cfg, prof):
    S, D, H = cfg.seq_len, cfg.dim, cfg.hidden_dim
    return {
        "min-surface": D * S * 2 < prof.min_surface_bytes,
        "min-width": prof.zero_width <= S < prof.min_width,
        "zero-width": S < prof.zero_width,
        "width-multiple": S % prof.width_multiple != 0,
        "max-width": 2 * S + 3 * H > prof.max_width,
        "max-dim": S * cfg.head_dim // 2 > prof.max_dim,
    }[rule]


@pytest.mark.parametrize("rule", sorted(BREAKERS))
def test_each_shape_rule_is_refused_on_each_profile_that_has_it(rule):
    cfg = _research(**BREAKERS[rule])
    for prof in PROFILES:
        hit = _expected_hit(rule, cfg, prof)
        rules = {b.rule for b in ane_guard.config_breaches(cfg, prof)}
        assert (rule in rules) == hit, (rule, prof.name)
        if hit:
            with pytest.raises(AneRuleError) as ei:
                ane_guard.require_config(cfg, prof)
            msg = str(ei.value)
            assert f"docs/ane-rules.md#{rule}" in msg and ane_rules.RULES[rule].effect in msg
            assert "kernel " in msg and prof.name in msg


def test_message_names_field_kernel_limit_effect_and_fix():
    cfg = _research(seq_len=200)
    with pytest.raises(AneRuleError) as ei:
        ane_guard.require_config(cfg, profile("m4", 26))
    line = next(ln for ln in str(ei.value).splitlines() if "width-multiple" in ln and "output" in ln)
    assert line.strip().startswith("seq_len 200: kernel ")
    assert "output width 200 is not a multiple of 16 (silent corruption on M4" in line
    fixes = [int(v) for v in line.rsplit("; use ", 1)[1].split(" or ")]
    # the suggested values clear every enforced rule (checked independently of the search)
    for v in fixes:
        assert v % 16 == 0 and v >= 64 and cfg.dim * v * 2 >= 49152
        assert enforced(_research(seq_len=v), profile("m4", 26)) == []


def test_matmul_inner_dim_warns_by_default_and_refuses_when_strict():
    """stories15m's head_dim 48 is the case the low-confidence report would flag."""
    cfg = preset("stories15m")
    assert cfg.head_dim % 32
    warnings = ane_guard.require_config(cfg, profile("m4", 26))
    assert any("matmul-inner" in w and "contraction dim 48" in w for w in warnings)
    with pytest.raises(AneRuleError, match="matmul-inner"):
        ane_guard.require_config(cfg, profile("m4", 26).strict())


def test_m1_m2_on_macos26_refuse_matmul_kernels_with_the_way_out():
    for chip in ("m1", "m2"):
        with pytest.raises(AneRuleError) as ei:
            ane_guard.require_config(preset("tiny"), profile(chip, 26))
        assert "op matmul is rejected" in str(ei.value) and "--backend sim" in str(ei.value)
        assert ane_guard.require_config(preset("tiny"), profile(chip, 15)) == []


def test_simulator_guards_by_default_and_research_flag_opts_out():
    from rustane.engine import Engine, make_backend

    bad = _research(seq_len=40)
    with pytest.raises(AneRuleError, match="seq_len 40"):
        Engine(bad, backend="sim", precision="fp16")
    eng = Engine(bad, backend="sim", precision="fp16", ane_rules=False)
    assert eng.model.cfg.seq_len == 40
    eng.model.close()
    with pytest.raises(ValueError, match="simulator only"):
        make_backend("ane", "fp16", ane_rules=False)


def test_profile_from_probe_picks_chip_and_os():
    mk = lambda chip, os: {"ane": True, "machine": {"chip": chip, "os": os}}  # noqa: E731
    assert ane_rules.profile_from_probe(mk("Apple M3 Pro", "15.4")) == profile("m3", 15)
    assert ane_rules.profile_from_probe(mk("Apple M1", "26.1")) == profile("m1", 26)
    assert ane_rules.profile_from_probe(mk("Apple M4 Max", "27.0")).os == 26
    assert ane_rules.profile_from_probe(mk("Intel", "15.0")) is CONSERVATIVE
    assert ane_rules.profile_from_probe(None) is CONSERVATIVE


def _rules(**over):
    """A probe record where everything the probe tried worked, then ``over`` per rule."""
    ok = lambda *vals: [{"value": v, "result": "ok"} for v in vals]  # noqa: E731
    rec = {"dialect": {"accepted": ["ios18", "ios16"]},
           "min-surface": {"width": 64, "tested": ok(2048, 49152), "accepted_min": 2048},
           "min-width": {"bytes": 98304, "tested": ok(16, 64), "accepted_min": 16},
           "zero-width": {"zeros_at": []},
           "width-multiple": {"tested": ok(65, 80), "accepted_multiple": 1},
           "max-width": {"tested": ok(16384, 32768), "accepted_max": 32768, "refused_from": None},
           "matmul-inner": {"tested": ok(64, 80), "accepted_multiple": 1},
           "matmul-op": {"result": "ok"}, "cast-op": {"result": "ok"},
           "uniform-io-sizes": {"equal": "ok", "different": "ok"}}
    rec.update(over)
    return rec


def test_a_probe_that_saw_everything_work_never_loosens_the_profile():
    for p in [CONSERVATIVE, profile("m1", 26), profile("m4", 15)]:
        assert ane_rules.tighten(p, _rules()) == p


def test_a_probe_that_saw_stricter_limits_tightens_each_rule():
    bad = lambda v, r: {"value": v, "result": r}  # noqa: E731
    rules = _rules(**{
        "dialect": {"accepted": ["ios16"]},
        "min-surface": {"width": 64, "tested": [bad(49152, "eval-error"), bad(65536, "ok")], "accepted_min": 65536},
        "min-width": {"bytes": 98304, "tested": [bad(64, "eval-error"), bad(128, "ok")], "accepted_min": 128},
        "zero-width": {"zeros_at": [16, 32, 48]},
        "width-multiple": {"tested": [bad(80, "wrong"), bad(128, "ok")], "accepted_multiple": 32},
        "max-width": {"tested": [bad(8192, "ok"), bad(16384, "compile-error")], "accepted_max": 8192,
                      "refused_from": 16384},
        "matmul-inner": {"tested": [bad(64, "ok"), bad(80, "zeros")], "accepted_multiple": 32},
        "cast-op": {"result": "compile-error"},
    })
    t = ane_rules.tighten(profile("m4", 26), rules)
    assert t.dialects == ("ios16",) and t.min_surface_bytes == 65536 and t.min_width == 128
    assert t.zero_width == 49 and t.width_multiple == 32 and t.max_width == 8192
    assert "cast" in t.rejected_ops and "matmul" not in t.rejected_ops and t.enforces("matmul-inner")
    # and a failed matmul rejects the op (the M1/M2 + macOS 26 report), whatever the chip
    t = ane_rules.tighten(CONSERVATIVE, _rules(**{"matmul-op": {"result": "compile-error"}}))
    assert "matmul" in t.rejected_ops
    with pytest.raises(AneRuleError, match="matmul-op"):
        ane_guard.require_config(preset("tiny"), t)


def test_rule_table_matches_the_document():
    """docs/ane-rules.md lists exactly the rules of the module, each with a section."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "ane-rules.md").read_text()
    for rid in ane_rules.RULES:
        assert f"[{rid}](#{rid})" in doc, rid
        assert f"### {rid}" in doc or f", {rid}" in doc or f"### {rid}," in doc, rid
    assert math.prod([1]) == 1


def test_train_cli_refuses_with_one_error_line_and_research_flag_allows(tmp_path):
    import subprocess
    import sys

    base = [sys.executable, "-P", "-m", "rustane.train", "--preset", "tiny", "--seq-len", "40", "--backend", "sim",
            "--steps", "1", "--eval-every", "0", "--sample", "0", "--no-progress", "--out", str(tmp_path / "r")]
    p = subprocess.run(base, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode != 0 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr
    assert "seq_len 40: kernel" in p.stderr and "docs/ane-rules.md#" in p.stderr
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").glob("step-*"))
    p = subprocess.run(base + ["--research"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    p = subprocess.run(base[:-2] + ["--backend", "ane", "--research", "--out", str(tmp_path / "a")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode != 0 and "error:" in p.stderr


@pytest.mark.parametrize("name", preset_names())
def test_io_order_cannot_reach_training_every_kernel_has_one_input_and_one_output(name):
    """docs/ane-rules.md#io-order is about requests with several inputs or outputs, bound in the
    wrong order. Every kernel a preset trains with is rendered and parsed here: one input and one
    output each, so no order exists to get wrong (the runtime refuses more, rustane/runtime/kernel_set.py)."""
    from rustane import models, selfcheck
    from rustane.mil.parser import parse

    cfg = preset(name)
    fam = models.family_for(cfg)
    programs = selfcheck.render_plan(fam.plan_for(fam.kernel_shape(cfg, "fp16")))
    assert len(programs) >= 8
    for kernel, (text, _) in programs.items():
        fn = parse(text).functions["main"]
        assert (len(fn.params), len(fn.returns)) == (1, 1), (name, kernel)


def test_the_probes_io_order_check_passes_on_name_order_and_fails_on_declaration_order():
    """The probe's io-order program (docs/ane-rules.md#io-order) on the simulator, which binds by name
    like the runtime: `ok`. A Mac binding in declaration order would hand the program a's data as
    b and b's as a; fed that way the check must say `wrong`, or it could never catch such a Mac."""
    import numpy as np

    from rustane import probe
    from rustane.backends import get

    sim = get("sim", precision="fp16")
    r = np.random.default_rng(0)
    a = (r.standard_normal((probe.SAFE_C, probe.SAFE_W)) * 0.5).astype(np.float16)
    b = (r.standard_normal((probe.SAFE_C, probe.SAFE_W)) * 0.5).astype(np.float16)
    want = b.astype(np.float32) - a.astype(np.float32)
    text = probe.io_order_program("ios18")
    assert probe._check(sim, text, {"a": a, "b": b}, want, "io")["result"] == "ok"
    assert probe._check(sim, text, {"a": b, "b": a}, want, "io")["result"] == "wrong"
    assert probe.summarize_rules({"io_order": {"result": "wrong"}}, ["ios18"])["io-order"] == {"result": "wrong"}


def test_the_documents_rule_to_test_table_names_real_tests_for_every_rule():
    """docs/ane-rules.md says which test breaks each rule; a renamed or deleted test must show."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent
    doc = (root.parent / "docs" / "ane-rules.md").read_text()
    section = doc.split("## Which test breaks each rule", 1)[1].split("\n## ", 1)[0]
    rows = {ln.split("|")[1].strip(): ln for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert set(rows) - {"rule"} == set(ane_rules.RULES)
    defined = set(re.findall(r"^def (test_\w+)", "\n".join(p.read_text() for p in root.glob("test_*.py")), re.M))
    for rule, row in rows.items():
        named = re.findall(r"`(test_\w+)`", row)
        assert rule == "rule" or named, rule
        missing = [n for n in named if n not in defined]
        assert not missing, (rule, missing)
