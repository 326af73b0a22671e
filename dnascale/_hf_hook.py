"""`import dnascale` registers the HF classes with transformers' Auto classes, without importing transformers.

transformers takes seconds to import and most dnascale entry points (training, shard building) never need it, so
the registration waits for transformers: done now if transformers is already imported, otherwise right after its
first import (a meta-path finder that wraps transformers' loader once and then removes itself).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys


def _register() -> None:
    if "dnascale.hf" in sys.modules:
        # The package registers every family at the end of its __init__: it either already has, or its
        # `import transformers` got us here and it will once its classes exist.
        return
    try:
        import dnascale.hf  # noqa: F401  (registers on import)
    except ImportError:  # an incomplete install (no megatron-core, ...): the Auto classes simply stay unknown
        pass


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            _register()

        loader.exec_module = exec_module
        return spec


def install() -> None:
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())
