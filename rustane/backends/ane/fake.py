"""Test scaffolding: the evaluator the fake ANE framework (tests/fakeane, Linux builds made with
``-Dane_fake=true``) calls for every request. It runs the MIL through the fp16 simulator, so the
contract tests can compare the ANE runtime's results with the sim backend byte for byte.

Loaded only when ``unavailable_reason()`` opens the fake framework; never on the training path
(tests/test_training_path_imports.py).
"""

from __future__ import annotations

import numpy as np

from ..base import Kernel

__all__ = ["install_sim_evaluator"]


class _SimEvaluator:
    """Runs one fake-framework evaluation through the sim backend (precision fp16).

    Kernels are cached by MIL text and weights, so a model evaluated many times compiles once.
    """

    def __init__(self):
        from rustane.backends.sim import SimBackend

        # The hardware runs no rule checker; AneBackend(check=...) decides that before compiling.
        self.backend = SimBackend(precision="fp16", check=False)
        self._cache: dict[tuple, Kernel] = {}

    def __call__(self, text: str, weights: dict, inputs: list, outputs: list) -> None:
        key = (text, tuple(sorted(weights.items())))
        kernel = self._cache.get(key)
        if kernel is None:
            kernel = self._cache[key] = self.backend.compile(text, weights, name="fakeane")
        if len(inputs) != len(kernel.inputs) or len(outputs) != len(kernel.outputs):
            raise ValueError(f"request binds {len(inputs)} inputs / {len(outputs)} outputs, the program has "
                             f"{len(kernel.inputs)} / {len(kernel.outputs)}")
        for raw, spec in zip(list(inputs) + list(outputs), kernel.inputs + kernel.outputs):
            if raw.nbytes != spec.nbytes:
                raise ValueError(f"surface for {spec.name} has {raw.nbytes} bytes, the MIL type needs {spec.nbytes}")
        ins = [kernel.alloc(s) for s in kernel.inputs]
        outs = [kernel.alloc(s) for s in kernel.outputs]
        for buf, raw in zip(ins, inputs):
            buf.write(raw.view(buf.spec.dtype).reshape(buf.spec.view_shape))
        kernel.eval(ins, outs)
        for buf, raw in zip(outs, outputs):
            raw[...] = np.ascontiguousarray(buf.read()).reshape(-1).view(np.uint8)


_evaluator_installed = False


def install_sim_evaluator(_ane) -> None:
    global _evaluator_installed
    if not _evaluator_installed:
        _ane.set_fake_evaluator(_SimEvaluator())
        _evaluator_installed = True
