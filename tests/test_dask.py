"""%%bg --mode dask and jobs.map(mode="dask") against a real LocalCluster, and dask's bad inputs."""

from __future__ import annotations

import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from kernel_session import POLYCELL_KERNEL, KernelSession


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _until(kernel: KernelSession, expression: str, timeout: float = 60) -> None:
    """Poll `expression` in the kernel until it is true (hang guard: `timeout`)."""
    deadline = time.monotonic() + timeout
    while not kernel.eval(expression):
        assert time.monotonic() < deadline, f"still false after {timeout} s: {expression}"
        time.sleep(0.05)


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
    job = kernel.job_id(msg_id)
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
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job, timeout=60)
    errors = [m for m in kernel.outputs(msg_id) if m["msg_type"] == "error"]
    assert [(e["content"]["ename"], e["content"]["evalue"]) for e in errors] == [
        ("ZeroDivisionError", "division by zero")
    ]
    assert any("y = x / 0" in _plain(line) for line in errors[0]["content"]["traceback"])
    assert kernel.eval(f"(jobs[{job}].status.value, type(jobs[{job}].exception).__name__)") == (
        "failed",
        "ZeroDivisionError",
    )


def test_error_traceback_is_ipythons_from_the_cells_frame(dask_kernel):
    kernel = dask_kernel
    msg_id = kernel.execute("%%bg --mode dask\ndef inner(v):\n    return {}[v]\n\ninner('missing')")
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job, timeout=60)
    (error,) = [m["content"] for m in kernel.outputs(msg_id) if m["msg_type"] == "error"]
    assert (error["ename"], error["evalue"]) == ("KeyError", "'missing'")
    traceback = error["traceback"]
    assert isinstance(traceback, list)
    assert any("\x1b[" in line for line in traceback)  # coloured, like the other modes
    text = _plain("\n".join(traceback))
    assert "Traceback (most recent call last)" in text
    arrows = [line.split(maxsplit=2)[2] for line in text.splitlines() if line.startswith("---->")]
    assert arrows == ["inner('missing')", "return {}[v]"]
    # Nothing of polycell's or dask's own frames: the cell's frame comes first.
    assert "dask_worker" not in text and "distributed" not in text


def test_display_metadata_with_numpy_scalars_reaches_the_cell(dask_kernel):
    kernel = dask_kernel
    msg_id = kernel.execute(
        "%%bg --mode dask\n"
        "import numpy as np\n"
        "from IPython.display import display\n"
        "display({'text/plain': 'raw bundle'}, raw=True, metadata={'n': np.int64(7), 'shape': (2, 3)})\n"
        "display(np.float32(0.5), metadata={'scale': np.float64(1.5), 'ok': np.bool_(True)})\n"
        "display({'text/plain': 'bad'}, raw=True, metadata={'what': object()})\n"
        "print('after')"
    )
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job, timeout=60)
    assert kernel.eval(f"jobs[{job}].status.value") == "done"
    shown = [m["content"] for m in kernel.outputs(msg_id) if m["msg_type"] == "display_data"]
    shown = [c for c in shown if "polycell-handle" not in c["data"].get("text/html", "")]
    assert shown[0] == {"data": {"text/plain": "raw bundle"}, "metadata": {"n": 7, "shape": [2, 3]}}
    assert shown[1]["data"]["text/plain"] == "np.float32(0.5)"
    assert shown[1]["metadata"] == {"scale": 1.5, "ok": True}
    assert len(shown) == 2
    stderr = kernel.text(msg_id, "stderr")
    assert "[polycell: a display_data output could not be sent from the worker: TypeError: object" in stderr
    assert kernel.text(msg_id, "stdout") == "after\n"


def test_a_job_ends_off_distributeds_callback_thread(dask_kernel, tmp_path):
    """Finishing a job (unpickling, merging names) must not hold up other futures' callbacks."""
    kernel = dask_kernel
    flag = tmp_path / "go"
    wait = f"import os, time\nwhile not os.path.exists({str(flag)!r}):\n    time.sleep(0.02)"
    msg_id = kernel.execute(f"%%bg --mode dask\n{wait}\nv = 5")
    job = kernel.job_id(msg_id)
    kernel.run(
        "import threading\n_ends = []\n"
        "def _seen(j):\n"
        "    _ends.append((j.status.value, threading.current_thread().name))\n"
        f"jobs[{job}].add_state_listener(_seen)"
    )
    flag.write_text("")
    kernel.wait_job_end(job, timeout=60)
    ends = kernel.eval("_ends")
    assert [status for status, _ in ends if status != "running"] == ["done"]
    assert [thread for status, thread in ends if status == "done"] == ["polycell-dask-finish_0"]
    assert kernel.eval("v") == 5


def test_kill_after_the_cell_ended_but_before_its_result_arrived(dask_kernel):
    """The worker's "ended" came first; then a kill cancels the future: the job still ends."""
    kernel = dask_kernel
    # Hold distributed's one callback thread, so the cell's done-callback waits behind it.
    kernel.run(
        "import threading\n"
        "_release = threading.Event()\n"
        "_client = jobs.runner('dask').client\n"
        "_blocker = _client.submit(abs, -1, pure=False)\n"
        "_blocker.add_done_callback(lambda f: _release.wait(60))\n"
        "_ = _blocker.result()"
    )
    msg_id = kernel.execute("%%bg --mode dask\nhit = 1\nprint('bye')")
    job = kernel.job_id(msg_id)
    # The cell is submitted from a thread of its own: its task may not be registered yet.
    _until(kernel, f"getattr(jobs.runner('dask')._tasks.get({job}), 'ended', None) is not None")
    assert kernel.eval(f"jobs[{job}].status.value") == "running"  # the result is stuck behind the blocker
    try:
        assert kernel.eval(f"jobs[{job}].kill(timeout=10).value") == "killed"
    finally:
        kernel.run("_release.set()")
    assert "bye\n" in kernel.text(msg_id, "stdout")
    assert kernel.eval("'hit' in globals()") is False
    assert kernel.eval("jobs.runner('dask').running()") == 0


def test_kill_while_the_started_event_is_still_in_flight_stops_the_cell(dask_kernel):
    kernel = dask_kernel
    # The runner never hears "started" (as when the event is still on its way).
    kernel.run(
        "_runner = jobs.runner('dask')\n"
        "_real_on_event = _runner._on_event\n"
        "_runner._on_event = lambda task, msg: None if 'started' in msg else _real_on_event(task, msg)"
    )
    try:
        msg_id = kernel.execute("%%bg --mode dask\nn = 0\nprint('looping')\nwhile True:\n    n += 1")
        job = kernel.job_id(msg_id)
        kernel.wait_for(
            lambda m: m["msg_type"] == "stream" and m["content"]["text"] == "looping\n", timeout=60
        )
        assert kernel.eval(f"jobs[{job}].info.get('worker')") is None
        assert kernel.eval(f"jobs[{job}].kill(timeout=10).value") == "killed"
        assert kernel.eval(f"jobs[{job}].info['worker']").startswith("tcp://")  # found by asking all workers
    finally:
        kernel.run("_runner._on_event = _real_on_event")
    # Both workers are free again: two cells run side by side.
    first, second = kernel.execute("%%bg --mode dask\n1"), kernel.execute("%%bg --mode dask\n2")
    for msg_id in (first, second):
        kernel.wait_job_end(kernel.job_id(msg_id), timeout=60)


def test_kill_of_a_cell_waiting_for_a_worker_never_runs_it(dask_kernel, tmp_path):
    kernel = dask_kernel
    flag = tmp_path / "go"
    wait = f"import os, time\nwhile not os.path.exists({str(flag)!r}):\n    time.sleep(0.02)"
    busy = [kernel.job_id(kernel.execute(f"%%bg --mode dask\n{wait}")) for _ in range(2)]
    for job in busy:
        _until(kernel, f"jobs[{job}].status.value == 'running'")
    msg_id = kernel.execute("%%bg --mode dask\nqueued = 1\nprint('queued ran')")
    job = kernel.job_id(msg_id)
    assert kernel.eval(f"jobs[{job}].kill(timeout=10).value") == "killed"
    flag.write_text("")
    for other in busy:
        kernel.wait_job_end(other, timeout=60)
    after = kernel.execute("%%bg --mode dask\n'after'")
    kernel.wait_job_end(kernel.job_id(after), timeout=60)
    assert "queued ran" not in kernel.text(msg_id)
    assert kernel.eval("'queued' in globals()") is False


def test_a_job_killed_before_submit_never_runs_and_a_failed_submit_fails_the_job(dask_kernel, dask_cluster):
    kernel = dask_kernel
    kernel.run(
        "from polycell.cell import CellWork, compile_cell\n"
        "_runner = jobs.runner('dask')\n"
        "def _ship(src):\n"
        "    return CellWork(compile_cell(get_ipython(), src, 1), globals())\n"
        "_early = jobs.new_job('dask')\n"
        "_ = _early.kill()\n"
        "_ = _runner.submit(_early, _ship('early = 1'))"
    )
    assert kernel.eval("(_early.status.value, _runner.running())") == ("killed", 0)
    assert kernel.eval("_early.info.get('worker')") is None
    # A client that cannot submit any more: the job fails with one line, nothing is left tracked.
    reply = kernel.run(
        f"from distributed import Client\n"
        f"_closed = Client({dask_cluster!r}, set_as_default=False)\n"
        f"_ = polycell.use_dask(_closed)\n"
        f"_closed.close()\n"
        f"_broken = jobs.new_job('dask')\n"
        f"_ = _runner.submit(_broken, _ship('broken = 1'))"
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    assert kernel.eval("(_broken.wait(10), _broken.status.value, _runner.running())") == (True, "failed", 0)
    message = kernel.eval("str(_broken.exception)")
    assert message.startswith("dask: the cell could not be submitted: ") and "\n" not in message
    assert kernel.eval("'early' in globals() or 'broken' in globals()") is False


def test_private_reaches_on_the_worker_are_where_polycell_expects_them(dask_kernel):
    """IPython 9.18 re-exports display_functions.display; distributed 2026.8.0's Worker.loop is tornado's."""
    kernel = dask_kernel
    msg_id = kernel.execute(
        "%%bg --mode dask\n"
        "import IPython.display, tornado.ioloop\n"
        "from IPython.core import display_functions\n"
        "from distributed import get_worker\n"
        "loop = get_worker().loop\n"
        "(IPython.display.display is display_functions.display,\n"
        " type(display_functions.display).__name__,\n"
        " isinstance(loop, tornado.ioloop.IOLoop)\n"
        " and callable(loop.call_later) and callable(loop.add_callback))"
    )
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job, timeout=60)
    assert kernel.eval(f"jobs[{job}].result") == (True, "_CapturingDisplay", True)


def test_kill_of_a_python_loop_stops_it(dask_kernel):
    kernel = dask_kernel
    msg_id = kernel.execute("%%bg --mode dask\nn = 0\nprint('looping')\nwhile True:\n    n += 1")
    job = kernel.job_id(msg_id)
    kernel.wait_for(lambda m: m["msg_type"] == "stream" and m["content"]["text"] == "looping\n", timeout=60)
    assert kernel.eval(f"jobs[{job}].kill(timeout=10).value") == "killed"
    kernel.wait_job_end(job)
    # The worker is free again: the next cell runs.
    nxt = kernel.execute("%%bg --mode dask\n'free'")
    kernel.wait_job_end(kernel.job_id(nxt), timeout=60)
    assert kernel.eval(f"jobs[{job} + 1].result") == "free"


def test_kill_of_a_task_in_time_sleep_stops_it(dask_kernel):
    kernel = dask_kernel
    msg_id = kernel.execute("%%bg --mode dask\nimport time\nprint('sleeping')\ntime.sleep(60)\nprint('woke')")
    job = kernel.job_id(msg_id)
    kernel.wait_for(lambda m: m["msg_type"] == "stream" and m["content"]["text"] == "sleeping\n", timeout=60)
    assert kernel.eval(f"jobs[{job}].kill(timeout=10).value") == "killed"
    assert "woke" not in kernel.text(msg_id)


def test_kill_of_a_task_blocked_in_c_says_so(dask_kernel):
    kernel = dask_kernel
    msg_id = kernel.execute(
        "%%bg --mode dask\nimport select\nprint('sleeping')\nselect.select([], [], [], 4)\nprint('woke')"
    )
    job = kernel.job_id(msg_id)
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
    msg_id = kernel.execute("%%bg --mode dask\nwith guard:\n    pass")
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job, timeout=60)
    (line,) = kernel.text(msg_id, "stderr").splitlines()
    assert line.startswith(f"[job {job}: %%bg --mode dask: cannot send 'guard' (lock) to the cluster")
    assert kernel.eval(f"jobs[{job}].status.value") == "failed"


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
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job, timeout=60)
    assert kernel.eval("[x for x, _ in j.result] == list(range(40))") is True
    assert kernel.eval("len({w for _, w in j.result})") == 2
    assert "three on a worker\n" in kernel.text(msg_id, "stdout")
    assert "40/40" in kernel.text(msg_id, "stderr")


def test_map_on_dask_reads_a_generator_lazily(dask_kernel):
    kernel = dask_kernel
    kernel.run(
        "import threading\ngate = threading.Event()\n"
        "def items():\n    yield 0\n    gate.wait(30)\n    yield from range(1, 30)"
    )
    msg_id = kernel.execute("j = jobs.map(abs, items(), mode='dask', chunksize=3)")
    assert kernel.reply(msg_id, timeout=20)["content"]["status"] == "ok"  # returned with the gate shut
    job = kernel.job_id(msg_id)
    kernel.run("gate.set()")
    kernel.wait_job_end(job, timeout=60)
    assert kernel.eval("j.result == list(range(30))") is True
    assert "30/30" in kernel.text(msg_id, "stderr").rpartition("\r")[2]


def test_map_on_dask_reports_the_failing_item(dask_kernel):
    kernel = dask_kernel
    kernel.run("def inv(x):\n    return 1 / (x - 9)")
    msg_id = kernel.execute("j = jobs.map(inv, range(20), mode='dask', chunksize=4)")
    job = kernel.job_id(msg_id)
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
    # The same through the environment variable, for %%bg: the cell returns at once, its job fails.
    kernel.run(f"import os\nos.environ['DASK_SCHEDULER_ADDRESS'] = 'tcp://127.0.0.1:{port}'")
    msg_id = kernel.execute("%%bg --mode dask\n1 + 1")
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job, timeout=60)
    (line,) = kernel.text(msg_id, "stderr").splitlines()
    assert line.startswith(f"[job {job}: dask: cannot reach the scheduler at tcp://127.0.0.1:{port}")


def test_shutdown_while_a_cell_still_connects_kills_it_at_once(kernel):
    port = _closed_port()
    kernel.run(f"import os\nos.environ['DASK_SCHEDULER_ADDRESS'] = 'tcp://127.0.0.1:{port}'")
    msg_id = kernel.execute("%%bg --mode dask\n1 + 1")
    job = kernel.job_id(msg_id)
    kernel.run("_ = jobs.shutdown(timeout=0.5)")  # returns although the connect goes on for 10 s
    kernel.wait_job_end(job)
    assert kernel.eval(f"jobs[{job}].status.value") == "killed"
    # The starter gives up when its connect times out; then it neither says more nor submits anything.
    starting = "any(t.name.startswith('polycell-dask-start') for t in __import__('threading').enumerate())"
    deadline = time.monotonic() + 60
    while kernel.eval(starting):
        assert time.monotonic() < deadline, "the starter thread never ended"
        time.sleep(0.1)
    kernel.run("1")  # anything the starter printed has reached the cell by this cell's idle
    assert kernel.text(msg_id, "stderr") == f"[job {job} killed after 0.00s]\n"  # and no "cannot reach"
    assert kernel.eval(f"jobs[{job}].status.value") == "killed"


def test_connecting_to_the_cluster_does_not_hold_up_other_cells():
    """In the polycell kernel a dask cell starts from the shell channel thread, which routes every request."""
    port = _closed_port()
    session = KernelSession(POLYCELL_KERNEL, load_ext=False)
    try:
        session.run(f"import os\nos.environ['DASK_SCHEDULER_ADDRESS'] = 'tcp://127.0.0.1:{port}'")
        dask_cell = session.execute("%%bg --mode dask\n1 + 1")
        dask_job = session.job_id(dask_cell)
        other = session.execute("%%bg\nprint('not held up')")
        other_job = session.job_id(other)
        session.wait_job_end(other_job)
        assert session.text(other) == "not held up\n"
        assert session.eval(f"jobs[{dask_job}].status.value") == "pending"  # still connecting
        handle = next(m for m in session.outputs(dask_cell) if m["msg_type"] == "display_data")
        assert handle["metadata"]["polycell"]["status"] == "pending"  # and its handle says so
        session.wait_job_end(dask_job, timeout=60)
        assert "cannot reach the scheduler" in session.text(dask_cell, "stderr")
    finally:
        session.close()


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
        job = session.job_id(msg_id)
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


def test_a_local_cluster_and_its_dashboard_listen_on_loopback_only(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    session = KernelSession()
    try:
        msg_id = session.execute("%%bg --mode dask\n6 * 7")
        job = session.job_id(msg_id)
        session.wait_job_end(job, timeout=120)
        assert session.eval(f"jobs[{job}].result") == 42
        tree = [psutil.Process(session.pid), *psutil.Process(session.pid).children(recursive=True)]
        listening = sorted(
            {
                (proc.pid, conn.laddr.ip, conn.laddr.port)
                for proc in tree
                for conn in proc.net_connections(kind="inet")
                if conn.status == psutil.CONN_LISTEN
            }
        )
        # The scheduler, each worker and nanny, and the dashboard, at least.
        assert len({pid for pid, _, _ in listening}) >= 2
        assert len(listening) >= 4
        assert [entry for entry in listening if entry[1] not in ("127.0.0.1", "::1")] == []
        dashboard = session.eval("jobs.runner('dask').client.dashboard_link")
        assert dashboard.startswith("http://127.0.0.1:")
    finally:
        session.close()


def test_the_kernels_interrupt_does_not_reach_a_local_clusters_workers(monkeypatch):
    """They share the kernel's process group, which the kernel's interrupt signals as a whole."""
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    session = KernelSession()
    try:
        # Started by a foreground cell: its workers are spawned while SIGINT would raise.
        session.run("import polycell, psutil\n_ = polycell.use_dask()", timeout=120)
        workers = "sorted(p.pid for p in psutil.Process().children() if 'spawn' in ' '.join(p.cmdline()))"
        pids = session.eval(workers)
        assert pids
        fg = session.start_foreground("import time\ntime.sleep(300)")
        session.km.interrupt_kernel()
        assert session.reply(fg, timeout=30)["content"]["ename"] == "KeyboardInterrupt"
        cell = session.execute_accepted("%%bg --mode dask\n6 * 7")
        job = session.job_id(cell)
        session.wait_job_end(job, timeout=120)
        assert session.eval(f"jobs[{job}].result") == 42
        assert session.eval(workers) == pids
    finally:
        session.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
