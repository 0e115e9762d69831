"""Every output of a job lands in its own cell, whatever writes it, on both kernels.

Each test runs twice: on a stock ipykernel with ``%load_ext polycell`` and on
the polycell kernel. Assertions are on the iopub messages of each cell, by
parent msg_id.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from kernel_session import POLYCELL_KERNEL, KernelSession

#: A job waits on this event, which a foreground cell sets, so that the two overlap.
GATE = "import threading\ngate = threading.Event()\njob_ready = threading.Event()"


@pytest.fixture(params=["extension", "kernel"])
def session(request: pytest.FixtureRequest) -> Iterator[KernelSession]:
    if request.param == "extension":
        s = KernelSession()
    else:
        s = KernelSession(POLYCELL_KERNEL, load_ext=False)
    try:
        yield s
    finally:
        s.close()


def _streams(session: KernelSession, msg_id: str) -> str:
    return "".join(m["content"]["text"] for m in session.outputs(msg_id) if m["msg_type"] == "stream")


@pytest.mark.parametrize("mode", ["thread", "task"])
def test_programs_a_job_starts_write_to_its_cell(session: KernelSession, mode: str) -> None:
    session.run(GATE)
    bg = session.execute(
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
    job = session.job_id(bg)
    # The foreground prints and runs its own program while the job's programs write.
    fg = session.execute(
        "import subprocess, time\njob_ready.wait(30)\nprint('fg-before')\ngate.set()\n"
        "subprocess.run(['echo', 'FG-SUBPROC'])\ntime.sleep(0.5)\nprint('fg-after')"
    )
    session.wait_idle(fg)
    session.wait_job_end(job)
    assert session.text(bg, "stdout") == "SUBPROC-LINE\nOS-SYSTEM-LINE\npy-line\nCAPTURED!\n3\n"
    assert session.text(bg, "stderr") == "OS-SYSTEM-ERR\nPOPEN-ERR\n"
    foreground = _streams(session, fg)
    for line in ("SUBPROC-LINE", "OS-SYSTEM", "POPEN-ERR"):
        assert line not in foreground
    assert "fg-before" in foreground and "fg-after" in foreground


def test_programs_outside_jobs_are_untouched(session: KernelSession) -> None:
    reply = session.run(
        "import os, subprocess\n"
        "r = subprocess.run(['sh', '-c', 'exit 5'])\n"
        "status = os.system('exit 2')\n"
        "print(r.returncode, status >> 8, type(subprocess.Popen).__name__)"
    )
    assert session.text(reply["parent_header"]["msg_id"]).endswith("5 2 type\n")


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


def test_an_interrupted_foreground_sleep_shows_the_users_traceback(session: KernelSession) -> None:
    """After thread jobs ran (time.sleep is polycell's stand-in), a ■ in a foreground sleep
    shows the traceback it shows without polycell: the cell's line, no polycell frame."""
    watcher = session.execute(_main_thread_in_sleep_watcher())
    job = session.job_id(watcher)
    fg = session.execute("import time\ntime.sleep(300)")
    session.wait_job_end(job)
    assert session.text(watcher) == "main sleeps\n"
    session.km.interrupt_kernel()
    reply = session.reply(fg, timeout=30)
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    traceback = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(reply["content"]["traceback"]))
    assert "polycell" not in traceback and "time.sleep(300)" in traceback
    assert session.eval("time.sleep.__module__, repr(time.sleep)") == ("time", "<built-in function sleep>")


def _images(session: KernelSession, msg_id: str) -> int:
    return sum(
        1
        for m in session.outputs(msg_id)
        if m["msg_type"] in ("display_data", "execute_result") and "image/png" in m["content"]["data"]
    )


def test_a_jobs_figures_show_in_its_cell_only(session: KernelSession) -> None:
    session.run(GATE + "\nimport matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')")
    shown = session.execute(
        "%%bg\nimport matplotlib.pyplot as plt\nplt.plot([3, 2, 1])\n"
        "job_ready.set()\ngate.wait(30)\nplt.show()"
    )
    left_open = session.execute("%%bg\nimport matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\ngate.wait(30)")
    jobs = [session.job_id(shown), session.job_id(left_open)]
    # A foreground cell ends, and draws a figure of its own, while both jobs hold theirs open.
    fg = session.run("job_ready.wait(30)\nx = 1")["parent_header"]["msg_id"]
    fg_plot = session.run("import matplotlib.pyplot as plt\nplt.plot([5, 5])")["parent_header"]["msg_id"]
    session.run("gate.set()")
    for job in jobs:
        session.wait_job_end(job)
    assert _images(session, fg) == 0
    assert _images(session, fg_plot) == 1
    assert _images(session, shown) == 1  # at its plt.show()
    assert _images(session, left_open) == 1  # when it ended, as a foreground cell's
    assert session.eval("len(plt.get_fignums())") == 0


def _html(session: KernelSession, msg_id: str) -> str:
    return "".join(
        m["content"]["data"].get("text/html", "")
        for m in session.outputs(msg_id)
        if m["msg_type"] in ("display_data", "update_display_data")
    )


def test_rich_in_a_job_renders_as_in_a_foreground_cell(session: KernelSession) -> None:
    session.run(GATE)
    # The job is the first to use rich, while the foreground is idle.
    job_print = session.execute("%%bg\nimport rich\nrich.print('[bold]job-rich[/bold]')")
    session.wait_job_end(session.job_id(job_print))
    fg_print = session.run("rich.print('[bold]fg-rich[/bold]')")["parent_header"]["msg_id"]
    assert "job-rich" in _html(session, job_print) and "fg-rich" in _html(session, fg_print)
    assert "\x1b[" not in session.text(job_print) + session.text(fg_print)

    live = session.execute(
        "%%bg\nfrom rich.progress import track\nfor i in track(range(3)):\n"
        "    if i == 1:\n        job_ready.set()\n        gate.wait(30)\n    print('job-line', i)"
    )
    job = session.job_id(live)
    fg = session.run("job_ready.wait(30)\nprint('fg-line')\ngate.set()")["parent_header"]["msg_id"]
    session.wait_job_end(job)
    # The foreground's print stays a plain line of its own cell, out of the job's display.
    assert session.outputs(fg)[0]["content"] == {"name": "stdout", "text": "fg-line\n"}
    assert "fg-line" not in str(session.job_messages(job))
    # The live display (an ipywidgets Output) is in the job's cell and captures the job's cell.
    widget_views = [
        m
        for m in session.outputs(live)
        if m["msg_type"] == "display_data"
        and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]
    ]
    assert len(widget_views) == 1
    captures = {
        m["content"]["data"]["state"]["msg_id"]
        for m in session.messages
        if m["msg_type"] == "comm_msg" and "msg_id" in m["content"]["data"].get("state", {})
    }
    assert captures <= {live, ""} and live in captures
    assert all(f"job-line {i}" in _html(session, live) for i in range(3))
