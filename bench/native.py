"""Thin wrapper kept for old command lines: ``python bench/native.py`` is
``python -m rustane.bench native`` (rustane/bench/native.py)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads

from rustane.bench.cli import main  # noqa: E402
from rustane.cli import run  # noqa: E402

if __name__ == "__main__":
    run(lambda argv: main(["native", *argv]))
