"""REFACTORING GOLDEN: the rendered MIL text of every kernel is byte-identical to main's at 914652a.

``tests/goldens/kernel_text.json`` holds sha256 digests written from main before the model layer
was reshaped (issue 10; ``tests/goldens/refactor_golden.py write-kernels`` regenerates it). A
kernel change that is meant to change the compiled text must rewrite the golden in the same
commit and say why; a refactoring (moved modules, template comments, merged templates) must not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "goldens"))
import refactor_golden  # noqa: E402

GOLDEN = json.loads(refactor_golden.KERNELS_FILE.read_text())


@pytest.fixture(scope="module")
def rendered():
    return refactor_golden.rendered_kernels()


def test_every_preset_kernel_and_dialect_is_covered(rendered):
    assert set(rendered) == set(GOLDEN)


PRESETS = sorted({k.split("/")[0] for k in GOLDEN})


@pytest.mark.parametrize("preset", PRESETS)
def test_rendered_text_is_byte_identical_to_main(rendered, preset):
    differ = [k for k in sorted(GOLDEN) if k.startswith(preset + "/") and rendered.get(k) != GOLDEN[k]]
    assert not differ, f"rendered text (or blobs) differ from main's golden: {differ}"
