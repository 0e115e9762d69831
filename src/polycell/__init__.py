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
]


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext polycell``."""
    from polycell.extension import load_ipython_extension as load

    load(shell)


def unload_ipython_extension(shell: Any) -> None:
    """``%unload_ext polycell``: kills running jobs and restores the shell's output."""
    from polycell.extension import unload_ipython_extension as unload

    unload(shell)
