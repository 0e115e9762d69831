"""The polycell kernel: ipykernel's IPython kernel, with background cells that start at once.

A stock ipykernel runs shell requests one at a time: a ``%%bg`` cell sent while
``time.sleep(30)`` runs waits 30 s in the queue before it can start its job.
`PolycellKernel` takes such requests out of the queue where ipykernel 7 first
sees them, in the *shell channel thread*, and starts their jobs there and then.

Which requests leave the queue (`out_of_queue_action` decides, from the code
and the request's metadata):

* a cell starting with ``%%bg``, or a one-line ``%bg STATEMENT`` cell;
* a cell tagged ``bg`` or ``bg:MODE`` (JupyterLab sends the cell's tags in the
  request's ``metadata.tags``), or whose metadata says ``{"polycell": {"mode": M}}``;
* the job queries that never block: one-line ``%jobs``, ``%job kill N``, ``%job show N``.

It leaves the queue only if no earlier cell is still waiting for the main
thread (`MainThreadQueue`): otherwise it queues behind them, so "Run All" starts
it after the cells above it have started. Such a request gets what any request
gets, with its own parent header: status busy, ``execute_input`` with an
execution count, the job's handle, its ``execute_reply`` (an error reply, and
the error shown in the cell, if anything fails) and status idle. Everything
else queues for the main thread exactly as in ipykernel. The kernel also loads
the polycell extension itself, ends every job on shutdown, and lets
``input()``/``getpass()`` in a job prompt in the job's own cell.

What still runs on the shell channel thread, and holds up the routing of other
shell messages while it does: starting a job, which for ``--mode dask`` may
mean connecting to the cluster and cloudpickling the cell's inputs. ``%job kill``
waits for the job in a thread of its own.

All reaching into ipykernel internals is in `Ipykernel74` (ipykernel_internals.py), and
for ipykernel's IOPub thread in `BatchingIOPubSocket` (iopub_batch.py).
"""

from __future__ import annotations

import builtins
import contextvars
import getpass
import sys
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from IPython.core.error import StdinNotImplementedError, UsageError
from tornado.ioloop import IOLoop

from polycell import history_pacing
from polycell.interrupts import BackgroundThread
from polycell.iopub_batch import BatchingIOPubSocket
from polycell.ipykernel_internals import Ipykernel74
from polycell.job import JobError, current_job, one_line
from polycell.job_table import jobs
from polycell.out_of_queue import ExecutionCounter, MainThreadQueue, OutOfQueue, out_of_queue_action

# The out_of_queue names stay importable from here, where they were first defined.
__all__ = ["ExecutionCounter", "MainThreadQueue", "OutOfQueue", "PolycellKernel", "out_of_queue_action"]

#: Whether the front end that sent the request that started a job accepts
#: ``input_request``s (the request's ``allow_stdin``). A job's context is copied
#: from its request's, so a job sees its own cell's answer, not the foreground's.
request_allow_stdin: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "polycell_request_allow_stdin", default=False
)


class PolycellKernel(Ipykernel74):
    """IPython kernel whose background cells start at once, however busy the main thread is."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.iopub_socket = BatchingIOPubSocket(self.iopub_socket)  # before polycell takes it
        self.shell_replies = self._send_replies_directly()
        self.shell.displayhook.pub_socket = self.shell.display_pub.pub_socket = self.iopub_socket
        self.counter = ExecutionCounter(self.shell)
        self.main_queue = MainThreadQueue()
        self._stdin_lock = threading.Lock()
        self._forward_input(False)  # so a job started before any foreground cell can ask too
        try:
            self.shell.extension_manager.load_extension("polycell")
        except Exception:
            self.log.error("polycell: could not load the extension", exc_info=True)

    @property
    def polycell(self) -> Any:
        """The loaded extension (None after ``%unload_ext polycell``)."""
        from polycell.extension import loaded

        return loaded(self.shell)

    # -- the interception point -----------------------------------------------------------

    async def shell_channel_thread_main(self, msg: list[Any]) -> None:
        """Start background cells here and now; queue everything else as ipykernel does."""
        request = self._look(msg)
        if request is not None:
            idents, frames, header, metadata, content = request
            if self._take_out_of_queue(idents, frames, header, metadata, content):
                return
            if header.get("subshell_id") is None and not content.get("silent") and self._signed(frames):
                self.main_queue.handed(str(header.get("msg_id")))
        await super().shell_channel_thread_main(msg)

    async def dispatch_shell(
        self, msg: list[Any], /, subshell_id: str | None = None, *, concurrent: bool = False
    ) -> None:
        """As ipykernel; first mark a queued execute request as begun (`MainThreadQueue`)."""
        if subshell_id is None and not concurrent and len(msg) > 1 and len(self.main_queue):
            try:
                _, frames = self.session.feed_identities(msg, copy=False)
                header = self.session.unpack(frames[1].bytes)
            except Exception:  # noqa: BLE001 - ipykernel reports the malformed message
                header = {}
            if header.get("msg_type") == "execute_request":
                self.main_queue.started(str(header.get("msg_id")))
        with history_pacing.answering(self.shell.history_manager):  # the reply before the history write
            await super().dispatch_shell(msg, subshell_id=subshell_id, concurrent=concurrent)

    def _look(self, msg: list[Any]) -> tuple[list[bytes], list[Any], dict, dict, dict] | None:
        """An execute request's idents, frames, header, metadata and content; None for others."""
        if self.session is None:
            return None
        try:
            idents, frames = self.session.feed_identities(msg, copy=False)
            header, metadata, content = self._peek(frames)
        except Exception:  # noqa: BLE001 - a malformed message is ipykernel's to report
            return None
        if header.get("msg_type") != "execute_request":
            return None
        return idents, frames, header, metadata or {}, content

    def _take_out_of_queue(
        self,
        idents: list[bytes],
        frames: list[Any],
        header: dict[str, Any],
        metadata: dict[str, Any],
        content: dict[str, Any],
    ) -> bool:
        if self.polycell is None or content.get("silent") or header.get("subshell_id") is not None:
            return False
        action = out_of_queue_action(str(content.get("code", "")), metadata)
        if action is None or not self._is_polycell_magic(action):
            return False
        if len(self.main_queue):
            return False  # an earlier cell still waits for the main thread: go after it
        try:
            # The full deserialize checks the signature and records it against replays.
            request = self.session.deserialize(frames, content=True, copy=False)
        except Exception:
            self.log.error("polycell: invalid message", exc_info=True)
            return True
        if _waits_for_a_job(action):
            # Up to half a second: done in a thread of its own, so that the shell
            # channel thread goes on routing every other message meanwhile.
            loop = IOLoop.current()
            BackgroundThread(
                target=self._run_out_of_queue,
                args=(idents, request, action, partial(loop.add_callback, self._send_reply)),
                name="polycell-job-kill",
                daemon=True,
            ).start()
        else:
            with history_pacing.answering(self.shell.history_manager):
                self._run_out_of_queue(idents, request, action, self._send_reply)
        return True

    def _is_polycell_magic(self, action: OutOfQueue) -> bool:
        """True unless the magic the action names is not polycell's (a user's own %bg)."""
        from polycell.magics import PolycellMagics

        if action.kind == "cell":
            return True
        find = self.shell.find_cell_magic if action.kind == "cell_magic" else self.shell.find_line_magic
        return isinstance(getattr(find(action.magic), "__self__", None), PolycellMagics)

    def _run_out_of_queue(
        self,
        idents: list[bytes],
        request: dict[str, Any],
        action: OutOfQueue,
        send_reply: Callable[[list[bytes], dict[str, Any], dict[str, Any]], object],
    ) -> None:
        """busy, execute_input, the cell's output, execute_reply, idle: whatever goes wrong.

        Nothing raised here may skip the reply and the idle status: the front end
        would show the cell busy for ever. `send_reply` sends both, on the shell
        channel thread (a ZMQ stream is not for other threads).
        """
        reply: dict[str, Any] | None = None
        try:
            with self.iopub_socket.held():  # busy, execute_input, the handle: one hand-over
                self._publish_status("busy", "shell", parent=request)
                reply = contextvars.copy_context().run(self._start_in_context, idents, request, action)
        except BaseException as exc:  # not even a KeyboardInterrupt may leave the cell busy
            name = type(exc).__name__
            reply = {
                "status": "error",
                "execution_count": self.shell.execution_count,
                "ename": name,
                "evalue": str(exc),
                "traceback": [f"{name}: {exc}"],
            }
            raise
        finally:
            send_reply(idents, request, reply)

    def _flush_std_streams(self) -> None:
        """What this request printed goes out before its reply, as ipykernel does, and after its busy."""
        self.iopub_socket.release()
        sys.stdout.flush()
        sys.stderr.flush()

    def _send_reply(self, idents: list[bytes], request: dict[str, Any], reply: dict[str, Any] | None) -> None:
        try:
            if reply is not None:
                metadata = self.init_metadata(request)
                metadata = self.finish_metadata(request, metadata, reply)
                self.session.send(
                    self.shell_replies, "execute_reply", reply, request, metadata=metadata, ident=idents
                )
        finally:
            self._publish_status("idle", "shell", parent=request)

    def _start_in_context(
        self, idents: list[bytes], request: dict[str, Any], action: OutOfQueue
    ) -> dict[str, Any]:
        """Start the job with `request` as parent of everything it sends; returns the reply content.

        Any exception becomes an error reply and is shown in the cell as IPython
        shows errors: a UsageError (or JobError) as its one line, a SyntaxError
        as IPython shows one, anything else as ``ename: evalue`` (the frames
        would be polycell's own, of no use to the user).
        """
        self._set_request_parent(idents, request)
        polycell = self.polycell
        if polycell is not None:
            polycell.note_request(request)  # %jobs here replaces what its cell showed: see control.py
        content = request["content"]
        code = content.get("code", "")
        request_allow_stdin.set(bool(content.get("allow_stdin", False)))
        count = self.shell.execution_count
        try:
            if content.get("store_history", True):
                count = self.counter.reserve(code)
            self._publish_execute_input(code, request, count)
            self._start(action, count)
        except (UsageError, JobError) as exc:
            error = exc if isinstance(exc, UsageError) else UsageError(str(exc))
            self.shell.show_usage_error(error)
            self._flush_std_streams()
            return {"status": "error", "execution_count": count, "ename": "UsageError", "evalue": str(error),
                    "traceback": []}  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - shown in the cell, and the cell replies
            return {"status": "error", "execution_count": count, **self._show_error(exc, request)}
        if action.kind == "line_magic":  # %job kill, %job wait print
            self._flush_std_streams()
        # A started job printed nothing here (its output goes through the publisher),
        # and skipping the flush, a wait for ipykernel's iopub thread, makes its start cheaper.
        # user_expressions are not evaluated here: they are arbitrary user code, and
        # this thread runs at the same time as the main thread's cell.
        return {"status": "ok", "execution_count": count, "payload": [], "user_expressions": {}}

    def _start(self, action: OutOfQueue, count: int) -> None:
        from polycell.extension import cell_execution_count

        cell_execution_count.set(count)
        if action.kind == "cell_magic":
            self.shell.find_cell_magic(action.magic)(action.line, action.cell)
        elif action.kind == "line_magic":
            self.shell.find_line_magic(action.magic)(action.line)
        else:
            self.polycell.run_cell(action.cell, mode=action.mode)

    def _show_error(self, exc: BaseException, request: dict[str, Any]) -> dict[str, Any]:
        """Show `exc` in the request's cell; returns the ename/evalue/traceback of the reply."""
        try:
            if isinstance(exc, SyntaxError):  # as IPython's showsyntaxerror, without a stack
                stb = self.shell.SyntaxTB.structured_traceback(type(exc), exc, [])
            else:
                stb = self.shell.InteractiveTB.get_exception_only(type(exc), exc)
        except Exception:  # noqa: BLE001 - the formatter failed: the plain line will do
            stb = [one_line(exc, 1000)]
        error = {"ename": type(exc).__name__, "evalue": str(exc), "traceback": list(stb)}
        self._flush_std_streams()  # as ipykernel: what the cell printed comes before its error
        self._publish_error(error, request)
        return error

    # -- the foreground ---------------------------------------------------------------------

    async def execute_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        """Queued cells, as in ipykernel; a counted main-thread cell keeps its number."""
        content = parent.get("content", {})
        counted = (
            not content.get("silent", False)
            and content.get("store_history", True)
            and parent.get("header", {}).get("subshell_id") is None
        )
        if not counted:
            await super().execute_request(stream, ident, parent)
            return
        with self.counter.foreground():
            await super().execute_request(stream, ident, parent)

    def _forward_input(self, allow_stdin: bool = False) -> None:
        """As ipykernel, and remember `allow_stdin` for the jobs this request starts."""
        request_allow_stdin.set(allow_stdin)
        self._allow_stdin = allow_stdin
        # input() and getpass() stay forwarded between cells, so that a job asking
        # for input after its cell has ended still reaches the front end.
        if builtins.input is not self.raw_input:
            self._sys_raw_input = builtins.input
            builtins.input = self.raw_input
        if getpass.getpass is not self.getpass:
            self._save_getpass = getpass.getpass
            getpass.getpass = self.getpass

    def _restore_input(self) -> None:
        """Kept forwarded (see `_forward_input`); restored at shutdown."""

    def _really_restore_input(self) -> None:
        if builtins.input is self.raw_input:
            builtins.input = self._sys_raw_input
        if getpass.getpass is self.getpass:
            getpass.getpass = self._save_getpass

    # -- input() in jobs ---------------------------------------------------------------------

    def raw_input(self, prompt: str = "") -> str:
        if current_job.get() is None:
            return super().raw_input(prompt)
        return self._job_input(str(prompt), password=False)

    def getpass(self, prompt: str = "", stream: Any = None, *, echo_char: str | None = None) -> str:
        if current_job.get() is None:
            return super().getpass(prompt, stream, echo_char=echo_char)
        return self._job_input(prompt, password=True)

    def _job_input(self, prompt: str, *, password: bool) -> str:
        """An input_request in the job's own cell: the job's context holds that cell's parent."""
        job = current_job.get()
        if not request_allow_stdin.get():
            what = "getpass()" if password else "input()"
            raise StdinNotImplementedError(
                f"{what} was called in background job {job.id if job else '?'}, but the front end "
                "that started it does not accept input requests (allow_stdin is false)"
            )
        if (polycell := self.polycell) is not None:
            polycell.publisher.flush(2)  # the job's output so far comes before its prompt
        return self._input_request(
            prompt, self._get_shell_context_var(self._shell_parent_ident), self.get_parent("shell"), password
        )

    def _input_request(self, prompt: str, ident: Any, parent: Any, password: bool = False) -> str:
        """One prompt at a time: the foreground and every job share one stdin socket."""
        with self._stdin_lock:
            return super()._input_request(prompt, ident, parent, password=password)

    # -- shutdown ----------------------------------------------------------------------------
    #
    # No interrupt override: ipykernel 7.4's interrupt (``_send_interrupt_children``)
    # signals the kernel's own process group, and every process polycell starts
    # for a job (a process job's child, a map's workers) leads a group of its own.

    def do_shutdown(self, restart: bool) -> dict[str, Any]:
        """End every job, saying so in its cell, before the kernel goes."""
        self.end_jobs("kernel restarting" if restart else "kernel shutting down")
        self.counter.close()
        self._really_restore_input()
        return super().do_shutdown(restart)

    def end_jobs(self, reason: str) -> list[Any]:
        """Kill every job, each saying once in its cell ``[job N killed after 1.20s: <reason>]``."""
        running = jobs.running()
        for job in running:
            job.kill(timeout=0, reason=reason)  # ask them all first; the runners' shutdown waits
        jobs.shutdown()
        if (polycell := self.polycell) is not None:
            polycell.publisher.flush(2)
        if running:
            self.log.info("polycell: %d job(s) killed: %s", len(running), reason)
        return running


def _waits_for_a_job(action: OutOfQueue) -> bool:
    """``%job kill N`` waits (up to 0.5 s) to see the job end, to say honestly whether it did."""
    return action.kind == "line_magic" and action.magic == "job" and action.line.split()[:1] == ["kill"]
