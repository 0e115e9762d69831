"""%%bg --mode dask and jobs.map(mode="dask") against a real LocalCluster, and dask's bad inputs."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel_session import KernelSession


def _job_id(kernel: KernelSession, msg_id: str) -> int:
    handle = kernel.wait_for(
        lambda m: (
            m["msg_type"] == "display_data"
            and m["parent_header"].get("msg_id") == msg_id
            and "polycell-handle" in m["content"]["data"].get("text/html", "")
        )
    )
    return int(handle["content"]["data"]["text/plain"].split()[2])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dask_kernel(dask_cluster: str) -> Iterator[KernelSession]:
    session = KernelSession()
    try:
        reply = session.run(f"import polycell\n_ = polycell.use_dask({dask_cluster!r})")
        assert reply["content"]["status"] == "ok", reply["content"]
        yield session
    finally:
        session.close()


def test_cell_runs_on_a_worker_streams_output_live_and_brings_names_back(dask_kernel, tmp_path):
    kernel = dask_kernel
    flag = tmp_path / "go"
    kernel.run(
        f"base = 20\ndef twice(x):\n    return 2 * x\nflag = {str(flag)!r}\nunused = open(flag + '.x', 'w')"
    )
    msg_id = kernel.execute(
        "%%bg --mode dask --name remote\n"
        "import os, time\n"
        "from IPython.display import display, HTML\n"
        "print('first')\n"
        "while not os.path.exists(flag):\n"
        "    time.sleep(0.02)\n"
        "display(HTML('<b>rich</b>'))\n"
        "answer = twice(base) + 2\n"
        "print('answer', answer)\n"
        "answer * 10"
    )
    assert kernel.reply(msg_id)["content"]["status"] == "ok"
    job = _job_id(kernel, msg_id)
    first = kernel.wait_for(
        lambda m: m["msg_type"] == "stream" and m["content"]["text"] == "first\n", timeout=60
    )
    # Live: the job is still waiting for the flag when its first line is here.
    assert first["parent_header"]["msg_id"] == msg_id
    assert first["metadata"]["polycell"]["job"] == job
    assert kernel.eval(f"jobs[{job}].status.value") == "running"
    flag.write_text("")
    kernel.wait_job_end(job, timeout=60)
    assert kernel.text(msg_id, "stdout") == "first\nanswer 42\n"
    outputs = kernel.outputs(msg_id)
    rich = [m for m in outputs if m["msg_type"] == "display_data" and m["metadata"].get("polycell")]
    assert any(m["content"]["data"].get("text/html") == "<b>rich</b>" for m in rich)
    result = [m for m in outputs if m["msg_type"] == "execute_result"]
    assert result[0]["content"]["data"]["text/plain"] == "420"
    assert kernel.eval(f"(answer, jobs[{job}].result, display.__module__)") == (
        42,
        420,
        "IPython.core.display_functions",
    )
    worker = kernel.eval(f"jobs[{job}].info['worker']")
    assert worker.startswith("tcp://127.0.0.1:")
    table = kernel.text(kernel.run("print(repr(jobs))")["parent_header"]["msg_id"])
    assert f"dask @ {worker}" in table


def test_error_traceback_lands_in_the_cell(dask_kernel):
    kernel = dask_kernel
    msg_id = kernel.execute("%%bg --mode dask\nx = 1\ny = x / 0")
    job = _job_id(kernel, msg_id)
    kernel.wait_job_end(job, timeout=60)
    errors = [m for m in kernel.outputs(msg_id) if m["msg_type"] == "error"]
    assert [(e["content"]["ename"], e["content"]["evalue"]) for e in errors] == [
        ("ZeroDivisionError", "division by zero")
    ]
    assert any("y = x / 0" in line for line in errors[0]["content"]["traceback"])
    assert kernel.eval(f"(jobs[{job}].status.value, type(jobs[{job}].exception).__name__)") == (
        "failed",
        "ZeroDivisionError",
    )


def test_kill_of_a_python_loop_stops_it(dask_kernel):
    kernel = dask_kernel
    msg_id = kernel.execute("%%bg --mode dask\nn = 0\nprint('looping')\nwhile True:\n    n += 1")
    job = _job_id(kernel, msg_id)
    kernel.wait_for(lambda m: m["msg_type"] == "stream" and m["content"]["text"] == "looping\n", timeout=60)
    assert kernel.eval(f"jobs[{job}].kill(timeout=10).value") == "killed"
    kernel.wait_job_end(job)
    # The worker is free again: the next cell runs.
    nxt = kernel.execute("%%bg --mode dask\n'free'")
    kernel.wait_job_end(_job_id(kernel, nxt), timeout=60)
    assert kernel.eval(f"jobs[{job} + 1].result") == "free"


def test_kill_of_a_task_blocked_in_c_says_so(dask_kernel):
    kernel = dask_kernel
    msg_id = kernel.execute("%%bg --mode dask\nimport time\nprint('sleeping')\ntime.sleep(4)\nprint('woke')")
    job = _job_id(kernel, msg_id)
    kernel.wait_for(lambda m: m["msg_type"] == "stream" and m["content"]["text"] == "sleeping\n", timeout=60)
    assert kernel.eval(f"jobs[{job}].kill(timeout=0.2).value") == "kill requested, still blocked"
    note = kernel.wait_for(
        lambda m: m["msg_type"] == "stream" and "dask could not stop" in m["content"]["text"]
    )
    assert note["parent_header"]["msg_id"] == msg_id
    kernel.wait_job_end(job, timeout=60)  # once the sleep returns
    assert kernel.eval(f"jobs[{job}].status.value") == "killed"
    assert "woke" not in kernel.text(msg_id)


def test_a_name_that_cannot_be_pickled_is_named(dask_kernel):
    kernel = dask_kernel
    kernel.run("import threading\nguard = threading.Lock()")
    reply = kernel.run("%%bg --mode dask\nwith guard:\n    pass")
    line = kernel.error_line(reply)
    assert line.startswith("UsageError: %%bg --mode dask: cannot send 'guard' (lock) to the cluster")
    assert "\n" not in line
    assert kernel.eval("len(jobs)") == 0


def test_map_spreads_over_the_cluster_workers(dask_kernel):
    kernel = dask_kernel
    kernel.run(
        "import time\n"
        "def where(x):\n"
        "    import distributed\n"
        "    time.sleep(0.05)\n"
        "    if x == 3:\n"
        "        print('three on a worker')\n"
        "    return (x, distributed.get_worker().address)"
    )
    msg_id = kernel.execute("j = jobs.map(where, range(40), mode='dask', chunksize=2)")
    job = _job_id(kernel, msg_id)
    kernel.wait_job_end(job, timeout=60)
    assert kernel.eval("[x for x, _ in j.result] == list(range(40))") is True
    assert kernel.eval("len({w for _, w in j.result})") == 2
    assert "three on a worker\n" in kernel.text(msg_id, "stdout")
    assert "40/40" in kernel.text(msg_id, "stderr")


def test_map_on_dask_reports_the_failing_item(dask_kernel):
    kernel = dask_kernel
    kernel.run("def inv(x):\n    return 1 / (x - 9)")
    msg_id = kernel.execute("j = jobs.map(inv, range(20), mode='dask', chunksize=4)")
    job = _job_id(kernel, msg_id)
    kernel.wait_job_end(job, timeout=60)
    assert kernel.eval("str(j.exception)") == "item 9 failed: ZeroDivisionError: division by zero"


def test_unreachable_scheduler_is_one_line_within_the_timeout(kernel):
    port = _closed_port()
    t0 = time.monotonic()
    reply = kernel.run(f"import polycell\npolycell.use_dask('tcp://127.0.0.1:{port}', timeout=2)", timeout=60)
    assert time.monotonic() - t0 < 30  # hang guard only
    assert reply["content"]["ename"] == "JobError"
    assert reply["content"]["evalue"].startswith(
        f"dask: cannot reach the scheduler at tcp://127.0.0.1:{port}"
    )
    assert "\n" not in reply["content"]["evalue"]
    # The same through the environment variable, for %%bg.
    kernel.run(f"import os\nos.environ['DASK_SCHEDULER_ADDRESS'] = 'tcp://127.0.0.1:{port}'")
    reply = kernel.run("%%bg --mode dask\n1 + 1", timeout=60)
    assert kernel.error_line(reply).startswith("UsageError: dask: cannot reach the scheduler")
    assert kernel.eval("len(jobs)") == 0


def test_without_dask_installed_the_message_says_how_to_install_it(tmp_path, monkeypatch):
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class _NoDask:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('dask', 'distributed'):\n"
        "            raise ImportError(f'No module named {name!r} (blocked by the test)')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _NoDask())\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(Path(tmp_path)))
    session = KernelSession()
    try:
        assert session.eval("__import__('sys').modules.get('distributed') is None") is True
        reply = session.run("%%bg --mode dask\n1 + 1")
        hint = "dask mode needs dask.distributed, which is not installed: pip install polycell[dask]"
        assert session.error_line(reply) == f"UsageError: {hint}"
        reply = session.run("jobs.map(abs, range(3), mode='dask')")
        assert reply["content"]["evalue"].endswith("pip install polycell[dask]")
        # Other modes are unaffected.
        assert session.eval("jobs.map(abs, [-1, -2], mode='thread').wait(30)") is True
    finally:
        session.close()


def test_default_local_cluster_is_started_on_first_use_and_closed_at_shutdown(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    session = KernelSession()
    try:
        msg_id = session.execute("%%bg --mode dask\nimport os\nos.getpid()")
        job = _job_id(session, msg_id)
        session.wait_job_end(job, timeout=120)
        assert session.eval(f"jobs[{job}].status.value") == "done"
        assert session.eval(f"jobs[{job}].result != __import__('os').getpid()") is True
        workers = (
            "[p for p in psutil.Process().children() if 'resource_tracker' not in ' '.join(p.cmdline())]"
        )
        session.run("import psutil")
        assert session.eval(f"len({workers})") >= 1  # the cluster's worker processes (nannies)
        session.run("_ = jobs.shutdown()")
        # multiprocessing's resource tracker is the interpreter's, not the cluster's: it stays.
        deadline = time.monotonic() + 60
        while session.eval(f"len({workers})") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session.eval(f"[p.cmdline() for p in {workers}]") == []
    finally:
        session.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
