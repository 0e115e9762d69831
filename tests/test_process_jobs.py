"""``%%bg --mode process`` in a real stock ipykernel: output, merge-back, kill, interrupt, deaths."""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest

from kernel_session import POLYCELL_KERNEL, KernelSession

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _start(kernel: KernelSession, code: str, options: str = "") -> tuple[str, int]:
    msg_id = kernel.execute(f"%%bg --mode process {options}\n{code}")
    return msg_id, kernel.job_id(msg_id)


def _wait_text(kernel: KernelSession, msg_id: str, text: str, timeout: float = 30) -> None:
    kernel.wait_for(
        lambda m: (
            m["msg_type"] == "stream"
            and m["parent_header"].get("msg_id") == msg_id
            and text in kernel.text(msg_id)
        ),
        timeout,
    )


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_output_of_every_kind_lands_in_the_job_cell(kernel):
    bg, job = _start(
        kernel,
        "import os, sys, subprocess\n"
        "print('python stdout')\n"
        "print('python stderr', file=sys.stderr)\n"
        "os.write(1, b'fd one\\n')\n"
        "os.write(2, b'fd two\\n')\n"
        "os.system('echo from-c')\n"
        "subprocess.run(['echo', 'from-subprocess'])\n"
        "from IPython.display import display, HTML\n"
        "display(HTML('<b>bold</b>'))\n"
        "import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots(); ax.plot([1, 2, 3]); plt.show()\n"
        "import threading\n"
        "t = threading.Thread(target=lambda: display(HTML('<i>from a thread of the job</i>')))\n"
        "t.start(); t.join()\n"
        "os.getpid()",
    )
    fg = kernel.run("print('foreground')")
    kernel.wait_job_end(job)
    stdout, stderr = kernel.text(bg, "stdout"), kernel.text(bg, "stderr")
    for line in ("python stdout\n", "fd one\n", "from-c\n", "from-subprocess\n"):
        assert line in stdout
    assert "python stderr\n" in stderr and "fd two\n" in stderr
    assert kernel.text(fg["parent_header"]["msg_id"]) == "foreground\n"
    displays = [
        m for m in kernel.outputs(bg) if m["msg_type"] == "display_data" and m["metadata"].get("polycell")
    ]
    html = [m["content"]["data"].get("text/html", "") for m in displays]
    assert "<b>bold</b>" in html and "<i>from a thread of the job</i>" in html
    assert any("image/png" in m["content"]["data"] for m in displays)
    for msg in kernel.job_messages(job):
        assert msg["parent_header"]["msg_id"] == bg
    result = [m for m in kernel.outputs(bg) if m["msg_type"] == "execute_result"]
    child_pid = int(result[0]["content"]["data"]["text/plain"])
    kernel_pid = kernel.eval("__import__('os').getpid()")
    assert child_pid != kernel_pid
    assert kernel.eval(f"(jobs[{job}].status.value, jobs[{job}].result, jobs[{job}].info['pid'])") == (
        "done",
        child_pid,
        child_pid,
    )
    assert _gone(child_pid)


def test_assigned_names_come_back_and_overwrite_the_foreground(kernel, tmp_path):
    flag = tmp_path / "go"
    kernel.run("x = 1\nuntouched = 'kept'")
    bg, job = _start(
        kernel,
        "import os, time, json as j\n"
        "from os import path\n"
        "seen = x\n"
        f"while not os.path.exists({str(flag)!r}):\n    time.sleep(0.01)\n"
        "x = seen + 100\n"
        "def double(v):\n    return 2 * v\n"
        "class Point:\n    def __init__(self, a):\n        self.a = a\n"
        "p = Point(7)\n"
        "for i in range(3):\n    total = i\n"
        "'result'",
    )
    kernel.run("x = 50")  # the foreground changes x while the job runs; the job's x still wins
    flag.write_text("")
    kernel.wait_job_end(job)
    assert kernel.eval("(x, seen, untouched, double(21), p.a, type(p).__name__, total, i)") == (
        101,
        1,
        "kept",
        42,
        7,
        "Point",
        2,
        2,
    )
    assert kernel.eval("(j.__name__, path.__name__, j is __import__('json'))") == ("json", "posixpath", True)
    stdout = kernel.text(bg, "stdout")
    assert f"[job {job} set: os, time, j, path, seen, x, double, Point, p, i, total]\n" in stdout
    assert kernel.eval(f"jobs[{job}].result") == "result"


def test_unpicklable_values_are_skipped_one_line_each(kernel):
    bg, job = _start(
        kernel,
        "import threading\nlock = threading.Lock()\ngen = (n for n in range(3))\n"
        "kept = [1, 2]\n(n for n in range(3))",
    )
    kernel.wait_job_end(job)
    stderr = kernel.text(bg, "stderr").splitlines()
    assert stderr == [
        f"[job {job}: result not sent back (TypeError: cannot pickle 'generator' object); "
        f"jobs[{job}].result is None]",
        f"[job {job}: 'lock' not sent back (TypeError: cannot pickle '_thread.lock' object); skipped]",
        f"[job {job}: 'gen' not sent back (TypeError: cannot pickle 'generator' object); skipped]",
    ]
    assert f"[job {job} set: threading, kept]\n" in kernel.text(bg, "stdout")
    assert kernel.eval(f"(jobs[{job}].status.value, jobs[{job}].result, kept, 'lock' in dir())") == (
        "done",
        None,
        [1, 2],
        False,
    )


KILL_CASES = {
    "python loop": "print('ready', flush=True)\nwhile True:\n    pass",
    "time.sleep": "import time\nprint('ready', flush=True)\ntime.sleep(600)",
    "blocked socket": "import socket\na, b = socket.socketpair()\nprint('ready', flush=True)\na.recv(1)",
    "C code": "import ctypes\nprint('ready', flush=True)\nctypes.CDLL(None).sleep(600)",
    "grandchild": (
        "import subprocess\np = subprocess.Popen(['sleep', '600'])\n"
        "print('ready', p.pid, flush=True)\np.wait()"
    ),
}


@pytest.mark.parametrize("case", list(KILL_CASES))
def test_kill_in_every_state_leaves_no_process(kernel, case):
    bg, job = _start(kernel, KILL_CASES[case])
    _wait_text(kernel, bg, "ready")
    pids = [kernel.eval(f"jobs[{job}].info['pid']")]
    if case == "grandchild":
        pids.append(int(kernel.text(bg).split()[1]))
    assert all(psutil.pid_exists(pid) for pid in pids)
    kill = kernel.run(f"%job kill {job}")
    assert kernel.text(kill["parent_header"]["msg_id"]) == f"job {job} killed\n"
    kernel.wait_job_end(job)
    assert f"[job {job} killed after" in kernel.text(bg, "stderr")
    assert kernel.eval(f"jobs[{job}].status.value") == "killed"
    assert all(_gone(pid) for pid in pids), case


def test_kernel_interrupt_does_not_reach_process_jobs(kernel):
    bg, job = _start(
        kernel, "import time\nfor i in range(20):\n    print(i, flush=True)\n    time.sleep(0.1)"
    )
    fg = kernel.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    _wait_text(kernel, fg, "sleeping")  # the interrupt must land inside the foreground's sleep
    _wait_text(kernel, bg, "0\n")
    kernel.km.interrupt_kernel()
    reply = kernel.reply(fg, timeout=30)
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    kernel.wait_job_end(job)
    assert kernel.eval(f"jobs[{job}].status.value") == "done"
    assert kernel.text(bg) == "".join(f"{i}\n" for i in range(20)) + f"[job {job} set: time, i]\n"


DEATHS = {
    "segfault": ("import ctypes\nctypes.string_at(0)", "child process died: signal 11 (SIGSEGV)"),
    "exit code": ("import os\nos._exit(3)", "child process exited with code 3 without a result"),
}


@pytest.mark.parametrize("case", list(DEATHS))
def test_child_death_is_a_failed_job_with_its_cause(kernel, case):
    code, cause = DEATHS[case]
    bg, job = _start(kernel, code)
    kernel.wait_job_end(job)
    assert kernel.text(bg, "stderr").endswith(f"[job {job} failed: {cause}]\n")
    assert kernel.eval(f"(jobs[{job}].status.value, str(jobs[{job}].exception))") == ("failed", cause)
    assert kernel.eval("1 + 1") == 2  # the kernel lives on


def test_sigkill_from_outside_is_reported_not_taken_for_a_kill(kernel):
    bg, job = _start(kernel, "import os, time\nprint('pid', os.getpid(), flush=True)\ntime.sleep(600)")
    _wait_text(kernel, bg, "pid")
    os.kill(int(kernel.text(bg).split()[1]), signal.SIGKILL)  # as the out-of-memory killer would
    kernel.wait_job_end(job)
    cause = "child process died: signal 9 (SIGKILL), killed from outside polycell (the out-of-memory killer?)"
    assert f"[job {job} failed: {cause}]\n" in kernel.text(bg, "stderr")
    assert kernel.eval(f"jobs[{job}].status.value") == "failed"


@pytest.mark.parametrize(
    ("code", "ename"),
    [("import sys\nsys.exit(4)", "SystemExit"), ("raise KeyboardInterrupt", "KeyboardInterrupt")],
)
def test_systemexit_and_keyboardinterrupt_in_the_job_fail_it_with_traceback(kernel, code, ename):
    bg, job = _start(kernel, code)
    kernel.wait_job_end(job)
    errors = [m for m in kernel.outputs(bg) if m["msg_type"] == "error"]
    assert len(errors) == 1 and errors[0]["content"]["ename"] == ename
    tb = ANSI.sub("", "\n".join(errors[0]["content"]["traceback"]))
    assert code.splitlines()[-1] in tb
    assert kernel.eval(f"(jobs[{job}].status.value, type(jobs[{job}].exception).__name__)") == (
        "failed",
        ename,
    )


def test_exception_in_the_job_is_shown_and_kept(kernel):
    bg, job = _start(kernel, "def f():\n    raise ValueError('bad value')\nf()")
    kernel.wait_job_end(job)
    errors = [m for m in kernel.outputs(bg) if m["msg_type"] == "error"]
    assert [(e["content"]["ename"], e["content"]["evalue"]) for e in errors] == [("ValueError", "bad value")]
    tb = ANSI.sub("", "\n".join(errors[0]["content"]["traceback"]))
    assert "raise ValueError('bad value')" in tb and "polycell" not in tb
    assert kernel.eval(f"repr(jobs[{job}].exception)") == "ValueError('bad value')"
    assert "f" not in kernel.eval("list(globals())")  # a failed job merges nothing back


def test_jobs_table_and_wait_show_process_jobs(kernel):
    _, job = _start(kernel, "import time\ntime.sleep(0.2)\n6 * 7", options="--name proc")
    wait = kernel.run(f"%job wait {job} --timeout 30")
    results = [
        m for m in kernel.outputs(wait["parent_header"]["msg_id"]) if m["msg_type"] == "execute_result"
    ]
    assert results[0]["content"]["data"]["text/plain"] == "42"
    table = kernel.run("%jobs")
    shown = [m for m in kernel.outputs(table["parent_header"]["msg_id"]) if m["msg_type"] == "display_data"]
    assert re.search(rf"{job}\s+proc\s+process\s+done", shown[0]["content"]["data"]["text/plain"])


def test_without_fork_process_mode_is_a_one_line_usage_error(kernel):
    # A platform without os.fork (Windows) simulated in a real kernel: no job is made, no fallback.
    kernel.run("import os\n_fork = os.fork\ndel os.fork")
    try:
        line = kernel.error_line(kernel.run("%%bg --mode process\nprint(1)"))
    finally:
        kernel.run("os.fork = _fork")
    assert line == (
        "UsageError: --mode process needs os.fork, which linux does not have; use --mode thread or dask"
    )
    assert kernel.eval("len(jobs)") == 0


@pytest.mark.parametrize("now", [False, True], ids=["shutdown request", "kernel SIGKILLed"])
def test_process_jobs_die_with_the_kernel(now):
    kernel = KernelSession()
    grandchild = None
    try:
        bg, _job = _start(
            kernel,
            "import os, subprocess\np = subprocess.Popen(['sleep', '600'])\n"
            "print(os.getpid(), p.pid, flush=True)\np.wait()",
        )
        _wait_text(kernel, bg, "\n")
        child, grandchild = (int(pid) for pid in kernel.text(bg).split())
        kernel.km.shutdown_kernel(now=now)
        deadline = time.monotonic() + 30
        while not _gone(child) or (not now and not _gone(grandchild)):
            assert time.monotonic() < deadline, "a process job outlived its kernel"
            time.sleep(0.02)
    finally:
        kernel.close()
        # A kernel killed with SIGKILL cannot end what its jobs started (a documented limit).
        if grandchild is not None and not _gone(grandchild):
            os.kill(grandchild, signal.SIGKILL)


KERNELS = {
    "stock kernel + extension": {},
    "polycell kernel": {
        "argv": POLYCELL_KERNEL,
        "load_ext": False,
    },
}


@pytest.mark.parametrize("kind", list(KERNELS))
def test_input_and_getpass_fail_in_one_line_in_process_jobs_and_map_workers(kind):
    """Neither may reach the kernel's stdin socket (not fork-safe) nor wait for its threads."""
    kernel = KernelSession(**KERNELS[kind])
    try:
        kernel.run(
            "import getpass\n"
            "def ask(x):\n"
            "    try:\n"
            "        (input if x == 0 else getpass.getpass)('? ')\n"
            "    except EOFError as exc:\n"
            "        return str(exc)"
        )
        bg, job = _start(kernel, "print(ask(0))\nprint(ask(1))")
        kernel.wait_job_end(job)
        assert kernel.text(bg, "stdout").splitlines()[:2] == [
            "input() is not available in a process job: it has no front end to ask",
            "getpass() is not available in a process job: it has no front end to ask",
        ]
        msg_id = kernel.execute("j = jobs.map(ask, [0, 1], workers=2, mode='process', chunksize=1)")
        map_job = kernel.job_id(msg_id)
        kernel.wait_job_end(map_job)
        assert kernel.eval("j.result") == [
            "input() is not available in a map worker: it has no front end to ask",
            "getpass() is not available in a map worker: it has no front end to ask",
        ]
        assert not kernel.kc.stdin_channel.msg_ready()  # nobody asked the front end
        assert kernel.eval("1 + 1") == 2
    finally:
        kernel.close()


def test_a_process_job_cannot_start_jobs_of_its_own(kernel):
    bg, job = _start(
        kernel,
        "from polycell import jobs\n"
        "starts = [\n"
        "    lambda: jobs.map(abs, [1]),\n"
        "    lambda: jobs.map(abs, [1], mode='thread'),\n"
        "    lambda: get_ipython().run_line_magic('bg', 'print(1)'),\n"
        "    lambda: get_ipython().run_line_magic('bg', '--mode process print(1)'),\n"
        "]\n"
        "for start in starts:\n"
        "    try:\n"
        "        start()\n"
        "    except Exception as exc:\n"
        "        print(type(exc).__name__, exc)",
    )
    kernel.wait_job_end(job)
    refused = "a process job cannot start jobs of its own; start them from the notebook"
    lines = kernel.text(bg, "stdout").splitlines()
    assert lines[:4] == [f"JobError {refused}"] * 2 + [f"UsageError {refused}"] * 2
    assert kernel.eval("len(jobs)") == 1


def test_a_record_the_kernel_cannot_load_does_not_kill_the_job(kernel):
    """Display metadata holding an instance of a class the cell defines: the kernel has no such class yet."""
    bg, job = _start(
        kernel,
        "from IPython.display import display\n"
        "class Thing:\n    pass\n"
        "display({'text/plain': 'shown'}, raw=True, metadata={'thing': Thing()})\n"
        "print('after', flush=True)\n"
        "'end'",
    )
    kernel.wait_job_end(job)
    assert kernel.eval(f"(jobs[{job}].status.value, jobs[{job}].result)") == ("done", "end")
    stderr = kernel.text(bg, "stderr")
    assert f"[job {job}: an output record could not be read here (AttributeError: " in stderr
    assert stderr.count("\n") == 1
    assert "after\n" in kernel.text(bg, "stdout")


def test_a_stray_process_of_a_job_holds_no_kernel_port_and_a_restart_after_a_crash_works():
    """A process a job leaves behind outlives a SIGKILLed kernel; the restart binds the same ports."""
    session = KernelSession()
    stray = None
    try:
        _, job = _start(
            session,
            "import os, time\n"
            "ready, tell = os.pipe()\n"
            "if os.fork() == 0:\n"
            "    os.setsid()  # out of the job's process group: the job's end does not kill it\n"
            "    os.write(tell, str(os.getpid()).encode())\n"
            "    time.sleep(300)\n"
            "    os._exit(0)\n"
            "stray_pid = int(os.read(ready, 32))\n",
        )
        session.wait_job_end(job)
        stray = psutil.Process(session.eval("stray_pid"))
        assert [c for c in stray.net_connections(kind="all") if c.status == psutil.CONN_LISTEN] == []
        os.kill(session.pid, signal.SIGKILL)
        session.km.restart_kernel(now=True)
        client = session.km.client()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=60)  # raises "Kernel died..." when a port is taken
            assert stray.is_running()
        finally:
            client.stop_channels()
    finally:
        if stray is not None and stray.is_running():
            stray.kill()
            stray.wait(10)
        session.close()
