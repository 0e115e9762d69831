"""Headless runs keep every job's output: ``polycell run`` and ``papermill --engine polycell``.

Each runs as a user runs it, a separate process with the polycell kernelspec
installed into a prefix of the test's own, against the polycell kernel and a
stock ipykernel with ``%load_ext polycell``.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from kernel_session import kernel_env, run_polycell

KERNELS = ["polycell", "python3"]

#: The issue's notebook: a ticking job, a late one, a process job, a failing one.
CELLS = [
    "%load_ext polycell",
    "%%bg --name tick\nimport time\nfor i in range(5):\n    print('tick', i)\n    time.sleep(0.2)",
    "%%bg --name late\nimport time\ntime.sleep(1.5)\nprint('late line')\n"
    "from IPython.display import HTML, display\ndisplay(HTML('<b>rich late</b>'))\n6 * 7",
    "%%bg --mode process --name proc\nimport os\nprint('from the process')\n"
    "os.system('echo from-fd-1')\nvalue = 7",
    "%%bg --name broken\nimport time\ntime.sleep(0.5)\n1 / 0",
    "print('foreground done')",
]


def write_notebook(path: Path, cells: list[str], kernel: str = "python3") -> Path:
    nb = new_notebook(cells=[new_code_cell(source) for source in cells])
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user with the polycell kernelspec installed, and a history of their own."""
    prefix = tmp_path / "prefix"
    result = dict(kernel_env())
    result.update(
        JUPYTER_PATH=str(prefix / "share" / "jupyter"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        JUPYTER_DATA_DIR=str(tmp_path / "data"),
        IPYTHONDIR=str(tmp_path / "ipython"),
        PATH=os.pathsep.join((str(Path(sys.executable).parent), result.get("PATH", ""))),
    )
    install = [sys.executable, "-m", "polycell", "install", "--prefix", str(prefix)]
    subprocess.run(install, check=True, env=result, capture_output=True)
    return result


def polycell_run(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return run_polycell("run", *args, env=env, timeout=timeout)


def outputs(path: Path) -> list[list[dict]]:
    return [cell.get("outputs", []) for cell in nbformat.read(path, as_version=4).cells]


def text_of(cell_outputs: list[dict], name: str = "stdout") -> str:
    return "".join(o["text"] for o in cell_outputs if o["output_type"] == "stream" and o["name"] == name)


def handle(cell_outputs: list[dict]) -> str:
    (shown,) = [o for o in cell_outputs if o["output_type"] == "display_data" and "[polycell] job" in str(o)]
    return shown["data"]["text/plain"]


def assert_every_job_in_its_cell(cells: list[list[dict]], offset: int = 0) -> None:
    tick, late, proc, broken, foreground = cells[1 + offset : 6 + offset]
    assert text_of(tick) == "".join(f"tick {i}\n" for i in range(5))
    assert "done after" in handle(tick)
    assert text_of(late) == "late line\n"
    assert [
        o["data"]["text/html"] for o in late if "text/html" in o.get("data", {}) and "job" not in str(o)
    ] == ["<b>rich late</b>"]
    assert [o["data"]["text/plain"] for o in late if o["output_type"] == "execute_result"] == ["42"]
    assert "from the process\n" in text_of(proc) and "from-fd-1\n" in text_of(proc)
    assert "done after" in handle(proc)
    (error,) = [o for o in broken if o["output_type"] == "error"]
    assert (error["ename"], error["evalue"]) == ("ZeroDivisionError", "division by zero")
    assert "failed after" in handle(broken)
    assert text_of(foreground) == "foreground done\n"


def assert_no_history_written(env: dict[str, str]) -> None:
    history = Path(env["IPYTHONDIR"]) / "profile_default" / "history.sqlite"
    if history.exists():
        with sqlite3.connect(history) as conn:
            assert conn.execute("SELECT COUNT(*) FROM history").fetchone() == (0,)


@pytest.mark.parametrize("kernel", KERNELS)
def test_polycell_run_saves_every_line_of_every_job_in_its_cell(env, tmp_path, kernel):
    notebook = write_notebook(tmp_path / "jobs.ipynb", CELLS)
    out = tmp_path / "out.ipynb"
    run = polycell_run(env, str(notebook), "--output", str(out), "--kernel", kernel)
    assert run.returncode == 1, run.stderr
    assert "[polycell run] job 4 (cell 5) failed: ZeroDivisionError: division by zero" in run.stderr
    assert "Traceback" not in run.stderr
    assert_every_job_in_its_cell(outputs(out))
    # The terminal showed the late output as it came, tagged with its cell and job.
    assert "[cell 3, job 2] late line" in run.stdout
    assert "[cell 2, job 1] tick 4" in run.stdout or "tick 4" in run.stdout
    assert_no_history_written(env)


def test_a_clean_run_exits_0_and_a_job_past_the_timeout_is_killed(env, tmp_path):
    clean = write_notebook(
        tmp_path / "clean.ipynb", ["%%bg\nimport time\ntime.sleep(0.5)\nprint('ok')"], "polycell"
    )
    run = polycell_run(env, str(clean), "--output", str(tmp_path / "clean-out.ipynb"))
    assert run.returncode == 0, run.stderr
    assert text_of(outputs(tmp_path / "clean-out.ipynb")[0]) == "ok\n"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "clean-out.ipynb").stat().st_mode) == 0o666 & ~mask  # not 0600

    slow = write_notebook(
        tmp_path / "slow.ipynb",
        ["%%bg --name slow\nimport time\nprint('started')\ntime.sleep(300)"],
        "polycell",
    )
    out = tmp_path / "slow-out.ipynb"
    run = polycell_run(env, str(slow), "--output", str(out), "--timeout", "3")
    assert run.returncode == 1, run.stderr
    assert "job 1 (cell 1) was still running after 3 s: killed" in run.stderr
    (cell,) = outputs(out)
    assert text_of(cell) == "started\n"
    assert "killed after" in handle(cell)


def test_ctrl_c_kills_the_kernels_jobs_and_saves_what_it_has(env, tmp_path):
    printed = tmp_path / "printed"  # made by the job once it has printed: only then the Ctrl-C
    notebook = write_notebook(
        tmp_path / "long.ipynb",
        [f"%%bg --name long\nimport time\nprint('working')\nopen({str(printed)!r}, 'w')\ntime.sleep(300)"],
        "polycell",
    )
    out = tmp_path / "long-out.ipynb"
    proc = subprocess.Popen(
        [sys.executable, "-m", "polycell.cli", "run", str(notebook), "--output", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        seen = ""
        deadline = time.monotonic() + 120
        while "waiting for 1 job(s)" not in seen:  # the cell ran; the run waits for its job
            line = proc.stderr.readline()
            assert line and time.monotonic() < deadline, seen
            seen += line
        while not printed.exists():
            assert time.monotonic() < deadline, "the job did not print"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        shown, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, seen + rest
    assert "interrupted: the kernel's jobs were killed" in rest
    (cell,) = outputs(out)
    assert text_of(cell) == "working\n", shown
    assert "killed after" in handle(cell)


def test_bad_input_is_one_line_and_exit_2_and_leaves_the_output_alone(env, tmp_path):
    good = write_notebook(tmp_path / "good.ipynb", ["1"])
    broken = tmp_path / "broken.ipynb"
    broken.write_text("{ not json")
    existing = tmp_path / "existing.ipynb"
    existing.write_text("precious")
    cases = [
        ([str(tmp_path / "missing.ipynb")], "cannot read"),
        ([str(broken)], "is not a notebook"),
        ([str(good), "--kernel", "no-such-kernel"], "no kernel named 'no-such-kernel'"),
        ([str(good), "--output", str(tmp_path / "no-dir" / "out.ipynb")], "cannot write"),
        ([str(good), "--output", str(tmp_path)], "it is a directory"),
        ([str(broken), "--output", str(existing)], "is not a notebook"),
        ([str(good), "--timeout", "0"], "--timeout must be"),
    ]
    for args, words in cases:
        run = polycell_run(env, *args)
        assert run.returncode == 2, (args, run.stderr)
        assert run.stderr.startswith("polycell run: ") and words in run.stderr, (args, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    assert existing.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


@pytest.mark.parametrize("kernel", KERNELS)
def test_papermill_engine_polycell_keeps_every_job_output(env, tmp_path, kernel):
    cells = ["n = 1", *CELLS]
    nb = new_notebook(cells=[new_code_cell(source) for source in cells])
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
    notebook = tmp_path / "in.ipynb"
    nbformat.write(nb, notebook)
    out = tmp_path / "out.ipynb"
    run = subprocess.run(
        ["papermill", str(notebook), str(out), "--engine", "polycell", "-p", "n", "5", "--log-output"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert run.returncode != 0  # the failing job fails the run, as a failing cell does
    assert "ZeroDivisionError" in run.stderr
    assert "late line" in run.stderr  # --log-output logs late output too
    saved = nbformat.read(out, as_version=4)
    code = [c for c in saved.cells if c.cell_type == "code"]
    assert "n = 5" in code[1].source  # papermill's injected parameters
    assert_every_job_in_its_cell([c.get("outputs", []) for c in code], offset=2)  # + the parameters
    assert_no_history_written(env)


def test_papermill_engine_is_registered_by_entry_point():
    from papermill.engines import papermill_engines

    from polycell.papermill_engine import PolycellEngine

    assert papermill_engines.get_engine("polycell") is PolycellEngine


def test_the_polycell_kernel_logs_like_ipykernel(tmp_path):
    """Headless tools filter ipykernel's known warnings by its prefix (nbclient's tests do)."""
    from jupyter_client.connect import write_connection_file

    lines = {}
    for name, module in (("polycell", "polycell.kernelapp"), ("ipykernel", "ipykernel_launcher")):
        connection_file, _ = write_connection_file(str(tmp_path / f"{name}.json"))
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "-f", connection_file],
            stderr=subprocess.PIPE,
            text=True,
            env=kernel_env(),
        )
        try:
            assert proc.stderr is not None
            lines[name] = proc.stderr.readline()
        finally:
            proc.kill()
            proc.wait(10)
    assert lines["polycell"] == lines["ipykernel"]
    assert lines["polycell"].startswith(
        "[IPKernelApp] WARNING | Kernel is running over TCP without encryption"
    )


def test_a_job_record_names_its_status_in_the_message_metadata(kernel):
    msg_id = kernel.execute("%%bg\n1 / 0")
    job = kernel.job_id(msg_id)
    kernel.wait_job_end(job)
    marks = [
        m["metadata"]["polycell"]
        for m in kernel.messages
        if m["parent_header"].get("msg_id") == msg_id and "polycell" in m.get("metadata", {})
    ]
    handles = [mark for mark in marks if mark.get("handle")]
    assert handles[0]["status"] in ("pending", "running")
    assert handles[-1] == {"job": job, "handle": True, "status": "failed"}
    assert json.dumps(marks)  # plain JSON, for any client
