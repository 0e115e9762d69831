"""Task jobs on trio (``--backend trio``), without a kernel: run, fail, kill, and trio missing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

from kernel_session import kernel_env
from polycell.job import JobError, JobState
from polycell.job_table import JobTable


@pytest.fixture
def table():
    table = JobTable()
    yield table
    table.shutdown()


def test_trio_jobs_run_fail_and_are_killed(table):
    runner = table.runner("task", "trio")
    assert table.runner("task", "trio") is runner
    assert table.runner("task") is not runner  # asyncio stays the default

    async def ok():
        await trio.sleep(0.01)
        return trio.lowlevel.current_task().name

    async def fails():
        await trio.sleep(0)
        raise ValueError("bad")

    async def forever():
        await trio.sleep_forever()

    jobs = []
    for body in (ok, fails, forever):
        job = table.new_job("task")
        runner.submit(job, body)
        jobs.append(job)
    done, failed, sleeping = jobs
    assert done.wait(10) and failed.wait(10)
    assert (done.status, done.result) == (JobState.DONE, f"polycell-job-{done.id}")
    assert failed.status is JobState.FAILED and str(failed.exception) == "bad"
    assert sleeping.status is JobState.RUNNING
    sleeping.kill(timeout=5)
    assert sleeping.status is JobState.KILLED


def test_unknown_backend_and_non_task_mode_are_one_line_errors(table):
    with pytest.raises(JobError, match=r"^unknown backend 'curio': choose one of asyncio, trio$"):
        table.runner("task", "curio")
    with pytest.raises(JobError, match=r"^--backend trio is for task mode only, not --mode thread$"):
        table.runner("thread", "trio")


def test_without_trio_installed_the_error_says_how_to_get_it():
    # A fresh interpreter in which `import trio` fails, as it does where trio is not installed.
    code = (
        "import sys; sys.modules['trio'] = None\n"
        "from polycell.job_table import JobTable\n"
        "from polycell.job import JobError\n"
        "try:\n    JobTable().runner('task', 'trio')\n"
        "except JobError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=kernel_env(), capture_output=True, text=True, check=False
    )
    assert done.stdout.strip() == "--backend trio needs the trio package: pip install 'polycell[trio]'"
