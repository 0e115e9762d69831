"""Reattaching to a job's output from another client, after the first one went away."""

from __future__ import annotations

import re

import pytest

from kernel_session import KernelSession
from polycell.kernel_link import KernelLink

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


def _keep_after(position: int, messages: list[dict]) -> list[tuple[str, str]]:
    """What the JupyterLab extension keeps of live messages after replaying up to `position`."""
    kept = []
    for m in messages:
        pos = m["metadata"]["polycell"].get("pos")
        if pos is None:
            continue  # the handle's updates: not journal output
        if m["msg_type"] == "stream":
            text = m["content"]["text"]
            if pos + len(text) > position:
                kept.append(("stream", text[max(0, position - pos) :]))
        elif pos >= position:
            kept.append((m["msg_type"], m["content"].get("data", {}).get("text/html", "")))
    return kept


def _joined(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for kind, text in items:
        if out and kind == "stream" and out[-1][0] == "stream":
            out[-1] = ("stream", out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


def test_a_reloaded_page_replays_then_follows_each_output_once(any_kernel):
    """The JupyterLab extension's protocol, as a page that reloads mid-job uses it.

    The kernel says it has polycell in its help links; the jobs list gives each
    job's cell and request, and the last request of that cell; ``tail`` replays
    the journal up to a position, and live messages carry positions past it.
    """
    kernel = any_kernel
    reply = kernel.reply(kernel.kc.kernel_info())
    assert {"text": "polycell", "url": "https://pypi.org/project/polycell/"} in reply["content"]["help_links"]

    kernel.run("import threading; gate = threading.Event()")
    started = kernel.execute_in_cell(JOB, "cell-1")
    job = kernel.job_id(started)
    kernel.wait_for(
        lambda m: (
            m["parent_header"].get("msg_id") == started
            and "half way" in m["content"].get("data", {}).get("text/html", "")
        )
    )
    with KernelLink(kernel.connection_file, 10) as link:
        listing = link.request("jobs")
        (row,) = [r for r in listing["jobs"] if r["id"] == job]
        assert row["info"]["cell_id"] == "cell-1"
        assert row["info"]["request"] == started == listing["cells"]["cell-1"]
        assert listing["kernel_process"]
        replay = link.request("tail", job=job, since=0)
        # The handle as the cell showed it, for the page to put back first.
        assert set(replay["handle"]) == {"text/plain", "text/html", "application/vnd.polycell.job+json"}
        assert replay["handle"]["text/plain"] == f"[polycell] job {job} 'gated' (thread): running"
        replayed = [
            (r["msg_type"], r["content"].get("text", r["content"].get("data", {}).get("text/html", "")))
            for r in replay["records"]
        ]
        kernel.run("gate.set()")
        kernel.wait_job_end(job)
        rest = link.request("tail", job=job, since=replay["position"])
        assert rest["ended"] is True
        # The cell runs something else (the polycell kernel runs %jobs off the main thread,
        # where no pre_run_cell is called): it no longer shows the job's request.
        jobs_table = kernel.execute_in_cell("%jobs", "cell-1")
        kernel.reply(jobs_table)
        assert link.request("jobs")["cells"]["cell-1"] == jobs_table

    live = [m for m in kernel.outputs(started) if m.get("metadata", {}).get("polycell", {}).get("job") == job]
    whole = _joined(replayed + [(r["msg_type"], r["content"].get("text", "")) for r in rest["records"]])
    # All of the job's live messages, the ones the replay already had included: each unit once.
    rebuilt = _joined([(kind, text) for kind, text in replayed] + _keep_after(replay["position"], live))
    assert [kind for kind, _ in rebuilt] == ["stream", "display_data", "stream", "error"]
    assert rebuilt[0][1] + rebuilt[2][1] == _expected(0, LINES)
    assert [kind for kind, _ in whole] == [kind for kind, _ in rebuilt]
    handle = next(m for m in live if m["msg_type"] == "display_data")
    data = handle["content"]["data"]["application/vnd.polycell.job+json"]
    assert (data["job"], data["name"], data["mode"]) == (job, "gated", "thread")
    assert data["kernel_process"] == listing["kernel_process"]


def test_a_job_an_earlier_run_of_a_cell_starts_leaves_the_cells_latest_request_alone(any_kernel):
    """A job's thread that starts another job later (here a map) speaks for its own cell's
    earlier run: the cell's latest request stays the one it ran since, or a page would put
    that earlier run's jobs back over what the cell shows now."""
    kernel = any_kernel
    kernel.run("import threading; go = threading.Event()")
    first = kernel.execute_in_cell(
        "%%bg --name outer\ngo.wait()\ninner = jobs.map(abs, range(3), workers=1, mode='thread')", "cell-1"
    )
    outer = kernel.job_id(first)
    kernel.reply(first)
    again = kernel.execute_in_cell("x = 1", "cell-1")
    kernel.reply(again)
    kernel.run("go.set()")
    kernel.wait_job_end(outer)
    inner = kernel.eval("inner.id")
    kernel.wait_job_end(inner)
    with KernelLink(kernel.connection_file, 10) as link:
        listing = link.request("jobs")
    (row,) = [r for r in listing["jobs"] if r["id"] == inner]
    assert row["info"]["request"] == first  # the map is the outer job's, started by the first run
    assert listing["cells"]["cell-1"] == again
