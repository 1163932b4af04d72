"""``python -m rustane.bench compare``: the CI gate's decision rule.

Every expectation here is worked out by hand from the rule in docs/benchmarks.md (a gated ratio
fails only when worse by more than the tolerance *and* by more than the larger measured spread),
not read back from the code.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rustane.bench import compare as C


def _m(median, direction="higher", kind="ratio", spread=0.02, unit="x"):
    return {"median": median, "direction": direction, "kind": kind, "spread": spread, "unit": unit,
            "repeats": [median]}


def _doc(metrics, machine_class="linux-x86_64-sim", **extra):
    return {"schema": "rustane-bench/1", "machine_class": machine_class, "metrics": metrics, **extra}


def _row(rows, name):
    (r,) = [r for r in rows if r["name"] == name]
    return r


def test_regression_beyond_tolerance_and_spread_is_flagged():
    # higher is better: 1.00 -> 0.80 is 20 % worse; tolerance 15 %, spreads 2 % and 3 %
    rows = C.compare(_doc({"a": _m(1.0)}), _doc({"a": _m(0.8, spread=0.03)}), 0.15)
    r = _row(rows, "a")
    assert r["regression"] and r["verdict"] == "REGRESSION"
    assert r["change"] == pytest.approx(-0.20)
    assert r["noise"] == pytest.approx(0.03)


def test_worse_than_tolerance_but_within_spread_is_noise():
    # 20 % worse, but the current run's repeats were ±25 % apart: not evidence of a regression
    rows = C.compare(_doc({"a": _m(1.0)}), _doc({"a": _m(0.8, spread=0.25)}), 0.15)
    r = _row(rows, "a")
    assert not r["regression"]
    assert r["verdict"] == "worse, within measured spread"
    # the baseline's spread counts too
    rows = C.compare(_doc({"a": _m(1.0, spread=0.30)}), _doc({"a": _m(0.8)}), 0.15)
    assert not _row(rows, "a")["regression"]


def test_worse_within_tolerance_is_ok():
    rows = C.compare(_doc({"a": _m(1.0, spread=0.0)}), _doc({"a": _m(0.9, spread=0.0)}), 0.15)
    assert _row(rows, "a")["verdict"] == "ok" and not _row(rows, "a")["regression"]


def test_direction_is_honoured():
    # lower is better: 10 -> 13 is 30 % worse; 10 -> 7 is 30 % better
    worse = C.compare(_doc({"t": _m(10.0, "lower")}), _doc({"t": _m(13.0, "lower")}), 0.15)
    better = C.compare(_doc({"t": _m(10.0, "lower")}), _doc({"t": _m(7.0, "lower")}), 0.15)
    assert _row(worse, "t")["regression"] and _row(worse, "t")["worse_by"] == pytest.approx(0.30)
    assert not _row(better, "t")["regression"] and _row(better, "t")["verdict"] == "better"
    # higher is better: the same numbers flip
    up = C.compare(_doc({"t": _m(10.0)}), _doc({"t": _m(13.0)}), 0.15)
    assert _row(up, "t")["verdict"] == "better"


def test_absolute_metrics_are_reported_not_gated():
    rows = C.compare(_doc({"ms": _m(100.0, "lower", "absolute")}), _doc({"ms": _m(200.0, "lower", "absolute")}), 0.15)
    r = _row(rows, "ms")
    assert not r["regression"] and not r["gated"]
    assert r["verdict"] == "worse (absolute: not gated)"


def test_absolute_gated_only_on_its_own_machine_class_when_the_baseline_says_so():
    base = _doc({"ms": _m(100.0, "lower", "absolute")}, gate_absolute=True)
    same = C.compare(base, _doc({"ms": _m(200.0, "lower", "absolute")}), 0.15)
    other = C.compare(base, _doc({"ms": _m(200.0, "lower", "absolute")}, "macos-arm64-ane"), 0.15)
    assert _row(same, "ms")["regression"]
    assert not _row(other, "ms")["regression"]


def test_missing_and_new_metrics():
    base = _doc({"kept": _m(1.0), "gone": _m(1.0), "gone_abs": _m(5.0, kind="absolute")})
    cur = _doc({"kept": _m(1.0), "fresh": _m(2.0)})
    rows = C.compare(base, cur, 0.15)
    assert [r["name"] for r in rows] == ["kept", "gone", "gone_abs", "fresh"]
    assert _row(rows, "gone")["regression"] and _row(rows, "gone")["verdict"] == "MISSING"
    assert not _row(rows, "gone_abs")["regression"]
    assert _row(rows, "fresh")["verdict"] == "new (no baseline)" and not _row(rows, "fresh")["regression"]
    assert _row(rows, "fresh")["baseline"] is None and _row(rows, "fresh")["current"] == 2.0


def test_markdown_table_has_every_metric_and_the_result():
    rows = C.compare(_doc({"a": _m(1.0), "b": _m(2.0, "lower")}), _doc({"a": _m(0.5), "b": _m(2.0, "lower")}), 0.15)
    md = C.markdown(rows, 0.15)
    lines = md.splitlines()
    assert lines[0].startswith("| metric |") and lines[1].startswith("|---")
    assert any(line.startswith("| a |") and "-50.0%" in line and "REGRESSION" in line for line in lines)
    assert any(line.startswith("| b |") and "+0.0%" in line and "| ok |" in line for line in lines)
    assert "**FAIL** (a)" in md


@given(st.floats(min_value=0, max_value=99.99, allow_nan=False))
def test_tolerance_spellings(p):
    assert C.parse_tolerance(f"{p}%") == pytest.approx(p / 100)
    assert C.parse_tolerance(repr(p / 100)) == pytest.approx(p / 100)
    if p >= 1:
        assert C.parse_tolerance(repr(p)) == pytest.approx(p / 100)  # "15" means 15 %


@given(st.text(alphabet=st.characters(blacklist_categories=("Nd",)), min_size=1, max_size=12))
def test_tolerance_without_digits_is_an_error(text):
    # no digits: not a number, or nan/inf, which are no tolerance either
    with pytest.raises(C.CompareError):
        C.parse_tolerance(text)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rustane.bench", "compare", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def test_cli_exit_codes_table_and_update(tmp_path):
    base, cur = tmp_path / "base.json", tmp_path / "cur.json"
    base.write_text(json.dumps(_doc({"r": _m(1.0), "abs": _m(10.0, "lower", "absolute")})))
    cur.write_text(json.dumps(_doc({"r": _m(0.7), "abs": _m(30.0, "lower", "absolute")})))
    p = _cli(base, cur, "--tolerance", "15%")
    assert p.returncode == 1, p.stderr
    assert "| r |" in p.stdout and "REGRESSION" in p.stdout and "**FAIL** (r)" in p.stdout
    # a looser tolerance passes the same pair: 30 % worse < 35 %
    assert _cli(base, cur, "--tolerance", "35%").returncode == 0
    # --update rewrites the baseline; the same pair then passes
    md = tmp_path / "table.md"
    p = _cli(base, cur, "--update", "--markdown-out", md)
    assert p.returncode == 0 and md.read_text().startswith("| metric |")
    assert json.loads(base.read_text())["metrics"]["r"]["median"] == 0.7
    assert _cli(base, cur).returncode == 0
    # --update on a baseline that does not exist yet creates it
    fresh = tmp_path / "sub" / "new.json"
    assert _cli(fresh, cur, "--update").returncode == 0 and fresh.exists()


@pytest.mark.parametrize("content, needle", [
    (None, "no such file"),
    ("{not json", "not a readable JSON"),
    ('{"metrics": {"x": {"median": 1}}}', "has no 'direction'"),
    ('[1, 2]', "not a bench result"),
    ('{"metrics": {"x": {"median": 1, "direction": "up", "kind": "ratio"}}}', "expected higher|lower"),
])
def test_cli_bad_input_is_one_error_line(tmp_path, content, needle):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_doc({"r": _m(1.0)})))
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    p = _cli(bad, good)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], p.stderr
    assert _cli(good, good, "--tolerance", "lots").returncode == 2
