"""Names a package loads on first use (PEP 562), written once for every collafuse package.

    # in a package's __init__.py
    from collafuse_edge.lazy import lazy_getattr

    _LAZY = {"EdgeRuntime": "runtime", "load_bundle": "bundle"}  # name -> submodule that defines it
    __getattr__ = lazy_getattr(__name__, _LAZY)

``package.EdgeRuntime`` then imports ``package.runtime`` the first time it is asked for, so
importing the package (or wiring a command-line parser) stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_getattr(package: str, mapping: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``package.<mapping[name]>`` and returns
    its ``name``; any other name raises AttributeError as a module without it would."""

    def __getattr__(name: str) -> Any:
        module = mapping.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{module}", package), name)

    return __getattr__


__all__ = ["lazy_getattr"]
