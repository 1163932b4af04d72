"""REFACTORING GOLDEN (issue 10): what the model-layer reshaping must leave bit-identical.

Generated from main at 914652a, before the model layer was split into ``rustane/runtime/`` and
``rustane/models/llama/``. It records

- ``kernel_text.json``: sha256 of the rendered MIL text of every kernel, for every preset, in both
  program dtypes (fp16, fp32) and both MIL dialects (ios18 as rendered, ios16 as the ANE backend
  rewrites it), plus the sha256 of each kernel's BLOBFILE consts. ``tests/test_refactor_golden.py``
  checks it on every run: rendering is pure text, so it is the same on every machine.
- ``checkpoints.json``: a digest of the tensors (and metadata) of the checkpoint a short seeded
  training run writes, per backend (sim fp32, sim fp16, the fake ANE when this build carries it).
  These bits depend on the machine's BLAS and libm, so they are not a test: ``check`` compares
  them on the machine that wrote them, which is what the refactoring proof needs.

    python tests/goldens/refactor_golden.py write-kernels     # rewrite kernel_text.json
    python tests/goldens/refactor_golden.py write-checkpoints # rewrite checkpoints.json
    python tests/goldens/refactor_golden.py check              # compare both, exit 1 on a difference

With ``RUSTANE_ANE_FAKE`` set (a ``-Dane_fake=true`` build on ``PYTHONPATH``) the fake ANE run is
included.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNELS_FILE = HERE / "kernel_text.json"
CHECKPOINTS_FILE = HERE / "checkpoints.json"

#: seeded runs: (name, model config, accumulation). The dims are spelled out (not a preset, which
#: may change): tiny-gqa and tiny-mha-alpha (MHA, residual scaling) are the tiny preset of 914652a,
#: below the ANE's minimum surface, so they run on the simulator only; ane-sized has the same
#: layout at dim 128 x seq 192 (the smallest that meets it), so the fake ANE runs it too. Accum 3
#: makes the workspace drain mid-step.
_TINY = dict(dim=96, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, seq_len=64,
             rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True)
RUNS = (
    ("tiny-gqa", _TINY, 3),
    ("tiny-mha-alpha", {**_TINY, "n_kv_heads": 4, "residual_scaling": True}, 2),
    ("ane-sized", {**_TINY, "dim": 128, "seq_len": 192}, 3),
)
STEPS = 3


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def rendered_kernels() -> dict[str, str]:
    """``preset/dtype/dialect/kernel`` -> sha256 of the text, ``.../kernel/blobs`` -> of the consts."""
    from rustane.config import PRESETS, preset
    from rustane.kernels import plan_for, render
    from rustane.mil.dialect import to_dialect
    from rustane.mil.emit import emit
    from rustane.mil.parser import parse
    from rustane.model import kernel_shape

    out = {}
    for name in PRESETS:
        cfg = preset(name)
        for dtype in ("fp16", "fp32"):
            for kname, spec in plan_for(kernel_shape(cfg, dtype)).items():
                text = render(spec)
                key = f"{name}/{dtype}/{{}}/{kname}"
                out[key.format("ios18")] = _sha(text.encode())
                out[key.format("ios16")] = _sha(emit(to_dialect(parse(text), "ios16")).encode())
                blobs = b"".join(k.encode() + b"\0" + v for k, v in sorted(spec.blobs.items()))
                out[key.format("blobs")] = _sha(blobs)
    return out


def _checkpoint_digest(path: Path) -> dict[str, str]:
    """Tensor bytes and sorted metadata of each safetensors file (the file bytes are not stable:
    safetensors writes its metadata map in no fixed order)."""
    from safetensors import safe_open

    out = {}
    for f in ("model.safetensors", "optimizer.safetensors"):
        h = hashlib.sha256()
        with safe_open(str(path / f), "np") as st:
            h.update(json.dumps(st.metadata() or {}, sort_keys=True).encode())
            for k in sorted(st.keys()):
                a = st.get_tensor(k)
                h.update(f"{k}:{a.dtype}:{a.shape}".encode())
                h.update(a.tobytes())
        out[f] = h.hexdigest()
    return out


def _backends(run: str) -> list[tuple[str, str, str]]:
    """(label, backend, precision) of every run this build can do."""
    out = [("sim-fp32", "sim", "fp32"), ("sim-fp16", "sim", "fp16")]
    if os.environ.get("RUSTANE_ANE_FAKE") and run == "ane-sized":
        out.append(("fake-ane", "ane", "fp16"))
    return out


def _engine(cfg, backend: str, precision: str, **kw):
    """An Engine; research shapes may break ANE rules on the simulator (builds before the ANE
    rule guard have no ``ane_rules``)."""
    from rustane.engine import Engine

    try:
        return Engine(cfg, backend=backend, precision=precision, ane_rules=backend != "sim", **kw)
    except TypeError:
        return Engine(cfg, backend=backend, precision=precision, **kw)


def trained_checkpoints() -> dict[str, dict[str, str]]:
    import numpy as np

    from rustane.config import ModelConfig
    from rustane.engine import TrainConfig

    out = {}
    for run, dims, accum in RUNS:
        cfg = ModelConfig(**dims).validate()
        rng = np.random.Generator(np.random.PCG64(11))
        batches = [rng.integers(0, cfg.vocab_size, size=(accum, cfg.seq_len + 1)) for _ in range(STEPS)]
        for label, backend, precision in _backends(run):
            eng = _engine(cfg, backend, precision, seed=5,
                          train=TrainConfig(steps=STEPS, warmup=1, lr=3e-3, accum=accum))
            try:
                for b in batches:
                    eng.train_step(b)
                with tempfile.TemporaryDirectory() as d:
                    out[f"{run}/{label}"] = _checkpoint_digest(eng.save(Path(d) / "ck"))
            finally:
                eng.close()
    return out


def _compare(what: str, want: dict, got: dict) -> int:
    bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k) and k in got)
    missing = sorted(set(want) - set(got))
    for k in bad:
        print(f"DIFFERS {what}: {k}")
    print(f"{what}: {len(got) - len(bad)} equal, {len(bad)} differ, {len(missing)} not run here")
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "check"
    if cmd == "write-kernels":
        KERNELS_FILE.write_text(json.dumps(rendered_kernels(), indent=1, sort_keys=True) + "\n")
    elif cmd == "write-checkpoints":
        old = json.loads(CHECKPOINTS_FILE.read_text()) if CHECKPOINTS_FILE.exists() else {}
        old.update(trained_checkpoints())
        CHECKPOINTS_FILE.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    elif cmd == "check":
        rc = _compare("kernel text", json.loads(KERNELS_FILE.read_text()), rendered_kernels())
        return rc | _compare("checkpoints", json.loads(CHECKPOINTS_FILE.read_text()), trained_checkpoints())
    else:
        print(f"error: unknown command {cmd!r}; use write-kernels, write-checkpoints or check", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
