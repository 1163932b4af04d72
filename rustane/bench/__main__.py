import os
import sys

if len(sys.argv) > 1 and sys.argv[1] == "native":
    # before numpy loads: the overlap figures need the main thread's BLAS on one thread
    # (rustane/bench/native.py explains why)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from rustane.bench.cli import main  # noqa: E402
from rustane.cli import run  # noqa: E402

run(main)
