"""The self-check's comparison (rustane/selfcheck.py) on its own: what it accepts and what it catches.

The end-to-end tests (a fake ANE corrupting one kernel) live in tests/test_ane_contract.py; here
the bound is checked against numbers written in the test: results that differ from the reference by
fp16 rounding pass, the failures docs/ane-rules.md describes do not, and the worst element named is
the one the test broke.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustane import selfcheck


def _ref(seed=0, shape=(64, 192), scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale).astype(np.float16).astype(np.float32)


def _ulps(x: np.ndarray, k: int) -> np.ndarray:
    """``x`` moved by ``k`` fp16 ulps (towards +inf for k > 0), element by element."""
    h = x.astype(np.float16)
    for _ in range(abs(k)):
        h = np.nextafter(h, np.float16(np.inf if k > 0 else -np.inf))
    return h.astype(np.float32)


def test_bound_is_tol_times_element_plus_row_scale():
    want = np.array([[1.0, -4.0, 0.0], [0.5, 0.25, 0.0]], np.float32)
    # written out by hand: row 0 scale 4, row 1 scale 0.5
    expected = 2.0 ** -6 * np.array([[1 + 4, 4 + 4, 0 + 4], [0.5 + 0.5, 0.25 + 0.5, 0 + 0.5]])
    np.testing.assert_allclose(selfcheck.bound(want), expected)
    assert selfcheck.TOL == 2.0 ** -6


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(-4, 4), scale=st.sampled_from([1e-3, 0.1, 1.0, 300.0]))
def test_a_few_fp16_ulps_everywhere_pass(seed, k, scale):
    """An ANE that rounds differently (up to 4 ulps on every element) passes."""
    want = _ref(seed, (16, 64), scale)
    r = selfcheck.compare("k", _ulps(want, k), want)
    assert r.ok, r.describe()


def test_silent_zeros_fail():
    want = _ref(1)
    r = selfcheck.compare("zeroed", np.zeros_like(want), want)
    assert not r.ok
    idx, got, exp = r.worst
    assert got == 0.0 and exp == want[idx]
    # the worst element is the largest |want| relative to its bound
    ratio = np.abs(want) / selfcheck.bound(want)
    assert idx == np.unravel_index(np.argmax(ratio), want.shape)


def test_shifted_tail_columns_fail():
    """width-multiple: the tail past the last group of 16 shifted by one column."""
    want = _ref(2, (32, 200))
    got = want.copy()
    got[:, 193:] = want[:, 192:199]
    r = selfcheck.compare("shifted", got, want)
    assert not r.ok and r.worst[0][1] >= 193


def test_one_wrong_element_is_found_and_named():
    want = _ref(3)
    got = want.copy()
    got[40, 17] = 100.0
    r = selfcheck.compare("one", got, want)
    assert not r.ok and r.worst == ((40, 17), 100.0, float(want[40, 17]))
    assert "out[40, 17]" in r.describe() and "100" in r.describe()


def test_the_bound_edge_on_a_row_of_ones():
    """Row of ones: the bound is 2^-6 * (1 + 1) = 0.03125 on every element."""
    want = np.ones((4, 64), np.float32)
    got = want.copy()
    got[2, 5] = 1.0 + 0.03
    assert selfcheck.compare("a", got, want).ok
    got[2, 5] = 1.0 + 0.032
    assert not selfcheck.compare("b", got, want).ok


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_ane_values_fail(bad):
    want = _ref(4, (8, 64))
    got = want.copy()
    got[3, 3] = bad
    r = selfcheck.compare("nf", got, want)
    assert not r.ok and r.worst[0] == (3, 3)


def test_cache_dir_follows_rustane_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RUSTANE_CACHE", str(tmp_path))
    assert selfcheck.cache_dir() == tmp_path
    monkeypatch.delenv("RUSTANE_CACHE")
    assert selfcheck.cache_dir().parts[-2:] == (".cache", "rustane")


def test_key_changes_with_chip_os_dialect_text_and_weights():
    base = ({"chip": "Apple M4", "os": "26.1"}, "ios18", {"a": ("text a", {"w": b"1"}), "b": ("text b", {})})
    k0 = selfcheck.selfcheck_key(*base)
    assert k0 == selfcheck.selfcheck_key(*base)
    variants = [
        ({"chip": "Apple M3", "os": "26.1"}, "ios18", base[2]),
        ({"chip": "Apple M4", "os": "26.2"}, "ios18", base[2]),
        (base[0], "ios16", base[2]),
        (base[0], "ios18", {"a": ("text A", {"w": b"1"}), "b": ("text b", {})}),
        (base[0], "ios18", {"a": ("text a", {"w": b"2"}), "b": ("text b", {})}),
    ]
    keys = {selfcheck.selfcheck_key(*v) for v in variants}
    assert len(keys) == len(variants) and k0 not in keys


def test_non_ane_backends_are_not_checked():
    from rustane.backends import get

    assert selfcheck.ensure({}, {}, get("sim", precision="fp16")) is None
