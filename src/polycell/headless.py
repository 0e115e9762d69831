"""Running a notebook without a browser, keeping every job's output in the cell that started it.

nbclient (and so papermill and ``nbconvert --execute``) stops listening to a
cell at its ``status: idle``; a ``%%bg`` cell is idle at once, and what its job
prints later used to be dropped. `FollowJobs` is a mixin for nbclient's
`NotebookClient` that keeps it: a second client of the same kernel
(`JobWatch`) reads every iopub message, and what arrives for a cell after that
cell's idle is handed to nbclient's own ``process_message`` for that cell, on
nbclient's thread, between cells and until every job has ended. The job's
cell is known from the parent msg_id that every message of the job carries,
so this works on the polycell kernel and on a stock ipykernel with
``%load_ext polycell`` alike; how a job ended comes from its handle's message
metadata (``metadata.polycell.status``, see `polycell.iopub`).

Used by ``polycell run`` (`run_notebook`) and by the papermill engine
(`polycell.papermill_engine`), through nbclient's public hooks and methods only.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from polycell.interrupts import ctrl_c_deferred

__all__ = ["FINAL_STATUSES", "OUTPUT_TYPES", "FollowJobs", "JobOutcome", "JobWatch", "Settled"]

FINAL_STATUSES = frozenset({"done", "failed", "killed"})
#: The iopub messages that change what a cell shows.
OUTPUT_TYPES = frozenset(
    {"stream", "display_data", "update_display_data", "execute_result", "error", "clear_output"}
)
#: nbclient must not write the runs it makes into the user's IPython history.
NO_HISTORY = "--HistoryManager.hist_file=:memory:"


@dataclass
class JobOutcome:
    """What a headless run learnt of one job from its messages."""

    id: int
    cell_msg_id: str
    status: str = "pending"
    last_line: str = ""
    error: str = ""


@dataclass
class Settled:
    """How a run's jobs ended: one line per job that failed, and per job that did not end in time."""

    failed: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)


@dataclass
class _CellState:
    idle: bool = False
    late: list[dict[str, Any]] = field(default_factory=list)


class JobWatch:
    """A second client of the kernel that sees every iopub message, from a thread of its own."""

    def __init__(self, kernel_manager: Any, timeout: float = 60) -> None:
        from jupyter_client import BlockingKernelClient

        # Blocking, whatever nbclient's manager makes (an async client): it runs on a thread.
        self.connection_file = kernel_manager.connection_file
        self.client = BlockingKernelClient()
        self.client.load_connection_file(self.connection_file)
        self.client.start_channels()
        # Once it answers, the iopub subscription is in place: nothing later is missed.
        self.client.wait_for_ready(timeout=timeout)
        self._changed = threading.Condition()
        self._messages = self._seen_messages = 0
        self._cells: dict[str, _CellState] = {}
        self.jobs: dict[int, JobOutcome] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="polycell-run-iopub", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.stop_channels()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.client.get_iopub_msg(timeout=0.1)
            except queue.Empty:
                continue
            except Exception:  # noqa: BLE001 - the channel closed as the kernel went away
                return
            with self._changed:
                self._take(msg)
                self._messages += 1
                self._changed.notify_all()

    def _take(self, msg: dict[str, Any]) -> None:
        parent = msg.get("parent_header", {}).get("msg_id", "")
        cell = self._cells.setdefault(parent, _CellState())
        msg_type, content = msg["msg_type"], msg["content"]
        if is_end_line(msg):
            return  # for terminals; here the job's handle says how it ended
        mark = (msg.get("metadata") or {}).get("polycell") or {}
        if msg_type == "status" and content.get("execution_state") == "idle":
            cell.idle = True
        elif cell.idle and msg_type in OUTPUT_TYPES:
            cell.late.append(msg)
        if "job" not in mark:
            return
        job = self.jobs.setdefault(mark["job"], JobOutcome(mark["job"], parent))
        if mark.get("handle") and job.status not in FINAL_STATUSES:
            job.status = mark.get("status", job.status)
        if msg_type == "stream":
            lines = content["text"].strip().splitlines()
            if lines:
                job.last_line = lines[-1]
        elif msg_type == "error":
            job.error = f"{content['ename']}: {content['evalue']}"

    def take_late(self, cell_msg_id: str) -> list[dict[str, Any]]:
        """The output messages for this cell that came after its idle, since the last call."""
        with self._changed:
            cell = self._cells.get(cell_msg_id)
            if cell is None or not cell.late:
                return []
            late, cell.late = cell.late, []
            return late

    def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait until `done()` (called under the watch's lock) is true; False at the timeout."""
        with self._changed:
            return self._changed.wait_for(done, timeout)

    def wait_for_news(self, timeout: float) -> None:
        """Return at the next message (or one already read since the last call), or at the timeout."""
        with self._changed:
            seen = self._seen_messages
            self._changed.wait_for(lambda: self._messages != seen, timeout)
            self._seen_messages = self._messages

    def seen_idle(self, cell_msg_ids: list[str]) -> Callable[[], bool]:
        return lambda: all(self._cells.get(m, _CellState()).idle for m in cell_msg_ids)

    def running(self) -> list[JobOutcome]:
        with self._changed:
            return [job for job in self.jobs.values() if job.status not in FINAL_STATUSES]

    def kill(self, jobs: list[JobOutcome], timeout: float = 10) -> None:
        """Ask the kernel to kill these jobs, as ``polycell kill`` does (over the control channel)."""
        from polycell.kernel_link import CliError, KernelLink

        with KernelLink(self.connection_file, timeout) as link:
            for job in jobs:
                try:
                    link.request("kill", job=job.id)
                except CliError:
                    continue  # it ended meanwhile, or the kernel is gone: its handle says which


def is_end_line(msg: dict[str, Any]) -> bool:
    """The line that tells a terminal front end how a job ended (see `polycell.extension`)."""
    return bool(((msg.get("metadata") or {}).get("polycell") or {}).get("end_line"))


class FollowJobs:
    """Mixin for an nbclient `NotebookClient`: every job's output lands in its cell, then waits for jobs.

    Call `start_following` once the kernel is up (inside ``setup_kernel``), run the
    cells, then `settle_jobs`. Late output is applied by `apply_late_output`,
    which the hook ``on_cell_executed`` also calls between cells.
    """

    watch: JobWatch | None = None

    def start_following(self) -> None:
        self.watch = JobWatch(self.km, timeout=self.startup_timeout)  # type: ignore[attr-defined]
        self._cell_of_msg: dict[str, int] = {}
        self._clear_pending: dict[int, bool] = {}
        self._touched: set[int] = set()
        chained = self.on_cell_executed  # type: ignore[has-type]

        def executed(cell: Any, cell_index: int, execute_reply: dict[str, Any]) -> Any:
            self._cell_of_msg[execute_reply["parent_header"]["msg_id"]] = cell_index
            self.apply_late_output()
            return chained(cell=cell, cell_index=cell_index, execute_reply=execute_reply) if chained else None

        self.on_cell_executed = executed

    def output(self, outs: list[Any], msg: dict[str, Any], display_id: str | None, cell_index: int) -> Any:
        """nbclient's handler of one output message, minus polycell's lines for terminals."""
        if is_end_line(msg):
            return None  # the job's handle, saved in the notebook, says how it ended
        return super().output(outs, msg, display_id, cell_index)  # type: ignore[misc]

    def stop_following(self) -> None:
        if self.watch is not None:
            self.watch.close()

    def cell_index_of(self, job: JobOutcome) -> int | None:
        return self._cell_of_msg.get(job.cell_msg_id)

    def apply_late_output(self) -> None:
        """Put what came for finished cells after their idle into those cells.

        Ctrl-C waits until this is done: messages taken from the watch and not yet
        in their cell would be lost, and the interrupted run saves what it has.
        """
        with ctrl_c_deferred():  # a Ctrl-C meanwhile lands after it
            self._apply_late_output()

    def _apply_late_output(self) -> None:
        assert self.watch is not None
        current_clear = self.clear_before_next_output  # type: ignore[has-type]
        for msg_id, index in self._cell_of_msg.items():
            late = self.watch.take_late(msg_id)
            if not late:
                continue
            cell = self.nb.cells[index]  # type: ignore[attr-defined]
            # clear_output(wait=True) is pending per cell, not for whatever cell runs next.
            self.clear_before_next_output = self._clear_pending.get(index, False)
            for msg in late:
                self.process_message(msg, cell, index)  # type: ignore[attr-defined]
            self._clear_pending[index] = self.clear_before_next_output
            self._touched.add(index)
        self.clear_before_next_output = current_clear

    def merge_late_streams(self) -> None:
        """Adjacent text of one stream as one output, as nbclient leaves a cell it ran."""
        for index in self._touched:
            merged: list[Any] = []
            for output in self.nb.cells[index].outputs:  # type: ignore[attr-defined]
                last = merged[-1] if merged else None
                if (
                    last is not None
                    and output.get("output_type") == last.get("output_type") == "stream"
                    and output.get("name") == last.get("name")
                ):
                    last["text"] += output["text"]
                else:
                    merged.append(output)
            self.nb.cells[index].outputs = merged  # type: ignore[attr-defined]
        self._touched.clear()

    def settle_jobs(
        self, timeout: float | None, on_wait: Callable[[list[JobOutcome]], None] | None = None
    ) -> Settled:
        """Wait until every job the cells started has ended, applying its output as it comes.

        A job still running after `timeout` seconds is killed. Returns a line for each job
        that failed, or did not end in time, naming the job and its cell.
        """
        watch = self.watch
        assert watch is not None
        # Until this client has read as far as nbclient did, it may not know every job yet.
        watch.wait(watch.seen_idle(list(self._cell_of_msg)), 30)
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out: set[int] = set()
        while running := watch.running():
            if on_wait is not None:
                on_wait(running)
            if deadline is not None and time.monotonic() >= deadline:
                timed_out.update(job.id for job in running)
                watch.kill(running)
                watch.wait(lambda: not watch.running(), 30)  # for the kills to be reported
                break
            remaining = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            watch.wait_for_news(remaining)
            self.apply_late_output()
        self.apply_late_output()
        self.merge_late_streams()
        settled = Settled()
        for job in sorted(watch.jobs.values(), key=lambda j: j.id):
            index = self.cell_index_of(job)
            where = f"cell {index + 1}" if index is not None else "another cell"
            if job.id in timed_out:
                late = f"was still running after {timeout:g} s: killed"
                settled.unfinished.append(f"job {job.id} ({where}) {late}")
            elif job.status == "failed":
                settled.failed.append(f"job {job.id} ({where}) failed: {job.error or 'see its cell'}")
            elif job.status not in FINAL_STATUSES:
                settled.unfinished.append(f"job {job.id} ({where}) never reported its end")
        return settled

    def kill_running_jobs(self) -> None:
        """Ask the kernel to kill every job that has not ended (Ctrl-C, a run given up)."""
        if self.watch is None:
            return
        self.watch.kill(self.watch.running(), timeout=5)
        self.watch.wait(lambda: not self.watch.running(), 10)  # type: ignore[union-attr]
        self.apply_late_output()
