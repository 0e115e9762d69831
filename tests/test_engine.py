"""The job engine alone: jobs, journals and the thread and task runners, with no Jupyter."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest

from polycell.builtin_standin import BuiltinStandIn
from polycell.job import Job, JobError, JobKilled, JobState, KillOutcome, current_job
from polycell.job_table import JobTable
from polycell.journal import OutputJournal, StreamRun


@pytest.fixture
def table():
    t = JobTable()
    yield t
    t.shutdown()


def test_states_move_forward_only():
    job = Job(1, mode="thread")
    assert job.status is JobState.PENDING
    assert job.set_running()
    job.set_result(5)
    job.set_exception(ValueError("late"))  # ignored: already ended
    assert job.status is JobState.DONE and job.result == 5 and job.exception is None
    assert not job.set_running()


def test_thread_job_result_output_and_await(table):
    def body():
        print_to = current_job.get()
        assert print_to is not None
        print_to.journal.write("stdout", "hello\n")
        return 42

    job = table.submit("thread", body)
    assert job.wait(10)
    assert job.status is JobState.DONE and job.result == 42
    assert job.output == "hello\n"
    assert asyncio.run(_await(job)) == 42


async def _await(job):
    return await job


def test_thread_job_failure_keeps_exception(table):
    def body():
        raise ValueError("boom")

    job = table.submit("thread", body)
    job.wait(10)
    assert job.status is JobState.FAILED
    assert isinstance(job.exception, ValueError)
    with pytest.raises(ValueError, match="boom"):
        asyncio.run(_await(job))


def test_kill_thread_in_python_loop(table):
    started = threading.Event()

    def body():
        started.set()
        while True:
            pass

    job = table.submit("thread", body)
    assert started.wait(10)
    assert job.kill() is KillOutcome.KILLED
    assert job.status is JobState.KILLED
    assert isinstance(job.exception, JobKilled)
    assert "killed" in job.output


def test_kill_thread_inside_time_sleep(table):
    started = threading.Event()

    def body():
        started.set()
        time.sleep(60)

    job = table.submit("thread", body)
    assert started.wait(10)
    assert job.kill(timeout=5) is KillOutcome.KILLED  # not after the 60 s sleep


def test_kill_thread_blocked_in_c_is_reported_honestly(table):
    gate = threading.Lock()
    gate.acquire()
    started = threading.Event()

    def body():
        started.set()
        gate.acquire()  # C-level wait that no async exception can break
        gate.release()
        while True:
            pass

    job = table.submit("thread", body)
    assert started.wait(10)
    assert job.kill(timeout=0.3) is KillOutcome.STILL_BLOCKED
    assert job.status is JobState.RUNNING and job.kill_requested
    gate.release()
    assert job.wait(10)
    assert job.status is JobState.KILLED


def test_time_sleep_outside_jobs_is_untouched(table):
    table.runner("thread")
    assert isinstance(time.sleep, BuiltinStandIn) and repr(time.sleep) == "<built-in function sleep>"
    t0 = time.monotonic()
    time.sleep(0.05)
    assert time.monotonic() - t0 >= 0.05
    with pytest.raises(ValueError):
        time.sleep(-1)


def test_task_job_and_cancel(table):
    async def quick():
        await asyncio.sleep(0)
        return "ok"

    async def forever():
        await asyncio.sleep(3600)

    done = table.submit("task", quick)
    stuck = table.submit("task", forever)
    assert done.wait(10) and done.result == "ok"
    assert stuck.kill() is KillOutcome.KILLED
    assert stuck.status is JobState.KILLED


def test_many_task_and_thread_jobs_all_finish(table):
    async def tick(i):
        await asyncio.sleep(0.01)
        return i

    task_jobs = [table.submit("task", lambda i=i: tick(i)) for i in range(1000)]
    thread_jobs = [table.submit("thread", lambda i=i: (time.sleep(0.01), i)[1]) for i in range(200)]
    for job in task_jobs + thread_jobs:
        assert job.wait(60)
    assert [j.result for j in task_jobs] == list(range(1000))
    assert [j.result for j in thread_jobs] == list(range(200))


def test_kill_ended_job_says_so(table):
    job = table.submit("thread", lambda: 1)
    job.wait(10)
    assert job.kill() is KillOutcome.ALREADY_ENDED


def test_unknown_job_and_mode_are_one_line_errors(table):
    with pytest.raises(JobError, match="no job 7: no job has been started yet"):
        table[7]
    with pytest.raises(JobError, match="unknown mode 'gpu'"):
        table.submit("gpu", lambda: None)


def test_journal_merges_streams_and_caps_memory():
    journal = OutputJournal(max_chars=10_000, chunk_chars=1_000)
    for i in range(100_000):
        journal.write("stdout", f"{i}\n")
    records = journal.records()
    assert len(records) < 30
    assert records[0]["content"]["text"].startswith("[polycell:")
    text = journal.text()
    assert text.endswith("99999\n")
    assert len(text) < 12_000
    lines = text.splitlines()[1:]
    numbers = [int(x) for x in lines[1:]]  # first line after the marker may be cut
    assert numbers == list(range(numbers[0], 100_000))


def test_journal_follow_has_no_gap_and_no_duplicate():
    journal = OutputJournal()
    seen: list[str] = []
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set() and i < 20_000:
            journal.write("stdout", f"{i}\n")
            i += 1
        journal.close()

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0)  # let the writer get going; correctness does not depend on it
    ended = threading.Event()

    def follower(record, _position):
        if record is None:
            ended.set()
        else:
            seen.append(record)

    sub = journal.follow(follower)
    thread.join(30)
    if not sub.ended:
        assert ended.wait(10)
    # Never taken while the writer wrote: every write after the snapshot is in one run.
    assert len(seen) <= 1 and all(isinstance(run, StreamRun) for run in seen)
    text = "".join(r["content"]["text"] for r in sub.snapshot) + "".join(
        run.take()["content"]["text"] for run in seen
    )
    assert text == "".join(f"{i}\n" for i in range(20_000))


def test_gil_switch_interval_is_short_only_while_thread_jobs_run(table):
    from polycell.thread import BUSY_SWITCH_INTERVAL

    before = sys.getswitchinterval()
    inside = []
    gate = threading.Event()

    def body():
        inside.append(sys.getswitchinterval())
        gate.wait(10)

    job = table.submit("thread", body)
    job2 = table.submit("thread", body)
    gate.set()
    assert job.wait(10) and job2.wait(10)
    assert inside == pytest.approx([BUSY_SWITCH_INTERVAL, BUSY_SWITCH_INTERVAL])
    assert sys.getswitchinterval() == before


def test_no_line_after_a_killed_sleep_runs(table):
    # The kill's exception is pending before the sleep wakes, every time.
    for _ in range(20):
        started = threading.Event()
        after: list[int] = []

        def body(started=started, after=after):
            started.set()
            time.sleep(60)
            after.append(1)

        job = table.submit("thread", body)
        assert started.wait(10)
        assert job.kill(timeout=5) is KillOutcome.KILLED
        assert job.status is JobState.KILLED and after == []


def test_a_second_kill_stops_a_job_that_swallowed_the_first(table):
    started, swallowed = threading.Event(), threading.Event()

    def body():
        try:
            started.set()
            while True:
                pass
        except BaseException:  # the user's code swallows the kill
            swallowed.set()
        while True:
            pass

    job = table.submit("thread", body)
    assert started.wait(10)
    assert job.kill(timeout=0.5) is KillOutcome.STILL_BLOCKED
    assert swallowed.is_set()
    assert job.kill(timeout=5) is KillOutcome.KILLED


def test_job_threads_leave_sigint_to_the_main_thread(table):
    """Linux may hand a process-directed SIGINT to any thread not blocking it (polycell.interrupts)."""
    import signal

    for mode in ("thread", "task"):
        if mode == "thread":
            body = lambda: signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # noqa: E731
        else:

            async def body() -> bool:
                return signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])

        job = table.submit(mode, body)
        assert job.wait(10)
        assert job.result is True, mode
    plain: list[bool] = []
    thread = threading.Thread(
        target=lambda: plain.append(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    )
    thread.start()
    thread.join(10)
    assert plain == [False]  # only polycell's threads: the caller's mask is back as it was
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
