"""Process mode: a job runs in a forked child of the kernel.

Why fork: the child starts with the whole namespace exactly as it was, shared
copy-on-write, so a job can use a 2 GB array without a byte being pickled or
copied on the way in. Only what comes back (the last expression's value and
the names the cell assigns) is pickled, with cloudpickle.

The child is the job. It is made by `polycell.fork` like every fork of the
kernel (own process group, parent-death signal, fds 1 and 2 piped to the
kernel, no stdin, no jobs of its own); its Python-level output and every
structured record (display data, results, tracebacks) travel in order over a
record pipe (`polycell.child_pipe`), which stands in for the job's journal in
the child, so the output routing layer works unchanged. This module is the
runner: it forks the child, reads it on a thread of its own, sends back the
outcome and the names, and merges them into the notebook.
"""

from __future__ import annotations

import atexit
import contextvars
import importlib
import os
import selectors
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import cloudpickle

from polycell.cell import CellWork
from polycell.child_pipe import RecordPipe
from polycell.fork import ForkedChild, acquire_forker, describe_status, fork_available, release_forker
from polycell.interrupts import BackgroundThread
from polycell.job import Job, JobError, Runner, one_line

__all__ = ["DEFAULT_MAX_VALUE_BYTES", "DEFAULT_NICENESS", "ProcessDied", "ProcessRunner"]

DEFAULT_NICENESS = 10
#: Cap on one pickled value sent back (the result, or one name); larger ones are skipped.
DEFAULT_MAX_VALUE_BYTES = 1 << 30


class ProcessDied(JobError):
    """The child ended without sending an outcome: killed by a signal, or an exit code."""

    def __init__(
        self, message: str, *, signal_number: int | None = None, exitcode: int | None = None
    ) -> None:
        super().__init__(message)
        self.signal_number = signal_number
        self.exitcode = exitcode


def _size_text(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} bytes"  # pragma: no cover


# -- the parent's side ------------------------------------------------------------------------


@dataclass
class _Launch:
    """Everything the child needs to run a job, handed across the fork."""

    job: Job
    body: Callable[[], Any]
    context: contextvars.Context
    namespace: dict[str, Any] | None
    names: list[str]


class ProcessRunner(Runner):
    """Runs each job in a forked child; see the module docstring for why and how."""

    mode = "process"

    def __init__(
        self, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES, niceness: int = DEFAULT_NICENESS
    ) -> None:
        if not fork_available():
            raise JobError(
                f"--mode process needs os.fork, which {sys.platform} does not have; use --mode thread or dask"
            )
        self.max_value_bytes = max_value_bytes
        #: Added to each child's nice value: background work yields the CPU to the
        #: kernel and the notebook, and still takes every core nobody else wants.
        self.niceness = niceness
        self._owner_pid = os.getpid()
        self._children: dict[int, ForkedChild] = {}
        self._readers: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._forker = acquire_forker()
        atexit.register(self._kill_all)

    # -- starting ------------------------------------------------------------------------

    def submit(
        self,
        job: Job,
        work: CellWork | Callable[[], Any],
        *,
        namespace: dict[str, Any] | None = None,
        names: Iterable[str] = (),
    ) -> Job:
        """Run the work in a forked child; its return value becomes the job's result.

        When the job succeeds, each of `names` that `namespace` holds in the child
        is sent back and set in the parent's `namespace`: for a cell, the names it
        assigns, in the notebook's namespace.
        """
        body: Callable[[], Any] = work
        if isinstance(work, CellWork):
            body, namespace, names = work.run_in_child, work.namespace, work.cell.assigned
        if self._closed:
            raise RuntimeError("this ProcessRunner has been shut down")
        context = self._prepare(job)
        if not job.set_running():
            return job
        launch = _Launch(job, body, context, namespace, list(names))
        try:
            child = self._forker.fork(
                job,
                lambda pipe, _tasks: self._child_body(launch, pipe),
                what="a process job",
                niceness=self.niceness,
            )
        except OSError as exc:
            message = f"could not start a child process: {one_line(exc)}"
            job.journal.write("stderr", f"[job {job.id} failed: {message}]\n")
            job.set_exception(JobError(message))
            return job
        job.info["pid"] = child.pid
        reader = BackgroundThread(
            target=self._watch, args=(child, launch), name=f"polycell-process-{job.id}", daemon=True
        )
        with self._lock:
            self._children[job.id] = child
            self._readers[job.id] = reader
        if job.kill_requested:  # killed while it was being forked
            child.signal_group(signal.SIGKILL)
        reader.start()
        return job

    # -- in the child ----------------------------------------------------------------------

    def _child_body(self, launch: _Launch, pipe: RecordPipe) -> None:
        launch.job.journal = pipe  # type: ignore[assignment]
        pipe.send_end(launch.context.run(self._outcome, launch, pipe))

    def _outcome(self, launch: _Launch, pipe: RecordPipe) -> dict[str, Any]:
        """Run the body; what the parent needs to end the job, ready to pickle."""
        job, namespace = launch.job, launch.namespace
        try:
            value = launch.body()
        except BaseException as exc:  # noqa: BLE001 - a job's failure is data, not a crash
            try:
                blob: bytes | None = cloudpickle.dumps(exc, protocol=5)
            except Exception:  # noqa: BLE001
                blob = None
            return {"ok": False, "exception": blob, "summary": one_line(exc, 1000)}
        result = None
        if value is not None:
            result = self._dump(job, pipe, value, "result", f"jobs[{job.id}].result is None")
        sent: dict[str, tuple[str, Any]] = {}
        if namespace is not None:
            for name in launch.names:
                if name not in namespace:
                    continue  # bound only on a branch that did not run, or deleted
                value = namespace[name]
                if isinstance(value, types.ModuleType):
                    sent[name] = ("module", value.__name__)
                    continue
                data = self._dump(job, pipe, value, repr(name), "skipped")
                if data is not None:
                    sent[name] = ("pickle", data)
        return {"ok": True, "result": result, "names": sent}

    def _dump(self, job: Job, pipe: RecordPipe, value: Any, what: str, consequence: str) -> bytes | None:
        try:
            data = cloudpickle.dumps(value, protocol=5)
        except Exception as exc:  # noqa: BLE001 - reported in one line, the rest still arrives
            pipe.write("stderr", f"[job {job.id}: {what} not sent back ({one_line(exc)}); {consequence}]\n")
            return None
        if len(data) > self.max_value_bytes:
            pipe.write(
                "stderr",
                f"[job {job.id}: {what} not sent back ({_size_text(len(data))} pickled, over the "
                f"{_size_text(self.max_value_bytes)} limit); {consequence}]\n",
            )
            return None
        return data

    # -- in the parent: reading and ending ---------------------------------------------------

    def _watch(self, child: ForkedChild, launch: _Launch) -> None:
        """The reader thread: output into the journal as it comes, then end the job.

        Whatever goes wrong here, the child is killed and reaped and the job ends:
        a job that never ends would be worse than one that says why it failed.
        """
        job = child.job
        outcome: dict[str, Any] | None = None
        lost: BaseException | None = None
        try:
            outcome = self._read(child)
        except Exception as exc:  # noqa: BLE001 - reported on the job, never lost
            child.signal_group(signal.SIGKILL)
            lost = JobError(f"polycell lost track of the job's child: {one_line(exc)}")
        finally:
            status = child.reap()
            child.close()
            with self._lock:
                self._children.pop(job.id, None)
                self._readers.pop(job.id, None)
        try:
            if lost is not None:
                raise lost
            self._end(launch, outcome, status)
        except Exception as exc:  # noqa: BLE001
            job.note(f"failed: {one_line(exc)}")
            job.set_exception(exc)

    def _read(self, child: ForkedChild) -> dict[str, Any] | None:
        """Read the child's pipes into the journal until it exits; its outcome, if it sent one."""
        outcome: dict[str, Any] | None = None

        def drain(name: str) -> bool:
            nonlocal outcome
            messages, still_open = child.read(name)
            for kind, payload in messages:
                if kind == "end":
                    outcome = payload
            return still_open

        selector = selectors.DefaultSelector()
        pidfd = child.open_pidfd()
        try:
            for name, fd in child.fds.items():
                os.set_blocking(fd, False)
                selector.register(fd, selectors.EVENT_READ, name)
            if pidfd is not None:
                selector.register(pidfd, selectors.EVENT_READ, None)
            exited = False
            while not exited:
                ready = selector.select(None if pidfd is not None else 0.02)
                # Records first: when Python output and fd output are both waiting,
                # the Python output was usually first (print, then a subprocess).
                ready.sort(key=lambda event: event[0].data != "records")
                for key, _events in ready:
                    if key.data is None:
                        exited = True
                    elif not drain(key.data):
                        selector.unregister(key.fd)
                if pidfd is None:
                    exited = child.exited()
            # The child is a zombie now (not reaped, so its group id is still ours):
            # end what it left running, then take what is already in the pipes.
            child.signal_group(signal.SIGKILL)
            for key in list(selector.get_map().values()):
                if key.data is not None:
                    drain(key.data)
        finally:
            selector.close()
            if pidfd is not None:
                os.close(pidfd)
        return outcome

    def _end(self, launch: _Launch, outcome: dict[str, Any] | None, status: int | None) -> None:
        job = launch.job
        if job.kill_requested:
            job.set_killed()
        elif outcome is not None and outcome["ok"]:
            value = self._load(job, outcome["result"], "result")
            self._merge(launch, outcome["names"])
            job.set_result(value)
        elif outcome is not None:
            exc: BaseException | None = None
            if outcome["exception"] is not None:
                try:
                    exc = cloudpickle.loads(outcome["exception"])
                except Exception:  # noqa: BLE001 - fall back to its text
                    exc = None
            job.set_exception(exc if isinstance(exc, BaseException) else JobError(outcome["summary"]))
        else:
            died = self._death(status)
            job.journal.write("stderr", f"[job {job.id} failed: {died}]\n")
            job.set_exception(died)

    @staticmethod
    def _death(status: int | None) -> ProcessDied:
        if status is None:
            return ProcessDied("child process ended without a result (its exit status was taken elsewhere)")
        if os.WIFSIGNALED(status):
            return ProcessDied(
                f"child process died: {describe_status(status)}", signal_number=os.WTERMSIG(status)
            )
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
        return ProcessDied(f"child process exited with code {code} without a result", exitcode=code)

    def _load(self, job: Job, data: bytes | None, what: str) -> Any:
        if data is None:
            return None
        try:
            return cloudpickle.loads(data)
        except Exception as exc:  # noqa: BLE001 - one line; the job still ends
            job.note(f"{what} could not be loaded here ({one_line(exc)})")
            return None

    def _merge(self, launch: _Launch, sent: dict[str, tuple[str, Any]]) -> None:
        """Set the names the job assigned in the parent's namespace, and say which."""
        job, namespace = launch.job, launch.namespace
        if namespace is None or not sent:
            return
        arrived: dict[str, Any] = {}
        for name, (kind, data) in sent.items():
            if kind == "module":
                try:
                    arrived[name] = importlib.import_module(data)
                except Exception as exc:  # noqa: BLE001
                    job.note(f"{name!r} (module {data}) not re-imported ({one_line(exc)})")
                continue
            try:
                arrived[name] = cloudpickle.loads(data)
            except Exception as exc:  # noqa: BLE001
                job.note(f"{name!r} could not be loaded here ({one_line(exc)})")
        namespace.update(arrived)
        if arrived:
            job.journal.write("stdout", f"[job {job.id} set: {', '.join(arrived)}]\n")

    # -- stopping ----------------------------------------------------------------------------

    def kill(self, job: Job) -> None:
        with self._lock:
            child = self._children.get(job.id)
        if child is None:
            job.set_killed()
            return
        child.signal_group(signal.SIGKILL)

    def pids(self) -> list[int]:
        """The pids of the children running now."""
        with self._lock:
            return [child.pid for child in self._children.values()]

    def _kill_all(self) -> list[threading.Thread]:
        with self._lock:
            children = list(self._children.values())
            readers = list(self._readers.values())
        for child in children:
            child.job.request_kill()
            child.signal_group(signal.SIGKILL)
        return readers

    def shutdown(self, timeout: float = 2.0) -> None:
        with self._lock:
            if self._closed or os.getpid() != self._owner_pid:
                return
            self._closed = True
        atexit.unregister(self._kill_all)
        readers = self._kill_all()
        deadline = time.monotonic() + timeout
        for reader in readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        release_forker(max(0.1, deadline - time.monotonic()))
