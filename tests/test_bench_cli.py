"""``python -m rustane.bench``: the subcommand registry, the metric records, the measuring
machinery (interleaving, other processes' CPU time) and the smoke suite's JSON.

Nothing here times anything against a goal: speed lives in the bench JSON (docs/benchmarks.md).
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

from rustane.bench import cli
from rustane.bench import metrics as M


def _bench(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "rustane.bench", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)


def test_every_subcommand_is_one_module_with_the_interface():
    for name, mod_name in cli.COMMANDS.items():
        mod = importlib.import_module(f"rustane.bench.{mod_name}")
        assert isinstance(mod.HELP, str) and mod.HELP, name
        assert callable(mod.add_arguments) and callable(mod.run), name
    p = _bench("--help")
    assert p.returncode == 0
    for name in cli.COMMANDS:
        assert name in p.stdout
    assert "_suite-child" not in p.stdout


def test_metric_median_and_spread_against_numpy():
    vals = [3.0, 1.0, 2.0, 10.0, 2.5]
    m = M.metric("x", vals, "ms", "lower", "absolute")
    assert m["median"] == float(np.median(vals))
    assert m["spread"] == pytest.approx((10.0 - 1.0) / 2 / np.median(vals))
    assert m["repeats"] == vals and m["basis"] == "uncontended"
    # contended repeats leave the decision when >= 3 clean ones remain
    m = M.metric("x", vals, "ms", "lower", "absolute", contended=[False, False, False, True, False])
    clean = [3.0, 1.0, 2.0, 2.5]
    assert m["median"] == float(np.median(clean))
    assert m["spread"] == pytest.approx((3.0 - 1.0) / 2 / np.median(clean))
    assert m["repeats"] == vals  # all repeats stay on record
    # too few clean ones: all repeats, and the record says so
    m = M.metric("x", vals, "ms", "lower", "absolute", contended=[True, True, True, False, False])
    assert m["median"] == float(np.median(vals)) and m["basis"].startswith("all")
    with pytest.raises(ValueError):
        M.metric("x", vals, "ms", "up", "ratio")
    with pytest.raises(ValueError):
        M.metric("x", [], "ms", "lower", "ratio")


def test_interleaving_and_per_round_ratios():
    order = []
    rounds = M.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 4, clock="wall",
                           retries=0)
    assert order == ["a", "b"] * 4
    assert len(rounds) == 4 and all(set(r) >= {"a", "b", "_contended", "_repeats"} for r in rounds)
    fake = [{"a": 2.0, "b": 1.0, "_contended": False}, {"a": 3.0, "b": 1.0, "_contended": False},
            {"a": 4.0, "b": 2.0, "_contended": False}]
    r = M.ratio_metric("r", fake, "a", "b", "x", "higher", vs="b")
    assert r["repeats"] == [2.0, 3.0, 2.0] and r["median"] == 2.0 and r["kind"] == "ratio" and r["vs"] == "b"


def test_injected_burn_is_cpu_time_inside_the_measurement():
    # the slowdown hook of the gate's proof must show on the CPU clock the suite reads
    rounds = M.interleaved({"a": lambda: M._spin(0.05), "b": lambda: M._spin(0.05)}, 3, clock="cpu",
                           retries=0, burn={"a": 1.0})
    ratio = statistics.median(r["a"] / r["b"] for r in rounds)
    assert 1.6 < ratio < 2.5  # 0.1 s of CPU against 0.05 s: twice, loosely


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not os.path.exists("/proc/stat"),
                    reason="Linux: /proc/stat and CPU affinity")
def test_other_processes_cpu_time_is_recorded():
    cpu = sorted(os.sched_getaffinity(0))[0]
    burner = [sys.executable, "-c",
              f"import os, time; os.sched_setaffinity(0, {{{cpu}}}); e = time.process_time() + 0.6\n"
              "while time.process_time() < e: pass"]
    script = (f"import os, subprocess, json; os.sched_setaffinity(0, {{{cpu}}})\n"
              "from rustane.bench.metrics import Repeat\n"
              "with Repeat() as r:\n"
              f"    subprocess.Popen({burner!r}).wait()\n"
              "print(json.dumps(r.record(0.0)))")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    # the burner is our child: its 0.6 s count as our own CPU time (RUSAGE_CHILDREN), not as others'
    assert rec["cpu_s"] < 0.3
    # and a separate process burning our CPU must show as others' time: run the burner unrelated
    script2 = (f"import os, subprocess, json, time; os.sched_setaffinity(0, {{{cpu}}})\n"
               "from rustane.bench.metrics import Repeat\n"
               f"b = subprocess.Popen({burner!r}, start_new_session=True)\n"
               "time.sleep(0.05)\n"
               "with Repeat() as r:\n"
               "    time.sleep(0.4)\n"
               "b.wait()\n"
               "print(json.dumps(r.record(0.0)))")
    p = subprocess.run([sys.executable, "-c", script2], capture_output=True, text=True, timeout=120)
    rec = json.loads(p.stdout)
    # RUSAGE_CHILDREN only counts reaped children, so a child still running during the repeat is
    # another process as far as the CPU is concerned: it held our CPU for most of the 0.4 s
    assert rec["others_cpu_s"] >= 0.2 and rec["others_share"] >= 0.5 and rec["contended"]


def test_machine_class_spelling():
    c = M.machine_class("sim")
    system, arch, backend = c.split("-", 2)
    assert backend == "sim" and system in ("linux", "macos", "windows") and arch in ("x86_64", "arm64")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    p = _bench("--suite", "smoke", "--out", out)
    assert p.returncode == 0, p.stderr
    return json.loads(out.read_text())


def test_smoke_suite_json_schema(smoke):
    assert smoke["schema"] == M.SCHEMA and smoke["suite"] == "smoke"
    assert smoke["machine_class"] == M.machine_class("sim")
    ms = smoke["metrics"]
    assert any(m["kind"] == "ratio" for m in ms.values()) and any(m["kind"] == "absolute" for m in ms.values())
    for name, m in ms.items():
        assert m["name"] == name
        assert {"unit", "direction", "kind", "repeats", "median", "spread", "contended"} <= set(m)
        assert m["direction"] in ("higher", "lower") and m["kind"] in ("ratio", "absolute")
        used = [v for v, c in zip(m["repeats"], m["contended"]) if not c]
        used = used if len(used) >= M.MIN_CLEAN else m["repeats"]
        assert m["median"] == pytest.approx(statistics.median(used))
        if m["kind"] == "ratio":
            assert m.get("vs")
    # the ratio really is per round: torch CPU seconds over sim CPU seconds of the same round
    rounds = smoke["details"]["rounds"]
    r = ms["ci.train.tiny.s192.sim_fp32_vs_torch"]
    assert r["repeats"] == pytest.approx([x["torch_eager_fp32"] / x["sim_fp32"] for x in rounds])
    # each round records every side's CPU time and what other processes took meanwhile
    for rec in smoke["details"]["round_records"]:
        assert set(rec) == {"sim_fp32", "sim_fp16", "torch_eager_fp32", "sgemm"}
        assert all(v["cpu_s"] > 0 for v in rec.values())


def test_compare_of_a_run_with_itself_passes(smoke, tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps(smoke))
    p = _bench("compare", f, f)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("| ok |") == len(smoke["metrics"])


def test_train_subcommand_keeps_its_keys_and_adds_metrics():
    p = _bench("train", "--preset", "tiny", "--steps", "2", "--warmup", "0", "--no-torch", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    for k in ("sim_fp32", "sim_fp16"):
        assert res[k]["tokens_per_s"] > 0 and set(res[k]["ms"])
    assert res["null"]["us_per_eval_orchestration"] > 0
    assert "train.tiny.s192.sim_fp32.ms_per_step" in res["metrics"]


@pytest.mark.parametrize("args, needle", [
    (["train", "--steps", "0"], "--steps must be >= 1"),
    (["generate", "--model", "/nonexistent/model.gguf", "--no-torch"], "error: "),
    (["generate", "--max-tokens", "1"], "--max-tokens must be >= 2"),
    (["sim", "--repeats", "0"], "--repeats and --seq must be >= 1"),
    (["native", "--only", "warp"], "unknown part"),
    (["plot", "/nonexistent.json"], "no such file"),
])
def test_bad_input_is_one_error_line(args, needle):
    p = _bench(*args, timeout=300)
    assert p.returncode == 2, (p.stdout, p.stderr)
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], p.stderr


def test_old_script_paths_still_run():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join(root, "bench", "qk_norm.py"), "--repeats", "2", "--seq", "8"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "qk_norm_backward_per_layer" in json.loads(p.stdout)


def test_plot_without_matplotlib_says_how_to_get_it(smoke, tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps(smoke))
    png = tmp_path / "b.png"
    p = _bench("plot", f, "-o", png)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert p.returncode == 2 and "pip install 'rustane[plot]'" in p.stderr
    else:
        assert p.returncode == 0, p.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_ratios_are_the_recorded_seconds_and_quiet_rounds_only(tmp_path):
    # the sweep's ratios recomputed here from its own per-round records: wall ratios only from
    # rounds where others used < QUIET_SHARE of the CPUs, CPU ratios against the 1-thread PyTorch step
    from rustane.bench.sweep import QUIET_SHARE

    out = tmp_path / "sweep.json"
    p = _bench("sweep", "--preset", "tiny", "--rounds", "2", "--warmup", "0", "--out", out)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    d = doc["details"]
    assert d["preset"] == "tiny" and d["ane_rules"] is True and len(d["per_round"]) == 2
    for prec in ("fp32", "fp16"):
        side = f"sim_{prec}"
        cpu = [r["torch_1t"]["cpu_s"] / r[side]["cpu_s"] for r in d["per_round"]]
        got = d["summary"][f"{side}_vs_torch_1t_cpu"]["values"]
        assert got == pytest.approx(cpu, abs=1e-3)
        quiet = [r["torch"]["wall_s"] / r[side]["wall_s"] for r in d["per_round"]
                 if r["others_share"] is not None and r["others_share"] < QUIET_SHARE]
        s = d["summary"][f"{side}_vs_torch_wall_quiet"]
        assert s["n"] == len(quiet) and s.get("values", []) == pytest.approx(quiet, abs=1e-3)
        name = f"sweep.tiny.s{d['seq_len']}.{side}_vs_torch.wall"
        assert (name in doc["metrics"]) == bool(quiet)
        m = doc["metrics"][f"sweep.tiny.s{d['seq_len']}.{side}_vs_torch_1t.cpu"]
        assert m["kind"] == "ratio" and m["direction"] == "higher" and len(m["repeats"]) == 2


def test_sweep_refuses_a_size_past_the_ane_rules_without_research():
    p = _bench("sweep", "--preset", "stories15m", "--seq-len", "1024", "--rounds", "1")
    assert p.returncode != 0
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), p.stderr
