"""How a kernel plan runs on a backend, for any model family (docs/design.md).

- ``plan``: the vocabulary of a plan (Block, Tap, KernelSpec), rendering and packing;
- ``kernel_set``: compiled kernels, per-layer/shared buffers, requests, stage/read/copy;
- ``workspace``: the two-set workspace of a micro-step and the dW-queue drain rule;
- ``timing``: wall time per phase of a step;
- ``model``: ``Model``, a family's step math on a kernel set, with parameters, gradients, the dW
  queue and the optimizer update (which re-stages the weights itself).

Nothing here names a model family: ``rustane.models.family_for(config)`` supplies one.
"""
