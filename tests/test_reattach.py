"""Reattaching to a job's output from another client, after the first one went away."""

from __future__ import annotations

import re

import pytest

from kernel_session import KernelSession

LINES = 60
HALF = 30

JOB = f"""%%bg --name gated
from IPython.display import HTML, display
for i in range({HALF}):
    print('line', i)
display(HTML('<b>half way</b>'))
gate.wait()
for i in range({HALF}, {LINES}):
    print('line', i)
raise ValueError('the end')
"""


def _expected(start: int, stop: int) -> str:
    return "".join(f"line {i}\n" for i in range(start, stop))


@pytest.fixture
def second_client(kernel: KernelSession):
    """Make one more client of the `kernel` fixture's kernel, on demand."""
    clients: list[KernelSession] = []

    def connect() -> KernelSession:
        clients.append(KernelSession(attach_to=kernel.km))
        return clients[-1]

    yield connect
    for client in clients:
        client.close()


def test_show_replays_then_follows_live_in_another_client(kernel, second_client):
    kernel.run("import threading; gate = threading.Event()")
    started = kernel.execute(JOB)
    job = kernel.job_id(started)
    kernel.wait_for(
        lambda m: (
            m["parent_header"].get("msg_id") == started
            and m["msg_type"] == "display_data"
            and "text/html" in m["content"]["data"]
            and "half way" in m["content"]["data"]["text/html"]
        )
    )
    assert kernel.text(started) == _expected(0, HALF)
    kernel.disconnect()  # client A goes away while the job waits at its gate

    b = second_client()
    shows = [b.execute(f"%job show {job}"), b.execute(f"%job show {job}")]
    for show in shows:
        b.wait_idle(show)
        # The whole journal so far was replayed into each cell, the rich output included.
        b.wait_for(
            lambda m, show=show: (
                m["parent_header"].get("msg_id") == show
                and m["msg_type"] == "display_data"
                and "half way" in m["content"]["data"].get("text/html", "")
            )
        )
        assert b.text(show) == _expected(0, HALF)

    b.run("gate.set()")
    for show in shows:
        b.wait_for(lambda m, show=show: m["parent_header"].get("msg_id") == show and m["msg_type"] == "error")
        outputs = [m for m in b.outputs(show) if m.get("metadata", {}).get("polycell", {}).get("job") == job]
        # Every line once, in order: the replayed half, the display, the live half, the traceback.
        assert b.text(show) == _expected(0, LINES)
        half_way = next(  # the job's own display (the first display_data is its handle)
            i
            for i, m in enumerate(outputs)
            if m["msg_type"] == "display_data" and "half way" in m["content"]["data"].get("text/html", "")
        )
        assert half_way < [m["msg_type"] for m in outputs].index("error")
        text_before_display = "".join(
            m["content"]["text"] for m in outputs[:half_way] if m["msg_type"] == "stream"
        )
        assert text_before_display == _expected(0, HALF)
        assert outputs[-1]["msg_type"] in ("error", "update_display_data")
        error = next(m for m in outputs if m["msg_type"] == "error")
        assert (error["content"]["ename"], error["content"]["evalue"]) == ("ValueError", "the end")
    b.wait_job_end(job)
    assert b.eval(f"jobs[{job}].status.value") == "failed"


def test_show_of_an_ended_job_replays_everything(kernel, second_client):
    started = kernel.execute("%%bg\nfor i in range(5):\n    print('line', i)\n'result'")
    job = kernel.job_id(started)
    kernel.wait_job_end(job)
    kernel.disconnect()
    b = second_client()
    show = b.execute(f"%job show {job}")
    b.wait_job_end(job)
    b.wait_idle(show)
    assert b.text(show) == _expected(0, 5)
    results = [m for m in b.outputs(show) if m["msg_type"] == "execute_result"]
    assert results and results[0]["content"]["data"]["text/plain"] == "'result'"
    # All of it before the cell's idle, where nbclient and papermill stop listening.
    mine = [m for m in b.messages if m["parent_header"].get("msg_id") == show]
    idle = next(
        i
        for i, m in enumerate(mine)
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
    )
    assert [m["msg_type"] for m in mine[idle + 1 :]] == []


def test_jobs_table_from_a_new_client(kernel, second_client):
    first = kernel.execute("%%bg --name finished\nprint('all done')")
    second = kernel.execute("%%bg --name sleeper\nimport time\ntime.sleep(60)")
    finished, sleeper = kernel.job_id(first), kernel.job_id(second)
    kernel.wait_job_end(finished)
    kernel.disconnect()

    b = second_client()
    table = b.run("%jobs")
    shown = next(m for m in b.outputs(table["parent_header"]["msg_id"]) if m["msg_type"] == "display_data")
    text = shown["content"]["data"]["text/plain"]
    assert re.search(rf"^{finished}\s+finished\s+thread\s+done\s+\S+\s+all done$", text, re.M), text
    assert re.search(rf"^{sleeper}\s+sleeper\s+thread\s+running\s+\S+$", text, re.M), text
    b.run(f"%job kill {sleeper}")
    b.wait_for(
        lambda m: (
            m["msg_type"] == "update_display_data"
            and "killed after" in m["content"]["data"].get("text/plain", "")
            and m["metadata"].get("polycell", {}).get("job") == sleeper
        )
    )
