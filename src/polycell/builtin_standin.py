"""Stand-ins for builtin functions whose behaviour must differ inside a job.

``time.sleep`` must wake when a thread job is killed; ``os.system`` must send a
job's program output to the job's cell. The stand-in replaces the builtin in its
module and, on every call, lets a chooser pick the function that runs: the
builtin itself, or polycell's version for the calling job.

It adds no Python frame of its own to the call. ``__call__`` is a property, so
Python's call slot asks it for the function to run and then calls that function
directly: an interrupted ``time.sleep`` in the foreground shows the traceback it
shows without polycell, ending in the user's own line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["BuiltinStandIn"]


class BuiltinStandIn:
    """Calls `choose()`'s function, or `builtin` when it returns None.

    It looks like the builtin to ``inspect`` (``__wrapped__``), ``help`` and
    ``repr``, and pickles by name, as the builtin does: `module` is the module
    whose attribute it replaces (``os``, where the builtin itself says ``posix``).
    """

    def __init__(
        self, builtin: Callable[..., Any], choose: Callable[[], Callable[..., Any] | None], module: str
    ) -> None:
        self.__wrapped__ = builtin
        self.__name__ = builtin.__name__
        self.__qualname__ = builtin.__qualname__
        self.__module__ = module
        self.__doc__ = builtin.__doc__
        self._choose = choose

    @property
    def __call__(self) -> Callable[..., Any]:  # type: ignore[override]
        return self._choose() or self.__wrapped__

    def __repr__(self) -> str:
        return repr(self.__wrapped__)

    def __reduce__(self) -> str:
        return self.__qualname__
