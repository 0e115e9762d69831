"""The ``polycell`` command line against real kernels, run as a separate process like a user would."""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from kernel_session import POLYCELL_KERNEL, KernelSession, kernel_env, polycell
from polycell.cli import main
from polycell.journal_store import read_job
from polycell.kernel_link import KernelLink


def _tail(job: int, runtime: Path) -> subprocess.Popen[str]:
    """``polycell tail N`` running as a separate process, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "polycell.cli", "tail", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**kernel_env(), "JUPYTER_RUNTIME_DIR": str(runtime)},
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str] | tuple[int, str], *words: str) -> None:
    code, stderr = (result.returncode, result.stderr) if not isinstance(result, tuple) else result
    assert code != 0
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    for word in words:
        assert word in stderr, stderr


@pytest.fixture
def runtime(tmp_path, monkeypatch) -> Path:
    """A Jupyter runtime directory of the test's own, so 'the newest kernel' is ours."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(params=["ipykernel+ext", "polycell-kernel"])
def rt_kernel(runtime, request):
    """A kernel with polycell, whose connection file is in `runtime`: stock ipykernel with
    ``%load_ext polycell``, and the polycell kernel."""
    if request.param == "polycell-kernel":
        session = KernelSession(
            POLYCELL_KERNEL, load_ext=False, connection_file=str(runtime / "kernel-clitest.json")
        )
    else:
        session = KernelSession(connection_file=str(runtime / "kernel-clitest.json"))
    try:
        yield session
    finally:
        session.close()


def _idle_seen(kernel: KernelSession, msg_id: str) -> bool:
    return any(
        m["msg_type"] == "status"
        and m["content"]["execution_state"] == "idle"
        and m["parent_header"].get("msg_id") == msg_id
        for m in list(kernel.messages)
    )


def test_ipykernel_control_dispatch_is_where_we_reach():
    """polycell.control registers in Kernel.control_handlers (ipykernel 7.4.0): fail if that moves."""
    from ipykernel.kernelbase import Kernel

    assert "self.control_handlers = {}" in inspect.getsource(Kernel.__init__)
    source = inspect.getsource(Kernel.process_control)
    assert "self.control_handlers.get(msg_type" in source
    assert "handler(self.control_stream, idents, msg)" in source


def test_jobs_kill_and_tail_answer_while_the_main_thread_sleeps(rt_kernel, runtime):
    kernel = rt_kernel
    started = kernel.execute("%%bg --name sleeper\nimport time\nprint('started')\ntime.sleep(120)")
    job = kernel.job_id(started)
    kernel.wait_for(lambda m: m["parent_header"].get("msg_id") == started and m["msg_type"] == "stream")
    foreground = kernel.start_foreground("import time\ntime.sleep(60)")

    listed = polycell("jobs", "--json", runtime=runtime)  # the newest connection file: this kernel
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["id"], r["name"], r["status"], r["last_output"]) for r in rows] == [
        (job, "sleeper", "running", "started")
    ]
    table = polycell("jobs", "--existing", kernel.connection_file, runtime=runtime)
    assert re.search(rf"^{job}\s+sleeper\s+thread\s+running\s+\S+\s+started$", table.stdout, re.M), (
        table.stdout
    )

    killed = polycell("kill", str(job), "--existing", kernel.connection_file, runtime=runtime)
    assert (killed.returncode, killed.stdout) == (0, f"job {job} killed\n"), killed.stderr
    tail = polycell("tail", str(job), runtime=runtime)
    assert tail.returncode == 0
    assert tail.stdout == "started\n"
    assert f"[job {job} killed after" in tail.stderr
    top = polycell("top", "--once", runtime=runtime)
    assert top.returncode == 0 and "sleeper" in top.stdout and "killed" in top.stdout

    # All of that happened while the foreground cell was still sleeping.
    assert not _idle_seen(kernel, foreground)
    kernel.km.interrupt_kernel()
    assert kernel.reply(foreground)["content"]["status"] == "error"
    assert kernel.eval(f"jobs[{job}].status.value") == "killed"


def test_tail_replays_then_follows_until_the_job_ends(rt_kernel, runtime):
    kernel = rt_kernel
    kernel.run("import threading; gate = threading.Event()")
    started = kernel.execute(
        "%%bg\nfor i in range(20):\n    print('line', i)\n"
        "import sys; print('to stderr', file=sys.stderr)\n"
        "gate.wait()\nfor i in range(20, 40):\n    print('line', i)\n"
        "from IPython.display import display; display({'text/plain': 'a rich output'}, raw=True)\n"
        "1 / 0"
    )
    job = kernel.job_id(started)
    with _tail(job, runtime) as tail:
        assert tail.stdout is not None
        seen = [tail.stdout.readline() for _ in range(20)]  # the replay, while the job waits
        assert seen == [f"line {i}\n" for i in range(20)]
        kernel.run("gate.set()")
        stdout, stderr = tail.communicate(timeout=60)
    assert tail.returncode == 0
    assert stdout == "".join(f"line {i}\n" for i in range(20, 40)) + "a rich output\n"
    assert stderr.startswith("to stderr\n")
    assert "ZeroDivisionError" in stderr and "\x1b[" not in stderr
    assert f"[job {job} failed after" in stderr


def test_ctrl_c_detaches_tail_and_the_job_keeps_running(rt_kernel, runtime):
    kernel = rt_kernel
    job = kernel.job_id(kernel.execute("%%bg\nimport time\nprint('up')\ntime.sleep(120)"))
    with _tail(job, runtime) as tail:
        assert tail.stdout is not None
        assert tail.stdout.readline() == "up\n"
        tail.send_signal(signal.SIGINT)
        _, stderr = tail.communicate(timeout=30)
    assert tail.returncode == 0
    assert stderr.strip() == f"[detached from job {job}; it keeps running]"
    assert kernel.eval(f"jobs[{job}].status.value") == "running"
    kernel.run(f"%job kill {job}")


def test_log_after_the_kernel_was_killed(rt_kernel, runtime):
    kernel = rt_kernel
    started = kernel.execute(
        "%%bg --name counter\nimport itertools, time\n"
        "for i in itertools.count():\n    print('line', i)\n    time.sleep(0.002)"
    )
    job = kernel.job_id(started)
    deadline = time.monotonic() + 60
    while True:  # wait until the store has committed a good part of the output
        try:
            _, records = read_job(kernel.store_path, job)
        except (LookupError, FileNotFoundError):
            records = []
        on_disk = "".join(r["content"]["text"] for r in records if r["msg_type"] == "stream")
        if on_disk.count("\n") >= 200:
            break
        assert time.monotonic() < deadline, "the journal store never got 200 lines"
        time.sleep(0.05)
    process = psutil.Process(kernel.pid)
    os.kill(kernel.pid, signal.SIGKILL)
    process.wait(30)  # reaps it too: gone, not a zombie

    table = polycell("log", runtime=runtime)  # the newest journal in the runtime directory
    assert table.returncode == 0, table.stderr
    assert re.search(rf"^{job}\s+counter\s+thread\s+lost\s+\S+\s+line \d+$", table.stdout, re.M), table.stdout
    log = polycell("log", str(job), "--existing", kernel.connection_file, runtime=runtime)
    assert log.returncode == 0, log.stderr
    lines = log.stdout.splitlines()
    assert len(lines) >= 200
    assert lines == [f"line {i}" for i in range(len(lines))]
    assert on_disk.startswith(log.stdout) or log.stdout.startswith(on_disk)
    assert len(log.stdout) >= len(on_disk)

    missing = polycell("log", "99", runtime=runtime)
    assert_one_line_error(missing, "no job 99")


def test_100k_lines_all_in_order_in_memory_and_on_disk_memory_bounded(rt_kernel, runtime):
    kernel = rt_kernel
    count = 100_000
    process = psutil.Process(kernel.pid)
    before = process.memory_info().rss
    started = kernel.execute(f"%%bg --name flood\nfor i in range({count}):\n    print(i)")
    job = kernel.job_id(started)
    kernel.wait_job_end(job, timeout=240)
    expected = "".join(f"{i}\n" for i in range(count))
    assert kernel.text(started) == expected
    assert kernel.eval(f"jobs[{job}].output == ''.join(f'{{i}}\\n' for i in range({count}))") is True
    deadline = time.monotonic() + 60
    while True:
        stored, records = read_job(kernel.store_path, job)
        if stored.status == "done":
            break
        assert time.monotonic() < deadline, "the journal store never recorded the end of the job"
        time.sleep(0.05)
    assert "".join(r["content"]["text"] for r in records if r["msg_type"] == "stream") == expected
    assert len(records) < 1000  # merged into rows, not one row per print
    after = process.memory_info().rss
    assert after - before < 300 * 2**20, f"kernel RSS grew by {(after - before) / 2**20:.0f} MB"


# -- bad input: one line on stderr, non-zero exit, never a traceback ----------------------------------


def _main(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(list(args)))
    return int(exit_info.value.code or 0), capsys.readouterr().err


def test_no_kernel_found(runtime, capsys):
    assert_one_line_error(_main(capsys, "jobs"), "no running kernel found", str(runtime))
    assert_one_line_error(_main(capsys, "log"), "no polycell journal found")
    assert_one_line_error(_main(capsys, "kill", "1", "--existing", "kernel-nope.json"), "kernel-nope.json")
    assert_one_line_error(_main(capsys, "log", "--existing", "kernel-nope.json"), "no polycell journal")


def test_stale_and_broken_connection_files(runtime, capsys):
    from jupyter_client.connect import write_connection_file

    stale, _ = write_connection_file(str(runtime / "kernel-stale.json"))  # ports nobody listens on
    code, err = _main(capsys, "jobs", "--existing", stale, "--timeout", "0.5")
    assert_one_line_error((code, err), "no answer from the kernel", "0.5s")
    broken = runtime / "kernel-broken.json"
    broken.write_text("{not json")
    assert_one_line_error(_main(capsys, "jobs", "--existing", str(broken)), "not a kernel connection file")
    assert_one_line_error(_main(capsys, "jobs", "--timeout", "0"), "--timeout")


def test_bad_arguments(capsys):
    code, err = _main(capsys, "tail", "abc")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "invalid int value" in err
    code, err = _main(capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_unknown_job_and_ended_job(rt_kernel, runtime):
    kernel = rt_kernel
    job = kernel.job_id(kernel.execute("%%bg\nprint('quick')"))
    kernel.wait_job_end(job)
    assert_one_line_error(polycell("tail", "7", runtime=runtime), "no job 7", "known jobs are 1-1")
    assert_one_line_error(polycell("kill", "7", runtime=runtime), "no job 7")
    assert_one_line_error(polycell("kill", str(job), runtime=runtime), f"job {job} already ended (done)")


def test_a_kernel_without_polycell(runtime):
    session = KernelSession(load_ext=False, connection_file=str(runtime / "kernel-plain.json"))
    try:
        result = polycell("jobs", runtime=runtime)
        assert_one_line_error(result, "does not answer polycell requests", "%load_ext polycell")
    finally:
        session.close()


def test_a_job_keeps_the_id_of_the_cell_that_started_it(any_kernel):
    """JupyterLab sends the cell's id with each request; the jobs list over the control channel has it."""
    kernel = any_kernel
    tagged = kernel.job_id(kernel.execute_in_cell("%%bg\nprint('in its cell')", "cell-7f3a"))
    untagged = kernel.job_id(kernel.execute("%%bg\nprint('no cell id')"))
    with KernelLink(kernel.connection_file, 10) as link:
        rows = {row["id"]: row for row in link.request("jobs")["jobs"]}
    assert rows[tagged]["info"]["cell_id"] == "cell-7f3a"
    assert "cell_id" not in rows[untagged]["info"]
