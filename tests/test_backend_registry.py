"""Backends are found by name: a module declaring ``BACKEND`` and ``unavailable_reason()`` is all
it takes, and the registry alone decides which backend runs which precision."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from rustane import backends
from rustane.backends.null import NullBackend
from rustane.backends.sim import SimBackend

PLUGIN = '''
from rustane.backends.base import BackendInfo
from rustane.backends.sim import SimBackend

CREATED = []


class EchoBackend(SimBackend):
    name = "{name}"


def unavailable_reason():
    return {reason!r}


def _create(precision, ane_rules, **options):
    CREATED.append((precision, ane_rules, options))
    return EchoBackend(precision=precision, ane_rules=ane_rules, **options)


BACKEND = BackendInfo(name="{name}", summary="a test backend", create=_create, precisions=("fp32", "fp16"),
                      auto_rank={rank}, research=True)
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A folder on ``rustane.backends.__path__``: modules written there are backends-to-be."""
    monkeypatch.setattr(backends, "__path__", list(backends.__path__) + [str(tmp_path)])
    monkeypatch.setattr(backends, "_modules", None)
    yield tmp_path
    import sys

    for name in [n for n in sys.modules if n.startswith("rustane.backends.echo")]:
        del sys.modules[name]
    backends._modules = None


def _write(plugin_dir, name="echo", reason=None, rank=None):
    (plugin_dir / f"{name}.py").write_text(textwrap.dedent(PLUGIN.format(name=name, reason=reason, rank=rank)))


def test_the_shipped_backends_and_their_rules():
    assert set(backends.names()) == {"ane", "null", "sim"}
    assert backends.cli_choices()[0] == "auto" and set(backends.cli_choices()) == {"auto", "ane", "sim"}
    assert backends.precisions() == ("fp16", "fp32")
    assert backends.precisions("ane") == ("fp16",) and backends.precisions("sim") == ("fp16", "fp32")
    assert backends.available()["sim"] == "" and backends.available()["null"] == ""
    sim = backends.get("sim", precision="fp32", io_dtype="fp32")
    assert isinstance(sim, SimBackend) and sim.precision == "fp32" and sim.io_dtype == "fp32"
    assert backends.get("sim").precision == "fp16"  # the first precision is the default
    assert isinstance(backends.get("null", precision="fp32"), NullBackend)


def test_refusals_name_the_problem_and_the_fix():
    with pytest.raises(ValueError, match=r"unknown backend 'tpu': choose one of auto, ane, null, sim"):
        backends.get("tpu")
    with pytest.raises(ValueError, match="--precision must be one of fp16, fp32, got 'bf16'"):
        backends.get("sim", precision="bf16")
    with pytest.raises(ValueError, match="--precision fp32 is not offered by the ane backend.*--backend sim"):
        backends.get("ane", precision="fp32")
    with pytest.raises(ValueError, match="simulator only: use --backend sim"):
        backends.get("ane", ane_rules=False)
    with pytest.raises(ValueError, match="simulator only"):
        backends.get("auto", ane_rules=False)
    be = backends.get("sim", precision="fp16", ane_rules=False)
    assert be.ane_profile is None


def test_auto_is_the_best_available(monkeypatch):
    from rustane.backends import ane

    if backends.available()["ane"]:
        assert backends.resolve("auto") == "sim"
        with pytest.raises(RuntimeError, match="the ane backend is not available here: .*Use --backend sim"):
            backends.get("ane")
    monkeypatch.setattr(ane, "unavailable_reason", lambda: None)
    assert backends.resolve("auto") == "ane"  # ranked above the simulator
    with pytest.raises(ValueError, match=r"not offered by the ane backend \(picked by --backend auto\)"):
        backends.get("auto", precision="fp32")


def test_a_new_backend_is_one_module(plugin_dir):
    _write(plugin_dir, rank=None)
    assert "echo" in backends.names() and "echo" in backends.cli_choices()
    be = backends.get("echo", precision="fp16", ane_rules=False, check=False)
    assert be.name == "echo" and be.precision == "fp16" and be.check is False
    import rustane.backends.echo as echo

    assert echo.CREATED[-1] == ("fp16", False, {"check": False})
    assert backends.get("echo").precision == "fp32"  # its own default
    assert backends.resolve("auto") != "echo"  # no auto_rank: never picked

    # the CLI offers it without any edit to the CLI
    from rustane.train import build_parser

    args = build_parser().parse_args(["--backend", "echo", "--precision", "fp32"])
    assert args.backend == "echo"


def test_a_new_backend_trains_through_the_engine(plugin_dir):
    """The engine needs no edit either: one step on the new backend matches the simulator's."""
    from rustane.engine import Engine

    _write(plugin_dir, rank=100)
    assert backends.resolve("auto") == "echo"
    rng = np.random.default_rng(0)
    losses = {}
    for name in ("echo", "sim"):
        eng = Engine("tiny", backend=name, precision="fp32", seed=3)
        assert eng.backend.name == name
        tokens = rng.integers(0, eng.config.vocab_size, (1, eng.config.seq_len + 1))
        rng = np.random.default_rng(0)
        losses[name] = [eng.train_step(tokens).loss for _ in range(2)]
        eng.model.close()
    assert losses["echo"] == losses["sim"] and losses["sim"][1] < losses["sim"][0]


def test_an_unavailable_new_backend_is_skipped_by_auto_and_refused_by_name(plugin_dir):
    _write(plugin_dir, reason="needs the echo chip", rank=100)
    assert backends.available()["echo"] == "needs the echo chip"
    assert backends.resolve("auto") != "echo"
    with pytest.raises(RuntimeError, match="the echo backend is not available here: needs the echo chip"):
        backends.get("echo")
