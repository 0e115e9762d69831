"""%%bg in a real stock ipykernel: routing, modes, kill, interrupt and bad input."""

from __future__ import annotations

import re

import pytest

from kernel_session import check_interrupt_spares_a_thread_jobs_child


def test_output_lands_in_the_cell_that_started_the_job(kernel):
    bg = kernel.execute(
        "%%bg --name ticker\nimport time\n"
        "for i in range(5):\n    print('tick', i)\n    time.sleep(0.2)\n'finished'"
    )
    reply = kernel.reply(bg)
    assert reply["content"]["status"] == "ok"
    job = kernel.job_id(bg)
    # Foreground cells run while the job prints; none of their output is the job's.
    fg1 = kernel.run("print('foreground one')")
    fg2 = kernel.run("import time; time.sleep(0.3); print('foreground two')")
    kernel.wait_job_end(job)
    assert kernel.text(bg) == "".join(f"tick {i}\n" for i in range(5))
    assert kernel.text(fg1["parent_header"]["msg_id"]) == "foreground one\n"
    assert kernel.text(fg2["parent_header"]["msg_id"]) == "foreground two\n"
    for msg in kernel.job_messages(job):
        assert msg["parent_header"]["msg_id"] == bg
    result = [m for m in kernel.outputs(bg) if m["msg_type"] == "execute_result"]
    assert result and result[0]["content"]["data"]["text/plain"] == "'finished'"
    # Out[n] of the job is the number of the cell that started it (IPython 9 counts early).
    assert result[0]["content"]["execution_count"] == reply["content"]["execution_count"]
    assert result[0]["metadata"]["polycell"]["job"] == job
    assert kernel.eval(f"(jobs[{job}].status.value, jobs[{job}].result, jobs[{job}].name)") == (
        "done",
        "finished",
        "ticker",
    )


def test_bg_returns_at_once_while_job_runs(kernel):
    msg_id = kernel.execute("%%bg\nimport time\ntime.sleep(300)")
    kernel.reply(msg_id)
    kernel.wait_idle(msg_id)
    job = kernel.job_id(msg_id)
    assert kernel.eval(f"jobs[{job}].status.value") == "running"  # the cell did not wait for it
    kernel.run(f"%job kill {job}")
    kernel.wait_job_end(job)


def test_display_rich_reprs_and_matplotlib_go_to_the_job_cell(kernel):
    msg_id = kernel.execute(
        "%%bg\n"
        "from IPython.display import display, HTML\n"
        "display(HTML('<b>bold</b>'))\n"
        "import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots(); ax.plot([1, 2, 3]); plt.show()\n"
        "import sys; print('to stderr', file=sys.stderr)"
    )
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job)
    outputs = kernel.outputs(msg_id)
    displays = [m for m in outputs if m["msg_type"] == "display_data" and m["metadata"].get("polycell")]
    mimes = [set(m["content"]["data"]) for m in displays]
    assert any("text/html" in m for m in mimes)
    assert any("image/png" in m for m in mimes)
    assert kernel.text(msg_id, "stderr") == "to stderr\n"


def test_uncaught_exception_is_shown_with_ipython_traceback(kernel):
    msg_id = kernel.execute("%%bg\ndef f():\n    raise ValueError('bad value')\nf()")
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job)
    errors = [m for m in kernel.outputs(msg_id) if m["msg_type"] == "error"]
    assert len(errors) == 1
    content = errors[0]["content"]
    assert content["ename"] == "ValueError" and content["evalue"] == "bad value"
    tb = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(content["traceback"]))
    assert "raise ValueError('bad value')" in tb
    assert "f()" in tb
    assert "polycell" not in tb  # the job machinery's own frames are not shown
    assert kernel.eval(f"jobs[{job}].status.value") == "failed"


def test_async_cell_runs_as_task_during_blocking_foreground(kernel):
    kernel.run("import threading\nfg_running = threading.Event()")
    bg = kernel.execute(  # the task starts printing only once the foreground cell blocks the main thread
        "%%bg\nimport asyncio\nwhile not fg_running.is_set():\n    await asyncio.sleep(0.01)\n"
        "for i in range(4):\n    print('async', i)\n    await asyncio.sleep(0.2)"
    )
    job = kernel.job_id(bg)
    fg = kernel.start_foreground("fg_running.set()\nimport time\ntime.sleep(300)")
    # All four lines arrive while the foreground cell is still sleeping.
    kernel.wait_for(lambda m: m["msg_type"] == "stream" and "async 3" in m["content"]["text"], timeout=30)
    fg_idle = [
        m
        for m in kernel.messages
        if m["msg_type"] == "status"
        and m["parent_header"].get("msg_id") == fg
        and m["content"]["execution_state"] == "idle"
    ]
    assert not fg_idle
    kernel.km.interrupt_kernel()
    assert kernel.reply(fg, timeout=30)["content"]["ename"] == "KeyboardInterrupt"
    kernel.wait_job_end(job)
    assert kernel.eval(f"jobs[{job}].mode") == "task"


def test_line_magic_and_modes(kernel):
    kernel.run("import time")
    one = kernel.execute("%bg --name one print('line job')")
    two = kernel.execute("%bg --mode task print('forced task')")
    j1, j2 = kernel.job_id(one), kernel.job_id(two)
    kernel.wait_job_end(j1)
    kernel.wait_job_end(j2)
    assert kernel.text(one) == "line job\n"
    assert kernel.text(two) == "forced task\n"
    assert kernel.eval(f"(jobs[{j1}].name, jobs[{j1}].mode, jobs[{j2}].mode)") == ("one", "thread", "task")


def test_kill_thread_in_sleep_and_task(kernel):
    a = kernel.execute("%%bg\nimport time\nprint('sleeping')\ntime.sleep(600)")
    b = kernel.execute("%%bg\nimport asyncio\nawait asyncio.sleep(600)")
    ja, jb = kernel.job_id(a), kernel.job_id(b)
    kernel.wait_for(lambda m: m["msg_type"] == "stream" and m["content"]["text"] == "sleeping\n")
    kill_a = kernel.run(f"%job kill {ja}")
    assert kernel.text(kill_a["parent_header"]["msg_id"]) == f"job {ja} killed\n"
    kernel.run(f"%job kill {jb}")
    kernel.wait_job_end(ja)
    kernel.wait_job_end(jb)
    assert f"[job {ja} killed after" in kernel.text(a, "stderr")
    assert kernel.eval(f"(jobs[{ja}].status.value, jobs[{jb}].status.value)") == ("killed", "killed")
    # Killing the same job again is a one-line error.
    again = kernel.run(f"%job kill {ja}")
    assert kernel.error_line(again) == f"UsageError: %job kill: job {ja} already ended (killed)"


def test_interrupt_stops_only_the_foreground(kernel):
    bg = kernel.execute("%%bg\nimport time\nfor i in range(20):\n    print(i)\n    time.sleep(0.1)")
    job = kernel.job_id(bg)
    fg = kernel.start_foreground("import time\ntime.sleep(60)")
    kernel.km.interrupt_kernel()
    reply = kernel.reply(fg, timeout=30)
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    kernel.wait_job_end(job)
    assert kernel.eval(f"jobs[{job}].status.value") == "done"
    assert kernel.text(bg) == "".join(f"{i}\n" for i in range(20))


def test_an_interrupt_another_thread_took_still_stops_the_foreground(kernel):
    """With the extension in a stock ipykernel, ipykernel's threads can take the kernel's SIGINT."""
    kernel.run(
        "import signal, sys, threading, time as _time\n"
        "_main = threading.main_thread().ident\n"
        "def _take_the_interrupt():\n"
        "    # Once the main thread is at its sleep (and a moment more: inside it), this\n"
        "    # thread, which does not block SIGINT, takes the signal instead of it.\n"
        "    while getattr(sys._current_frames().get(_main), 'f_lineno', 0) != 3:\n"
        "        _time.sleep(0.01)\n"
        "    _time.sleep(0.3)\n"
        "    signal.pthread_kill(threading.get_ident(), signal.SIGINT)\n"
        "_taker = threading.Thread(target=_take_the_interrupt, daemon=True)"
    )
    fg = kernel.execute("_taker.start()\nimport time\ntime.sleep(60)")
    reply = kernel.reply(fg, timeout=30)
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"


def test_wait_and_jobs_table(kernel):
    bg = kernel.execute("%%bg --name waiter\nimport time\ntime.sleep(0.3)\n7 * 6")
    job = kernel.job_id(bg)
    wait = kernel.run(f"%job wait {job} --timeout 30")
    results = [
        m for m in kernel.outputs(wait["parent_header"]["msg_id"]) if m["msg_type"] == "execute_result"
    ]
    assert results[0]["content"]["data"]["text/plain"] == "42"
    table = kernel.run("%jobs")
    shown = [m for m in kernel.outputs(table["parent_header"]["msg_id"]) if m["msg_type"] == "display_data"]
    assert "<table" in shown[0]["content"]["data"]["text/html"]
    assert "waiter" in shown[0]["content"]["data"]["text/plain"]
    api = kernel.eval(f"(jobs[{job}].output, jobs[{job}].exception)")
    assert api == ("", None)


def test_bad_input_gives_one_line(any_kernel):
    """On both kernels."""
    kernel = any_kernel
    cases = {
        "%%bg --frobnicate\nprint(1)": "UsageError: %%bg: unrecognized arguments: --frobnicate",
        "%%bg --mode gpu\nprint(1)": "UsageError: %%bg: argument --mode: invalid choice: 'gpu'",
        "%%bg\n   \n": "UsageError: %%bg: the cell is empty",
        "%job kill 99": "UsageError: no job 99",
        "%job wait abc": "UsageError: %job: 'abc' is not a job id",
        "%job frob 1": "UsageError: %job: use %job kill N",
        "%bg": "UsageError: %bg: give a statement to run",
        "%jobs extra": "UsageError: %jobs: unrecognized arguments: extra",
        "%%bg --mode thread --mode process\nprint(1)": "UsageError: %%bg: --mode given twice ('thread', then",
        "%bg --name a --name b print(1)": "UsageError: %bg: --name given twice ('a', then 'b')",
    }
    for code, expected in cases.items():
        reply = kernel.run(code)
        line = kernel.error_line(reply)
        assert line.startswith(expected), (code, line)
        assert "\n" not in line and "Traceback" not in line, (code, line)
    # The kernel still works afterwards.
    assert kernel.eval("1 + 1") == 2


def _error_traceback(kernel, reply) -> list[str]:
    (error,) = [m for m in kernel.outputs(reply["parent_header"]["msg_id"]) if m["msg_type"] == "error"]
    return error["content"]["traceback"]


def test_api_mistakes_are_one_line_with_no_polycell_frame(any_kernel):
    """On both kernels."""
    kernel = any_kernel
    cases = {
        "jobs[999]": "JobError: no job 999",
        "jobs.map(abs, 5)": "JobError: jobs.map: the items must be iterable",
        "jobs.map(abs, [1], mode='nope')": "JobError: jobs.map: unknown mode 'nope'",
        "jobs.map(abs, [1], workers=0)": "JobError: jobs.map: workers",
        "jobs.map(abs, [1], chunksize=0)": "JobError: jobs.map: chunksize must be",
    }
    for code, expected in cases.items():
        reply = kernel.run(code)
        assert reply["content"]["ename"] == "JobError", code
        traceback = _error_traceback(kernel, reply)
        assert len(traceback) == 1 and traceback[0].startswith(expected), (code, traceback)
        assert "polycell/" not in traceback[0], (code, traceback)


def test_interrupting_job_wait_stops_the_waiting_in_one_line(any_kernel):
    """On both kernels."""
    kernel = any_kernel
    # The job itself says when the main thread is inside %job wait's wait: the ■ must land there.
    bg = kernel.execute(
        "%%bg --name sleeper\n"
        "import sys, threading, time\n"
        "def _main_is_waiting():\n"
        "    frame = sys._current_frames().get(threading.main_thread().ident)\n"
        "    names = []\n"
        "    while frame is not None:\n"
        "        names.append(frame.f_code.co_name)\n"
        "        frame = frame.f_back\n"
        "    return names[:1] == ['wait'] and '_wait' in names\n"
        "while not _main_is_waiting():\n"
        "    time.sleep(0.01)\n"
        "print('main is waiting')\n"
        "time.sleep(120)"
    )
    job = kernel.job_id(bg)
    fg = kernel.execute(f"%job wait {job}")
    kernel.wait_for(lambda m: "main is waiting" in kernel.text(bg), 30)
    kernel.km.interrupt_kernel()
    reply = kernel.reply(fg, timeout=30)
    kernel.wait_idle(fg)
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    stopped = f"KeyboardInterrupt: stopped waiting; job {job} is still running"
    assert _error_traceback(kernel, reply) == [stopped]
    assert kernel.eval(f"jobs[{job}].status.value") == "running"
    kernel.run(f"%job kill {job}")
    kernel.wait_job_end(job)


def test_a_job_that_catches_its_kill_says_so(any_kernel):
    """On both kernels."""
    kernel = any_kernel
    kernel.run("import threading\ngate = threading.Event()")
    bg = kernel.execute(
        "%%bg\nimport time\ntry:\n    print('sleeping')\n    time.sleep(60)\nexcept BaseException as exc:\n"
        "    print('caught', type(exc).__name__)\n    gate.wait(60)"
    )
    job = kernel.job_id(bg)
    kernel.wait_for(lambda m: m["parent_header"].get("msg_id") == bg and "sleeping" in kernel.text(bg), 30)
    kill = kernel.run(f"%job kill {job}")
    said = kernel.text(kill["parent_header"]["msg_id"])
    assert said.startswith(f"job {job}: kill requested; it has not stopped yet"), said
    assert "caught the kill" in said
    kernel.run("gate.set()")
    kernel.wait_job_end(job)
    assert kernel.eval(f"jobs[{job}].status.value") == "done"
    assert kernel.text(bg, "stdout") == "sleeping\ncaught JobKilled\n"
    assert f"[job {job} was asked to stop but ended done after" in kernel.text(bg, "stderr")


def test_unload_ext_says_which_jobs_it_ended_and_each_cell_says_why(kernel):
    bg = kernel.execute("%%bg --name sleeper\nimport time\ntime.sleep(120)")
    job = kernel.job_id(bg)
    unload = kernel.run("%unload_ext polycell")
    said = kernel.text(unload["parent_header"]["msg_id"])
    assert said == f"polycell unloaded: 1 running job(s) killed: job {job} 'sleeper'\n"
    assert f"[job {job} killed after" in kernel.text(bg, "stderr")
    assert ": %unload_ext polycell]" in kernel.text(bg, "stderr")


def test_job_output_during_heavy_printing_is_complete_and_in_order(kernel):
    bg = kernel.execute("%%bg\nfor i in range(20000):\n    print(i)")
    job = kernel.job_id(bg)
    kernel.wait_job_end(job, timeout=120)
    assert kernel.text(bg) == "".join(f"{i}\n" for i in range(20000))
    assert len(kernel.outputs(bg)) < 2000  # merged, not one message per line


def test_threads_a_job_starts_print_into_the_job_cell(kernel):
    bg = kernel.execute(
        "%%bg --name spawner\nimport threading\n"
        "t = threading.Thread(target=lambda: print('from a thread of the job'))\nt.start()\nt.join()"
    )
    job = kernel.job_id(bg)
    kernel.wait_job_end(job)
    kernel.run("import threading\nthreading.Thread(target=lambda: print('foreground thread')).start()")
    assert kernel.text(bg) == "from a thread of the job\n"
    (msg,) = [m for m in kernel.outputs(bg) if m["msg_type"] == "stream"]
    assert msg["metadata"]["polycell"]["job"] == job


def test_syntax_error_fails_the_bg_cell_itself(kernel):
    reply = kernel.run("%%bg\nx = (1,")
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "SyntaxError"
    (error,) = [m for m in kernel.outputs(reply["parent_header"]["msg_id"]) if m["msg_type"] == "error"]
    shown = re.sub(r"\x1b\[[0-9;]*m", "", "".join(error["content"]["traceback"]))
    assert "x = (1," in shown and "polycell" not in shown and "Traceback" not in shown
    assert kernel.eval("len(jobs)") == 0
    # A job that awaits a killed job fails (its own error), it is not "killed".
    kernel.run("%%bg --name victim\nimport time\ntime.sleep(600)")
    kernel.run("%job kill 1")
    kernel.wait_job_end(1)
    waiter = kernel.execute("%%bg --name waiter\nawait jobs[1]")
    kernel.wait_job_end(2)
    assert kernel.eval("jobs[2].status.value") == "failed"
    errors = [m for m in kernel.outputs(waiter) if m["msg_type"] == "error"]
    assert errors and errors[0]["content"]["ename"] == "JobKilled"


def test_interrupt_spares_programs_started_by_thread_jobs(kernel):
    check_interrupt_spares_a_thread_jobs_child(kernel, kernel.km.interrupt_kernel)


def test_a_cells_busy_and_handle_come_before_its_jobs_first_line(any_kernel):
    """However fast a job prints, its cell says busy, shows the input, then the handle, then the output."""
    kernel = any_kernel
    started = [kernel.execute(f"%%bg\nprint('first', {n})") for n in range(30)]
    for msg_id in started:
        kernel.wait_idle(msg_id)
        job = kernel.job_id(msg_id)
        kernel.wait_job_end(job)
    with kernel._cond:
        messages = list(kernel.messages)
    for n, msg_id in enumerate(started):
        kinds = [m["msg_type"] for m in messages if m["parent_header"].get("msg_id") == msg_id]
        assert kinds[:3] == ["status", "execute_input", "display_data"], kinds
        assert kinds.index("display_data") < kinds.index("stream"), (n, kinds)


@pytest.mark.parametrize("mode", ["thread", "task", "process"])
def test_a_job_started_at_once_is_first_shown_running_and_updated_only_when_it_ends(
    any_kernel, tmp_path, mode
):
    """No "pending" handle and a "running" update a moment later: one message fewer per cell."""
    kernel = any_kernel
    gate = tmp_path / "go"
    wait = "await asyncio.sleep(0.01)" if mode == "task" else "time.sleep(0.01)"
    kernel.run("import asyncio, os, time")
    msg_id = kernel.execute(
        f"%%bg --mode {mode}\nwhile not os.path.exists({str(gate)!r}):\n    {wait}\nprint('ran')"
    )
    kernel.wait_idle(msg_id)
    gate.touch()
    kernel.wait_job_end(kernel.job_id(msg_id))
    handles = [
        (m["msg_type"], m["metadata"]["polycell"]["status"])
        for m in kernel.outputs(msg_id)
        if m["msg_type"] in ("display_data", "update_display_data")
    ]
    assert handles == [("display_data", "running"), ("update_display_data", "done")]
    assert kernel.text(msg_id) == "ran\n"


def test_a_handle_says_a_job_ended_only_after_all_its_output(any_kernel):
    """A job that ends as it starts is first shown running: its output is still on its way."""
    kernel = any_kernel
    started = [kernel.execute(f"%%bg\nprint({n})") for n in range(20)]
    for n, msg_id in enumerate(started):
        kernel.wait_job_end(kernel.job_id(msg_id))
        kinds = [
            (m["msg_type"], m["metadata"].get("polycell", {}).get("status")) for m in kernel.outputs(msg_id)
        ]
        assert kinds[0] == ("display_data", "running"), kinds
        assert kinds[-1] == ("update_display_data", "done"), kinds
        assert kinds.index(("stream", None)) < len(kinds) - 1, kinds
        assert kernel.text(msg_id) == f"{n}\n"
