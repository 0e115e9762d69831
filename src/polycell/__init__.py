"""polycell: run notebook cells in the background, with their output in the right cell.

``%load_ext polycell`` in an ipykernel (or the ``polycell`` kernel) adds the
``%%bg``, ``%bg``, ``%jobs`` and ``%job`` magics; ``from polycell import jobs``
gives the same jobs to Python code.
"""

from __future__ import annotations

from typing import Any

from polycell.job import Job, JobError, JobKilled, JobState, KillOutcome
from polycell.job_table import JobTable, jobs

__version__ = "0.1.0"

__all__ = [
    "Job",
    "JobError",
    "JobKilled",
    "JobState",
    "JobTable",
    "KillOutcome",
    "jobs",
    "load_ipython_extension",
    "unload_ipython_extension",
    "use_dask",
]


def use_dask(client_or_address: Any = None, *, timeout: float = 10.0) -> Any:
    """Run ``%%bg --mode dask`` cells and ``jobs.map(..., mode="dask")`` on this cluster.

    Give a ``distributed.Client`` or a scheduler address (``"tcp://host:8786"``);
    None means ``DASK_SCHEDULER_ADDRESS``, else a ``LocalCluster`` started now,
    which listens on 127.0.0.1 only (scheduler, workers and dashboard). For one
    other machines can reach, start it yourself and pass its client:
    ``use_dask(LocalCluster(host="0.0.0.0").get_client())``.
    Returns the client. Raises `JobError` (one line) when the scheduler cannot
    be reached within `timeout` seconds or dask is not installed.
    """
    return jobs.runner("dask").use(client_or_address, timeout=timeout)


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext polycell``."""
    from polycell.extension import load_ipython_extension as load

    load(shell)


def unload_ipython_extension(shell: Any) -> None:
    """``%unload_ext polycell``: kills running jobs and restores the shell's output."""
    from polycell.extension import unload_ipython_extension as unload

    unload(shell)


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where JupyterLab finds the built frontend extension (``jupyter labextension develop``)."""
    return [{"src": "labextension", "dest": "polycell"}]
