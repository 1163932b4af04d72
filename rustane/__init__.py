"""rustane: train Llama-family transformers on the Apple Neural Engine, or on a MIL simulator anywhere.

The package import is kept light on purpose: compiled modules (``rustane.native``, the ANE runtime)
load only when a submodule that needs them is imported, so pure-Python tooling (MIL parser,
simulator) works even in a source checkout that has not been built.
"""

__version__ = "0.1.0"
