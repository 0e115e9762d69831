"""Run a function once a module is imported, now if it already is.

polycell adapts two libraries to jobs (matplotlib's figure registry, rich's
stdout proxy) and must do so even when a job is the first to import them:
importing them eagerly would slow every kernel's start, and checking at each
job's start misses the job that imports them itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["after_import"]

_waiting: dict[str, list[Callable[[ModuleType], None]]] = {}
_lock = threading.Lock()


class _Watcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the finders after it, and hooks the watched modules' loaders."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _waiting:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader: Any = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        load = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            load(module)
            with _lock:
                callbacks = _waiting.pop(fullname, [])
            for callback in callbacks:
                callback(module)

        loader.exec_module = exec_module  # this module's own loader instance only
        return spec


_watcher = _Watcher()


def after_import(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call `callback(module)` once module `name` is imported: at once if it is already."""
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _waiting.setdefault(name, []).append(callback)
            if _watcher not in sys.meta_path:
                sys.meta_path.insert(0, _watcher)
            return
    callback(module)
