"""Every output of a job lands in its own cell, whatever writes it, on both kernels.

Each test runs twice: on a stock ipykernel with ``%load_ext polycell`` and on
the polycell kernel. Assertions are on the iopub messages of each cell, by
parent msg_id.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kernel_session import KernelSession, kernel_env
from polycell.iopub import CLIENT_WAIT_SECONDS

#: A job waits on this event, which a foreground cell sets, so that the two overlap.
GATE = "import threading\ngate = threading.Event()\njob_ready = threading.Event()"


def _streams(kernel: KernelSession, msg_id: str) -> str:
    return "".join(m["content"]["text"] for m in kernel.outputs(msg_id) if m["msg_type"] == "stream")


@pytest.mark.parametrize("mode", ["thread", "task"])
def test_programs_a_job_starts_write_to_its_cell(any_kernel: KernelSession, mode: str) -> None:
    any_kernel.run(GATE)
    bg = any_kernel.execute(
        f"%%bg --mode {mode}\n"
        "import os, subprocess, sys\n"
        "job_ready.set()\n"
        "gate.wait(30)\n"
        "subprocess.run(['echo', 'SUBPROC-LINE'])\n"
        "os.system('echo OS-SYSTEM-LINE; echo OS-SYSTEM-ERR >&2')\n"
        "subprocess.run('echo POPEN-ERR >&2', shell=True, stdout=subprocess.DEVNULL)\n"
        "print('py-line')\n"
        "print(subprocess.run(['echo', 'CAPTURED'], capture_output=True, text=True).stdout.strip() + '!')\n"
        "print(os.system('exit 3') >> 8)"
    )
    job = any_kernel.job_id(bg)
    # The foreground prints and runs its own program while the job's programs write.
    fg = any_kernel.execute(
        "import subprocess, time\njob_ready.wait(30)\nprint('fg-before')\ngate.set()\n"
        "subprocess.run(['echo', 'FG-SUBPROC'])\ntime.sleep(0.5)\nprint('fg-after')"
    )
    any_kernel.wait_idle(fg)
    any_kernel.wait_job_end(job)
    assert any_kernel.text(bg, "stdout") == "SUBPROC-LINE\nOS-SYSTEM-LINE\npy-line\nCAPTURED!\n3\n"
    assert any_kernel.text(bg, "stderr") == "OS-SYSTEM-ERR\nPOPEN-ERR\n"
    foreground = _streams(any_kernel, fg)
    for line in ("SUBPROC-LINE", "OS-SYSTEM", "POPEN-ERR"):
        assert line not in foreground
    assert "fg-before" in foreground and "fg-after" in foreground


def test_programs_outside_jobs_are_untouched(any_kernel: KernelSession) -> None:
    reply = any_kernel.run(
        "import os, subprocess\n"
        "r = subprocess.run(['sh', '-c', 'exit 5'])\n"
        "status = os.system('exit 2')\n"
        "print(r.returncode, status >> 8, type(subprocess.Popen).__name__)"
    )
    assert any_kernel.text(reply["parent_header"]["msg_id"]).endswith("5 2 type\n")


def _main_thread_in_sleep_watcher() -> str:
    """A job that prints 'main sleeps' once the main thread is blocked in the cell's own sleep."""
    return (
        "%%bg --name watcher\n"
        "import sys, threading, time\n"
        "def _main_sleeps():\n"
        "    frame = sys._current_frames().get(threading.main_thread().ident)\n"
        "    return frame is not None and frame.f_code.co_name == '<module>' and frame.f_lineno == 2\n"
        "while not _main_sleeps():\n"
        "    time.sleep(0.01)\n"
        "print('main sleeps')"
    )


def test_an_interrupted_foreground_sleep_shows_the_users_traceback(any_kernel: KernelSession) -> None:
    """After thread jobs ran (time.sleep is polycell's stand-in), a ■ in a foreground sleep
    shows the traceback it shows without polycell: the cell's line, no polycell frame."""
    watcher = any_kernel.execute(_main_thread_in_sleep_watcher())
    job = any_kernel.job_id(watcher)
    fg = any_kernel.execute("import time\ntime.sleep(300)")
    any_kernel.wait_job_end(job)
    assert any_kernel.text(watcher) == "main sleeps\n"
    any_kernel.km.interrupt_kernel()
    reply = any_kernel.reply(fg, timeout=30)
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    traceback = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(reply["content"]["traceback"]))
    assert "polycell" not in traceback and "time.sleep(300)" in traceback
    assert any_kernel.eval("time.sleep.__module__, repr(time.sleep)") == ("time", "<built-in function sleep>")


def _images(kernel: KernelSession, msg_id: str) -> int:
    return sum(
        1
        for m in kernel.outputs(msg_id)
        if m["msg_type"] in ("display_data", "execute_result") and "image/png" in m["content"]["data"]
    )


def test_a_jobs_figures_show_in_its_cell_only(any_kernel: KernelSession) -> None:
    any_kernel.run(GATE + "\nimport matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')")
    shown = any_kernel.execute(
        "%%bg\nimport matplotlib.pyplot as plt\nplt.plot([3, 2, 1])\n"
        "job_ready.set()\ngate.wait(30)\nplt.show()"
    )
    left_open = any_kernel.execute(
        "%%bg\nimport matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\ngate.wait(30)"
    )
    jobs = [any_kernel.job_id(shown), any_kernel.job_id(left_open)]
    # A foreground cell ends, and draws a figure of its own, while both jobs hold theirs open.
    fg = any_kernel.run("job_ready.wait(30)\nx = 1")["parent_header"]["msg_id"]
    fg_plot = any_kernel.run("import matplotlib.pyplot as plt\nplt.plot([5, 5])")["parent_header"]["msg_id"]
    any_kernel.run("gate.set()")
    for job in jobs:
        any_kernel.wait_job_end(job)
    assert _images(any_kernel, fg) == 0
    assert _images(any_kernel, fg_plot) == 1
    assert _images(any_kernel, shown) == 1  # at its plt.show()
    assert _images(any_kernel, left_open) == 1  # when it ended, as a foreground cell's
    assert any_kernel.eval("len(plt.get_fignums())") == 0


def _html(kernel: KernelSession, msg_id: str) -> str:
    return "".join(
        m["content"]["data"].get("text/html", "")
        for m in kernel.outputs(msg_id)
        if m["msg_type"] in ("display_data", "update_display_data")
    )


def test_rich_in_a_job_renders_as_in_a_foreground_cell(any_kernel: KernelSession) -> None:
    any_kernel.run(GATE)
    # The job is the first to use rich, while the foreground is idle.
    job_print = any_kernel.execute("%%bg\nimport rich\nrich.print('[bold]job-rich[/bold]')")
    any_kernel.wait_job_end(any_kernel.job_id(job_print))
    fg_print = any_kernel.run("rich.print('[bold]fg-rich[/bold]')")["parent_header"]["msg_id"]
    assert "job-rich" in _html(any_kernel, job_print) and "fg-rich" in _html(any_kernel, fg_print)
    assert "\x1b[" not in any_kernel.text(job_print) + any_kernel.text(fg_print)

    live = any_kernel.execute(
        "%%bg\nfrom rich.progress import track\nfor i in track(range(3)):\n"
        "    if i == 1:\n        job_ready.set()\n        gate.wait(30)\n    print('job-line', i)"
    )
    job = any_kernel.job_id(live)
    fg = any_kernel.run("job_ready.wait(30)\nprint('fg-line')\ngate.set()")["parent_header"]["msg_id"]
    any_kernel.wait_job_end(job)
    # The foreground's print stays a plain line of its own cell, out of the job's display.
    assert any_kernel.outputs(fg)[0]["content"] == {"name": "stdout", "text": "fg-line\n"}
    assert "fg-line" not in str(any_kernel.job_messages(job))
    # The live display (an ipywidgets Output) is in the job's cell and captures the job's cell.
    widget_views = [
        m
        for m in any_kernel.outputs(live)
        if m["msg_type"] == "display_data"
        and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]
    ]
    assert len(widget_views) == 1
    captures = {
        m["content"]["data"]["state"]["msg_id"]
        for m in any_kernel.messages
        if m["msg_type"] == "comm_msg" and "msg_id" in m["content"]["data"].get("state", {})
    }
    assert captures <= {live, ""} and live in captures
    assert all(f"job-line {i}" in _html(any_kernel, live) for i in range(3))


def _end_line_of(msg: dict[str, Any]) -> int | None:
    mark = msg["metadata"].get("polycell", {})
    return mark.get("job") if mark.get("end_line") else None


def test_jupyter_console_learns_how_a_job_ended(any_kernel: KernelSession) -> None:
    """The real jupyter console, which ignores display updates, on the kernel: one line per job end."""
    console = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_console",
            "--existing",
            any_kernel.connection_file,
            "--simple-prompt",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=kernel_env(),
    )
    try:
        assert console.stdin is not None
        console.stdin.write("%bg --name fine print('job-out')\n%bg --name broken 1 / 0\n")
        console.stdin.flush()
        # Once this client has both end lines, so has the console's socket: the kernel
        # publishes the reply to its next cell after them, on the same socket.
        for job in (1, 2):
            any_kernel.wait_for(lambda m, job=job: _end_line_of(m) == job, 60)
        screen, _ = console.communicate("print('after')\n", timeout=60)
    finally:
        if console.poll() is None:
            console.kill()
            console.wait(10)
    screen = re.sub(r"\x1b\[[0-9;]*m", "", screen)
    assert "job-out" in screen and "ZeroDivisionError" in screen and "after" in screen
    assert re.search(r"\[job 1 done after \d+\.\ds\]", screen), screen
    assert re.search(r"\[job 2 failed after \d+\.\ds\]", screen), screen


def test_a_notebook_gets_no_end_line_its_handle_says_it(any_kernel: KernelSession) -> None:
    """JupyterLab and Notebook 7 send the cell's id; they redraw the handle, so no extra line."""
    msg_id = any_kernel.execute_in_cell("%%bg\nprint('in a notebook')", "a-cell-id")
    job = any_kernel.job_id(msg_id)
    any_kernel.wait_job_end(job)
    assert any_kernel.text(msg_id) == "in a notebook\n"
    plain = any_kernel.execute("%%bg\nprint('from a terminal')")
    any_kernel.wait_job_end(any_kernel.job_id(plain))
    any_kernel.wait_for(lambda m: _end_line_of(m) is not None and m["parent_header"]["msg_id"] == plain)
    printed = any_kernel.text(plain, end_lines=True)
    assert re.fullmatch(r"from a terminal\n\[job \d+ done after \d+\.\ds\]\n", printed)
    assert not [m for m in any_kernel.messages if _end_line_of(m) == job]


def test_unload_ext_puts_back_what_polycell_replaced(kernel: KernelSession) -> None:
    kernel.run("%%bg\nimport matplotlib.pyplot as plt\nplt.plot([1])")  # a thread job; pyplot adopted
    kernel.run("import os, subprocess, time\nfrom matplotlib import _pylab_helpers")
    kernel.run("%unload_ext polycell")
    replaced = "(type(time.sleep).__name__, type(os.system).__name__, subprocess.Popen.__module__, "
    replaced += "type(_pylab_helpers.Gcf.figs).__name__)"
    builtin = "builtin_function_or_method"
    assert kernel.eval(replaced) == (builtin, builtin, "subprocess", "OrderedDict")


def test_a_client_that_falls_behind_still_gets_every_message(
    any_kernel: KernelSession, tmp_path: Path
) -> None:
    """A burst of output sent while the client reads nothing arrives whole, in order, once it reads.

    Not a job's only: any output. ZeroMQ's iopub socket drops what a subscriber's full
    queue cannot take unless told to wait (`polycell.iopub.PatientIOPubSocket`).
    20,000 messages are far more than ZeroMQ's queues and the network buffers between
    kernel and client hold, so without the wait most of them are dropped. The client
    pauses for less than the kernel waits for it (`CLIENT_WAIT_SECONDS`).
    """
    n, sent = 20_000, tmp_path / "sent"
    with any_kernel.not_reading():
        msg_id = any_kernel.execute(
            "import sys\nfrom IPython.display import display\n"
            f"for i in range({n}):\n    display(i)\n"
            "sys.stdout.flush()\n"  # waits for the IOPub thread to send what was queued before it
            f"open({str(sent)!r}, 'w').close()"
        )
        # Until the kernel says all was sent (dropped, if nothing made it wait), or it has been
        # held back a while: either way, far more than every queue holds is now on its way.
        deadline = time.monotonic() + CLIENT_WAIT_SECONDS - 1.5
        while not sent.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert any_kernel.reply(msg_id, timeout=120)["content"]["status"] == "ok"
    try:
        any_kernel.wait_idle(msg_id, timeout=30)
        idle = True
    except TimeoutError:
        idle = False
    shown = [m["content"]["data"]["text/plain"] for m in any_kernel.outputs(msg_id)]
    assert len(shown) == n and idle, (
        f"{n - len(shown)} of {n} displays lost; idle status {'came' if idle else 'lost'}"
    )
    assert shown == [str(i) for i in range(n)]


def test_a_client_that_reads_no_output_holds_the_kernel_back_only_for_a_while(
    any_kernel: KernelSession,
) -> None:
    """A script that waits for its replies and never reads iopub still gets them.

    The kernel waits `CLIENT_WAIT_SECONDS` for it, then drops what it cannot take (for a
    while), as ZeroMQ does at once: the polycell kernel's main thread, which sends its
    own output, must not wait for such a client for ever.
    """
    with any_kernel.not_reading():
        msg_id = any_kernel.execute(
            "from IPython.display import display\nfor i in range(20_000):\n    display(i)"
        )
        reply = any_kernel.reply(msg_id, timeout=60)
        assert reply["content"]["status"] == "ok"
        assert any_kernel.reply(any_kernel.execute("1"), timeout=30)["content"]["status"] == "ok"
