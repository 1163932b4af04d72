"""The PyTorch reference Llama lives in the package (rustane.testing.torch_llama) so the benchmark can use
it too; tests import it under this short name."""

from rustane.testing.torch_llama import forward, init_params, params_to_torch, rmsnorm, rope  # noqa: F401
