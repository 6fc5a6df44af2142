"""ortho-mecha: delta-base-aware orthogonal merge methods for sd-mecha and streaming model analysis.

Importing this package registers the merge methods (``ortho_project``, ``ortho_superpose``,
``orthomerge`` and their helpers) with sd-mecha. Importing sd-mecha (and torch behind it) takes
seconds, so the registration happens as soon as sd-mecha is imported — immediately if it already
is — which keeps ``ortho-mecha --help`` and the light CLI commands fast.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.1.0"

_SD_MECHA = "sd_mecha"
_METHODS = "ortho_mecha.methods"


class _RegisterAfterSdMecha(importlib.abc.MetaPathFinder):
    """Import ``ortho_mecha.methods`` right after sd-mecha itself has finished importing."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != _SD_MECHA:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_then_register(module: types.ModuleType) -> None:
            original_exec(module)
            importlib.import_module(_METHODS)

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def _register_methods() -> None:
    if _SD_MECHA in sys.modules:
        importlib.import_module(_METHODS)
    elif not any(isinstance(f, _RegisterAfterSdMecha) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterSdMecha())


_register_methods()
