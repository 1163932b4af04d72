"""Thin wrapper kept for old command lines: ``python bench/qk_norm.py`` is
``python -m rustane.bench qk-norm`` (rustane/bench/qk_norm.py)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


from rustane.bench.cli import main  # noqa: E402
from rustane.cli import run  # noqa: E402

if __name__ == "__main__":
    run(lambda argv: main(["qk-norm", *argv]))
