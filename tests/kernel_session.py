"""A real kernel, started with jupyter_client, and the messages it sends.

Tests talk to kernels the way front ends do: execute requests on the shell
channel, everything else observed on iopub. A background thread records every
iopub message so a test can wait for the one it needs (by predicate, with a
timeout) instead of sleeping.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import KernelManager

from polycell.headless import is_end_line

SRC = Path(__file__).resolve().parent.parent / "src"
Msg = dict[str, Any]
#: How a front end starts the polycell kernel (its kernelspec's argv).
POLYCELL_KERNEL = [sys.executable, "-m", "polycell.kernelapp", "-f", "{connection_file}"]


def kernel_env() -> dict[str, str]:
    """The environment for kernels under test: this checkout's polycell comes first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTEST_CURRENT_TEST", None)
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    return env


def run_polycell(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The ``polycell`` command, run as a separate process as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "polycell.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def polycell(*args: str, runtime: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``polycell ARGS`` with `runtime` as its Jupyter runtime directory (where it finds kernels)."""
    return run_polycell(*args, env={**kernel_env(), "JUPYTER_RUNTIME_DIR": str(runtime)}, timeout=timeout)


class KernelSession:
    """One running kernel and a client connected to it."""

    def __init__(
        self,
        argv: list[str] | None = None,
        *,
        load_ext: bool = True,
        connection_file: str | None = None,
        attach_to: KernelManager | None = None,
    ) -> None:
        """Start a kernel, or with `attach_to` connect one more client to a running one."""
        self.owns_kernel = attach_to is None
        if attach_to is not None:
            self.km = attach_to
            load_ext = False
        else:
            self.km = KernelManager()
            if connection_file is not None:
                self.km.connection_file = connection_file
            argv = argv or [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
            self.km._kernel_spec = KernelSpec(argv=argv, display_name="test", language="python")
            self.km.start_kernel(env=kernel_env())
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.messages: list[Msg] = []
        #: The same messages by the msg_id of their parent: waiting for one cell's idle
        #: status does not read every message of the session again.
        self._by_parent: dict[str, list[Msg]] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._reading = threading.Event()
        self._reading.set()
        self._reader = threading.Thread(target=self._read_iopub, name="test-iopub-reader", daemon=True)
        self._reader.start()
        if load_ext:
            self.run("%load_ext polycell")

    def _read_iopub(self) -> None:
        while not self._stop.is_set():
            if not self._reading.wait(0.1):
                continue
            try:
                msg = self.kc.get_iopub_msg(timeout=0.1)
            except queue.Empty:
                continue
            except Exception:  # channel closed during shutdown
                return
            msg["_received"] = time.monotonic()
            with self._cond:
                self.messages.append(msg)
                self._by_parent.setdefault(msg["parent_header"].get("msg_id", ""), []).append(msg)
                self._cond.notify_all()

    @contextmanager
    def not_reading(self) -> Iterator[None]:
        """Leave iopub messages unread meanwhile, as a client that falls behind does."""
        self._reading.clear()
        try:
            yield
        finally:
            self._reading.set()

    # -- executing --------------------------------------------------------------------

    def execute(self, code: str, **kwargs: Any) -> str:
        """Send an execute request; returns its msg_id without waiting."""
        return self.kc.execute(code, **kwargs)

    def execute_in_cell(self, code: str, cell_id: str) -> str:
        """An execute request as JupyterLab and Notebook 7 send it, with the cell's id; returns its msg_id."""
        content = {"code": code, "silent": False, "store_history": True, "allow_stdin": False}
        msg = self.kc.session.msg("execute_request", content, metadata={"cellId": cell_id})
        self.kc.shell_channel.send(msg)
        return str(msg["header"]["msg_id"])

    def execute_accepted(self, code: str, timeout: float = 60) -> str:
        """Execute, sending again while ipykernel aborts it; returns the accepted msg_id.

        Right after a cell fails (an interrupt too), ipykernel aborts the requests that
        arrive in its stop-on-error window, as a user would see and run again.
        """
        deadline = time.monotonic() + timeout
        while True:
            msg_id = self.execute(code)
            reply = self.reply(msg_id, max(0.0, deadline - time.monotonic()))
            if reply["content"]["status"] != "aborted":
                return msg_id

    def reply(self, msg_id: str, timeout: float = 60) -> Msg:
        """The shell reply to `msg_id` (other replies on the way are kept for later)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(getattr(self, "_replies", [])):
                if msg["parent_header"].get("msg_id") == msg_id:
                    return self._replies.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply to {msg_id} in {timeout}s")
            msg = self.kc.get_shell_msg(timeout=remaining)
            msg["_received"] = time.monotonic()
            self._replies = [*getattr(self, "_replies", []), msg]

    def run(self, code: str, timeout: float = 60, **kwargs: Any) -> Msg:
        """Execute and wait for the reply and for the kernel to go idle; returns the reply."""
        msg_id = self.execute(code, **kwargs)
        reply = self.reply(msg_id, timeout)
        self.wait_idle(msg_id, timeout)
        return reply

    def start_foreground(self, code: str = "import time\ntime.sleep(30)") -> str:
        """Send a blocking cell and return once its own code is running on the main thread.

        Waiting for ``busy`` or ``execute_input`` is not enough: both are sent before
        the cell's code starts, and an interrupt landing in between is lost.
        """
        msg_id = self.execute("print('foreground started', flush=True)\n" + code)
        self.wait_for(
            lambda m: (
                m["msg_type"] == "stream"
                and m["parent_header"].get("msg_id") == msg_id
                and "foreground started" in m["content"]["text"]
            )
        )
        return msg_id

    # -- observing ---------------------------------------------------------------------

    def wait_for(
        self, predicate: Callable[[Msg], bool], timeout: float = 30, *, parent: str | None = None
    ) -> Msg:
        """The first iopub message (received so far or later) matching `predicate`.

        With `parent`, only the messages whose parent is the request `parent` are read.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                messages = self.messages if parent is None else self._by_parent.get(parent, [])
                for msg in messages[seen:]:
                    if predicate(msg):
                        return msg
                seen = len(messages)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no matching iopub message")
                self._cond.wait(remaining)

    def wait_idle(self, msg_id: str, timeout: float = 30) -> Msg:
        return self.wait_for(
            lambda m: m["msg_type"] == "status" and m["content"]["execution_state"] == "idle",
            timeout,
            parent=msg_id,
        )

    def messages_of(self, msg_id: str) -> list[Msg]:
        """Every iopub message received so far whose parent is the request `msg_id`."""
        with self._cond:
            return list(self._by_parent.get(msg_id, []))

    def outputs(self, msg_id: str, *, end_lines: bool = False) -> list[Msg]:
        """Output messages (no status, no execute_input) whose parent is `msg_id`.

        Without `end_lines`, not the line that tells a terminal how a job ended: this
        client sends no cell id, so the kernel adds one after each job's last output.
        """
        return [
            m
            for m in self.messages_of(msg_id)
            if m["msg_type"] not in ("status", "execute_input") and (end_lines or not is_end_line(m))
        ]

    def text(self, msg_id: str, name: str | None = None, *, end_lines: bool = False) -> str:
        return "".join(
            m["content"]["text"]
            for m in self.outputs(msg_id, end_lines=end_lines)
            if m["msg_type"] == "stream" and (name is None or m["content"]["name"] == name)
        )

    def job_id(self, msg_id: str, timeout: float = 30) -> int:
        """The id of the job the cell `msg_id` started, read from the handle shown in that cell."""
        handle = self.wait_for(
            lambda m: (
                m["msg_type"] == "display_data"
                and "polycell-handle" in m["content"]["data"].get("text/html", "")
            ),
            timeout,
            parent=msg_id,
        )
        return int(handle["content"]["data"]["text/plain"].split()[2])

    def job_messages(self, job_id: int) -> list[Msg]:
        with self._cond:
            return [
                m for m in self.messages if m.get("metadata", {}).get("polycell", {}).get("job") == job_id
            ]

    def wait_job_end(self, job_id: int, timeout: float = 30) -> Msg:
        """The handle update that says job `job_id` ended (done, failed or killed)."""

        def ended(m: Msg) -> bool:
            if m["msg_type"] != "update_display_data":
                return False
            if m.get("metadata", {}).get("polycell", {}).get("job") != job_id:
                return False
            text = m["content"]["data"].get("text/plain", "")
            return any(f": {s} after" in text for s in ("done", "failed", "killed"))

        return self.wait_for(ended, timeout)

    def error_line(self, reply_or_msg_id: Msg | str) -> str:
        """The one-line error a cell produced (UsageError text on stderr, or an error message)."""
        msg_id = (
            reply_or_msg_id
            if isinstance(reply_or_msg_id, str)
            else reply_or_msg_id["parent_header"]["msg_id"]
        )
        for m in self.outputs(msg_id):
            if m["msg_type"] == "error":
                return f"{m['content']['ename']}: {m['content']['evalue']}"
        return self.text(msg_id, "stderr").strip()

    def eval(self, expression: str, timeout: float = 30) -> Any:
        """Evaluate an expression in the kernel and return it (via repr/literal)."""
        import ast

        deadline = time.monotonic() + timeout
        while True:
            msg_id = self.kc.execute("", silent=True, user_expressions={"x": expression})
            reply = self.reply(msg_id, max(0.0, deadline - time.monotonic()))
            # Right after a cell fails (an interrupt too), ipykernel aborts what arrives
            # until its stop-on-error window closes: ask again, as a user would.
            if reply["content"]["status"] != "aborted":
                break
        value = reply["content"]["user_expressions"]["x"]
        if value["status"] != "ok":
            raise RuntimeError(f"{value['ename']}: {value['evalue']}")
        return ast.literal_eval(value["data"]["text/plain"])

    @property
    def connection_file(self) -> str:
        return str(self.km.connection_file)

    @property
    def store_path(self) -> Path:
        """Where polycell keeps this kernel's journal on disk."""
        from polycell.journal_store import store_path

        return store_path(self.connection_file)

    @property
    def pid(self) -> int:
        return int(self.km.provisioner.process.pid)

    def disconnect(self) -> None:
        """Close this client (a browser tab going away); the kernel keeps running."""
        self._stop.set()
        self._reader.join(5)
        self.kc.stop_channels()

    def close(self) -> None:
        self._stop.set()
        try:
            self.kc.stop_channels()
        finally:
            if self.owns_kernel:
                self.km.shutdown_kernel(now=True)
                for path in self.store_path.parent.glob(self.store_path.name + "*"):
                    path.unlink(missing_ok=True)
        self._reader.join(5)


def check_interrupt_spares_a_thread_jobs_child(k: KernelSession, interrupt: Callable[[], object]) -> None:
    """A program a thread job started shares the kernel's process group, which an interrupt
    signals as a whole: it must not get the SIGINT meant for the foreground cell.

    The child blocks in ``read`` from before the interrupt until after it, so the
    check cannot pass by the child having already ended.
    """
    bg = k.execute(
        "%%bg\nimport subprocess, threading\n"
        "release = threading.Event()\n"
        "child = subprocess.Popen(['sh', '-c', 'echo started; read line; echo got $line'],\n"
        "                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)\n"
        "print(child.stdout.readline(), end='', flush=True)\n"
        "release.wait(120)\n"
        "out, _ = child.communicate('go\\n')\n"
        "(child.returncode, out)"
    )
    job = k.job_id(bg)
    k.wait_for(lambda m: m["parent_header"].get("msg_id") == bg and m["msg_type"] == "stream")
    fg = k.start_foreground("import time\ntime.sleep(300)")
    interrupt()
    assert k.reply(fg, timeout=30)["content"]["ename"] == "KeyboardInterrupt"
    k.run("release.set()")
    k.wait_job_end(job)
    assert k.eval(f"jobs[{job}].result") == (0, "got go\n")  # (-2, '') had SIGINT reached it
