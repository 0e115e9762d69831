"""Every job's journal, also on disk, so output outlives the kernel.

A `JournalStore` follows the journal of each job and writes its records to an
SQLite database (WAL mode), one database per kernel, private to its user:
``kernel-<id>.json`` -> ``<runtime dir>/polycell/polycell-<id>.sqlite`` (where,
who can read it and for how long: `polycell.journal_files`). After a crash or
a restart, ``polycell log`` reads what the jobs printed up to the end.

Writing is off the job's hot path: the journal follower only puts the record
on a queue; one writer thread drains it, merges consecutive text of the same
stream into one row, and commits a batch every `interval` seconds (or every
`batch_records` records). A job printing 100,000 lines costs it 100,000 queue
puts, and the disk a handful of rows.

The database stays under `max_bytes`: past it, the oldest ended jobs are
deleted first; if only running jobs are left, their oldest rows go and the job
counts them in ``dropped``. Each kernel process that opens the database is a
new *run* (job ids restart at 1 after a restart), so rows are keyed by
(run, job, seq).

`open_store` opens this kernel's store as the extension configures it
(``POLYCELL_STORE_*`` settings), and sweeps other kernels' old journals.

The reading side (`polycell.stored_jobs`: `read_jobs`, `read_job`) needs no
kernel at all; it is importable from here too, where it was first defined.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from polycell.interrupts import BackgroundThread
from polycell.job import Job, one_line
from polycell.journal import Record, StreamRun
from polycell.journal_files import DEFAULT_TOTAL_BYTES, KEEP_AFTER_SHUTDOWN, create_private, store_path, sweep
from polycell.stored_jobs import StoredJob, read_job, read_jobs, read_runs
from polycell.stream_text import StreamText

__all__ = [
    "DEFAULT_MAX_BYTES",
    "JournalStore",
    "StoredJob",
    "open_store",
    "read_job",
    "read_jobs",
    "read_runs",
    "store_path",
]

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
#: Identifies this process's run even if the extension is unloaded and loaded again.
_PROCESS_TOKEN = uuid.uuid4().hex
_STOP = object()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run INTEGER PRIMARY KEY AUTOINCREMENT,
    pid INTEGER NOT NULL,
    token TEXT NOT NULL,
    started REAL NOT NULL,
    connection_file TEXT
);
CREATE TABLE IF NOT EXISTS closes (
    run INTEGER PRIMARY KEY,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    run INTEGER NOT NULL,
    id INTEGER NOT NULL,
    name TEXT NOT NULL,
    mode TEXT NOT NULL,
    status TEXT NOT NULL,
    started REAL,
    ended REAL,
    dropped INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run, id)
);
CREATE TABLE IF NOT EXISTS records (
    run INTEGER NOT NULL,
    job INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    msg_type TEXT NOT NULL,
    content TEXT NOT NULL,
    PRIMARY KEY (run, job, seq)
) WITHOUT ROWID;
"""


def _job_row(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "name": job.name,
        "mode": job.mode,
        "status": str(job.status),
        "started": job.started_at if job.started_at is not None else job.created_at,
        "ended": job.ended_at,
    }


class JournalStore:
    """Writes the journals of the jobs it tracks to one SQLite database, from a thread of its own."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        interval: float = 0.1,
        batch_records: int = 20_000,
        connection_file: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.interval = interval
        self.batch_records = batch_records
        # A deque, not a queue.Queue: appending wakes nobody, so a job printing in a
        # tight loop never hands the GIL to the writer once per line.
        self._pending: deque[Any] = deque()
        self._wake = threading.Event()
        self._cancels: list[Any] = []
        self._failed = False
        # Open (and create) in the caller's thread so a bad path fails loudly and at once;
        # private to this user before SQLite writes a byte (JournalFileError otherwise).
        create_private(self.path)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.run = self._open_run(connection_file)
        self._seqs: dict[int, int] = {}
        self._thread = BackgroundThread(target=self._serve, name="polycell-journal-store", daemon=True)
        self._thread.start()

    @classmethod
    def for_connection_file(cls, connection_file: str, **kwargs: Any) -> JournalStore:
        return cls(store_path(connection_file), connection_file=connection_file, **kwargs)

    def _open_run(self, connection_file: str | None) -> int:
        conn = self._conn
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on a new database
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA journal_size_limit = 8388608")
        conn.executescript(_SCHEMA)
        row = conn.execute(
            "SELECT run FROM runs WHERE token = ? AND pid = ?", (_PROCESS_TOKEN, os.getpid())
        ).fetchone()
        if row is not None:  # the extension loaded again in the same kernel
            conn.execute("DELETE FROM closes WHERE run = ?", (row[0],))
            return int(row[0])
        cursor = conn.execute(
            "INSERT INTO runs (pid, token, started, connection_file) VALUES (?, ?, ?, ?)",
            (os.getpid(), _PROCESS_TOKEN, time.time(), connection_file),
        )
        return int(cursor.lastrowid or 0)

    # -- the job side: only queue puts ------------------------------------------------------

    def track(self, job: Job) -> None:
        """Store `job`: its metadata now and at every state change, its journal as it grows.

        A job already tracked by an earlier store of this process (the extension
        was reloaded) is written again from its in-memory journal.
        """
        put = self._put
        put(("reset", job.id, _job_row(job)))
        job.add_state_listener(lambda changed: put(("job", changed.id, _job_row(changed))))

        # The hot path of a printing job: one deque append and a length check.
        pending, wake, limit, job_id = self._pending, self._wake, self.batch_records, job.id

        def follow(record: Record | StreamRun | None, _position: int | None) -> None:
            if record is not None:
                pending.append(("record", job_id, record))
                if len(pending) >= limit:
                    wake.set()

        sub = job.journal.follow(follow, replay=True)
        self._cancels.append(sub.cancel)
        if job.done:
            put(("job", job.id, _job_row(job)))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is committed."""
        done = threading.Event()
        self._pending.append(done)
        self._wake.set()
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        for cancel in self._cancels:
            cancel()
        self._pending.append(_STOP)
        self._wake.set()
        self._thread.join(timeout)

    # -- the writer thread -----------------------------------------------------------------

    def _put(self, item: Any) -> None:
        self._pending.append(item)
        if len(self._pending) >= self.batch_records:
            self._wake.set()

    def _serve(self) -> None:
        """Every `interval` (or sooner when asked), write what is pending as one transaction."""
        pending = self._pending
        try:
            while True:
                self._wake.wait(self.interval)
                self._wake.clear()
                # What is there now; a job still printing gets the rest into the next batch.
                batch = [pending.popleft() for _ in range(len(pending))]
                if batch and self._write_batch(batch):
                    return
        finally:
            self._conn.close()

    def _write_batch(self, batch: list[Any]) -> bool:
        """Write one batch in one transaction; True when asked to stop.

        Consecutive text of one job's stream becomes one row (`polycell.stream_text`);
        this loop is the writer's whole cost, so it is kept tight.
        """
        rows: list[tuple[int, int, int, str, str]] = []
        jobs: dict[int, dict[str, Any]] = {}
        resets: list[int] = []
        events: list[threading.Event] = []
        stop = False
        seqs, run, dumps = self._seqs, self.run, json.dumps

        def add(job_id: int, msg_type: str, content: dict[str, Any]) -> None:
            seq = seqs.get(job_id, 0)
            seqs[job_id] = seq + 1
            rows.append((run, job_id, seq, msg_type, dumps(content, default=str)))

        # Consecutive text of one job's stream becomes one row.
        text = StreamText(lambda key, _tag, joined: add(key[0], "stream", {"name": key[1], "text": joined}))
        for item in batch:
            if item is _STOP:
                stop = True  # a clean shutdown: the journal may go after journal_files' delay
                continue
            if isinstance(item, threading.Event):
                events.append(item)
                continue
            kind, job_id, payload = item
            if isinstance(payload, StreamRun):
                payload = payload.take()
            if kind == "record" and payload["msg_type"] == "stream":
                content = payload["content"]
                text.add((job_id, content["name"]), content["text"])
                continue
            text.flush()
            if kind == "record":
                add(job_id, payload["msg_type"], payload["content"])
            elif kind == "job":
                jobs[job_id] = payload
            else:  # reset: the job is written again from its start
                rows = [row for row in rows if row[1] != job_id]
                resets.append(job_id)
                seqs[job_id] = 0
                jobs[job_id] = payload
        text.flush()
        if not self._failed:
            try:
                self._commit(resets, jobs, rows)
                if stop:
                    self._conn.execute("INSERT OR REPLACE INTO closes VALUES (?, ?)", (self.run, time.time()))
            except sqlite3.Error as exc:
                self._failed = True
                print(f"polycell: journal store {self.path} stopped: {exc}", file=sys.__stderr__)
        for event in events:
            event.set()
        return stop

    def _commit(
        self, resets: list[int], jobs: dict[int, dict[str, Any]], rows: list[tuple[int, int, int, str, str]]
    ) -> None:
        conn = self._conn
        conn.execute("BEGIN")
        try:
            for job_id in resets:
                conn.execute("DELETE FROM records WHERE run = ? AND job = ?", (self.run, job_id))
            conn.executemany(
                "INSERT INTO jobs (run, id, name, mode, status, started, ended) "
                "VALUES (:run, :id, :name, :mode, :status, :started, :ended) "
                "ON CONFLICT (run, id) DO UPDATE SET name = excluded.name, mode = excluded.mode, "
                "status = excluded.status, started = excluded.started, ended = excluded.ended",
                [{"run": self.run, **row} for row in jobs.values()],
            )
            conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?)", rows)
            trimmed = self._enforce_cap()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if trimmed:
            conn.execute("PRAGMA incremental_vacuum")

    def used_bytes(self) -> int:
        """Bytes of the database holding data (free pages excluded)."""
        conn = self._conn
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def _enforce_cap(self) -> bool:
        """Delete the oldest output until the database is under `max_bytes`; True if anything went."""
        conn = self._conn
        trimmed = False
        while self.used_bytes() > self.max_bytes:
            trimmed = True
            oldest = conn.execute(
                "SELECT run, id FROM jobs WHERE ended IS NOT NULL OR run != ? "
                "ORDER BY run, started, id LIMIT 1",
                (self.run,),
            ).fetchone()
            if oldest is not None:
                conn.execute("DELETE FROM records WHERE run = ? AND job = ?", oldest)
                conn.execute("DELETE FROM jobs WHERE run = ? AND id = ?", oldest)
                continue
            # Only running jobs are left: drop the oldest half of the biggest one's rows.
            biggest = conn.execute(
                "SELECT job, COUNT(*) AS n, MIN(seq) FROM records WHERE run = ? "
                "GROUP BY job ORDER BY SUM(LENGTH(content)) DESC LIMIT 1",
                (self.run,),
            ).fetchone()
            if biggest is None or biggest[1] <= 1:
                return trimmed  # one row bigger than the cap: keep it rather than nothing
            job_id, count, first = biggest
            cut = first + max(1, count // 2)
            conn.execute("DELETE FROM records WHERE run = ? AND job = ? AND seq < ?", (self.run, job_id, cut))
            conn.execute(
                "UPDATE jobs SET dropped = dropped + ? WHERE run = ? AND id = ?",
                (max(1, count // 2), self.run, job_id),
            )
        return trimmed


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def open_store(connection_file: str | None = None) -> JournalStore | None:
    """This kernel's journal on disk (see `polycell.journal_files`), or None.

    ``POLYCELL_STORE_MAX_MB`` caps its size (default 100; ``0`` turns it off),
    ``POLYCELL_STORE_TOTAL_MB`` all journals' together (default 1,000), and
    ``POLYCELL_STORE_KEEP_HOURS`` how long one stays after its kernel's clean
    shutdown (default 24). A journal that cannot be written privately is
    reported in one line on the kernel's stderr, and the kernel runs without it.
    """
    max_mb = _env_number("POLYCELL_STORE_MAX_MB", DEFAULT_MAX_BYTES / 2**20)
    if max_mb <= 0:
        return None
    if connection_file is None:
        try:
            from ipykernel.connect import get_connection_file

            connection_file = get_connection_file()
        except Exception:  # noqa: BLE001 - no kernel app (embedded kernel...): no store
            return None
    try:
        store = JournalStore.for_connection_file(connection_file, max_bytes=int(max_mb * 2**20))
    except Exception as exc:  # noqa: BLE001 - output on disk is a bonus, never a reason to fail
        print(f"polycell: the journal on disk is off ({one_line(exc)})", file=sys.__stderr__)
        return None
    total_mb = _env_number("POLYCELL_STORE_TOTAL_MB", DEFAULT_TOTAL_BYTES / 2**20)
    keep_hours = _env_number("POLYCELL_STORE_KEEP_HOURS", KEEP_AFTER_SHUTDOWN / 3600)

    def sweep_others() -> None:
        try:
            sweep(
                store.path.parent,
                keep=store.path,
                keep_after_shutdown=keep_hours * 3600,
                total_bytes=int(total_mb * 2**20),
            )
        except Exception as exc:  # noqa: BLE001 - an old journal left over is no reason to fail
            print(f"polycell: could not sweep old journals ({one_line(exc)})", file=sys.__stderr__)

    # Off the kernel's start: it opens (and may delete) other kernels' files.
    BackgroundThread(target=sweep_others, name="polycell-journal-sweep", daemon=True).start()
    return store
