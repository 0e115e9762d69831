"""Matplotlib figures made in a job are the job's: shown in its cell, never in another.

pyplot keeps every open figure in one registry, ``Gcf.figs``. The inline backend
shows all of them when a foreground cell ends, so a figure a thread job is still
drawing would appear in whatever foreground cell ended first, and the job's own
``plt.show()`` would find nothing left. While polycell is loaded, the registry
is a `FiguresByJob`: each job (and the threads it starts) sees its own figures
and the foreground sees only its own. A job's ``plt.show()`` shows its figures
in its cell, and `show_open_figures` shows what is left when the job ends, as
the inline backend does for a foreground cell.

Private reach, in this one place: ``matplotlib._pylab_helpers.Gcf.figs``, an
``OrderedDict`` class attribute, written against matplotlib 3.11 (every pyplot
function goes through it; tests/test_output_everywhere.py fails if it moves).
"""

from __future__ import annotations

import sys
import weakref
from collections import OrderedDict
from collections.abc import ItemsView, Iterator, KeysView, MutableMapping, ValuesView
from types import ModuleType
from typing import Any

from polycell.after_import import after_import
from polycell.job import Job, current_job, one_line

__all__ = ["FiguresByJob", "install_job_figures", "show_open_figures"]

_INLINE_BACKENDS = ("inline", "module://matplotlib_inline.backend_inline")


class FiguresByJob(MutableMapping[Any, Any]):
    """``Gcf.figs`` that is, in each job's context, that job's own ordered registry."""

    def __init__(self, foreground: OrderedDict[Any, Any]) -> None:
        self.foreground = foreground
        self._by_job: weakref.WeakKeyDictionary[Job, OrderedDict[Any, Any]] = weakref.WeakKeyDictionary()

    def current(self) -> OrderedDict[Any, Any]:
        """The registry of the calling context: its job's, or the foreground's."""
        job = current_job.get()
        if job is None:
            return self.foreground
        figures = self._by_job.get(job)
        if figures is None:
            figures = self._by_job[job] = OrderedDict()
        return figures

    def __getitem__(self, num: Any) -> Any:
        return self.current()[num]

    def __setitem__(self, num: Any, manager: Any) -> None:
        self.current()[num] = manager

    def __delitem__(self, num: Any) -> None:
        del self.current()[num]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.current())

    def __len__(self) -> int:
        return len(self.current())

    # OrderedDict's own views and methods: Gcf reverses values() and moves keys.
    def keys(self) -> KeysView[Any]:
        return self.current().keys()

    def values(self) -> ValuesView[Any]:
        return self.current().values()

    def items(self) -> ItemsView[Any, Any]:
        return self.current().items()

    def move_to_end(self, num: Any, last: bool = True) -> None:
        self.current().move_to_end(num, last)


def _adopt_registry(module: ModuleType) -> None:
    gcf = module.Gcf
    if not isinstance(gcf.figs, FiguresByJob):
        gcf.figs = FiguresByJob(gcf.figs)


def install_job_figures() -> None:
    """Give jobs their own figures once pyplot's registry exists (now, or when first imported)."""
    after_import("matplotlib._pylab_helpers", _adopt_registry)


def remove_job_figures() -> None:
    """Put back the plain registry, with the foreground's figures (jobs' figures are dropped)."""
    helpers = sys.modules.get("matplotlib._pylab_helpers")
    if helpers is not None and isinstance(helpers.Gcf.figs, FiguresByJob):
        helpers.Gcf.figs = helpers.Gcf.figs.foreground


def show_open_figures() -> None:
    """At a job's end: show the figures it left open in its cell, and close them.

    That is what the inline backend does for a foreground cell. With another
    backend (ipympl's widgets, a GUI window) figures show as that backend does.
    """
    helpers = sys.modules.get("matplotlib._pylab_helpers")
    if helpers is None or not helpers.Gcf.get_num_fig_managers():
        return
    import matplotlib

    if matplotlib.get_backend() in _INLINE_BACKENDS:
        from matplotlib_inline.backend_inline import show

        try:
            show(close=True)
        except Exception as exc:  # noqa: BLE001 - a figure that cannot draw must not fail a job that ran
            print(f"a figure could not be shown: {one_line(exc)}", file=sys.stderr)
