"""The polycell kernel, for real: background cells that do not wait for a busy main thread.

Every test starts ``python -m polycell.kernelapp`` (no ``%load_ext``: the kernel
loads polycell itself) and talks to it over ZMQ like a front end. "At once" is
asserted by message order: a background cell's reply and output arrive before
the foreground cell, still sleeping, goes idle. No wall-clock assertions.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel_session import POLYCELL_KERNEL, KernelSession, Msg, check_interrupt_spares_a_thread_jobs_child
from polycell.kernel import ExecutionCounter, MainThreadQueue, OutOfQueue, out_of_queue_action

#: A foreground cell that blocks the main thread in ``time.sleep`` until the test interrupts it.
SLEEP = "import time\ntime.sleep(300)"
#: One that blocks until a background cell runs ``fg_release.set()``, then ends normally.
GATED = "import threading\nfg_release = threading.Event()\nfg_release.wait(300)\nprint('foreground finished')"


@pytest.fixture
def pk() -> Iterator[KernelSession]:
    session = KernelSession(POLYCELL_KERNEL, load_ext=False)
    try:
        yield session
    finally:
        session.close()


def send_execute(k: KernelSession, code: str, metadata: dict[str, Any] | None = None, **content: Any) -> str:
    """An execute_request with request metadata, as JupyterLab sends a cell's tags."""
    body = {
        "code": code,
        "silent": False,
        "store_history": True,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": True,
        **content,
    }
    msg = k.kc.session.msg("execute_request", body, metadata=metadata or {})
    k.kc.shell_channel.send(msg)
    return msg["header"]["msg_id"]


def start_foreground(k: KernelSession, code: str = SLEEP) -> str:
    """Send a blocking cell and wait until the main thread has started running it."""
    return k.start_foreground(code)


def interrupt(k: KernelSession) -> Msg:
    """An interrupt_request on the control channel (the kernelspec's interrupt_mode is "message")."""
    msg = k.kc.session.msg("interrupt_request", {})
    k.kc.control_channel.send(msg)
    return k.kc.get_control_msg(timeout=30)


def still_busy(k: KernelSession, msg_id: str) -> bool:
    """True while the cell `msg_id` has not gone idle (judged from iopub messages received so far)."""
    with k._cond:
        return not any(
            m["msg_type"] == "status"
            and m["content"]["execution_state"] == "idle"
            and m["parent_header"].get("msg_id") == msg_id
            for m in k.messages
        )


def idle_index(k: KernelSession, msg_id: str) -> int:
    k.wait_idle(msg_id)
    with k._cond:
        for i, m in enumerate(k.messages):
            if (
                m["msg_type"] == "status"
                and m["content"]["execution_state"] == "idle"
                and m["parent_header"].get("msg_id") == msg_id
            ):
                return i
    raise AssertionError("unreachable")


# -- the interception point ------------------------------------------------------------------


def test_outstream_marks_unsent_output_as_routing_expects(pk):
    """`polycell.routing._has_unsent_output` reads ipykernel 7.4's ``OutStream._flush_pending``."""
    pk.run("import sys\nstream = sys.stdout._polycell_inner")
    assert pk.eval("stream._flush_pending") is False  # the last cell's output went out before its idle
    cell = pk.run("print('unsent', end='')\npending = stream._flush_pending")
    assert pk.eval("pending") is True
    assert pk.text(cell["parent_header"]["msg_id"]) == "unsent"  # and still sent before the cell's idle
    assert pk.eval("stream._flush_pending") is False


def test_ipykernel_internals_polycell_relies_on():
    """Fails when ipykernel moves what `polycell.ipykernel_internals.Ipykernel74` reaches into (7.4.0)."""
    import ipykernel
    from ipykernel.ipkernel import IPythonKernel
    from ipykernel.kernelbase import Kernel
    from ipykernel.shellchannel import ShellChannelThread

    assert ipykernel.__version__.startswith("7."), ipykernel.__version__
    # Every shell message passes through this coroutine in the shell channel thread, first,
    # under a lock that only serialises that thread's own coroutines (polycell's path skips it).
    assert inspect.iscoroutinefunction(Kernel.shell_channel_thread_main)
    assert list(inspect.signature(Kernel.shell_channel_thread_main).parameters) == ["self", "msg"]
    assert "self.shell_stream.on_recv(self.shell_channel_thread_main" in inspect.getsource(Kernel.start)
    routing = inspect.getsource(Kernel.shell_channel_thread_main)
    assert "async with self.shell_channel_thread.asyncio_lock:" in routing
    assert "socket.send_multipart(msg, copy=False)" in routing  # forwarded as received
    assert "self.asyncio_lock = asyncio.Lock()" in inspect.getsource(ShellChannelThread.__init__)
    # The main thread begins every queued request, run or aborted, in dispatch_shell, under its lock.
    assert inspect.iscoroutinefunction(Kernel.dispatch_shell)
    parameters = inspect.signature(Kernel.dispatch_shell).parameters
    assert list(parameters) == ["self", "msg", "subshell_id", "concurrent"]
    assert parameters["msg"].kind is inspect.Parameter.POSITIONAL_ONLY
    assert parameters["concurrent"].kind is inspect.Parameter.KEYWORD_ONLY
    shell_main = inspect.getsource(Kernel.shell_main)
    assert "await self.dispatch_shell(msg, subshell_id=subshell_id)" in shell_main
    dispatch = inspect.getsource(Kernel.dispatch_shell)
    assert dispatch.index("self._send_abort_reply(") < dispatch.index("handler(stream, idents, msg)")
    # polycell.iopub_batch hands held messages to the IOPub thread as its send_multipart does.
    from ipykernel.iostream import IOPubThread

    assert list(inspect.signature(IOPubThread._really_send).parameters)[:2] == ["self", "msg"]
    assert "self._really_send(*args, **kwargs)" in inspect.getsource(IOPubThread.send_multipart)
    assert list(inspect.signature(IOPubThread.schedule).parameters) == ["self", "f"]
    schedule = inspect.getsource(IOPubThread.schedule)
    assert "self._events.append(f)" in schedule  # what polycell.iopub_batch reads to join a pending drain
    assert "self._events.popleft()" in inspect.getsource(IOPubThread._handle_event)
    # ... and shares its socket: the thread runs what was scheduled when its _event_puller wakes it,
    # and reads an XPUB socket's subscriptions with _xpub_stream.
    event_pipe = inspect.getsource(IOPubThread._setup_event_pipe)
    assert "self._event_puller.on_recv(self._handle_event)" in event_pipe
    assert "self._xpub_stream = ZMQStream(self.socket, self.io_loop)" in inspect.getsource(
        IOPubThread._setup_xpub_listener
    )
    # The main thread's replies: sent to this socket, for the shell channel thread to forward.
    from ipykernel.subshell_manager import SubshellManager

    assert "manager.get_subshell_to_shell_channel_socket(" in inspect.getsource(Kernel.dispatch_shell)
    assert list(inspect.signature(SubshellManager.get_subshell_to_shell_channel_socket).parameters) == [
        "self",
        "subshell_id",
    ]
    # The per-context parent that get_parent("shell") and raw_input read.
    assert {"_shell_parent", "_shell_parent_ident"} <= set(Kernel.__annotations__)
    source = inspect.getsource(Kernel.raw_input)
    assert "self._shell_parent_ident" in source and 'self.get_parent("shell")' in source
    for name in ("_publish_status", "_publish_execute_input", "_input_request", "_process_children",
                 "_get_shell_context_var", "_topic"):  # fmt: skip
        assert callable(getattr(Kernel, name)), name
    assert list(inspect.signature(Kernel._input_request).parameters) == [
        "self",
        "prompt",
        "ident",
        "parent",
        "password",
    ]
    # Input forwarding: the methods do_execute calls, and the attributes they keep.
    for name in ("_forward_input", "_restore_input"):
        assert callable(getattr(IPythonKernel, name)), name
    assert "self._forward_input(allow_stdin)" in inspect.getsource(IPythonKernel.do_execute)
    forward = inspect.getsource(IPythonKernel._forward_input)
    for attribute in ("self._allow_stdin = allow_stdin", "self._sys_raw_input = builtins.input",
                      "self._save_getpass = getpass.getpass"):  # fmt: skip
        assert attribute in forward, attribute
    restore = inspect.getsource(IPythonKernel._restore_input)
    assert "builtins.input = self._sys_raw_input" in restore
    assert "getpass.getpass = self._save_getpass" in restore
    assert "self._allow_stdin" in inspect.getsource(Kernel.raw_input)
    # The pause before each execute reply that the polycell kernel sets to 0.
    assert Kernel.class_traits()["_execute_sleep"].metadata.get("config")
    assert "time.sleep(self._execute_sleep)" in inspect.getsource(Kernel.execute_request)
    from polycell.kernel import PolycellKernel

    assert PolycellKernel.class_traits()["_execute_sleep"].default_value == 0
    # No interrupt override: ipykernel signals only its own process group (jobs lead their own).
    assert "os.killpg(pgid, SIGINT)" in inspect.getsource(Kernel._send_interrupt_children)


def test_peek_reads_the_wire_frames_polycell_expects():
    """`_peek` and `_signed` read ``feed_identities``' frames by position (the wire protocol's)."""
    import types

    import zmq
    from jupyter_client.session import Session

    from polycell.ipykernel_internals import Ipykernel74

    session = Session(key=b"secret")
    msg = session.msg("execute_request", {"code": "%%bg\n1"}, metadata={"tags": ["bg"]})
    wire = [zmq.Frame(part) for part in session.serialize(msg, ident=[b"client"])]
    idents, frames = session.feed_identities(wire, copy=False)
    fake = types.SimpleNamespace(session=session)
    header, metadata, content = Ipykernel74._peek(fake, frames)  # type: ignore[arg-type]
    assert idents == [b"client"]
    assert (header["msg_id"], header["msg_type"]) == (msg["header"]["msg_id"], "execute_request")
    assert metadata == {"tags": ["bg"]}
    assert content == {"code": "%%bg\n1"}
    assert Ipykernel74._signed(fake, frames)  # type: ignore[arg-type]
    forged = [frames[0], zmq.Frame(session.pack({**header, "msg_id": "forged"})), *frames[2:]]
    assert not Ipykernel74._signed(fake, forged)  # type: ignore[arg-type]
    # ipykernel's own deserialize agrees on both.
    assert (
        session.deserialize(list(frames), content=False, copy=False)["header"]["msg_id"] == header["msg_id"]
    )
    with pytest.raises(ValueError, match="Invalid Signature"):
        session.deserialize(list(forged), content=False, copy=False)


def test_main_thread_queue_counts_each_request_until_it_starts():
    queue = MainThreadQueue()
    assert len(queue) == 0
    queue.handed("a")
    queue.handed("b")
    queue.handed("a")  # the same msg_id twice (a replay) counts twice
    assert len(queue) == 3
    queue.started("a")
    queue.started("b")
    assert len(queue) == 1
    queue.started("a")
    assert len(queue) == 0


def test_the_kernel_intercepts_in_the_shell_channel_thread(pk):
    reply = pk.run(
        "k = get_ipython().kernel\n"
        "import threading\n"
        "(type(k).__name__, type(k).shell_channel_thread_main.__module__, k.shell_channel_thread.name)"
    )
    assert reply["content"]["status"] == "ok"
    (result,) = [m for m in pk.outputs(reply["parent_header"]["msg_id"]) if m["msg_type"] == "execute_result"]
    assert result["content"]["data"]["text/plain"] == "('PolycellKernel', 'polycell.kernel', 'Shell channel')"


# -- which requests leave the queue ------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "metadata", "expected"),
    [
        ("%%bg\nx = 1", {}, OutOfQueue("cell_magic", magic="bg", cell="x = 1")),
        (
            "\n  \n%%bg --mode task\nawait f()",
            {},
            OutOfQueue("cell_magic", magic="bg", line="--mode task", cell="await f()"),
        ),
        ("%bg time.sleep(1)", {}, OutOfQueue("line_magic", magic="bg", line="time.sleep(1)")),
        ("%jobs", {}, OutOfQueue("line_magic", magic="jobs")),
        ("%job kill 3", {}, OutOfQueue("line_magic", magic="job", line="kill 3")),
        ("%job show 3", {}, OutOfQueue("line_magic", magic="job", line="show 3")),
        ("x = 1", {"tags": ["slow", "bg"]}, OutOfQueue("cell", cell="x = 1")),
        ("x = 1", {"tags": ["bg:task"]}, OutOfQueue("cell", cell="x = 1", mode="task")),
        ("x = 1", {"polycell": {"mode": "thread"}}, OutOfQueue("cell", cell="x = 1", mode="thread")),
        # These wait for the main thread, as in ipykernel:
        ("%job wait 3", {}, None),
        ("%bg x = 1\nprint('the rest runs in the foreground')", {}, None),
        ("x = 1\n%%bg", {}, None),
        ("%%bgx\n1", {}, None),
        ("print(1)", {"tags": ["background"]}, None),
        ("print(1)", {}, None),
    ],
)
def test_out_of_queue_action(code, metadata, expected):
    assert out_of_queue_action(code, metadata) == expected


class _FakeHistory:
    def __init__(self) -> None:
        self.stored: list[tuple[int, str]] = []

    def store_inputs(self, count: int, source: str) -> None:
        self.stored.append((count, source))


class _FakeShell:
    """Only the two attributes ExecutionCounter uses: the count and the history."""

    def __init__(self) -> None:
        self.execution_count = 5
        self.history_manager = _FakeHistory()


def test_execution_counts_never_collide_with_the_running_cell():
    shell = _FakeShell()
    counter = ExecutionCounter(shell)
    try:
        assert counter.reserve("a") == 5  # main thread idle: the next count
        assert shell.execution_count == 6
        with counter.foreground():  # cell 6 runs
            # Its input is stored after the inputs counted before it: foreground() waited for them.
            assert shell.history_manager.stored == [(5, "a")]
            assert counter.reserve("b") == 7
            assert counter.reserve("c") == 8
            assert shell.execution_count == 6  # Out[6] stays 6 while it runs
            shell.history_manager.store_inputs(6, "the foreground cell")  # as IPython's run_cell does
            shell.execution_count = 7  # IPython moves on when cell 6 ends
        assert shell.execution_count == 9
        assert counter.stored(10)
        assert shell.history_manager.stored == [(5, "a"), (6, "the foreground cell"), (7, "b"), (8, "c")]
    finally:
        counter.close()


# -- background cells while the main thread is busy -----------------------------------------


def test_bg_and_tagged_cells_start_while_the_foreground_sleeps(pk):
    fg = start_foreground(pk, GATED)
    bg = pk.execute("%%bg\nimport time\nprint('from %%bg')\ntime.sleep(1)\nprint('bg end')\n6 * 7")
    tagged = send_execute(pk, "print('from a tagged cell')", metadata={"tags": ["bg"]})
    by_metadata = send_execute(
        pk, "import asyncio\nawait asyncio.sleep(0.1)\nprint('task')", metadata={"polycell": {"mode": "task"}}
    )
    replies = {msg_id: pk.reply(msg_id, timeout=30) for msg_id in (bg, tagged, by_metadata)}
    assert still_busy(pk, fg)
    jobs = {msg_id: pk.job_id(msg_id) for msg_id in (bg, tagged, by_metadata)}
    for msg_id, job in jobs.items():
        pk.wait_job_end(job, timeout=30)
        assert still_busy(pk, fg), "a background cell waited for the foreground"
        assert replies[msg_id]["content"]["status"] == "ok"
        for msg in pk.job_messages(job):  # the job's output carries its own request's header
            assert msg["parent_header"]["msg_id"] == msg_id
    assert pk.text(bg) == "from %%bg\nbg end\n"
    assert pk.text(tagged) == "from a tagged cell\n"
    assert pk.text(by_metadata) == "task\n"
    assert still_busy(pk, fg)
    pk.run("%%bg\nfg_release.set()")
    fg_count = pk.reply(fg)["content"]["execution_count"]
    pk.wait_idle(fg)
    assert pk.eval(f"jobs[{jobs[by_metadata]}].mode") == "task"
    # Each background request had its own busy / execute_input / idle, before the foreground ended.
    fg_idle = idle_index(pk, fg)
    counts = []
    for msg_id in (bg, tagged, by_metadata):
        assert idle_index(pk, msg_id) < fg_idle
        (started,) = [
            m
            for m in pk.messages
            if m["msg_type"] == "execute_input" and m["parent_header"]["msg_id"] == msg_id
        ]
        counts.append(started["content"]["execution_count"])
        assert replies[msg_id]["content"]["execution_count"] == counts[-1]
    assert len({fg_count, *counts}) == 4, "execution counts collide"
    assert pk.run("1")["content"]["execution_count"] > max(fg_count, *counts)
    assert "foreground finished" in pk.text(fg)


def test_interrupt_stops_only_the_foreground(pk):
    fg = start_foreground(pk, "import time\ntime.sleep(30)")
    bg = pk.execute("%%bg\ntime.sleep(1)\nprint('job survived the interrupt')")
    pk.reply(bg, timeout=10)
    job = pk.job_id(bg)
    reply = interrupt(pk)
    assert reply["content"]["status"] == "ok"
    fg_reply = pk.reply(fg, timeout=10)
    assert fg_reply["content"]["status"] == "error"
    assert fg_reply["content"]["ename"] == "KeyboardInterrupt"
    pk.wait_job_end(job, timeout=10)
    assert pk.eval(f"jobs[{job}].status.value") == "done"
    assert pk.text(bg) == "job survived the interrupt\n"


def test_kill_a_job_while_the_main_thread_sleeps(pk):
    bg = pk.execute("%%bg\nimport time\nwhile True:\n    time.sleep(0.05)")
    pk.reply(bg)
    job = pk.job_id(bg)
    fg = start_foreground(pk)
    kill = pk.execute(f"%job kill {job}")
    assert pk.reply(kill, timeout=30)["content"]["status"] == "ok"
    pk.wait_job_end(job, timeout=30)
    pk.wait_idle(kill)  # iopub and shell are different sockets: the reply may overtake the text
    assert still_busy(pk, fg)
    assert pk.text(kill) == f"job {job} killed\n"
    table = pk.execute("%jobs")
    pk.reply(table, timeout=30)
    pk.wait_idle(table)
    assert still_busy(pk, fg)
    (shown,) = [m for m in pk.outputs(table) if m["msg_type"] == "display_data"]
    assert f"{job}   job-{job}  thread  killed" in shown["content"]["data"]["text/plain"]
    interrupt(pk)
    pk.reply(fg)


def test_bad_background_requests_give_one_line_and_the_kernel_goes_on(pk):
    fg = start_foreground(pk)
    cases = {
        "%%bg --mode nope\n1": "UsageError: %%bg: argument --mode: invalid choice: 'nope'",
        "%%bg --mode thread --backend trio\n1": (
            "UsageError: --backend trio is for task mode only, not --mode thread"
        ),
        "%%bg --backend curio\n1": "UsageError: unknown backend 'curio': choose one of asyncio, trio",
        "%job kill 99": "UsageError: no job 99",
    }
    for code, expected in cases.items():
        msg_id = pk.execute(code)
        reply = pk.reply(msg_id, timeout=30)
        pk.wait_idle(msg_id, timeout=30)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "UsageError"
        assert pk.error_line(msg_id).startswith(expected), (code, pk.error_line(msg_id))
        assert "\n" not in pk.error_line(msg_id)
    tagged = send_execute(pk, "1", metadata={"tags": ["bg:warp"]})
    assert pk.reply(tagged, timeout=30)["content"]["status"] == "error"
    pk.wait_idle(tagged, timeout=30)
    assert pk.error_line(tagged).startswith("UsageError: unknown mode 'warp'")
    assert still_busy(pk, fg)
    interrupt(pk)
    pk.reply(fg)
    assert pk.run("1 + 1")["content"]["status"] == "ok"


def test_a_background_cell_that_fails_to_start_still_replies_and_goes_idle(pk):
    """Whatever fails while a cell leaves the queue, its cell gets an error reply and idle."""
    pk.run(  # the thread runner cannot start threads any more (as when the OS refuses one)
        "from polycell import jobs\n"
        "def _refuse(job, body):\n"
        '    raise RuntimeError("can\'t start new thread")\n'
        "jobs.runner('thread').submit = _refuse"
    )
    fg = start_foreground(pk)
    syntax = pk.execute("%%bg\nprint('never'\nx = 1")
    tagged = send_execute(pk, "print('never')", metadata={"tags": ["bg"]})  # no magic in between
    refused = pk.execute("%%bg\nprint('never')")
    replies = {}
    for msg_id, ename in ((syntax, "SyntaxError"), (tagged, "RuntimeError"), (refused, "UsageError")):
        reply = replies[msg_id] = pk.reply(msg_id, timeout=30)  # hang guard
        pk.wait_idle(msg_id, timeout=30)
        assert still_busy(pk, fg)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == ename
    for msg_id in (syntax, tagged):  # shown as IPython shows an error, with none of polycell's frames
        (error,) = [m for m in pk.outputs(msg_id) if m["msg_type"] == "error"]
        assert error["content"]["ename"] == replies[msg_id]["content"]["ename"]
        assert error["content"]["traceback"] == replies[msg_id]["content"]["traceback"]
        assert "polycell" not in "".join(error["content"]["traceback"])
    assert replies[syntax]["content"]["evalue"].startswith("'(' was never closed")
    assert pk.error_line(tagged) == "RuntimeError: can't start new thread"
    # The %%bg magic says the same as a one-line UsageError.
    assert (
        pk.error_line(refused) == "UsageError: could not start the job: RuntimeError: can't start new thread"
    )
    assert "never" not in pk.text(syntax) + pk.text(tagged) + pk.text(refused)
    interrupt(pk)
    pk.reply(fg)
    pk.run("del jobs.runner('thread').submit")
    ok = pk.execute("%%bg\nprint('threads again')")
    pk.wait_job_end(pk.job_id(ok))
    assert pk.text(ok) == "threads again\n"


def held_until(path: Path, queued: int = 0) -> str:
    """A foreground cell that runs until `path` exists, then ends normally (no interrupt).

    With `queued`, it also waits until the kernel has that many requests queued
    for the main thread: the test's later cells are on their way once sent, but
    only in the kernel once its shell channel thread has read them. Released
    before, ipykernel may fail the cell above and stop aborting before a cell sent
    below it has even arrived; that cell then runs, as one sent after the failure would.
    """
    kernel_has_them = f" or len(get_ipython().kernel.main_queue) < {queued}" if queued else ""
    return f"import os, time\nwhile not os.path.exists({str(path)!r}){kernel_has_them}:\n    time.sleep(0.01)"


def test_run_all_starts_a_bg_cell_after_the_queued_cells_above_it(pk, tmp_path):
    """A %%bg cell waits for the cells queued before it; only a running cell is overtaken."""
    sleeping = start_foreground(pk, held_until(tmp_path / "go", queued=2))
    define = pk.execute("x = 41")  # queued behind the running cell
    bg = send_execute(pk, "%%bg\nprint(x + 1)", user_expressions={"y": "x"})
    (tmp_path / "go").touch()
    job = pk.job_id(bg)
    pk.wait_job_end(job)
    assert pk.text(bg) == "42\n"
    assert pk.eval(f"jobs[{job}].status.value") == "done"
    assert idle_index(pk, sleeping) < idle_index(pk, define) < idle_index(pk, bg)
    assert pk.reply(bg)["content"]["status"] == "ok"
    # The queue is empty again: the next %%bg overtakes a running cell, and its reply
    # carries no user_expressions (they are user code; the main thread is running).
    fg = start_foreground(pk)
    bg = send_execute(pk, "%%bg\nprint(x + 2)", user_expressions={"y": "x"})
    reply = pk.reply(bg, timeout=30)
    assert reply["content"]["user_expressions"] == {}
    pk.wait_job_end(pk.job_id(bg), timeout=30)
    assert still_busy(pk, fg)
    assert pk.text(bg) == "43\n"
    interrupt(pk)
    pk.reply(fg)


def test_run_all_aborts_a_bg_cell_queued_below_a_failing_cell(pk, tmp_path):
    start_foreground(pk, held_until(tmp_path / "go", queued=2))
    failing = pk.execute("1 / 0")  # queued; stop_on_error aborts what is queued after it
    bg = pk.execute("%%bg\nprint('must not run')")
    (tmp_path / "go").touch()
    assert pk.reply(failing)["content"]["ename"] == "ZeroDivisionError"
    assert pk.reply(bg)["content"]["status"] == "aborted"
    pk.wait_idle(bg)
    assert pk.eval("len(jobs)") == 0
    assert pk.text(bg) == ""


def test_kill_waits_off_the_shell_channel_thread(pk):
    """While ``%job kill`` waits for its job, other requests are routed (here: the one it waits for)."""
    bg = pk.execute("%%bg\nimport time\nwhile True:\n    time.sleep(0.05)")
    job = pk.job_id(bg)
    pk.run(  # the kill blocks until a later background cell opens the gate
        "import threading\n"
        "from polycell import jobs\n"
        "gate = threading.Event()\n"
        f"_kill = jobs[{job}].kill\n"
        f"jobs[{job}].kill = lambda *a, **k: (gate.wait(30), _kill(*a, **k))[1]"
    )
    fg = start_foreground(pk)
    kill = pk.execute(f"%job kill {job}")
    opener = pk.execute("%%bg\ngate.set()")
    pk.wait_job_end(pk.job_id(opener), timeout=10)  # hang guard: a blocked thread would wait 30 s
    assert pk.reply(kill, timeout=10)["content"]["status"] == "ok"
    pk.wait_idle(kill)
    assert pk.text(kill) == f"job {job} killed\n"
    assert still_busy(pk, fg)
    interrupt(pk)
    pk.reply(fg)


def test_interrupt_reaches_neither_process_jobs_nor_map_workers(pk):
    pk.run("import time\ndef nap(x):\n    time.sleep(0.3)\n    return x")
    bg = pk.execute(
        "%%bg --mode process\nimport time\nfor i in range(10):\n    print(i, flush=True)\n    time.sleep(0.2)"
    )
    job = pk.job_id(bg)
    mapped = pk.execute("j = jobs.map(nap, range(6), workers=2, mode='process', chunksize=1)")
    map_job = pk.job_id(mapped)
    fg = start_foreground(pk, "import time\ntime.sleep(30)")
    pk.wait_for(lambda m: m["parent_header"].get("msg_id") == bg and m["msg_type"] == "stream")
    assert interrupt(pk)["content"]["status"] == "ok"
    assert pk.reply(fg, timeout=10)["content"]["ename"] == "KeyboardInterrupt"
    pk.wait_job_end(job)
    pk.wait_job_end(map_job)
    assert pk.eval(f"(jobs[{job}].status.value, j.status.value, j.result)") == (
        "done",
        "done",
        list(range(6)),
    )
    assert pk.text(bg).startswith("".join(f"{i}\n" for i in range(10)))


SIGINT_MASKS = r"""
import os, signal, threading
def _sigint_blocked(tid):
    with open(f"/proc/self/task/{tid}/status") as status:
        mask = next(line for line in status if line.startswith("SigBlk:")).split()[1]
    return bool(int(mask, 16) & (1 << (signal.SIGINT - 1)))
masks = {int(tid): _sigint_blocked(tid) for tid in os.listdir("/proc/self/task")}
"""


def test_only_the_main_thread_can_take_the_interrupt(pk):
    """A process-directed SIGINT taken by any other thread would never wake the main one.

    Every thread of the kernel but the main one (ipykernel's, polycell's, a
    job's, a job's event loop) blocks SIGINT; a process job's child takes it as
    a plain Python program does.
    """
    thread_job = pk.job_id(pk.execute("%%bg\nimport time\nwhile True:\n    time.sleep(0.05)"))
    task_job = pk.job_id(pk.execute("%%bg --mode task\nimport asyncio\nawait asyncio.sleep(60)"))
    pk.run(SIGINT_MASKS)
    masks = pk.eval("masks")
    assert masks.pop(pk.eval("threading.main_thread().native_id")) is False
    assert len(masks) >= 8 and all(masks.values()), masks
    child = pk.execute(
        "%%bg --mode process\nimport signal\n"
        "(signal.getsignal(signal.SIGINT) is signal.default_int_handler, "
        "signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))"
    )
    job = pk.job_id(child)
    pk.wait_job_end(job)
    assert pk.eval(f"jobs[{job}].result") == (True, False)
    pk.run(f"%job kill {thread_job}\n%job kill {task_job}")


def test_interrupt_spares_programs_started_by_thread_jobs(pk):
    def press_interrupt() -> None:
        assert interrupt(pk)["content"]["status"] == "ok"

    check_interrupt_spares_a_thread_jobs_child(pk, press_interrupt)


@pytest.mark.parametrize("cell", ["%%bg\nimport time\ntime.sleep(60)", "%bg 1", "%%bg --mode task\n1"])
def test_the_handle_comes_before_the_cells_idle(pk, cell):
    """Front ends that stop listening to a cell at its idle status (nbclient, papermill) still record it.

    Even while another job floods the publisher that sends every job's output
    (without the wait for the handle, about one cell in two lost it here).
    """
    flood = pk.execute("%%bg --name flood\nwhile True:\n    print('x' * 200)")
    pk.wait_for(lambda m: m["parent_header"].get("msg_id") == flood and m["msg_type"] == "stream")
    for _ in range(5):
        msg_id = pk.execute(cell)
        pk.wait_idle(msg_id)
        with pk._cond:
            kinds = [
                "handle" if m["msg_type"] == "display_data" else m["content"]["execution_state"]
                for m in pk.messages
                if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] in ("display_data", "status")
            ]
        assert kinds == ["busy", "handle", "idle"]
    pk.run("_ = [job.kill() for job in jobs.running()]")


# -- input() in a job ---------------------------------------------------------------------------


def test_input_in_a_job_prompts_in_the_jobs_own_cell(pk):
    fg = start_foreground(pk)
    bg = pk.execute("%%bg\nprint('before')\nname = input('who? ')\nprint('hello', name)", allow_stdin=True)
    pk.reply(bg, timeout=30)
    job = pk.job_id(bg)
    request = pk.kc.get_stdin_msg(timeout=30)
    assert request["msg_type"] == "input_request"
    assert request["parent_header"]["msg_id"] == bg
    assert request["content"] == {"prompt": "who? ", "password": False}
    pk.kc.input("polycell")
    pk.wait_job_end(job, timeout=30)
    assert still_busy(pk, fg)
    assert pk.text(bg) == "before\nhello polycell\n"
    interrupt(pk)
    pk.reply(fg)


def test_input_in_a_job_without_stdin_is_a_clear_error(pk):
    bg = pk.execute("%%bg\nimport getpass\ngetpass.getpass('secret: ')", allow_stdin=False)
    pk.reply(bg)
    job = pk.job_id(bg)
    pk.wait_job_end(job)
    assert pk.error_line(bg) == (
        f"StdinNotImplementedError: getpass() was called in background job {job}, but the front end "
        "that started it does not accept input requests (allow_stdin is false)"
    )
    # The foreground's own input() still works as in ipykernel.
    fg = pk.execute("answer = input('fg? ')", allow_stdin=True)
    request = pk.kc.get_stdin_msg(timeout=10)
    assert request["parent_header"]["msg_id"] == fg
    pk.kc.input("42")
    pk.reply(fg)
    assert pk.eval("answer") == "42"


# -- trio --------------------------------------------------------------------------------------


def test_trio_backend_runs_and_kills_task_jobs(pk):
    ok = pk.execute(
        "%%bg --backend trio\nimport trio\nawait trio.sleep(0.1)\n"
        "print('trio', trio.lowlevel.current_task().name)\n'done in trio'"
    )
    pk.reply(ok)
    job = pk.job_id(ok)
    pk.wait_job_end(job)
    assert pk.text(ok) == f"trio polycell-job-{job}\n"
    assert pk.eval(f"(jobs[{job}].mode, jobs[{job}].info['backend'], jobs[{job}].result)") == (
        "task",
        "trio",
        "done in trio",
    )
    forever = pk.execute(
        "%%bg --mode task --backend trio\nimport trio\nprint('sleeping')\nawait trio.sleep(60)"
    )
    pk.reply(forever)
    job = pk.job_id(forever)
    pk.wait_for(lambda m: m["parent_header"].get("msg_id") == forever and m["msg_type"] == "stream")
    assert pk.text(pk.run(f"%job kill {job}")["parent_header"]["msg_id"]) == f"job {job} killed\n"
    pk.wait_job_end(job)
    assert pk.eval(f"jobs[{job}].status.value") == "killed"
    assert not [m for m in pk.outputs(forever) if m["msg_type"] == "error"]


# -- %jobs, shutdown, restart ------------------------------------------------------------------


def test_jobs_lists_the_kernels_other_threads_on_request(pk):
    bg = pk.execute("%%bg --name sleeper\nimport time\ntime.sleep(60)")
    pk.reply(bg)
    job = pk.job_id(bg)

    def table(line: str) -> str:
        shown_in = pk.outputs(pk.run(line)["parent_header"]["msg_id"])
        (shown,) = [m for m in shown_in if m["msg_type"] == "display_data"]
        return shown["content"]["data"]["text/plain"]

    plain = table("%jobs")
    assert "sleeper" in plain and "thread(s)" not in plain and "MainThread" not in plain
    text = table("%jobs --threads")
    assert "sleeper" in text
    assert "  MainThread (non-daemon)" in text
    assert "  Shell channel (daemon)" in text
    assert "  Control (daemon)" in text
    assert f"polycell-job-{job}" not in text  # a job's thread is in the table, not in the list
    pk.run(f"%job kill {job}")
    pk.wait_job_end(job)


def _stop_client(k: KernelSession) -> None:
    k._stop.set()
    k.kc.stop_channels()
    k._reader.join(5)


@pytest.mark.parametrize("restart", [False, True])
def test_shutdown_and_restart_end_every_job_and_say_so(restart):
    k = KernelSession(POLYCELL_KERNEL, load_ext=False)
    try:
        thread = k.execute("%%bg\nimport time\nwhile True:\n    time.sleep(0.05)")
        task = k.execute("%%bg\nimport asyncio\nawait asyncio.sleep(60)")
        jobs = [k.job_id(thread), k.job_id(task)]
        k.reply(thread)
        k.reply(task)
        old = k.km.provisioner.process
        reason = "kernel restarting" if restart else "kernel shutting down"
        if restart:
            k.km.restart_kernel(now=False)
        else:
            k.km.shutdown_kernel(now=False)
        for job, msg_id in zip(jobs, (thread, task), strict=True):
            k.wait_for(
                lambda m, job=job, msg_id=msg_id: (
                    m["msg_type"] == "stream"
                    and m["parent_header"].get("msg_id") == msg_id
                    and f"[job {job} killed after" in m["content"]["text"]
                ),
                timeout=10,
            )
            k.wait_job_end(job, timeout=10)
        assert old.wait(timeout=10) is not None  # the old kernel process is gone
        for job, msg_id in zip(jobs, (thread, task), strict=True):
            # One line says it all, once: how long the job ran and why it was killed.
            (line,) = [line for line in k.text(msg_id, "stderr").splitlines() if "killed" in line]
            assert re.fullmatch(rf"\[job {job} killed after \d+\.\d\ds: {reason}\]", line), line
    finally:
        _stop_client(k)
        if k.km.has_kernel:
            k.km.shutdown_kernel(now=True)


# -- what a stock kernel does keeps working ----------------------------------------------------


def test_matplotlib_inline_comms_debugger_and_subshells(pk):
    plot = pk.run("%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
    images = [
        m for m in pk.outputs(plot["parent_header"]["msg_id"]) if "image/png" in m["content"].get("data", {})
    ]
    assert images
    pk.kc.comm_info()
    assert pk.kc.get_shell_msg(timeout=10)["content"]["status"] == "ok"

    def control(msg_type: str, content: dict[str, Any]) -> Msg:
        msg = pk.kc.session.msg(msg_type, content)
        pk.kc.control_channel.send(msg)
        return pk.kc.get_control_msg(timeout=30)

    debug = control(
        "debug_request",
        {"type": "request", "seq": 1, "command": "initialize", "arguments": {"adapterID": "polycell-test"}},
    )
    assert debug["content"]["success"] is True
    created = control("create_subshell_request", {})
    subshell = created["content"]["subshell_id"]
    fg = start_foreground(pk)
    msg = pk.kc.session.msg("execute_request", {"code": "6 * 7", "silent": False})
    msg["header"]["subshell_id"] = subshell
    pk.kc.shell_channel.send(msg)
    reply = pk.reply(msg["header"]["msg_id"], timeout=30)
    assert reply["content"]["status"] == "ok"
    assert still_busy(pk, fg)
    control("delete_subshell_request", {"subshell_id": subshell})
    interrupt(pk)
    pk.reply(fg)


def test_the_kernel_logs_only_at_the_level_its_handlers_show(pk):
    """ipykernel's DEBUG lines for each request cost a record each unless the logger is at WARNING."""
    assert pk.eval("get_ipython().kernel.log.getEffectiveLevel()") == logging.WARNING


def test_a_handler_that_shows_debug_keeps_the_logger_at_debug():
    from polycell.kernelapp import _log_only_what_is_shown

    logger = logging.getLogger("polycell-test-logger")
    logger.setLevel(logging.DEBUG)
    quiet, loud = logging.NullHandler(logging.WARNING), logging.NullHandler(logging.DEBUG)
    try:
        logger.addHandler(quiet)
        _log_only_what_is_shown(logging.LoggerAdapter(logger, {}))
        assert logger.level == logging.WARNING
        logger.addHandler(loud)
        _log_only_what_is_shown(logger)
        assert logger.level == logging.DEBUG
    finally:
        logger.removeHandler(quiet)
        logger.removeHandler(loud)
