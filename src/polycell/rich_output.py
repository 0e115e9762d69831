"""rich in a job renders as in a foreground cell, and its live display stays in the job's cell.

Two things stood in the way:

* rich decides once, when its console is made, whether it runs in Jupyter, by
  looking for the builtin ``get_ipython``. IPython puts that builtin in place
  only while a foreground cell runs, so a job that made rich's console while
  the kernel was idle got a terminal console: ANSI text instead of HTML, for
  the job and for every foreground cell after it. While polycell is loaded,
  ``get_ipython`` stays a builtin (IPython's own trap saves and restores it).
* A live display (``rich.progress.track``, ``Live``) replaces ``sys.stdout`` and
  ``sys.stderr`` with rich's ``FileProxy`` for the whole process, so a
  foreground ``print`` went into the job's display. A ``FileProxy`` made in a
  job now proxies for that job only: text written from any other context goes
  straight to the stream it wraps, which routes it as usual.

Written against rich 15.0: ``rich.file_proxy.FileProxy`` with its public
``rich_proxied_file`` (tests/test_output_everywhere.py fails if it moves).
"""

from __future__ import annotations

import builtins
from types import ModuleType
from typing import Any

from polycell.after_import import after_import
from polycell.job import current_job

__all__ = ["RichSupport"]

_NOT_A_JOB = object()  # a FileProxy made outside polycell's reach: leave it alone


def _adapt_file_proxy(module: ModuleType) -> None:
    proxy = module.FileProxy
    if getattr(proxy, "_polycell_adapted", False):
        return
    init, write, flush = proxy.__init__, proxy.write, proxy.flush
    proxy._polycell_adapted = True

    def __init__(self: Any, console: Any, file: Any) -> None:
        init(self, console, file)
        self._polycell_job = current_job.get()

    def proxies_here(self: Any) -> bool:
        return getattr(self, "_polycell_job", _NOT_A_JOB) in (_NOT_A_JOB, current_job.get())

    def write_from_here(self: Any, text: str) -> int:
        if proxies_here(self):
            return write(self, text)
        return self.rich_proxied_file.write(text)

    def flush_from_here(self: Any) -> None:
        if proxies_here(self):
            flush(self)
        else:
            self.rich_proxied_file.flush()

    proxy.__init__ = __init__
    proxy.write = write_from_here
    proxy.flush = flush_from_here


class RichSupport:
    """Installs both adaptations on one shell; one per loaded extension."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._get_ipython = shell.get_ipython  # one bound method, so it can be recognised

    def install(self) -> None:
        self._keep_builtin()
        # IPython's builtin trap restores what it found when a foreground cell ends,
        # and a cell that runs %load_ext is inside the trap: the builtin is put back
        # after every cell, outside the trap.
        self.shell.events.register("post_run_cell", self._keep_builtin)
        after_import("rich.file_proxy", _adapt_file_proxy)

    def uninstall(self) -> None:
        """Drop the builtin polycell added (rich's proxy keeps its per-job rule: harmless)."""
        try:
            self.shell.events.unregister("post_run_cell", self._keep_builtin)
        except ValueError:
            pass
        if getattr(builtins, "get_ipython", None) is self._get_ipython:
            del builtins.get_ipython  # type: ignore[attr-defined]

    def _keep_builtin(self, *_result: Any) -> None:
        if not hasattr(builtins, "get_ipython"):
            builtins.get_ipython = self._get_ipython  # type: ignore[attr-defined]
