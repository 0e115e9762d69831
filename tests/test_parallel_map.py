"""jobs.map in a real kernel: order, progress in the calling cell, failures, kill, chunking."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from kernel_session import KernelSession

MODES = ["process", "thread"]


def _job_stream(kernel: KernelSession, msg_id: str, job: int, name: str) -> str:
    return "".join(
        m["content"]["text"]
        for m in kernel.outputs(msg_id)
        if m["msg_type"] == "stream"
        and m["content"]["name"] == name
        and m["metadata"].get("polycell", {}).get("job") == job
    )


@pytest.mark.parametrize("mode", MODES)
def test_map_results_in_order_with_progress_and_output_in_the_calling_cell(kernel, mode):
    kernel.run(
        "import time\n"
        "def work(x):\n"
        "    if x % 10 == 0:\n"
        "        print('item', x)\n"
        "    time.sleep(0.002 * (x % 3))  # uneven items, so chunks finish out of order\n"
        "    return x * x"
    )
    msg_id = kernel.execute(f"j = jobs.map(work, range(200), workers=2, mode={mode!r}, chunksize=7)")
    assert kernel.reply(msg_id)["content"]["status"] == "ok"
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job)
    assert kernel.eval("(j.status.value, j.result == [x * x for x in range(200)], j.mode)") == (
        "done",
        True,
        "map",
    )
    printed = _job_stream(kernel, msg_id, job, "stdout")
    assert sorted(printed.splitlines(), key=lambda s: int(s.split()[1])) == [
        f"item {x}" for x in range(0, 200, 10)
    ]
    bar = _job_stream(kernel, msg_id, job, "stderr")
    assert "\r" in bar
    assert "200/200" in bar.rpartition("\r")[2]
    # The journal holds the same output, so %job show can replay it.
    assert kernel.eval("'200/200' in j.output and 'item 190' in j.output") is True
    table = kernel.text(kernel.run("print(repr(jobs))")["parent_header"]["msg_id"])
    assert f"map @ 2 {mode}" in table


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_item_fails_the_map_with_its_index_and_stops_the_rest(kernel, mode):
    kernel.run(
        "import time\n"
        "def work(x):\n"
        "    if x == 17:\n"
        "        raise ValueError('no seventeen')\n"
        "    time.sleep(0.01)\n"
        "    print('ran', x)\n"
        "    return x"
    )
    msg_id = kernel.execute(f"j = jobs.map(work, range(1000), workers=2, mode={mode!r}, chunksize=10)")
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job)
    errors = [m for m in kernel.outputs(msg_id) if m["msg_type"] == "error"]
    assert len(errors) == 1
    assert errors[0]["content"]["evalue"] == "item 17 failed: ValueError: no seventeen"
    assert errors[0]["metadata"]["polycell"]["job"] == job
    tb = errors[0]["content"]["traceback"]
    assert any("raise ValueError('no seventeen')" in line for line in tb)
    # The traceback starts at the user's function: none of polycell's frames above it.
    assert tb[0].startswith("Traceback") and ", in work" in tb[1]
    assert not any("polycell" in line for line in tb)
    assert kernel.eval("(j.status.value, str(j.exception), type(j.exception.__cause__).__name__)") == (
        "failed",
        "item 17 failed: ValueError: no seventeen",
        "ValueError",
    )
    ran = _job_stream(kernel, msg_id, job, "stdout").count("ran ")
    assert ran < 1000 - 17  # the other worker stopped long before the end


@pytest.mark.parametrize("mode", MODES)
def test_kill_stops_every_worker(kernel, mode):
    kernel.run("import time, psutil\ndef slow(x):\n    print('start', x)\n    time.sleep(60)\n    return x")
    msg_id = kernel.execute(f"j = jobs.map(slow, range(8), workers=2, mode={mode!r})")
    job = kernel.job_id(msg_id)
    kernel.wait_for(
        lambda m: (
            m["msg_type"] == "stream" and "start" in m["content"]["text"] and m["metadata"].get("polycell")
        )
    )
    assert kernel.eval("j.kill().value") == "killed"
    kernel.wait_job_end(job)
    assert kernel.eval("j.status.value") == "killed"
    if mode == "process":
        pids = kernel.eval("[int(p) for p in j.info['pids'].split(',')]")
        assert len(pids) == 2
        assert kernel.eval(f"[psutil.pid_exists(p) for p in {pids}]") == [False, False]
    else:
        assert kernel.eval("[t.name for t in __import__('threading').enumerate() if 'map' in t.name]") == []


def test_process_workers_escape_a_kernel_interrupt(kernel):
    """A kernel interrupt is for the foreground cell; a map's workers keep going."""
    kernel.run("import time\ndef nap(x):\n    time.sleep(0.3)\n    return x")
    msg_id = kernel.execute("j = jobs.map(nap, range(8), workers=2, mode='process', chunksize=1)")
    job = kernel.job_id(msg_id)
    fg = kernel.start_foreground("time.sleep(30)")
    kernel.km.interrupt_kernel()
    assert kernel.reply(fg)["content"]["ename"] == "KeyboardInterrupt"
    kernel.wait_job_end(job)
    assert kernel.eval("(j.status.value, j.result)") == ("done", list(range(8)))


def test_100000_tiny_items_go_in_chunks(kernel):
    msg_id = kernel.execute("j = jobs.map(abs, range(-50000, 50000), mode='process')")
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job, timeout=120)  # generous hang guard; speed is for benchmarks/bench_map.py
    assert kernel.eval("(j.status.value, len(j.result), j.result[:3], j.result[-1])") == (
        "done",
        100000,
        [50000, 49999, 49998],
        49999,
    )
    # Chunked: a few dozen round trips, so the bar is redrawn a bounded number of times.
    assert kernel.eval("j.output.count(chr(13))") < 200


def test_empty_map_is_done_with_an_empty_list(kernel):
    msg_id = kernel.execute("j = jobs.map(abs, [], mode='process')")
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job)
    assert kernel.eval("(j.status.value, j.result)") == ("done", [])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("jobs.map(3, range(3))", "jobs.map: func must be callable, got int"),
        (
            "jobs.map(abs, range(3), mode='gpu')",
            "jobs.map: unknown mode 'gpu': choose one of process, thread, dask",
        ),
        ("jobs.map(abs, range(3), workers=0)", "jobs.map: workers must be a whole number >= 1"),
        ("jobs.map(abs, 5)", "jobs.map: the items must be iterable"),
    ],
)
def test_bad_map_arguments_say_what_is_wrong(kernel, call, message):
    reply = kernel.run(call)
    assert reply["content"]["ename"] == "JobError"
    assert reply["content"]["evalue"].startswith(message)
    assert "\n" not in reply["content"]["evalue"]
    assert kernel.eval("len(jobs)") == 0


def test_unpicklable_result_names_the_item(kernel):
    kernel.run("import threading\ndef lock_for(x):\n    return threading.Lock() if x == 5 else x")
    msg_id = kernel.execute("j = jobs.map(lock_for, range(10), workers=2, mode='process', chunksize=3)")
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job)
    message = kernel.eval("str(j.exception)")
    assert message.startswith("item 5 failed: TypeError: its result cannot be sent back to the kernel")


def test_display_in_a_process_worker_reaches_the_cell(kernel):
    kernel.run(
        "from IPython.display import display, HTML\n"
        "def show(x):\n"
        "    display(HTML(f'<i>item {x}</i>'))\n"
        "    return x"
    )
    msg_id = kernel.execute("j = jobs.map(show, range(3), workers=2, mode='process')")
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job)
    shown = sorted(
        m["content"]["data"]["text/html"]
        for m in kernel.outputs(msg_id)
        if m["msg_type"] == "display_data"
        and m["metadata"].get("polycell", {}).get("job") == job
        and "polycell-handle" not in m["content"]["data"].get("text/html", "")
    )
    assert shown == [f"<i>item {x}</i>" for x in range(3)]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_worker_killed_from_outside_fails_the_map_in_one_line_even_if_its_pipes_stay_open(kernel):
    """Its grandchild holds the worker's pipes open, so no end of file ever comes: the pidfd says it died."""
    kernel.run(
        "import os, time\n"
        "def work(x):\n"
        "    if x == 3:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(600)\n"
        "            os._exit(0)\n"
        "        os.kill(os.getpid(), 9)  # as the out-of-memory killer would\n"
        "    time.sleep(0.01)\n"
        "    return x"
    )
    msg_id = kernel.execute("j = jobs.map(work, range(8), workers=2, mode='process', chunksize=1)")
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job, timeout=60)  # hang guard: before the fix this never ended
    errors = [m["content"] for m in kernel.outputs(msg_id) if m["msg_type"] == "error"]
    assert len(errors) == 1
    assert errors[0]["ename"] == "MapWorkerDied"
    assert errors[0]["evalue"].startswith("map worker ")
    assert errors[0]["evalue"].endswith(
        " died: signal 9 (SIGKILL), killed from outside polycell (the out-of-memory killer?)"
    )
    assert errors[0]["traceback"] == [f"MapWorkerDied: {errors[0]['evalue']}"]
    assert kernel.eval("j.status.value") == "failed"
    # The grandchild went with the worker's process group (the leak check also looks).


def test_fd_level_output_of_workers_lands_in_the_map_cell(kernel):
    kernel.run(
        "import os, sys\n"
        "def loud(x):\n"
        "    os.system(f'echo from-c {x}')\n"
        "    os.write(sys.stdout.fileno(), f'fd {x}\\n'.encode())\n"
        "    return x"
    )
    msg_id = kernel.execute("j = jobs.map(loud, range(4), workers=2, mode='process', chunksize=1)")
    job = kernel.job_id(msg_id)
    fg = kernel.run("print('foreground')")["parent_header"]["msg_id"]
    kernel.wait_job_end(job)
    assert kernel.eval("(j.status.value, j.result)") == ("done", [0, 1, 2, 3])
    printed = _job_stream(kernel, msg_id, job, "stdout")
    for x in range(4):
        assert f"from-c {x}\n" in printed and f"fd {x}\n" in printed
    assert kernel.text(fg) == "foreground\n"
    strays = [
        m
        for m in kernel.messages
        if m["msg_type"] == "stream"
        and ("from-c" in m["content"]["text"] or "fd " in m["content"]["text"])
        and m["metadata"].get("polycell", {}).get("job") != job
    ]
    assert strays == []


@pytest.mark.parametrize("mode", MODES)
def test_a_map_worker_cannot_start_jobs(kernel, mode):
    kernel.run("def nest(x):\n    return jobs.map(abs, [x], mode='thread')")
    msg_id = kernel.execute(f"j = jobs.map(nest, [1], mode={mode!r})")
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job)
    if mode == "process":
        assert kernel.eval("str(j.exception)") == (
            "item 0 failed: JobError: a map worker cannot start jobs of its own; start them from the notebook"
        )
    else:  # a thread worker is the kernel itself: it may
        assert kernel.eval("j.status.value") == "done"


def test_map_workers_die_with_a_sigkilled_kernel():
    kernel = KernelSession()
    pids: list[int] = []
    try:
        kernel.run(
            "import os, time\ndef nap(x):\n    print('pid', os.getpid(), flush=True)\n    time.sleep(600)"
        )
        msg_id = kernel.execute("j = jobs.map(nap, range(2), workers=2, mode='process', chunksize=1)")
        job = kernel.job_id(msg_id)
        kernel.wait_for(lambda m: _job_stream(kernel, msg_id, job, "stdout").count("pid") == 2)
        pids = [int(line.split()[1]) for line in _job_stream(kernel, msg_id, job, "stdout").splitlines()]
        kernel.km.shutdown_kernel(now=True)  # SIGKILL: no atexit, no shutdown of the runners
        deadline = time.monotonic() + 30
        while not all(_gone(pid) for pid in pids):
            assert time.monotonic() < deadline, "a map worker outlived its kernel"
            time.sleep(0.02)
    finally:
        kernel.close()
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("mode", MODES)
def test_a_generator_is_read_lazily_and_the_map_returns_at_once(any_kernel, mode):
    """The generator blocks after its first item until the foreground, free again, opens the gate."""
    any_kernel.run(
        "import threading\ngate = threading.Event()\n"
        "def items():\n    yield 0\n    gate.wait(30)\n    yield from range(1, 25)\n"
        "def work(x):\n    return x * 10"
    )
    msg_id = any_kernel.execute(f"j = jobs.map(work, items(), workers=2, mode={mode!r})")
    assert any_kernel.reply(msg_id, timeout=20)["content"]["status"] == "ok"
    job = any_kernel.job_id(msg_id)
    assert any_kernel.eval("j.status.value") == "running"
    any_kernel.run("gate.set()")
    any_kernel.wait_job_end(job)
    assert any_kernel.eval("(j.status.value, j.result == [x * 10 for x in range(25)])") == ("done", True)
    bar = _job_stream(any_kernel, msg_id, job, "stderr")
    assert "25/25" in bar.rpartition("\r")[2]  # the total, once the input ended


@pytest.mark.parametrize("mode", MODES)
def test_an_endless_iterator_runs_until_killed(any_kernel, mode):
    any_kernel.run("import itertools\nendless = itertools.count()")
    msg_id = any_kernel.execute(f"j = jobs.map(abs, endless, workers=2, mode={mode!r}, chunksize=50)")
    assert any_kernel.reply(msg_id, timeout=20)["content"]["status"] == "ok"
    job = any_kernel.job_id(msg_id)
    any_kernel.wait_for(lambda m: "item" in _job_stream(any_kernel, msg_id, job, "stderr"))
    any_kernel.run(f"%job kill {job}")
    any_kernel.wait_job_end(job)
    assert any_kernel.eval("j.status.value") == "killed"


@pytest.mark.parametrize("mode", MODES)
def test_an_input_that_raises_fails_the_map_at_that_item(any_kernel, mode):
    any_kernel.run("def items():\n    yield from range(3)\n    raise ValueError('no more')")
    msg_id = any_kernel.execute(f"j = jobs.map(abs, items(), mode={mode!r})")
    job = any_kernel.job_id(msg_id)
    any_kernel.wait_job_end(job)
    errors = [m for m in any_kernel.outputs(msg_id) if m["msg_type"] == "error"]
    assert len(errors) == 1
    lines = errors[0]["content"]["traceback"]
    assert lines[-1] == "item 3 failed: ValueError: no more"
    assert "polycell" not in "".join(lines) and "raise ValueError('no more')" in "".join(lines)


def test_lazy_items_that_cannot_reach_a_process_worker_are_one_line(any_kernel):
    any_kernel.run("import threading")
    msg_id = any_kernel.execute("j = jobs.map(id, (threading.Lock() for _ in range(3)), mode='process')")
    job = any_kernel.job_id(msg_id)
    any_kernel.wait_job_end(job)
    errors = [m for m in any_kernel.outputs(msg_id) if m["msg_type"] == "error"]
    assert [e["content"]["traceback"][-1].split(": it")[0] for e in errors] == ["item 0 failed: TypeError"]
    assert any_kernel.eval("j.status.value") == "failed"
