"""The nouns of the job engine: a `Job`, its states, and the `Runner` that runs it.

Shaped like ``concurrent.futures._base``: this module says what a job *is*; each
runner module (`thread`, `task`, `process`) says how one mode runs it. Nothing
here knows about Jupyter: output is whatever a runner writes into the job's
`OutputJournal`, and the IPython layer decides where it goes from there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import enum
import importlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator
from typing import Any

from polycell.journal import OutputJournal, last_line

__all__ = [
    "Job",
    "JobError",
    "JobKilled",
    "JobState",
    "KillOutcome",
    "Runner",
    "current_job",
    "one_line",
    "refuse_jobs_here",
    "registered",
]


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    KILLED = "killed"

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    @property
    def ended(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.KILLED)


class JobError(Exception):
    """A user-facing error about jobs: its message is meant to be shown as one line."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows an exception through this method when it has one: a mistake
        # such as jobs[999] or jobs.map(f, 5) is one line, not a walk through polycell.
        return [one_line(self, 1000)]


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line, cut to `limit` characters: how polycell reports a cause."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class JobKilled(BaseException):
    """Raised inside a job to stop it.

    A `BaseException`, like `KeyboardInterrupt`, so that the ``except Exception``
    blocks of user code do not swallow a kill.
    """


class KillOutcome(enum.StrEnum):
    KILLED = "killed"
    STILL_BLOCKED = "kill requested, still blocked"
    ALREADY_ENDED = "already ended"


#: The job whose code is running in the current thread or task, if any. Runners
#: set it in the context a job runs in; the output routing layer reads it to
#: decide whether a ``print`` belongs to a job or to the foreground cell.
current_job: contextvars.ContextVar[Job | None] = contextvars.ContextVar("polycell_current_job", default=None)


def registered(path: str) -> Any:
    """The class a registration names (``"module:Class"``), imported when first asked for.

    Modes (`polycell.job_table.MODES`) and map backends
    (`polycell.parallel_map.BACKEND_CLASSES`) are registered this way, so a
    kernel imports only the ones it uses.
    """
    module_name, _, name = path.partition(":")
    return getattr(importlib.import_module(module_name), name)


#: Set in a forked child (a process job, a map worker): why no job can start there. Its
#: copies of the kernel's output threads and job table were left behind by the fork.
_jobs_refused: str | None = None


def refuse_jobs_here(what: str) -> None:
    """Called once in a forked child: from now on, starting a job is a one-line JobError."""
    global _jobs_refused
    _jobs_refused = f"{what} cannot start jobs of its own; start them from the notebook"


def check_jobs_allowed() -> None:
    """JobError in a forked child (see `refuse_jobs_here`); nothing anywhere else."""
    if _jobs_refused is not None:
        raise JobError(_jobs_refused)


class Job:
    """One piece of code running in the background, and everything known about it.

    A job is created by a runner's `submit`. Its state moves only forward:
    pending -> running -> done | failed | killed (a pending job may be killed
    before it runs). The transitions (`set_running`, `finish`, `set_result`,
    `set_exception`, `set_killed`, `request_kill`) are for runners and tests;
    everything else is for users.
    """

    def __init__(
        self,
        job_id: int,
        *,
        mode: str,
        name: str | None = None,
        source: str = "",
        journal: OutputJournal | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        check_jobs_allowed()  # the one place a forked child refuses jobs: none can exist there
        self.id = job_id
        self.name = name or f"job-{job_id}"
        self.mode = mode
        self.source = source
        self.journal = journal if journal is not None else OutputJournal()
        #: Free-form facts a runner or front end wants shown (worker address, pid...).
        self.info: dict[str, Any] = info or {}
        self.created_at = time.time()
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.kill_requested = False
        self._kill_reason: str | None = None
        self._state = JobState.PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._state_listeners: list[Callable[[Job], None]] = []
        self.runner: Runner | None = None

    # -- what users read -------------------------------------------------------

    @property
    def status(self) -> JobState:
        return self._state

    @property
    def done(self) -> bool:
        return self._state.ended

    @property
    def result(self) -> Any:
        """The value of the job's last expression once it is done, else None."""
        return self._result

    @property
    def exception(self) -> BaseException | None:
        """The exception that failed (or killed) the job, else None."""
        return self._exception

    @property
    def output(self) -> str:
        """All text the job wrote to stdout and stderr so far, in order."""
        return self.journal.text()

    @property
    def elapsed(self) -> float:
        if self.started_at is None:
            return 0.0
        end = self.ended_at if self.ended_at is not None else time.time()
        return end - self.started_at

    def last_line(self) -> str:
        """The last line of output; for a failed job, the error that failed it."""
        if self._state is JobState.FAILED and self._exception is not None:
            return one_line(self._exception, 1000)
        return last_line(self.journal.tail_text())

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has ended; True if it did, False on timeout."""
        try:
            concurrent.futures.wait([self._future], timeout=timeout)
        except concurrent.futures.CancelledError:  # pragma: no cover - never cancelled
            pass
        return self.done

    def kill(self, timeout: float = 0.5, reason: str | None = None) -> KillOutcome:
        """Stop the job; wait up to `timeout` seconds to see it end.

        `reason`, if given, ends the job's ``[job N killed after 1.20s: reason]`` line.

        Returns `KillOutcome.STILL_BLOCKED` when the runner asked the job to stop
        but it did not end in time (a thread stuck in C code, a dask task that
        already started): it will be marked killed as soon as it does stop.
        """
        if not self.request_kill(reason):
            return KillOutcome.ALREADY_ENDED
        if self.runner is None:
            self.set_killed()
            return KillOutcome.KILLED
        self.runner.kill(self)
        if self.wait(timeout):
            return KillOutcome.KILLED if self._state is JobState.KILLED else KillOutcome.ALREADY_ENDED
        return KillOutcome.STILL_BLOCKED

    def note(self, text: str) -> None:
        """One line about the job, in its cell's stderr: ``[job 3: text]``."""
        self.journal.write("stderr", f"[job {self.id}: {text}]\n")

    def add_state_listener(self, listener: Callable[[Job], None]) -> None:
        """Call `listener(job)` after every state change, from the thread that made it."""
        self._state_listeners.append(listener)

    def __await__(self) -> Generator[Any, None, Any]:
        """``await job`` gives its result, or raises its exception, from any loop."""
        return asyncio.wrap_future(self._future).__await__()

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.name!r} mode={self.mode} status={self._state}>"

    # -- transitions: for runners and tests, as Future.set_result is ---------------------
    #
    # A runner calls set_running when it starts the job's code (in `submit`, for a
    # runner that starts it at once: its handle is then first shown running), then
    # exactly one of finish, set_result, set_exception or set_killed; later calls do
    # nothing.

    def request_kill(self, reason: str | None = None) -> bool:
        """Record that the job is to be killed (by `kill`, or a runner shutting down).

        It is the runner's to stop the code; `finish` then knows the exception that
        stopped it is the kill's doing. False if the job has already ended.
        """
        with self._lock:
            if self._state.ended:
                return False
            self.kill_requested = True
            self._kill_reason = reason or self._kill_reason
            return True

    def finish(self, exc: BaseException, kill_raises: tuple[type[BaseException], ...] = (JobKilled,)) -> None:
        """End the job from the exception its code raised: the one rule, for every mode.

        Killed when a kill was requested and `exc` is what a kill raises in this
        mode (`kill_raises`: `JobKilled`, asyncio's or trio's cancellation, or
        any exception at all where a kill takes the process down); otherwise
        failed, so the same exceptions raised without a kill (awaiting a killed
        job, a cancelled inner task) are the job's own errors.
        """
        if self.kill_requested and isinstance(exc, kill_raises):
            self.set_killed(exc if isinstance(exc, JobKilled) else None)
        else:
            self.set_exception(exc)

    def set_running(self) -> bool:
        """Mark the job running; False if it was killed before it could start."""
        with self._lock:
            if self._state is not JobState.PENDING:
                return False
            self._state = JobState.RUNNING
            self.started_at = time.time()
        self._notify()
        return True

    def set_result(self, value: Any) -> None:
        self._end(JobState.DONE, result=value)

    def set_exception(self, exc: BaseException) -> None:
        self._end(JobState.FAILED, exception=exc)

    def set_killed(self, exc: BaseException | None = None) -> None:
        self._end(JobState.KILLED, exception=exc or JobKilled(f"job {self.id} was killed"))

    def _end(self, state: JobState, *, result: Any = None, exception: BaseException | None = None) -> None:
        with self._lock:
            if self._state.ended:
                return
            self._state = state
            self._result = result
            self._exception = exception
            now = time.time()
            self.ended_at = now
            if self.started_at is None:
                self.started_at = now
        if state is JobState.KILLED:
            why = f": {self._kill_reason}" if self._kill_reason else ""
            self.journal.write("stderr", f"[job {self.id} killed after {self.elapsed:.2f}s{why}]\n")
        elif self.kill_requested:
            # Code that catches BaseException can catch the kill, and a job can end
            # before the kill reaches it: either way it was not killed, and says so.
            self.journal.write(
                "stderr",
                f"[job {self.id} was asked to stop but ended {state.value} after {self.elapsed:.2f}s: "
                "it caught the kill, or finished first]\n",
            )
        self.journal.close()
        self._notify()
        if exception is None:
            self._future.set_result(result)
        else:
            self._future.set_exception(exception)

    def _notify(self) -> None:
        for listener in list(self._state_listeners):
            listener(self)


class Runner(ABC):
    """Runs jobs of one mode. One instance per mode per kernel, made on first use."""

    mode: str

    def _prepare(self, job: Job) -> contextvars.Context:
        """The context the job's code runs in: the caller's, with `current_job` set.

        Copying the submitting context is what makes output land in the right
        cell: ipykernel keeps the parent header of the cell being executed in
        context variables, and a job's context is born from its cell's.
        """
        job.runner = self
        context = contextvars.copy_context()
        context.run(current_job.set, job)
        return context

    @abstractmethod
    def submit(self, job: Job, work: Any) -> Job:
        """Start running `work` as `job` and return at once.

        `work` is a cell (`polycell.cell.CellWork`), the same for every mode, or,
        for the engine on its own, what the mode runs: a function, a coroutine
        function for task mode, a `MapSpec` for a map.
        """

    @abstractmethod
    def kill(self, job: Job) -> None:
        """Ask the job to stop; must not block on the job ending."""

    @abstractmethod
    def shutdown(self, timeout: float = 2.0) -> None:
        """Kill what runs and release threads, loops and processes."""
