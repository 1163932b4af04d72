"""rustane benchmarks: ``python -m rustane.bench`` (docs/benchmarks.md).

Kept import-light (no numpy here): ``python -m rustane.bench native`` limits numpy's BLAS to one
thread through the environment, which only works before numpy is first imported.
"""
