"""`jobs`: every job of this kernel by id, and the runners that run them.

One `JobTable` per process (`polycell.jobs`); the magics, the kernel and the
command line all go through it. Runners are made on first use of their mode, so
a kernel that never starts a process job never pays for one.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from polycell import view
from polycell.job import Job, JobError, Runner, registered
from polycell.journal import DEFAULT_MAX_CHARS, OutputJournal

__all__ = ["ENGINES", "MODES", "TASK_BACKENDS", "JobTable", "jobs"]

#: mode -> "module:Runner class"; a mode is importable only when used.
MODES: dict[str, str] = {
    "thread": "polycell.thread:ThreadRunner",
    "task": "polycell.task:TaskRunner",
    "process": "polycell.process:ProcessRunner",
    "dask": "polycell.dask_runner:DaskRunner",
}

#: Event loops a task job can run on, besides the default (asyncio, `MODES["task"]`).
TASK_BACKENDS: dict[str, str] = {
    "asyncio": "polycell.task:TaskRunner",
    "trio": "polycell.trio_task:TrioTaskRunner",
}

#: Runners of jobs that are not ``%%bg`` cells (``jobs.map``): same table, not a ``--mode``.
ENGINES: dict[str, str] = {
    "map": "polycell.parallel_map:MapRunner",
}


class JobTable:
    """The jobs of this kernel: ``jobs[3]``, ``len(jobs)``, ``for job in jobs``."""

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._runners: dict[tuple[str, str | None], Runner] = {}
        self._lock = threading.Lock()
        #: Cap, in characters, on each new job's journal kept in memory.
        self.journal_max_chars = DEFAULT_MAX_CHARS
        self._new_job_listeners: list[Callable[[Job], None]] = []
        #: Called with each job started through the Python API (`map`), in the
        #: caller's context; the IPython layer uses it to show the job in the
        #: calling cell.
        self.on_new_job: Callable[[Job], None] | None = None

    # -- lookup ----------------------------------------------------------------------

    def __getitem__(self, job_id: int) -> Job:
        try:
            return self._jobs[int(job_id)]
        except (KeyError, ValueError, TypeError):
            raise JobError(self._unknown(job_id)) from None

    def _unknown(self, job_id: object) -> str:
        if not self._jobs:
            return f"no job {job_id}: no job has been started yet"
        return f"no job {job_id}: known jobs are {min(self._jobs)}-{max(self._jobs)}"

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def __len__(self) -> int:
        return len(self._jobs)

    def running(self) -> list[Job]:
        return [job for job in self if not job.done]

    # -- starting ----------------------------------------------------------------------

    def runner(self, mode: str, backend: str | None = None) -> Runner:
        """The runner for `mode` (and, for task mode, the event loop `backend`), made on first use."""
        if backend == "asyncio":
            backend = None
        with self._lock:
            runner = self._runners.get((mode, backend))
            if runner is None:
                path = MODES.get(mode) or ENGINES.get(mode)
                if path is None:
                    raise JobError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
                target = path
                if backend is not None:
                    if mode != "task":
                        raise JobError(f"--backend {backend} is for task mode only, not --mode {mode}")
                    if backend not in TASK_BACKENDS:
                        choices = ", ".join(TASK_BACKENDS)
                        raise JobError(f"unknown backend {backend!r}: choose one of {choices}")
                    target = TASK_BACKENDS[backend]
                runner = self._runners[(mode, backend)] = registered(target)()
            return runner

    def new_job(self, mode: str, *, name: str | None = None, source: str = "", **info: Any) -> Job:
        """Register a pending job; the caller hands it to `runner(mode).submit`."""
        if mode not in MODES and mode not in ENGINES:
            raise JobError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        with self._lock:
            job_id = next(self._ids)
            job = Job(
                job_id,
                mode=mode,
                name=name,
                source=source,
                journal=OutputJournal(max_chars=self.journal_max_chars),
                info=info,
            )
            self._jobs[job_id] = job
        for listener in list(self._new_job_listeners):
            listener(job)
        return job

    def add_new_job_listener(self, listener: Callable[[Job], None]) -> None:
        """Call `listener(job)` for every job registered from now on, before it runs.

        This is how the on-disk journal store sees every job, whatever started it.
        """
        self._new_job_listeners.append(listener)

    def remove_new_job_listener(self, listener: Callable[[Job], None]) -> None:
        if listener in self._new_job_listeners:
            self._new_job_listeners.remove(listener)

    def submit(self, mode: str, body: Any, *, name: str | None = None, source: str = "") -> Job:
        """Start `body` as a new job of `mode`; returns the job at once."""
        runner = self.runner(mode)
        job = self.new_job(mode, name=name, source=source)
        return runner.submit(job, body)

    def map(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        workers: int | None = None,
        mode: str = "process",
        *,
        chunksize: int | None = None,
        name: str | None = None,
    ) -> Job:
        """``[func(x) for x in iterable]`` in parallel, as a job with a progress bar.

        Returns the job at once; its `result` is the list of results in input
        order. `mode` is ``process`` (forked workers, escapes the GIL),
        ``thread`` or ``dask`` (the cluster of `polycell.use_dask`);
        `workers` defaults to one per CPU (dask: every worker thread). See
        `polycell.parallel_map`.
        """
        from polycell.parallel_map import make_spec

        dask_client = (lambda: self.runner("dask").client) if mode == "dask" else None
        spec = make_spec(
            func, iterable, workers=workers, mode=mode, chunksize=chunksize, dask_client=dask_client
        )
        runner = self.runner("map")
        label = getattr(func, "__name__", type(func).__name__)
        job = self.new_job("map", name=name or f"map {label}")
        if self.on_new_job is not None:
            self.on_new_job(job)
        return runner.submit(job, spec)

    def shutdown(self, timeout: float = 2.0) -> list[Job]:
        """Kill every running job and stop every runner; returns the jobs that were running."""
        running = self.running()
        for job in running:
            job.request_kill()
        with self._lock:
            # Engines first: a map on dask still needs the dask runner's client to cancel.
            order = sorted(self._runners, key=lambda mode: mode not in ENGINES)
            runners, self._runners = [self._runners[mode] for mode in order], {}
        for runner in runners:
            runner.shutdown(timeout)
        return running

    # -- display ----------------------------------------------------------------------

    def __repr__(self) -> str:
        return view.jobs_text(list(self))

    def _repr_html_(self) -> str:
        return view.jobs_html(list(self))


jobs = JobTable()
