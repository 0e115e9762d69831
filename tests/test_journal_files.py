"""The journals on disk: private to their user, in one directory, and swept when due."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

from kernel_session import KernelSession
from polycell.job import Job
from polycell.journal_files import JournalFileError, journal_dir, store_path, sweep
from polycell.journal_store import JournalStore, open_store, read_job

HOUR = 3600.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait(10)
    return proc.pid


def _journal(directory: Path, name: str, *, pid: int, closed_at: float | None, written_at: float) -> Path:
    """A journal as a kernel leaves it: its run, maybe its clean close, its files' age."""
    path = directory / f"polycell-{name}.sqlite"
    store = JournalStore(path)
    job = Job(1, mode="thread")
    store.track(job)
    job.journal.write("stdout", "x" * 20_000)
    assert store.flush()
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE runs SET pid = ?", (pid,))
    conn.execute("DELETE FROM closes")
    if closed_at is not None:
        conn.execute("INSERT INTO closes SELECT run, ? FROM runs", (closed_at,))
    conn.commit()
    conn.close()
    for part in directory.glob(path.name + "*"):
        os.utime(part, (written_at, written_at))
    return path


def test_journals_live_in_one_directory_under_the_runtime_dir(tmp_path):
    assert store_path("/tmp/tmpab12cd.json", tmp_path) == tmp_path / "polycell" / "polycell-tmpab12cd.sqlite"
    expected = journal_dir(tmp_path) / "polycell-1a2b.sqlite"
    assert store_path(tmp_path / "kernel-1a2b.json", tmp_path) == expected


def test_the_directory_and_every_file_of_a_journal_are_private(tmp_path):
    path = store_path("kernel-k.json", tmp_path)
    store = JournalStore(path)
    try:
        job = Job(1, mode="thread")
        store.track(job)
        job.journal.write("stdout", "API_KEY=secret\n")
        assert store.flush()
        parts = sorted(path.parent.iterdir())
        assert [p.name for p in parts] == [path.name, path.name + "-shm", path.name + "-wal"]
        assert [(p.name, _mode(p)) for p in parts] == [(p.name, 0o600) for p in parts]
        assert _mode(path.parent) == 0o700
    finally:
        store.close()


def test_a_journal_an_older_polycell_left_readable_is_made_private(tmp_path):
    path = store_path("kernel-old.json", tmp_path)
    path.parent.mkdir(mode=0o755)
    path.parent.chmod(0o755)
    sqlite3.connect(path).close()
    path.chmod(0o644)
    JournalStore(path).close()
    assert (_mode(path.parent), _mode(path)) == (0o700, 0o600)


def test_a_journal_directory_that_cannot_be_made_is_one_line_and_no_store(tmp_path, capfd, monkeypatch):
    (tmp_path / "polycell").write_text("a file where the directory should be")
    with pytest.raises(JournalFileError, match="polycell"):
        JournalStore(store_path("kernel-x.json", tmp_path))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    assert open_store(str(tmp_path / "kernel-x.json")) is None
    err = capfd.readouterr().err
    assert err.startswith("polycell: the journal on disk is off (")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_sweep_removes_what_is_due_and_keeps_what_a_user_may_still_need(tmp_path):
    now = time.time()
    directory = journal_dir(tmp_path)
    dead = _dead_pid()
    shut_long_ago = _journal(directory, "a", pid=dead, closed_at=now - 25 * HOUR, written_at=now - 25 * HOUR)
    shut_recently = _journal(directory, "b", pid=dead, closed_at=now - 1 * HOUR, written_at=now - HOUR)
    crashed_recently = _journal(directory, "c", pid=dead, closed_at=None, written_at=now - 2 * 24 * HOUR)
    crashed_long_ago = _journal(directory, "d", pid=dead, closed_at=None, written_at=now - 8 * 24 * HOUR)
    live_and_old = _journal(directory, "e", pid=os.getpid(), closed_at=None, written_at=now - 30 * 24 * HOUR)
    removed = sweep(directory, now=now)
    assert sorted(removed) == [shut_long_ago, crashed_long_ago]
    assert sorted(directory.glob("*.sqlite")) == [shut_recently, crashed_recently, live_and_old]
    assert list(directory.glob(f"{shut_long_ago.name}*")) == []


def test_sweep_keeps_the_total_under_its_cap_oldest_first_never_a_live_journal(tmp_path):
    now = time.time()
    directory = journal_dir(tmp_path)
    dead = _dead_pid()
    live = _journal(directory, "live", pid=os.getpid(), closed_at=None, written_at=now - 9 * HOUR)
    paths = [
        _journal(directory, f"k{age}", pid=dead, closed_at=now - age * HOUR, written_at=now - age * HOUR)
        for age in (1, 2, 3, 4)
    ]
    size = sum(p.stat().st_size for p in directory.iterdir()) // 5
    removed = sweep(directory, total_bytes=3 * size, now=now)
    assert removed == [paths[3], paths[2]]  # the two oldest that are not live
    assert sorted(directory.glob("*.sqlite")) == sorted([live, paths[0], paths[1]])


def test_a_kernel_journal_started_by_kernel_manager_is_private_and_not_beside_its_connection_file():
    kernel = KernelSession()
    try:
        connection_file = Path(kernel.connection_file)
        msg_id = kernel.execute("%%bg\nprint('API_KEY=secret')")
        kernel.wait_job_end(kernel.job_id(msg_id))
        path = kernel.store_path
        assert path.parent == journal_dir()
        deadline = time.monotonic() + 30
        while True:  # the store's writer commits every 0.1 s
            try:
                _, records = read_job(path, 1)
            except (LookupError, FileNotFoundError):
                records = []
            if any("API_KEY" in r["content"].get("text", "") for r in records):
                break
            assert time.monotonic() < deadline, "the job's output never reached the journal"
            time.sleep(0.05)
        parts = sorted(path.parent.glob(path.name + "*"))
        assert {p.name[len(path.name) :] for p in parts} >= {"", "-wal"}
        assert [(p.name, _mode(p)) for p in parts] == [(p.name, 0o600) for p in parts]
        assert _mode(path.parent) == 0o700
        assert list(connection_file.parent.glob(f"polycell-{connection_file.stem}*")) == []
    finally:
        kernel.close()


def test_jobs_run_and_print_in_their_cell_when_the_journal_cannot_be_written(tmp_path, monkeypatch):
    (tmp_path / "polycell").write_text("not a directory")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    kernel = KernelSession()
    try:
        msg_id = kernel.execute("%%bg\nprint('still here')")
        kernel.wait_job_end(kernel.job_id(msg_id))
        assert kernel.text(msg_id, "stdout") == "still here\n"
    finally:
        kernel.close()
