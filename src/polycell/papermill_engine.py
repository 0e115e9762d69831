"""``papermill in.ipynb out.ipynb --engine polycell``: papermill, keeping every job's output in its cell.

Registered through papermill's ``papermill.engine`` entry point (so it exists only
where papermill is installed). It is papermill's own nbclient engine with one
difference: after the last cell, it waits until every job the notebook started
has ended, and puts what each job printed after its cell went idle into that cell
(`polycell.headless`). Parameters, ``--log-output``, ``--request-save-on-cell-execute``
and papermill's error handling work as with the default engine: late output goes
through papermill's own ``process_message``, which logs and autosaves it, and a
failed job's traceback in its cell fails the run as a failing cell does.
"""

from __future__ import annotations

from typing import Any

from nbclient.exceptions import CellTimeoutError
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine
from papermill.log import logger
from papermill.utils import merge_kwargs, remove_args

from polycell.headless import NO_HISTORY, FollowJobs

__all__ = ["PolycellEngine", "PolycellPapermillClient"]


class PolycellPapermillClient(FollowJobs, PapermillNotebookClient):  # type: ignore[misc]
    """papermill's notebook client, waiting for the jobs of the cells it ran."""

    def papermill_execute_cells(self) -> None:
        self.start_following()
        try:
            super().papermill_execute_cells()
            settled = self.settle_jobs(self.timeout)
        except KeyboardInterrupt:
            self.kill_running_jobs()
            raise
        finally:
            self.stop_following()
        # A failed job's traceback is in its cell: papermill's own check fails the run on it.
        for problem in settled.failed + settled.unfinished:
            self.log.error(problem)
        if settled.unfinished:
            raise CellTimeoutError("; ".join(settled.unfinished))


class PolycellEngine(NBClientEngine):
    """papermill's nbclient engine, with `PolycellPapermillClient`."""

    @classmethod
    def execute_managed_notebook(  # noqa: PLR0917 - papermill calls it with this signature
        cls,
        nb_man: Any,
        kernel_name: str,
        log_output: bool = False,
        stdout_file: Any = None,
        stderr_file: Any = None,
        start_timeout: int = 60,
        execution_timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        # The same arguments, handled the same way, as papermill 2.7's NBClientEngine.
        kwargs = remove_args(["input_path"], **kwargs)
        safe_kwargs = remove_args(["timeout", "startup_timeout"], **kwargs)
        extra = [*safe_kwargs.pop("extra_arguments", []), NO_HISTORY]
        final_kwargs = merge_kwargs(
            safe_kwargs,
            timeout=execution_timeout if execution_timeout else kwargs.get("timeout"),
            startup_timeout=start_timeout,
            kernel_name=kernel_name,
            log=logger,
            log_output=log_output,
            stdout_file=stdout_file,
            stderr_file=stderr_file,
            extra_arguments=extra,
        )
        return PolycellPapermillClient(nb_man, **final_kwargs).execute()
