"""rustane: train Llama-family transformers on the Apple Neural Engine, or on a MIL simulator anywhere.

The package import is kept light on purpose: compiled modules (``rustane.native``, the ANE runtime)
load only when a submodule that needs them is imported, so pure-Python tooling (MIL parser,
simulator) works even in a source checkout that has not been built.
"""

import sys as _sys
from importlib.machinery import EXTENSION_SUFFIXES as _EXT
from pathlib import Path as _Path

__version__ = "0.1.0"


def _borrow_installed_extensions() -> None:
    """Let a source checkout use the compiled modules of an installed rustane.

    ``pip install . && python -m rustane.train`` run from the repository root imports this source
    folder (the current directory comes first on ``sys.path``), which holds no compiled
    extensions: meson-python builds them only into the installed copy. Appending the installed
    package folder to ``__path__`` makes ``rustane._native`` & co. resolve there while every
    Python module still comes from the checkout (identical to the installed ones right after
    ``pip install .``). Editable installs and installed copies have their extensions and skip this.
    """
    def has_extensions(d: _Path) -> bool:
        return any((d / f"_native{suffix}").exists() for suffix in _EXT)

    here = _Path(__file__).resolve().parent
    if has_extensions(here):
        return
    for entry in _sys.path:
        try:
            cand = (_Path(entry) if entry else _Path.cwd()).resolve() / "rustane"
        except OSError:
            continue
        if cand != here and has_extensions(cand):
            __path__.append(str(cand))  # noqa: F821  (the package's own __path__)
            return


_borrow_installed_extensions()
