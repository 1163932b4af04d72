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
        # Like the hardware (docs/ane-rules.md#io-order, Orion), the request's surfaces go to the
        # program's inputs and outputs in alphabetical order of their MIL names, whatever order the
        # text declares them in: surface i feeds the i-th name. A caller binding in declaration
        # order gets inputs swapped and outputs read from the wrong surface, with no error.
        in_specs = sorted(kernel.inputs, key=lambda s: s.name)
        out_specs = sorted(kernel.outputs, key=lambda s: s.name)
        for raw, spec in zip(list(inputs) + list(outputs), in_specs + out_specs):
            if raw.nbytes != spec.nbytes:
                raise ValueError(f"surface for {spec.name} has {raw.nbytes} bytes, the MIL type needs {spec.nbytes}")
        ins = {s.name: kernel.alloc(s) for s in in_specs}
        outs = {s.name: kernel.alloc(s) for s in out_specs}
        for spec, raw in zip(in_specs, inputs):
            buf = ins[spec.name]
            buf.write(raw.view(buf.spec.dtype).reshape(buf.spec.view_shape))
        kernel.eval([ins[s.name] for s in kernel.inputs], [outs[s.name] for s in kernel.outputs])
        for spec, raw in zip(out_specs, outputs):
            raw[...] = np.ascontiguousarray(outs[spec.name].read()).reshape(-1).view(np.uint8)


_evaluator_installed = False


def install_sim_evaluator(_ane) -> None:
    global _evaluator_installed
    if not _evaluator_installed:
        _ane.set_fake_evaluator(_SimEvaluator())
        _evaluator_installed = True
