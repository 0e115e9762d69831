"""ProcessRunner alone, with no kernel: real forks, pipes, signals and merge-back."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from polycell.job import Job, JobError, JobState, KillOutcome, current_job
from polycell.process import ProcessDied, ProcessRunner

SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture
def runner():
    r = ProcessRunner()
    yield r
    r.shutdown()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_until(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.01)


def test_result_output_and_names_come_back(runner):
    namespace = {"x": 1}

    def body():
        import json

        print("python line")
        os.write(1, b"fd line\n")
        os.system("echo from-sh 1>&2")
        namespace["y"] = namespace["x"] + 41
        namespace["lock"] = threading.Lock()
        namespace["j"] = json
        namespace["square"] = lambda v: v * v
        return os.getpid()

    job = runner.submit(
        Job(1, mode="process"), body, namespace=namespace, names=["y", "lock", "j", "square", "gone"]
    )
    assert job.wait(30)
    assert job.status is JobState.DONE
    assert job.result == job.info["pid"] != os.getpid()
    assert "python line\n" in job.output and "fd line\n" in job.output and "from-sh\n" in job.output
    assert (
        "[job 1: 'lock' not sent back (TypeError: cannot pickle '_thread.lock' object); skipped]\n"
        in job.output
    )
    assert job.output.endswith("[job 1 set: y, j, square]\n")
    assert namespace["y"] == 42 and namespace["j"] is __import__("json") and namespace["square"](5) == 25
    assert "lock" not in namespace


def test_children_run_at_a_lower_priority(runner):
    job = runner.submit(Job(10, mode="process"), lambda: os.nice(0))
    assert job.wait(30)
    assert job.result == min(19, os.nice(0) + runner.niceness)


def test_records_and_text_keep_their_order(runner):
    def body():
        journal = current_job.get().journal
        for i in range(3):
            print(f"line {i}")
            journal.append({"msg_type": "display_data", "content": {"data": {"text/plain": f"d{i}"}}})
        for i in range(100_000):
            print(i)

    job = runner.submit(Job(2, mode="process"), body)
    assert job.wait(60)
    records = job.journal.records()
    kinds = [r["content"].get("text") or r["content"]["data"]["text/plain"] for r in records[:6]]
    assert kinds == ["line 0\n", "d0", "line 1\n", "d1", "line 2\n", "d2"]
    assert job.output == "line 0\nline 1\nline 2\n" + "".join(f"{i}\n" for i in range(100_000))


def test_child_survives_the_end_of_the_thread_that_submitted_it(runner, tmp_path):
    # Linux sends PR_SET_PDEATHSIG when the forking *thread* ends: forks are made by
    # the runner's own thread, so a job started from a short-lived thread lives on.
    flag = tmp_path / "go"
    jobs: list[Job] = []

    def body():
        while not flag.exists():
            time.sleep(0.01)
        return "survived"

    submitter = threading.Thread(target=lambda: jobs.append(runner.submit(Job(3, mode="process"), body)))
    submitter.start()
    submitter.join()
    flag.write_text("")
    assert jobs[0].wait(30)
    assert (jobs[0].status, jobs[0].result) == (JobState.DONE, "survived")


def test_kill_takes_the_whole_process_group(runner):
    ready = threading.Event()

    def body():
        child = subprocess.Popen(["sleep", "600"])
        print(child.pid, flush=True)
        while True:
            pass

    job = runner.submit(Job(4, mode="process"), body)
    job.journal.follow(lambda record, _pos: ready.set() if record else None)
    assert ready.wait(30)
    pids = [job.info["pid"], int(job.output.split()[0])]
    assert job.kill() is KillOutcome.KILLED
    assert job.status is JobState.KILLED
    assert all(_gone(pid) for pid in pids)


def test_deaths_and_unsendable_exceptions_fail_the_job(runner):
    import ctypes

    def segfault():
        ctypes.string_at(0)

    def unpicklable_exception():
        exc = ValueError("carries a lock")
        exc.lock = threading.Lock()
        raise exc

    jobs = [
        runner.submit(Job(5, mode="process"), segfault),
        runner.submit(Job(6, mode="process"), lambda: os._exit(3)),
        runner.submit(Job(7, mode="process"), unpicklable_exception),
    ]
    for job in jobs:
        assert job.wait(30) and job.status is JobState.FAILED
    assert isinstance(jobs[0].exception, ProcessDied) and jobs[0].exception.signal_number == 11
    assert "Fatal Python error: Segmentation fault" in jobs[0].output  # the crash's stack, from faulthandler
    assert "in string_at" in jobs[0].output and "in segfault" in jobs[0].output
    assert jobs[0].output.endswith("[job 5 failed: child process died: signal 11 (SIGSEGV)]\n")
    assert str(jobs[1].exception) == "child process exited with code 3 without a result"
    assert type(jobs[2].exception) is JobError and str(jobs[2].exception) == "ValueError: carries a lock"


def test_values_over_the_size_limit_are_skipped(runner):
    runner.max_value_bytes = 1000
    namespace: dict = {}

    def body():
        namespace["big"] = b"x" * 10_000
        namespace["small"] = 1
        return "y" * 10_000

    job = runner.submit(Job(8, mode="process"), body, namespace=namespace, names=["big", "small"])
    assert job.wait(30) and job.status is JobState.DONE and job.result is None
    assert "[job 8: result not sent back (9.8 KB pickled, over the 1,000 bytes limit); " in job.output
    assert (
        "[job 8: 'big' not sent back (9.8 KB pickled, over the 1,000 bytes limit); skipped]\n" in job.output
    )
    assert namespace == {"small": 1}


def test_a_process_job_cannot_start_jobs_of_any_kind(runner):
    """Its copies of the job table and of the kernel's output threads cannot run jobs."""
    from polycell import jobs

    refused = "a process job cannot start jobs of its own; start them from the notebook"
    job = runner.submit(Job(11, mode="process"), lambda: runner.submit(Job(12, mode="process"), lambda: 1))
    assert job.wait(30) and job.status is JobState.FAILED
    assert str(job.exception) == refused

    def start_others():
        said = []
        for start in (
            lambda: jobs.map(abs, [1], mode="process"),
            lambda: jobs.map(abs, [1], mode="thread"),
            lambda: jobs.submit("thread", lambda: 1),
            lambda: jobs.new_job("task"),
        ):
            try:
                start()
            except JobError as exc:
                said.append(str(exc))
        return said

    job = runner.submit(Job(13, mode="process"), start_others)
    assert job.wait(30) and job.status is JobState.DONE, job.output
    assert job.result == [refused] * 4
    assert len(jobs) == 0  # and nothing leaked into the parent's table


class _Unloadable:
    """Pickles fine in the child; cannot be unpickled (like a class defined in the job's cell)."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def _refuse_to_load():
    raise AttributeError("Can't get attribute 'Thing' on <module '__main__'>")


def test_a_record_the_parent_cannot_load_is_one_line_and_the_job_goes_on(runner):
    def body():
        job = current_job.get()
        print("before", flush=True)
        job.journal.append(
            {"msg_type": "display_data", "content": {"data": {}, "metadata": {"x": _Unloadable()}}}
        )
        print("after", flush=True)
        return "finished"

    job = runner.submit(Job(14, mode="process"), body)
    assert job.wait(30)
    assert (job.status, job.result) == (JobState.DONE, "finished")
    assert job.output == (
        "before\n[job 14: an output record could not be read here "
        "(AttributeError: Can't get attribute 'Thing' on <module '__main__'>)]\nafter\n"
    )


def test_input_and_getpass_fail_at_once_in_the_child(runner):
    def body():
        import getpass

        said = []
        for ask in (input, getpass.getpass):
            try:
                ask("? ")
            except EOFError as exc:
                said.append(str(exc))
        return said

    job = runner.submit(Job(15, mode="process"), body)
    assert job.wait(30) and job.status is JobState.DONE
    assert job.result == [
        "input() is not available in a process job: it has no front end to ask",
        "getpass() is not available in a process job: it has no front end to ask",
    ]


def test_no_fork_is_a_one_line_error(monkeypatch):
    monkeypatch.delattr(os, "fork")
    with pytest.raises(JobError, match=r"^--mode process needs os.fork, which \w+ does not have; "):
        ProcessRunner()


def test_shutdown_kills_running_children():
    runner = ProcessRunner()
    job = runner.submit(Job(9, mode="process"), lambda: time.sleep(600))
    pid = job.info["pid"]
    runner.shutdown()
    assert job.status is JobState.KILLED and _gone(pid)


HOST = """
import os, subprocess, sys, time
sys.path.insert(0, {src!r})
from polycell.job import Job
from polycell.process import ProcessRunner

def body():
    sleeper = subprocess.Popen(["sleep", "600"])
    print(os.getpid(), sleeper.pid, flush=True)
    time.sleep(600)

runner = ProcessRunner()
job = runner.submit(Job(1, mode="process"), body)
while not job.output:
    time.sleep(0.01)
print(job.output, end="", flush=True)
{ending}
"""


@pytest.mark.parametrize(
    ("ending", "dead"),
    [("sys.exit(0)", "job and grandchild"), ("os.kill(os.getpid(), 9)", "job")],
    ids=["host exits: atexit kills the group", "host SIGKILLed: PDEATHSIG kills the child"],
)
def test_children_die_with_their_host(ending, dead):
    script = HOST.format(src=str(SRC), ending=ending)
    host = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    child, grandchild = (int(pid) for pid in host.stdout.split())
    try:
        _wait_until(lambda: _gone(child))
        if dead == "job and grandchild":
            _wait_until(lambda: _gone(grandchild))
    finally:
        # A host killed with SIGKILL cannot end what the job started (a documented limit).
        if not _gone(grandchild):
            os.kill(grandchild, 9)
