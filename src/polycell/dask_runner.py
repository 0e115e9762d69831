"""Dask mode: a background cell runs as a task on a ``dask.distributed`` cluster.

The cluster is, in order of preference: the client or address given to
`polycell.use_dask`, the scheduler named by ``DASK_SCHEDULER_ADDRESS``, or a
`LocalCluster` this runner starts on first use and closes at shutdown.

The notebook's namespace cannot travel, so the names the cell reads (its free
variables that exist in the namespace) are cloudpickled in the kernel before
anything is submitted: a value that cannot be pickled is a one-line error
naming it. On the worker (`polycell.dask_worker.run_cell`) the cell's output
becomes numbered dask events on a topic of its own; this runner subscribes to
it and writes each record to the job's journal as it arrives. When the task
ends, the names the cell assigned come back and are merged into the
notebook's namespace, as for process jobs.

Kill cancels the task. Dask cannot stop a task that already runs, so the
runner also raises `JobKilled` in the task's thread on the worker (the same
async-exception trick as thread mode); a cell blocked in C code (a
``time.sleep``, a socket) ignores it until the call returns, and the job then
says so in its cell and reports ``kill requested, still blocked``.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from polycell.cell import CompiledCell
from polycell.job import Job, JobError, JobKilled, Runner

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "DaskCell", "DaskRunner", "require_distributed"]

DEFAULT_CONNECT_TIMEOUT = 10.0
INSTALL_HINT = "dask mode needs dask.distributed, which is not installed: pip install polycell[dask]"
#: How long to wait, after a task returned, for output events still on their way.
_LATE_OUTPUT_SECONDS = 10.0
#: After a kill, how long a started task gets to stop before the cell is told it is blocked.
_KILL_GRACE_SECONDS = 0.5


def require_distributed() -> None:
    """JobError with the install command when ``distributed`` cannot be imported."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise JobError(INSTALL_HINT) from None


@dataclass
class DaskCell:
    """A cell ready to ship: the compiled cell and the names it reads, cloudpickled."""

    cell_bytes: bytes
    names: dict[str, bytes]
    #: Called in the kernel with (value, assigned names) when the cell succeeded.
    finish: Callable[[Any, dict[str, Any]], None] | None = None


@dataclass
class _Task:
    """What the runner tracks about one running cell."""

    job: Job
    topic: str
    future: Any = None
    worker: str | None = None
    received: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)
    timer: threading.Timer | None = None


class DaskRunner(Runner):
    mode = "dask"

    def __init__(self) -> None:
        require_distributed()
        self._lock = threading.RLock()
        self._client: Any = None
        self._cluster: Any = None
        self._owns_client = False
        self._tasks: dict[int, _Task] = {}
        self._prefix = f"polycell-{uuid.uuid4().hex[:8]}"

    # -- the cluster ---------------------------------------------------------------------------

    def use(self, client_or_address: Any = None, *, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Any:
        """Switch to a given `distributed.Client` or scheduler address (None: the default choice)."""
        from distributed import Client

        with self._lock:
            if isinstance(client_or_address, Client):
                self._release()
                self._client = client_or_address
                return self._client
            if client_or_address is not None and not isinstance(client_or_address, str):
                raise JobError(
                    "use_dask: give a distributed.Client or a scheduler address such as "
                    f"'tcp://10.0.0.5:8786', not {type(client_or_address).__name__}"
                )
            self._release()
            return self._connect(client_or_address, timeout)

    @property
    def client(self) -> Any:
        """The client, connected (or a LocalCluster started) on first use."""
        with self._lock:
            if self._client is None:
                self._connect(None, DEFAULT_CONNECT_TIMEOUT)
            return self._client

    def _connect(self, address: str | None, timeout: float) -> Any:
        from distributed import Client, LocalCluster

        address = address or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
        if address is None:
            import logging

            self._cluster = LocalCluster(processes=True, dashboard_address=":0", silence_logs=logging.ERROR)
            self._client = Client(self._cluster, set_as_default=False)
        else:
            try:
                self._client = Client(address, timeout=timeout, set_as_default=False)
            except (OSError, TimeoutError, ValueError) as exc:
                reason = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise JobError(
                    f"dask: cannot reach the scheduler at {address} within {timeout:g} s ({reason})"
                ) from None
        self._owns_client = True
        return self._client

    def _release(self) -> None:
        client, cluster, owned = self._client, self._cluster, self._owns_client
        self._client = self._cluster = None
        self._owns_client = False
        if owned and client is not None:
            client.close()
        if cluster is not None:
            cluster.close()

    # -- shipping a cell -------------------------------------------------------------------------

    @staticmethod
    def ship(cell: CompiledCell, namespace: dict[str, Any], hidden: Iterable[str] = ()) -> DaskCell:
        """Pickle the cell and the names it reads; JobError naming a value that will not pickle."""
        import cloudpickle

        hidden_names = set(hidden)
        names: dict[str, bytes] = {}
        for name in cell.free:
            if name not in namespace or name in hidden_names:
                continue
            try:
                names[name] = cloudpickle.dumps(namespace[name])
            except Exception as exc:  # noqa: BLE001 - any pickling failure is the user's to see
                reason = (str(exc).splitlines() or [""])[0]
                raise JobError(
                    f"%%bg --mode dask: cannot send {name!r} ({type(namespace[name]).__name__}) to the "
                    f"cluster: it cannot be pickled ({type(exc).__name__}: {reason})"
                ) from None
        return DaskCell(cloudpickle.dumps(cell), names)

    # -- running ------------------------------------------------------------------------------------

    def submit(self, job: Job, body: DaskCell) -> Job:
        from polycell.dask_worker import run_cell

        self._prepare(job)
        client = self.client
        task = _Task(job, f"{self._prefix}-{job.id}")
        with self._lock:
            self._tasks[job.id] = task
        client.subscribe_topic(task.topic, lambda event: self._on_event(task, event[1]))
        task.future = client.submit(
            run_cell, body.cell_bytes, body.names, task.topic, pure=False, key=f"{task.topic}-cell"
        )
        task.future.add_done_callback(lambda future: self._on_done(task, body, future))
        return job

    def _on_event(self, task: _Task, msg: dict[str, Any]) -> None:
        """A record or a control event from the worker (runs in the client's loop thread)."""
        job = task.job
        if "seq" in msg:
            job.journal.append(msg["record"])
            with task.cond:
                task.received += 1
                task.cond.notify_all()
        elif "started" in msg:
            task.worker = msg["started"]
            job.info["worker"] = msg["started"]
            job._set_running()
        elif "ended" in msg and job.kill_requested:
            # The future was cancelled, so this event is the only news that the task stopped.
            self._end(task)
            job._set_killed()

    def _on_done(self, task: _Task, body: DaskCell, future: Any) -> None:
        job = task.job
        if future.cancelled():
            return  # killed: the "ended" event, or kill itself, ends the job
        try:
            outcome = future.result()
        except BaseException as exc:  # noqa: BLE001 - a lost worker, a failed deserialisation
            if job.kill_requested:
                self._end(task)
                job._set_killed()
                return
            job.journal.write("stderr", f"dask: the task failed: {type(exc).__name__}: {exc}\n")
            self._end(task)
            job._set_exception(exc)
            return
        with task.cond:
            task.cond.wait_for(lambda: task.received >= outcome["records"], _LATE_OUTPUT_SECONDS)
        self._end(task)
        job.info["worker"] = outcome["worker"]
        for what, why in outcome["unsent"].items():
            job.journal.write("stderr", f"polycell: {what} could not be sent back from the worker: {why}\n")
        self._finish(job, body, outcome)

    @staticmethod
    def _finish(job: Job, body: DaskCell, outcome: dict[str, Any]) -> None:
        import cloudpickle

        status = outcome["status"]
        if status == "killed":
            job._set_killed()
            return
        if status == "failed":
            exc: BaseException = RuntimeError("the cell failed on the dask worker")
            if outcome["exception"] is not None:
                try:
                    exc = cloudpickle.loads(outcome["exception"])
                except Exception:  # noqa: BLE001 - the error record already says what happened
                    pass
            job._set_exception(exc)
            return
        try:
            value = cloudpickle.loads(outcome["value"]) if outcome["value"] is not None else None
            names = {name: cloudpickle.loads(data) for name, data in outcome["names"].items()}
            if body.finish is not None:
                body.finish(value, names)
        except BaseException as exc:  # noqa: BLE001 - e.g. a class the kernel cannot import
            job.journal.write("stderr", f"polycell: could not bring the cell's results back: {exc}\n")
            job._set_exception(exc)
            return
        job._set_result(value)

    def _end(self, task: _Task) -> None:
        with self._lock:
            self._tasks.pop(task.job.id, None)
            client = self._client
        if task.timer is not None:
            task.timer.cancel()
        if client is not None:
            try:
                client.unsubscribe_topic(task.topic)
            except (ValueError, RuntimeError):  # already unsubscribed, or client closing
                pass

    def kill(self, job: Job) -> None:
        from polycell.dask_worker import interrupt_cell

        with self._lock:
            task = self._tasks.get(job.id)
            client = self._client
        if task is None or client is None:
            job._set_killed()
            return
        client.cancel([task.future], force=True)
        if task.worker is None:
            # Not started yet: cancelling is enough.
            self._end(task)
            job._set_killed()
            return
        try:
            client.run(interrupt_cell, task.topic, workers=[task.worker])
        except Exception as exc:  # noqa: BLE001 - the worker may be gone; the note below still holds
            job.journal.write("stderr", f"[job {job.id}: could not reach {task.worker} to stop it: {exc}]\n")

        def still_running() -> None:
            if not job.done:
                job.journal.write(
                    "stderr",
                    f"[job {job.id}: dask could not stop the task already running on {task.worker}: "
                    "it is blocked in code that cannot be interrupted; it was cancelled and its "
                    "result will be dropped, and the job will show killed when it returns]\n",
                )

        task.timer = threading.Timer(_KILL_GRACE_SECONDS, still_running)
        task.timer.daemon = True
        task.timer.start()

    def running(self) -> int:
        return len(self._tasks)

    def shutdown(self, timeout: float = 2.0) -> None:
        with self._lock:
            tasks = list(self._tasks.values())
            self._tasks.clear()
            client = self._client
        if client is not None and tasks:
            try:
                client.cancel([t.future for t in tasks if t.future is not None], force=True)
            except Exception:  # noqa: BLE001 - shutting down: nothing more to do
                pass
        for task in tasks:
            if task.timer is not None:
                task.timer.cancel()
            task.job._set_killed(JobKilled(f"job {task.job.id} was killed: the kernel shut down"))
        with self._lock:
            self._release()
