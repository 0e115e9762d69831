"""The journal on disk and the journal cursor, without a kernel."""

from __future__ import annotations

import queue
import sqlite3
import threading
from typing import Any

from polycell.control import answer
from polycell.job import Job
from polycell.job_table import JobTable
from polycell.journal import OutputJournal, StreamRun
from polycell.journal_store import JournalStore, read_job, read_jobs


def _text(records: list[dict]) -> str:
    return "".join(r["content"]["text"] for r in records if r["msg_type"] == "stream")


def _merged(records: list[dict]) -> list[dict]:
    """Adjacent text of one stream as one record, as a front end shows it.

    The store's writer thread may take a stream's writes in one batch or in
    several, depending on when it wakes: what the user sees is the same.
    """
    merged: list[dict] = []
    for record in records:
        last = merged[-1] if merged else None
        if (
            last is not None
            and record["msg_type"] == last["msg_type"] == "stream"
            and record["content"]["name"] == last["content"]["name"]
        ):
            text = last["content"]["text"] + record["content"]["text"]
            merged[-1] = {**last, "content": {**last["content"], "text": text}}
        else:
            merged.append(record)
    return merged


def test_records_metadata_and_rich_output_survive_in_order(tmp_path):
    path = tmp_path / "polycell-k.sqlite"
    store = JournalStore(path)
    try:
        job = Job(1, mode="thread", name="work")
        store.track(job)
        job.set_running()
        for i in range(1000):
            job.journal.write("stdout", f"{i}\n")
        job.journal.append({"msg_type": "display_data", "content": {"data": {"text/plain": "rich"}}})
        job.journal.write("stderr", "warning\n")
        job.set_exception(ValueError("boom"))
        assert store.flush()
        assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        stored, records = read_job(path, 1)
    finally:
        store.close()
    records = _merged(records)
    assert (stored.name, stored.mode, stored.status) == ("work", "thread", "failed")
    assert stored.ended is not None and stored.started is not None
    assert [r["msg_type"] for r in records] == ["stream", "display_data", "stream"]
    assert records[0]["content"]["text"] == "".join(f"{i}\n" for i in range(1000))
    assert records[2]["content"] == {"name": "stderr", "text": "warning\n"}


def test_oldest_jobs_go_first_past_the_cap(tmp_path):
    path = tmp_path / "polycell-k.sqlite"
    store = JournalStore(path, max_bytes=300_000)
    try:
        for job_id in range(1, 9):
            job = Job(job_id, mode="thread")
            store.track(job)
            job.set_running()
            for i in range(4000):
                job.journal.write("stdout", f"job {job_id} line {i} ------------\n")
            job.set_result(None)
            assert store.flush()
            assert store.used_bytes() <= 300_000
    finally:
        store.close()
    kept = [job.id for job in read_jobs(path)]
    assert kept and kept == list(range(9 - len(kept), 9))  # a suffix: the newest jobs
    assert len(kept) < 8
    _, records = read_job(path, 8)
    assert _text(records) == "".join(f"job 8 line {i} ------------\n" for i in range(4000))


def test_a_running_job_bigger_than_the_cap_keeps_its_newest_output(tmp_path):
    path = tmp_path / "polycell-k.sqlite"
    store = JournalStore(path, max_bytes=200_000, interval=0.01)
    job = Job(1, mode="thread")
    try:
        store.track(job)
        job.set_running()
        for i in range(40_000):
            job.journal.write("stdout", f"line {i:06d} ..........\n")
            if i % 2000 == 0:
                store.flush()
        assert store.flush()
        stored, records = read_job(path, 1)
    finally:
        store.close()
    assert stored.dropped > 0
    assert "earlier records were dropped" in records[0]["content"]["text"]
    text = _text(records[1:])
    assert text.endswith("line 039999 ..........\n")
    lines = text.splitlines()
    first = int(lines[0].split()[1])
    assert lines == [f"line {i:06d} .........." for i in range(first, 40_000)]


def test_a_reloaded_extension_rewrites_a_job_without_duplicates(tmp_path):
    path = tmp_path / "polycell-k.sqlite"
    job = Job(1, mode="thread")
    job.set_running()
    first = JournalStore(path)
    first.track(job)
    job.journal.write("stdout", "before\n")
    first.close()
    second = JournalStore(path)  # same process: same run
    try:
        assert second.run == first.run
        second.track(job)
        job.journal.write("stdout", "after\n")
        job.set_result(None)
        assert second.flush()
    finally:
        second.close()
    assert [j.id for j in read_jobs(path)] == [1]
    assert _text(read_job(path, 1)[1]) == "before\nafter\n"


def test_since_sees_every_write_once_across_merges_and_drops():
    journal = OutputJournal(max_chars=2_000, chunk_chars=50)
    position, seen, expected = 0, [], []
    for i in range(3000):
        journal.write("stdout" if i % 7 else "stderr", f"{i},")
        expected.append(f"{i},")
        if i % 5 == 0:
            records, position, _, _ = journal.since(position, max_chars=40)
            seen += records
    journal.close()
    while True:
        records, position, _, ended = journal.since(position, max_chars=40)
        seen += records
        if ended:
            break
    text = _text(seen)
    # Polled often enough that nothing was dropped before it was read.
    assert "dropped" not in text
    assert text == "".join(expected)
    assert position == journal.position == len(text)
    # A reader that comes late is told what it missed, then gets the rest.
    records, *_ = journal.since(0, max_chars=10**9)
    assert "characters or records of output were dropped unread" in records[0]["content"]["text"]
    assert "".join(expected).endswith(_text(records[1:]))


def test_live_positions_continue_a_replay_with_each_unit_once():
    """What a front end does after a reload: replay up to P, then keep live output past P."""
    journal = OutputJournal(chunk_chars=30)
    live: list[tuple[Any, int | None]] = []
    journal.follow(lambda record, position: live.append((record, position)))
    display = {"msg_type": "display_data", "content": {"data": {"text/plain": "fig"}, "metadata": {}}}
    for i in range(40):
        journal.write("stdout", f"{i} ")
        if i % 9 == 0:
            journal.append(display)
        if i == 25:
            replayed, replay_end, caught_up, _ = journal.since(0)
            assert caught_up
    journal.close()
    assert replay_end < journal.position
    kept = list(replayed)
    for item, position in live:
        if item is None:
            continue
        record = item.take() if isinstance(item, StreamRun) else item
        if record["msg_type"] == "stream":
            text = record["content"]["text"]
            skip = max(0, replay_end - position)
            if skip < len(text):
                kept.append({"msg_type": "stream", "content": {"name": "stdout", "text": text[skip:]}})
        elif position >= replay_end:
            kept.append(record)
    assert _streams_joined(kept) == _streams_joined(journal.since(0)[0])


def _streams_joined(records: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """Each record's kind and text, with the text of consecutive stream records joined."""
    joined: list[tuple[str, Any]] = []
    for record in records:
        text = record["content"].get("text")
        if joined and text is not None and joined[-1][0] == "stream":
            joined[-1] = ("stream", joined[-1][1] + text)
        else:
            joined.append((record["msg_type"], text))
    return joined


def test_replaying_follower_sees_snapshot_then_live_in_order():
    journal = OutputJournal()
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            journal.write("stdout", f"{i}\n")
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        got: list[str] = []
        while not journal.text():
            pass
        # As a follower's thread does: take each run of text while the writer adds to it.
        items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        sub = journal.follow(lambda r, _pos: items.put(r) if r else None, replay=True)
        while len("".join(got).splitlines()) < 5000:
            item = items.get(timeout=30)
            got.append((item.take() if isinstance(item, StreamRun) else item)["content"]["text"])
    finally:
        stop.set()
        thread.join()
    sub.cancel()
    lines = "".join(got).splitlines()
    assert lines == [str(i) for i in range(len(lines))]


def test_control_answers_without_a_kernel():
    table = JobTable()
    assert answer(table, {"action": "jobs"})["jobs"] == []
    assert answer(table, {"action": "tail", "job": 1})["evalue"] == "no job 1: no job has been started yet"
    assert "unknown action" in answer(table, {"action": "dance"})["evalue"]
    job = table.new_job("thread", name="x")
    job.journal.write("stdout", "hi\n")
    assert answer(table, {"action": "tail", "job": job.id, "since": "zero"})["evalue"] == (
        "tail: 'since' must be a journal position (a number ≥ 0), not 'zero'"
    )
    assert answer(table, {"action": "tail", "job": job.id, "since": -1})["status"] == "error"
    assert answer(table, {"action": "kill", "job": "1"})["status"] == "error"
    reply = answer(table, {"action": "tail", "job": job.id, "since": 0})
    assert (reply["records"], reply["position"], reply["ended"]) == (
        [{"msg_type": "stream", "content": {"name": "stdout", "text": "hi\n"}}],
        3,
        False,
    )
    assert answer(table, {"action": "tail", "job": job.id, "since": 0})["caught_up"] is True
    assert answer(table, {"action": "kill", "job": job.id})["outcome"] == "killed"
    assert answer(table, {"action": "tail", "job": job.id, "since": 3})["ended"] is True


def test_jobs_reply_says_which_request_each_jobs_cell_last_ran():
    table = JobTable()
    job = table.new_job("thread", name="x")
    job.info.update(cell_id="cell-a", request="msg-1")
    cells = {"cell-a": "msg-2", "cell-without-jobs": "msg-3"}
    reply = answer(table, {"action": "jobs"}, cells)
    assert reply["jobs"][0]["info"] == {"cell_id": "cell-a", "request": "msg-1"}
    assert reply["cells"] == {"cell-a": "msg-2"}
