"""Compatibility: the PyTorch reference Llama moved to ``rustane.testing.torch_llama``.

Attributes resolve on first use, so importing this name does not import torch.
"""


def __getattr__(name: str):
    from rustane.testing import torch_llama

    return getattr(torch_llama, name)
