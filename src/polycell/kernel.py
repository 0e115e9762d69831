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

Such a request gets what any request gets, with its own parent header: status
busy, ``execute_input`` with an execution count, the job's handle, its
``execute_reply``, status idle. Everything else queues for the main thread
exactly as in ipykernel. The kernel also loads the polycell extension itself,
keeps interrupts away from background jobs, ends every job on shutdown, and
lets ``input()``/``getpass()`` in a job prompt in the job's own cell.

All reaching into ipykernel internals is in `_Ipykernel74`, below.
"""

from __future__ import annotations

import builtins
import contextvars
import getpass
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ipykernel.ipkernel import IPythonKernel
from IPython.core.error import StdinNotImplementedError, UsageError

from polycell.job import JobError, current_job
from polycell.job_table import jobs

__all__ = ["OutOfQueue", "PolycellKernel", "out_of_queue_action"]

#: Whether the front end that sent the request that started a job accepts
#: ``input_request``s (the request's ``allow_stdin``). A job's context is copied
#: from its request's, so a job sees its own cell's answer, not the foreground's.
request_allow_stdin: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "polycell_request_allow_stdin", default=False
)


# -- which requests leave the queue ------------------------------------------------------


@dataclass(frozen=True)
class OutOfQueue:
    """What to do with a request that does not wait for the main thread.

    `kind` is ``"cell_magic"`` (``%%bg``: `magic`, `line`, `cell`),
    ``"line_magic"`` (``%bg``/``%jobs``/``%job``: `magic`, `line`) or
    ``"cell"`` (a tagged cell: `cell` run whole, in `mode`, None for the default).
    """

    kind: str
    magic: str = ""
    line: str = ""
    cell: str = ""
    mode: str | None = None


_CELL_MAGIC = re.compile(r"%%bg(?:[ \t]+(.*))?$")
_NO_MODE = object()


def requested_mode(metadata: Mapping[str, Any]) -> Any:
    """The mode a request's metadata asks for (None = the default), or `_NO_MODE`."""
    polycell = metadata.get("polycell")
    if isinstance(polycell, Mapping) and "mode" in polycell:
        mode = polycell["mode"]
        return mode or None
    tags = metadata.get("tags")
    if isinstance(tags, (list, tuple)):
        for tag in tags:
            if tag == "bg":
                return None
            if isinstance(tag, str) and tag.startswith("bg:"):
                return tag[3:] or None
    return _NO_MODE


def out_of_queue_action(code: str, metadata: Mapping[str, Any]) -> OutOfQueue | None:
    """How to run an execute request off the queue, or None to queue it as usual."""
    lines = code.splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    first = lines[0].rstrip() if lines else ""
    rest = "\n".join(lines[1:])
    match = _CELL_MAGIC.match(first)
    if match:
        return OutOfQueue("cell_magic", magic="bg", line=match.group(1) or "", cell=rest)
    if first.startswith("%") and not rest.strip():
        word, _, arg = first.partition(" ")
        action = arg.split()[:1]
        never_blocks = word in {"%bg", "%jobs"} or (word == "%job" and action in (["kill"], ["show"]))
        if never_blocks:
            return OutOfQueue("line_magic", magic=word[1:], line=arg.strip())
    mode = requested_mode(metadata)
    if mode is not _NO_MODE:
        if mode is not None and not isinstance(mode, str):
            mode = str(mode)
        return OutOfQueue("cell", cell=code, mode=mode)
    return None


# -- execution counts ---------------------------------------------------------------------


class ExecutionCounter:
    """Execution counts for out-of-queue cells that never collide with the foreground's.

    IPython numbers a cell when it starts and moves ``shell.execution_count`` on
    when it ends. An out-of-queue cell that arrives while a counted foreground
    cell N runs takes N+1 (then N+2...), and the shell's count moves past them
    when cell N ends, so ``In[N]``/``Out[N]`` of the running cell stay N and the
    history stays in order. With the main thread idle it simply takes the next count.
    """

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._lock = threading.Lock()
        self._foreground = False
        self._base = 0
        self._deferred: list[tuple[int, str]] = []

    @contextmanager
    def foreground(self) -> Iterator[None]:
        """Around a counted foreground cell on the main thread."""
        with self._lock:
            self._foreground = True
            self._base = self.shell.execution_count
        try:
            yield
        finally:
            with self._lock:
                self._foreground = False
                deferred, self._deferred = self._deferred, []
                for count, code in deferred:
                    self.shell.history_manager.store_inputs(count, code)
                if deferred:
                    last = deferred[-1][0]
                    self.shell.execution_count = max(self.shell.execution_count, last + 1)

    def reserve(self, code: str) -> int:
        """A fresh execution count for an out-of-queue cell (its input goes to the history)."""
        with self._lock:
            if self._foreground:
                count = self._base + 1 + len(self._deferred)
                self._deferred.append((count, code))
                return count
            count = self.shell.execution_count
            self.shell.history_manager.store_inputs(count, code)
            self.shell.execution_count = count + 1
            return count


# -- the kernel -----------------------------------------------------------------------------


class _Ipykernel74(IPythonKernel):
    """The ipykernel internals polycell relies on, in one place.

    Written against ipykernel 7.4.0; tests/test_kernel.py::test_ipykernel_internals
    fails if any of them moves. Each is used only here:

    * ``shell_channel_thread_main(msg)``: the coroutine the shell channel thread
      runs for every message arriving on the shell socket, before it is queued
      for the main thread (or a subshell). This is the interception point.
    * ``_shell_parent`` / ``_shell_parent_ident``: the context variables that
      ``get_parent("shell")`` and ``raw_input`` read. ``set_parent`` sets them
      too, but also resets the kernel-wide fallbacks, which must keep pointing
      at the foreground cell; so they are set directly, in a copied context.
    * ``_publish_status``, ``_publish_execute_input``, ``_input_request``,
      ``_forward_input``/``_restore_input``, ``_send_interrupt_children``,
      ``_process_children``: the kernel's own helpers, reused as ipykernel uses them.
    """

    def _set_request_parent(self, idents: list[bytes], msg: dict[str, Any]) -> None:
        """Make `msg` the parent in the current context only (kernel, shell, streams, displays)."""
        self._shell_parent.set(msg)
        self._shell_parent_ident.set(idents)
        self.shell.set_thread_parent(msg)

    def _peek(self, frames: list[Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Header, metadata and content of a raw message, unverified (a cheap look)."""
        unpack = self.session.unpack
        return unpack(frames[1].bytes), unpack(frames[3].bytes), unpack(frames[4].bytes)


class PolycellKernel(_Ipykernel74):
    """IPython kernel whose background cells start at once, however busy the main thread is."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.counter = ExecutionCounter(self.shell)
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
        taken = self._take_out_of_queue(msg)
        if not taken:
            await super().shell_channel_thread_main(msg)

    def _take_out_of_queue(self, msg: list[Any]) -> bool:
        if self.session is None or self.polycell is None:
            return False
        try:
            idents, frames = self.session.feed_identities(msg, copy=False)
            header, metadata, content = self._peek(frames)
        except Exception:  # noqa: BLE001 - a malformed message is ipykernel's to report
            return False
        if header.get("msg_type") != "execute_request" or content.get("silent"):
            return False
        action = out_of_queue_action(str(content.get("code", "")), metadata or {})
        if action is None or not self._is_polycell_magic(action):
            return False
        try:
            # The full deserialize checks the signature and records it against replays.
            request = self.session.deserialize(frames, content=True, copy=False)
        except Exception:
            self.log.error("polycell: invalid message", exc_info=True)
            return True
        self._run_out_of_queue(idents, request, action)
        return True

    def _is_polycell_magic(self, action: OutOfQueue) -> bool:
        """True unless the magic the action names is not polycell's (a user's own %bg)."""
        from polycell.magics import PolycellMagics

        if action.kind == "cell":
            return True
        find = self.shell.find_cell_magic if action.kind == "cell_magic" else self.shell.find_line_magic
        return isinstance(getattr(find(action.magic), "__self__", None), PolycellMagics)

    def _run_out_of_queue(self, idents: list[bytes], request: dict[str, Any], action: OutOfQueue) -> None:
        content = request["content"]
        code = content.get("code", "")
        self._publish_status("busy", "shell", parent=request)
        if content.get("store_history", True):
            count = self.counter.reserve(code)
        else:
            count = self.shell.execution_count
        self._publish_execute_input(code, request, count)
        context = contextvars.copy_context()
        reply = context.run(self._start_in_context, idents, request, action, count)
        metadata = self.init_metadata(request)
        metadata = self.finish_metadata(request, metadata, reply)
        self.session.send(self.shell_stream, "execute_reply", reply, request, metadata=metadata, ident=idents)
        self._publish_status("idle", "shell", parent=request)

    def _start_in_context(
        self, idents: list[bytes], request: dict[str, Any], action: OutOfQueue, count: int
    ) -> dict[str, Any]:
        """Start the job with `request` as parent of everything it sends; returns the reply content."""
        from polycell.extension import cell_execution_count

        self._set_request_parent(idents, request)
        request_allow_stdin.set(bool(request["content"].get("allow_stdin", False)))
        cell_execution_count.set(count)
        reply: dict[str, Any] = {"status": "ok", "execution_count": count, "payload": []}
        try:
            if action.kind == "cell_magic":
                self.shell.find_cell_magic(action.magic)(action.line, action.cell)
            elif action.kind == "line_magic":
                self.shell.find_line_magic(action.magic)(action.line)
            else:
                self.polycell.run_cell(action.cell, mode=action.mode)
        except (UsageError, JobError) as exc:
            error = exc if isinstance(exc, UsageError) else UsageError(str(exc))
            self.shell.show_usage_error(error)
            return {**reply, "status": "error", "ename": "UsageError", "evalue": str(error), "traceback": []}
        finally:
            # As ipykernel does before a reply: what the cell printed goes out first.
            sys.stdout.flush()
            sys.stderr.flush()
        expressions = request["content"].get("user_expressions") or {}
        reply["user_expressions"] = self.shell.user_expressions(expressions)
        return reply

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
        polycell = self.polycell
        if polycell is not None:
            polycell.publisher.flush(2)  # the job's output so far comes before its prompt
        return self._input_request(
            prompt, self._get_shell_context_var(self._shell_parent_ident), self.get_parent("shell"), password
        )

    def _input_request(self, prompt: str, ident: Any, parent: Any, password: bool = False) -> str:
        """One prompt at a time: the foreground and every job share one stdin socket."""
        with self._stdin_lock:
            return super()._input_request(prompt, ident, parent, password=password)

    # -- interrupt and shutdown ------------------------------------------------------------

    def _send_interrupt_children(self) -> None:
        """SIGINT to the foreground (and the processes it started), never to a job's processes."""
        if os.name == "nt":
            super()._send_interrupt_children()
            return
        spared = set(_job_pids())
        os.kill(os.getpid(), signal.SIGINT)
        for child in self._process_children():
            if child.pid not in spared:
                try:
                    child.send_signal(signal.SIGINT)
                except Exception:  # noqa: BLE001 - it ended meanwhile
                    pass

    def do_shutdown(self, restart: bool) -> dict[str, Any]:
        """End every job, saying so in its cell, before the kernel goes."""
        self.end_jobs("kernel restarting" if restart else "kernel shutting down")
        self._really_restore_input()
        return super().do_shutdown(restart)

    def end_jobs(self, reason: str) -> list[Any]:
        for job in jobs.running():
            job.journal.write("stderr", f"[job {job.id} killed: {reason}]\n")
        ended = jobs.shutdown()
        polycell = self.polycell
        if polycell is not None:
            polycell.publisher.flush(2)
        if ended:
            self.log.info("polycell: %d job(s) killed: %s", len(ended), reason)
        return ended


def _job_pids() -> Iterator[int]:
    """Processes that belong to running jobs (a process job's child and its descendants)."""
    try:
        import psutil
    except ImportError:  # ipykernel finds no children without psutil either
        psutil = None
    for job in jobs.running():
        pid = job.info.get("pid")
        if not isinstance(pid, int):
            continue
        yield pid
        if psutil is not None:
            try:
                yield from (p.pid for p in psutil.Process(pid).children(recursive=True))
            except psutil.Error:
                continue
