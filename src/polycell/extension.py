"""The IPython side of polycell: starting cells as jobs and wiring their output to Jupyter.

``%load_ext polycell`` makes one `Polycell` for the shell. It owns the output
router (job output -> journal), the iopub publisher (journal -> the cell's
messages) and the magics, and it shares the process-wide `jobs` table.
"""

from __future__ import annotations

import atexit
import contextvars
import itertools
import sys
import threading
import uuid
from collections.abc import Callable
from typing import Any

from polycell import view
from polycell.cell import CellWork, CompiledCell, compile_cell
from polycell.control import ControlHandler
from polycell.history_pacing import paced_history
from polycell.interrupts import InterruptWaker
from polycell.iopub import IOPubPublisher, keep_every_message
from polycell.job import Job, JobError, JobState
from polycell.job_figures import install_job_figures, remove_job_figures, show_open_figures
from polycell.job_table import JobTable, jobs
from polycell.journal import Record
from polycell.journal_store import JournalStore, open_store
from polycell.program_output import install_program_capture, remove_program_capture
from polycell.rich_output import RichSupport
from polycell.routing import OutputRouter, write_error, write_result

__all__ = ["Polycell", "cell_execution_count", "load_ipython_extension", "unload_ipython_extension"]

#: The execution count of the request starting a job, when it is not the shell's
#: current cell: the polycell kernel starts ``%%bg`` cells off the main thread,
#: while another cell is running, and sets this in the context it starts them in.
cell_execution_count: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "polycell_cell_execution_count", default=None
)


#: Makes display ids unique across kernels (job ids restart at 1), without a uuid4 (a
#: system call) for every job on the thread that starts them; also tells a front end
#: whether a handle saved in a notebook is of a job of the kernel running now.
_PROCESS_TAG = uuid.uuid4().hex[:8]
_HANDLE_NUMBERS = itertools.count(1)

#: In the kernel's help links (its kernel_info reply, which every front end asks for
#: when it connects, and shows in its Help menu): the JupyterLab extension asks a
#: kernel about its jobs only when polycell is there to answer.
HELP_LINK = {"text": "polycell", "url": "https://pypi.org/project/polycell/"}


def _cell_of(request: dict[str, Any]) -> str | None:
    """The id of the notebook cell that sent `request` (``metadata.cellId``), if it has one and a msg_id."""
    cell_id = request.get("metadata", {}).get("cellId")
    msg_id = request.get("header", {}).get("msg_id")
    return cell_id if isinstance(cell_id, str) and cell_id and isinstance(msg_id, str) else None


class JobHandle:
    """What ``%%bg`` shows: the job's id, name, mode and status, kept up to date.

    Made once (`first`), after the job was handed to its runner: a change of state
    before that needs no update, since the handle shows it (`stale`).
    """

    def __init__(self, job: Job) -> None:
        self.job = job
        self.display_id = f"polycell-{_PROCESS_TAG}-{job.id}-{next(_HANDLE_NUMBERS)}"
        self._made = threading.Lock()
        self._shown = False

    def record(self, msg_type: str, state: view.HandleState) -> Record:
        """The handle as a record; its status also goes in the message's metadata (`polycell.iopub`)."""
        data = view.handle_bundle(self.job, _PROCESS_TAG, state)
        content = {"data": data, "metadata": {}, "transient": {"display_id": self.display_id}}
        mark = {"handle": True, "status": state.status.value}
        return {"msg_type": msg_type, "content": content, "polycell": mark}

    def first(self, *, ended_as_running: bool) -> Record:
        """The display that shows the handle, as of now (see `view.handle_state`)."""
        with self._made:
            self._shown = True
            return self.record("display_data", view.handle_state(self.job, ended_as_running=ended_as_running))

    def stale(self) -> bool:
        """After a change of state: does the handle shown need an update? (The end's follows the output.)"""
        with self._made:
            return self._shown and not self.job.done


class Polycell:
    """polycell loaded into one IPython shell."""

    def __init__(self, shell: Any, table: JobTable = jobs) -> None:
        self.shell = shell
        self.jobs = table
        self.kernel = getattr(shell, "kernel", None)
        if self.kernel is None:
            raise JobError("polycell needs a Jupyter kernel (ipykernel); this IPython has none")
        self.router = OutputRouter(shell)
        self.publisher = IOPubPublisher(self.kernel.session, self.kernel.iopub_socket)
        #: The msg_id of the last request each cell (by its id) ran; see `polycell.control`.
        self.cells: dict[str, str] = {}
        self.control = ControlHandler(table, self.cells, kernel_process=_PROCESS_TAG)
        self.store: JournalStore | None = None
        self.waker = InterruptWaker()
        self.rich = RichSupport(shell)

    def start(self) -> None:
        from polycell.magics import PolycellMagics

        keep_every_message(getattr(self.kernel, "iopub_thread", None))  # late output, not lost output
        self.router.install()
        install_program_capture()  # subprocess and os.system output of a job to its cell
        install_job_figures()  # a job's matplotlib figures in its cell only
        self.rich.install()  # rich renders in a job as in a foreground cell
        self.waker.install()  # a ■ another thread took still wakes the main thread
        self.shell.register_magics(PolycellMagics(self.shell, self))
        self.shell.user_ns["jobs"] = self.jobs
        self.control.install(self.kernel)
        self.shell.events.register("pre_run_cell", self._note_cell)
        if HELP_LINK not in self.kernel.help_links:
            self.kernel.help_links = [*self.kernel.help_links, HELP_LINK]
        self.store = open_store()
        if self.store is not None:
            for job in self.jobs:
                self.store.track(job)
            self.jobs.add_new_job_listener(self.store.track)
        # jobs.map(...) in a cell: show its handle and progress in that cell.
        self.jobs.on_new_job = self.attach
        atexit.register(self.close)

    def close(self, reason: str = "the kernel is exiting") -> list[Job]:
        """End every job (each cell says why) and stop routing; idempotent. Returns the jobs ended."""
        atexit.unregister(self.close)
        self.control.uninstall()
        self.kernel.help_links = [link for link in self.kernel.help_links if link != HELP_LINK]
        try:
            self.shell.events.unregister("pre_run_cell", self._note_cell)
        except ValueError:
            pass  # closed twice
        if self.jobs.on_new_job == self.attach:
            self.jobs.on_new_job = None
        running = self.jobs.running()
        for job in running:
            job.kill(timeout=0, reason=reason)  # ask them all first; the runners' shutdown waits
        self.jobs.shutdown()
        self.publisher.flush(2)
        self.publisher.close()
        self.router.uninstall()
        remove_program_capture()
        remove_job_figures()
        self.rich.uninstall()
        self.waker.uninstall()
        if self.store is not None:
            self.jobs.remove_new_job_listener(self.store.track)
            self.store.close()
            self.store = None
        return running

    # -- starting jobs -------------------------------------------------------------------

    def current_execution_count(self) -> int:
        """The number of the cell running now (IPython 8 and 9 count at different times)."""
        given = cell_execution_count.get()
        if given is not None:
            return given
        # DisplayHook.exec_result is the ExecutionResult of the cell being run (a trait
        # of IPython's displayhook, set by run_cell since IPython 8; checked by a test).
        running = getattr(self.shell.displayhook, "exec_result", None)
        count = getattr(running, "execution_count", None)
        return count if isinstance(count, int) else self.shell.execution_count

    @staticmethod
    def choose_mode(cell: CompiledCell, mode: str | None) -> str:
        """The default mode: task when the cell has a top-level await, else thread.

        A given mode is checked by `JobTable.runner`, the one place that knows them all.
        """
        if mode is None:
            return "task" if cell.is_async else "thread"
        return mode

    def run_cell(
        self,
        raw_cell: str,
        *,
        mode: str | None = None,
        name: str | None = None,
        backend: str | None = None,
    ) -> Job:
        """Start a cell as a background job of the current cell.

        `backend` picks the event loop of a task job (asyncio by default, or trio).
        A cell that does not compile raises its SyntaxError here, in the foreground,
        so the cell that started it fails like any cell with a syntax error.
        """
        if not raw_cell.strip():
            raise JobError("%%bg: the cell is empty; put the code to run in the background below %%bg")
        count = self.current_execution_count()
        cell = compile_cell(self.shell, raw_cell, count)
        if mode is None and backend is not None:
            mode = "task"
        mode = self.choose_mode(cell, mode)
        runner = self.jobs.runner(mode, backend)  # checks both, before any job exists
        shell, router = self.shell, self.router
        job: Job

        def on_error(exc: BaseException) -> None:
            # Whatever a kill raises in the job (JobKilled, asyncio or trio cancellation)
            # is the kill's doing, not an error of the cell; the same exceptions raised
            # without a kill (awaiting a killed job, a cancelled inner task) are errors.
            if not job.kill_requested:
                write_error(job, shell, exc, cell.filename)

        def in_child() -> None:
            # In a forked child every output is this job's, even from threads it starts.
            router.default_job = job

        work = CellWork(
            cell,
            shell.user_ns,
            on_value=lambda value: write_result(job, shell, value, count),
            on_error=on_error,
            on_end=show_open_figures,  # as the inline backend does when a cell ends
            in_child=in_child,
            hidden=self._hidden_names,  # what dask does not ship: IPython's own names
        )
        job = self.jobs.new_job(mode, name=name, source=raw_cell)
        if backend is not None:
            job.info["backend"] = backend
        try:
            self.attach(job, start=lambda: runner.submit(job, work))
        except BaseException as exc:
            job.set_exception(exc)  # a job that could not start must not stay "pending"
            raise
        return job

    def _hidden_names(self) -> list[str]:
        """Names not to ship: IPython's own (In, Out, exit...) and `jobs`, while still theirs."""
        ns, hidden = self.shell.user_ns, self.shell.user_ns_hidden
        # A snapshot (taken at once, under the GIL): another thread may be storing an input,
        # whose `_iN` names IPython adds to both.
        absent = object()
        names = [n for n, v in list(hidden.items()) if ns.get(n, absent) is v]
        if ns.get("jobs") is self.jobs:
            names.append("jobs")
        return names

    def attach(self, job: Job, start: Callable[[], object] | None = None) -> None:
        """Show the job's handle in the current cell and send its output there, live.

        `start`, if given, hands the job to its runner: it is called before the
        handle is made, so a job its runner starts at once (thread, task, process)
        is first shown running, not pending followed by an update a moment later.
        If it raises, no handle is shown.

        The cell's id, which JupyterLab and Notebook 7 send with each request
        (``metadata.cellId``), is kept with the job (``job.info["cell_id"]``), so a
        client can tell which cell of its notebook a job belongs to. The request is
        not noted as its cell's latest here: that was done when it began
        (`note_request`), and a job's thread may start a job long after its cell
        ran something else.
        """
        parent = self.shell.parent_header
        cell_id = _cell_of(parent)
        if cell_id is not None:
            job.info["cell_id"] = cell_id
            job.info["request"] = parent["header"]["msg_id"]
        self._follow(job, replay=False, start=start)

    def note_request(self, request: dict[str, Any]) -> str | None:
        """Remember that a notebook cell ran `request`; returns the cell's id, if it has one.

        Called for every execute request: from ``pre_run_cell`` for the ones the
        main thread runs, and by the polycell kernel for the ones it starts off the
        main thread. A front end puts a job back into its cell only while the cell
        has run nothing since (`polycell.control`).
        """
        cell_id = _cell_of(request)
        if cell_id is not None:
            self.cells[cell_id] = request["header"]["msg_id"]  # one dict store: atomic for the control thread
        return cell_id

    def _note_cell(self, _info: Any) -> None:
        """pre_run_cell: the request the main thread runs now is its cell's latest.

        Also where IPython's history thread gets its `PacedSaveFlag` (again after a fork),
        before the cell's input is stored.
        """
        self.note_request(self.shell.parent_header)
        paced_history(self.shell.history_manager)

    def show(self, job: Job) -> None:
        """Replay a job's journal into the current cell, then follow it live."""
        self._follow(job, replay=True)

    def _follow(self, job: Job, *, replay: bool, start: Callable[[], object] | None = None) -> None:
        parent = self.shell.parent_header
        handle = JobHandle(job)

        def update() -> None:
            self.publisher.send(job.id, parent, handle.record("update_display_data", view.handle_state(job)))

        # A notebook (JupyterLab, Notebook 7) sends the cell's id with each request and
        # redraws the handle when it is updated; a terminal front end (jupyter console)
        # ignores display updates, so it is also told how the job ended in a line.
        # Not journaled: the handle says it everywhere else. Killed jobs already say so.
        says_how_it_ended = not parent.get("metadata", {}).get("cellId")

        def end() -> None:
            update()
            if says_how_it_ended and job.status is not JobState.KILLED:
                line = f"[job {job.id} {job.status.value} after {view.format_elapsed(job.elapsed)}]\n"
                stream = {"name": "stderr" if job.status is JobState.FAILED else "stdout", "text": line}
                record = {"msg_type": "stream", "content": stream, "polycell": {"end_line": True}}
                self.publisher.send(job.id, parent, record)

        if threading.current_thread() is threading.main_thread():
            # What the cell printed before it started the job comes first, as with
            # display(). (A cell the kernel starts from its shell channel thread
            # has printed nothing, and that flush is a wait for ipykernel's iopub thread.)
            sys.stdout.flush()
            sys.stderr.flush()

        job.add_state_listener(lambda _: update() if handle.stale() else None)
        if start is not None:
            start()
        first = handle.first(ended_as_running=not replay)
        # Sent from this thread, before the cell's reply and idle status (a front end
        # that stops listening to a cell at its idle, nbclient or papermill, still
        # records it), and before anything for this cell is queued: every later update
        # and every output goes through the publisher, after it.
        self.publisher.send_now(job.id, parent, first)
        # The final update is sent after the job's last output, so the handle never
        # says "done" while its traceback is still on its way.
        # A job just started may have printed already: that, too, comes after its handle.
        self.publisher.follow(job, parent, replay=replay or start is not None, on_end=end)
        if replay:
            # The replay (all of it, for a job that ended) reaches the socket before the
            # cell's idle: nbclient and papermill stop listening to a cell there.
            self.publisher.flush(_REPLAY_FLUSH_SECONDS)


#: How long ``%job show`` waits for its replay to be sent (a journal of many megabytes takes that long).
_REPLAY_FLUSH_SECONDS = 10.0


_loaded: dict[int, Polycell] = {}


def load_ipython_extension(shell: Any) -> None:
    if id(shell) in _loaded:
        return
    polycell = Polycell(shell)
    polycell.start()
    _loaded[id(shell)] = polycell


def unload_ipython_extension(shell: Any) -> None:
    polycell = _loaded.pop(id(shell), None)
    if polycell is None:
        return
    ended = polycell.close("%unload_ext polycell")
    if ended:
        names = ", ".join(f"job {job.id} {job.name!r}" for job in ended)
        print(f"polycell unloaded: {len(ended)} running job(s) killed: {names}")


def loaded(shell: Any) -> Polycell | None:
    return _loaded.get(id(shell))
