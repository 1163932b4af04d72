"""Test and benchmark scaffolding: references that the training path never imports.

``torch_llama`` is the PyTorch autograd reference (imports torch). Nothing under
``rustane.train``/``rustane.engine`` may import this package (tests/test_training_path_imports.py).
"""
