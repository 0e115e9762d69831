"""Dask mode: a background cell runs as a task on a ``dask.distributed`` cluster.

The cluster (`polycell.dask_cluster.DaskCluster`) is the client or address
given to `polycell.use_dask`, the scheduler named by ``DASK_SCHEDULER_ADDRESS``,
or a `LocalCluster` started on first use and closed at shutdown.

The notebook's namespace cannot travel, so the names the cell reads (its free
variables that exist in the namespace) are cloudpickled in the kernel before
anything is submitted: a value that cannot be pickled is a one-line error
naming it. On the worker (`polycell.dask_worker.run_cell`) the cell's output
becomes numbered dask events on a topic of its own; this runner subscribes to
it and writes each record to the job's journal as it arrives. When the task
ends, the names the cell assigned come back and are merged into the
notebook's namespace, as for process jobs.

A job ends once both the task's result and every output record it announced
have arrived (they travel separately: the result through the scheduler, the
records as events). Whichever comes last hands the finishing work (unpickling,
merging names) to a thread of this runner: distributed runs every future's
done-callback on one process-wide thread, which must never wait.

Kill cancels the task. Dask cannot stop a task that already runs, so the
runner also raises `JobKilled` in the task's thread on the worker (the same
async-exception trick as thread mode). When no "started" event has arrived,
the task may still have started, so every worker is asked: the one running
it stops it, the others remember never to start it. A cell blocked in C code (a
``time.sleep``, a socket) ignores it until the call returns, and the job then
says so in its cell and reports ``kill requested, still blocked``.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from polycell.cell import CellWork, CompiledCell
from polycell.dask_cluster import DEFAULT_CONNECT_TIMEOUT, DaskCluster, require_distributed
from polycell.interrupts import BackgroundThread, interrupts_blocked
from polycell.job import Job, JobError, JobKilled, Runner, one_line

# DEFAULT_CONNECT_TIMEOUT and require_distributed live in polycell.dask_cluster; they were
# first defined here, and are still importable from here.
__all__ = ["DEFAULT_CONNECT_TIMEOUT", "DaskCell", "DaskRunner", "require_distributed"]

#: How long to wait, after a task returned, for output events still on their way.
_LATE_OUTPUT_SECONDS = 10.0
#: After a kill, how long a started task gets to stop before the cell is told it is blocked.
_KILL_GRACE_SECONDS = 0.5


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
    body: DaskCell
    future: Any = None
    worker: str | None = None
    #: Output records received so far.
    received: int = 0
    #: The worker's ``ended`` event, once it arrived: the cell is no longer running.
    ended: dict[str, Any] | None = None
    #: The task's result, once its future resolved.
    outcome: dict[str, Any] | None = None
    #: Set once, by whoever hands the job to `DaskRunner._complete`.
    completing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    timers: list[threading.Timer] = field(default_factory=list)


class DaskRunner(Runner):
    mode = "dask"

    def __init__(self) -> None:
        self.cluster = DaskCluster()
        #: Guards the tasks and the pools; never held while waiting on the network.
        self._lock = threading.RLock()
        self._tasks: dict[int, _Task] = {}
        self._finish_pool: concurrent.futures.ThreadPoolExecutor | None = None
        #: Threads connecting, pickling and submitting a cell (`submit`), and their jobs.
        self._starters: dict[threading.Thread, Job] = {}
        #: Set by `shutdown`: nothing connects or submits any more.
        self._closed = False
        self._prefix = f"polycell-{uuid.uuid4().hex[:8]}"

    # -- the cluster ---------------------------------------------------------------------------

    def use(self, client_or_address: Any = None, *, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Any:
        """Switch to a given `distributed.Client` or scheduler address (None: the default choice)."""
        return self.cluster.use(client_or_address, timeout=timeout)

    @property
    def client(self) -> Any:
        """The client, connected (or a LocalCluster started) on first use."""
        return self.cluster.client

    @staticmethod
    def ship(cell: CompiledCell, values: dict[str, Any]) -> DaskCell:
        """Pickle the cell and the values of the names it reads; JobError naming one that will not pickle."""
        import cloudpickle

        names: dict[str, bytes] = {}
        for name, value in values.items():
            try:
                names[name] = cloudpickle.dumps(value)
            except Exception as exc:  # noqa: BLE001 - any pickling failure is the user's to see
                raise JobError(
                    f"%%bg --mode dask: cannot send {name!r} ({type(value).__name__}) to the "
                    f"cluster: it cannot be pickled ({one_line(exc)})"
                ) from None
        return DaskCell(cloudpickle.dumps(cell), names)

    # -- running ------------------------------------------------------------------------------------

    def submit(self, job: Job, work: CellWork) -> Job:
        """Start a cell's job; connecting, pickling and submitting happen on a thread of their own.

        Those can take seconds (a scheduler that does not answer until the
        connect timeout, a large array to pickle), and the thread that starts a
        cell must not wait: in the polycell kernel it routes every other
        request. The values of the names the cell reads are taken now, so a
        foreground cell that rebinds one afterwards does not change what is
        sent. What fails on the way (an unreachable scheduler, a value that
        will not pickle) fails the job, with one line in its cell. The names the
        cell assigns come back into its namespace.
        """
        context = self._prepare(job)  # what the starter prints (a warning, say) is the job's too
        namespace, skip = work.namespace, set(work.hidden())
        values = {name: namespace[name] for name in work.cell.free if name in namespace and name not in skip}
        starter = BackgroundThread(
            target=context.run,
            args=(self._ship_and_submit, job, work, values),
            name=f"polycell-dask-start-{job.id}",
            daemon=True,
        )
        with self._lock:
            if self._closed:
                raise JobError("dask: this runner was shut down")
            starter.start()  # under the lock: `shutdown` sees every starter that runs
            self._starters[starter] = job
        return job

    def _ship_and_submit(self, job: Job, work: CellWork, values: dict[str, Any]) -> None:
        def finish(value: Any, names: dict[str, Any]) -> None:
            work.namespace.update(names)
            work.on_value(value)

        try:
            if job.done or job.kill_requested:  # killed while waiting to start
                job.set_killed()
                return
            try:
                client = self.client  # connect (or start the local cluster) on first use
                body = self.ship(work.cell, values)
                body.finish = finish
                self._submit_to(client, job, body)
            except Exception as exc:  # noqa: BLE001 - whatever it is, the job's cell says it
                if job.done or job.kill_requested:  # killed, or shut down, meanwhile: nothing to say
                    job.set_killed()
                    return
                error = exc if isinstance(exc, JobError) else JobError(f"dask: {one_line(exc)}")
                job.note(error)
                job.set_exception(error)
        finally:
            with self._lock:
                self._starters.pop(threading.current_thread(), None)

    def _submit_to(self, client: Any, job: Job, body: DaskCell) -> Job:
        from polycell.dask_worker import run_cell

        task = _Task(job, f"{self._prefix}-{job.id}", body)
        with self._lock:
            if job.done or self._closed:
                job.set_killed()
                return job  # killed before it was submitted: nothing runs, nothing is merged
            self._tasks[job.id] = task
        try:
            client.subscribe_topic(task.topic, lambda event: self._on_event(task, event[1]))
            future = client.submit(
                run_cell, body.cell_bytes, body.names, task.topic, pure=False, key=f"{task.topic}-cell"
            )
        except Exception as exc:  # noqa: BLE001 - a closed client, a scheduler gone
            self._end(task)
            error = JobError(f"dask: the cell could not be submitted: {one_line(exc)}")
            job.note(error)
            job.set_exception(error)
            return job
        with self._lock:
            task.future = future
            killed_meanwhile = job.id not in self._tasks
        if killed_meanwhile:
            # `kill` ran between registering and submitting: it could not cancel a future
            # it did not have. Cancel it now; the workers refuse to start the cell.
            self._stop_unstarted(client, task)
            return job
        future.add_done_callback(lambda done: self._on_done(task, done))
        return job

    def _on_event(self, task: _Task, msg: dict[str, Any]) -> None:
        """A record or a control event from the worker (runs in the client's loop thread)."""
        job = task.job
        if "seq" in msg:
            job.journal.append(msg["record"])
            with task.lock:
                task.received += 1
            self._complete_when_ready(task)
        elif "started" in msg:
            task.worker = msg["started"]
            job.info["worker"] = msg["started"]
            job.set_running()
        elif "ended" in msg:
            task.ended = msg
            if job.kill_requested:
                # The future was cancelled, so this event is the only news that the task stopped.
                self._end(task)
                job.set_killed()
            else:
                self._complete_when_ready(task)

    def _on_done(self, task: _Task, future: Any) -> None:
        """The future resolved (runs on distributed's one callback thread: must not block)."""
        job = task.job
        if future.cancelled():
            # Only a kill (or shutdown) cancels. If the cell already ended on the worker,
            # no "ended" event is coming to end the job: end it here.
            if task.ended is not None:
                self._end(task)
                job.set_killed()
            return
        try:
            outcome = future.result()
        except BaseException as exc:  # noqa: BLE001 - a lost worker, a failed deserialisation
            self._end(task)
            if job.kill_requested:
                job.set_killed()
                return
            job.journal.write("stderr", f"dask: the task failed: {one_line(exc)}\n")
            job.set_exception(exc)
            return
        with task.lock:
            task.outcome = outcome
        if not self._complete_when_ready(task):
            # Records still on their way: wait for them, but not forever.
            self._start_timer(task, _LATE_OUTPUT_SECONDS, lambda: self._complete_when_ready(task, late=True))

    def _complete_when_ready(self, task: _Task, *, late: bool = False) -> bool:
        """Hand the job to `_complete` once its result and all its records are here (or `late`)."""
        with task.lock:
            outcome = task.outcome
            if task.completing or task.job.done:
                return True
            if outcome is None or (task.received < outcome["records"] and not late):
                return False
            task.completing = True
        with interrupts_blocked():  # the pool's thread, started here, inherits the mask
            self._finisher().submit(self._complete, task, outcome)
        return True

    @staticmethod
    def _start_timer(task: _Task, seconds: float, action: Callable[[], object]) -> None:
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        with task.lock:
            task.timers.append(timer)
        with interrupts_blocked():  # a kill may come from the main thread: the timer must not take ■
            timer.start()

    def _complete(self, task: _Task, outcome: dict[str, Any]) -> None:
        """End the job from its outcome (on the runner's finisher thread)."""
        job = task.job
        self._end(task)
        if job.done:
            return
        if job.kill_requested:
            job.set_killed()
            return
        job.info["worker"] = outcome["worker"]
        for what, why in outcome["unsent"].items():
            job.journal.write("stderr", f"polycell: {what} could not be sent back from the worker: {why}\n")
        self._finish(job, task.body, outcome)

    def _finisher(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._finish_pool is None:
                self._finish_pool = concurrent.futures.ThreadPoolExecutor(1, "polycell-dask-finish")
            return self._finish_pool

    @staticmethod
    def _finish(job: Job, body: DaskCell, outcome: dict[str, Any]) -> None:
        import cloudpickle

        status = outcome["status"]
        if status == "killed":
            job.set_killed()
            return
        if status == "failed":
            exc: BaseException = RuntimeError("the cell failed on the dask worker")
            if outcome["exception"] is not None:
                try:
                    exc = cloudpickle.loads(outcome["exception"])
                except Exception:  # noqa: BLE001 - the error record already says what happened
                    pass
            job.set_exception(exc)
            return
        try:
            value = cloudpickle.loads(outcome["value"]) if outcome["value"] is not None else None
            names = {name: cloudpickle.loads(data) for name, data in outcome["names"].items()}
            if body.finish is not None:
                body.finish(value, names)
        except BaseException as exc:  # noqa: BLE001 - e.g. a class the kernel cannot import
            job.journal.write("stderr", f"polycell: could not bring the cell's results back: {exc}\n")
            job.set_exception(exc)
            return
        job.set_result(value)

    def _end(self, task: _Task) -> None:
        """Stop tracking the task: its timers, its topic. The job's state is the caller's to set."""
        with self._lock:
            self._tasks.pop(task.job.id, None)
            client = self.cluster.current
        with task.lock:
            timers, task.timers = task.timers, []
        for timer in timers:
            timer.cancel()
        if client is not None:
            try:
                client.unsubscribe_topic(task.topic)
            except Exception:  # noqa: BLE001 - already unsubscribed, or the client closed
                pass

    def _stop_unstarted(self, client: Any, task: _Task) -> None:
        """Cancel a task and make every worker refuse to start it (if the cancel comes too late)."""
        from polycell.dask_worker import interrupt_cell

        try:
            client.cancel([task.future], force=True)
            client.run(interrupt_cell, task.topic)
        except Exception as exc:  # noqa: BLE001 - the cluster may be gone: then nothing runs anyway
            task.job.note(f"dask: {one_line(exc)}")

    def kill(self, job: Job) -> None:
        from polycell.dask_worker import interrupt_cell

        with self._lock:
            task = self._tasks.get(job.id)
            client = self.cluster.current
        if task is None or client is None or task.future is None:
            # Not submitted (yet): `submit` sees the task is gone and cancels what it submits.
            if task is not None:
                self._end(task)
            job.set_killed()
            return
        client.cancel([task.future], force=True)
        with task.lock:
            over = task.ended is not None or task.outcome is not None
        if over:
            # The cell already ended on the worker; its result was on its way. No event
            # will come to end the job, and the cancelled future will not either.
            self._end(task)
            job.set_killed()
            return
        worker = task.worker
        try:
            if worker is None:
                # Not known to have started, but its "started" event may be in flight: ask
                # every worker. One that runs it stops it; the others refuse to start it.
                running_on = [w for w, hit in client.run(interrupt_cell, task.topic).items() if hit]
                if not running_on:
                    self._end(task)
                    job.set_killed()
                    return
                worker = task.worker = job.info["worker"] = running_on[0]
            else:
                client.run(interrupt_cell, task.topic, workers=[worker])
        except Exception as exc:  # noqa: BLE001 - the worker may be gone; the note below still holds
            where = worker or "the cluster"
            job.note(f"could not reach {where} to stop it: {one_line(exc)}")
            if worker is None:
                self._end(task)
                job.set_killed()
                return

        def still_running() -> None:
            if not job.done:
                job.note(
                    f"dask could not stop the task already running on {worker}: "
                    "it is blocked in code that cannot be interrupted; it was cancelled and its "
                    "result will be dropped, and the job will show killed when it returns"
                )

        self._start_timer(task, _KILL_GRACE_SECONDS, still_running)

    def running(self) -> int:
        return len(self._tasks)

    def shutdown(self, timeout: float = 2.0) -> None:
        with self._lock:
            self._closed = True  # a starter still connecting submits nothing after this
            starters = dict(self._starters)
        for job in starters.values():
            job.set_killed(JobKilled(f"job {job.id} was killed: the kernel shut down"))
        deadline = time.monotonic() + timeout
        for starter in starters:
            starter.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            tasks = list(self._tasks.values())
            self._tasks.clear()
            client = self.cluster.current
            pool, self._finish_pool = self._finish_pool, None
        if client is not None and tasks:
            try:
                client.cancel([t.future for t in tasks if t.future is not None], force=True)
            except Exception:  # noqa: BLE001 - shutting down: nothing more to do
                pass
        for task in tasks:
            with task.lock:
                timers, task.timers = task.timers, []
            for timer in timers:
                timer.cancel()
            task.job.set_killed(JobKilled(f"job {task.job.id} was killed: the kernel shut down"))
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=False)
        self.cluster.close(deadline - time.monotonic())
