"""Modules that can be called as their main function.

``emscope.train``, ``emscope.geometry`` and ``emscope.lmc`` are modules (their functions and
types are reached as ``emscope.train.TrainConfig`` ...), and the public API
(:mod:`emscope`) also offers them as verbs: ``emscope.train(base, data, out=...)``. A
function of the same name as a submodule cannot live in the package namespace (importing
the submodule rebinds the name to the module), so the module itself is made callable: its
class becomes a :class:`types.ModuleType` subclass whose ``__call__`` is the function, and
``inspect.signature`` of the module gives the function's. Nothing else about the module
changes, whatever the order in which it and :mod:`emscope` are imported.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable
from typing import Any


def callable_module(name: str, function: Callable[..., Any]) -> None:
    """Make the module ``name`` (already in ``sys.modules``) callable as ``function``."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

    module = sys.modules[name]
    module.__class__ = CallableModule
    module.__signature__ = inspect.signature(function)  # type: ignore[attr-defined]
