"""The jobs a journal on disk holds, read without a kernel: ``polycell log``, ``polycell jobs``.

The database is the one `polycell.journal_store.JournalStore` writes; it is
opened read-only. A job a kernel left running is ``lost`` once that kernel's
process is gone.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polycell.journal import Record, last_line
from polycell.journal_files import pid_alive
from polycell.view import make_row

__all__ = ["StoredJob", "read_job", "read_jobs", "read_runs"]


@dataclass(frozen=True)
class StoredJob:
    """One job as the database holds it (`run`: which kernel process wrote it)."""

    run: int
    id: int
    name: str
    mode: str
    status: str
    started: float | None
    ended: float | None
    dropped: int
    last_output: str = ""

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended if self.ended is not None else time.time()) - self.started

    def row(self) -> dict[str, Any]:
        """The job as a table row, shaped like a live job's so both tables look the same."""
        return make_row(
            job_id=self.id,
            name=self.name,
            mode=self.mode,
            status=self.status,
            elapsed=self.elapsed,
            last_output=self.last_output,
            info={"run": self.run},
        )


def _connect_readonly(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise FileNotFoundError(f"no polycell journal at {path}")
    try:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:  # pragma: no cover - e.g. a read-only directory without the -shm file
        return sqlite3.connect(path)


def read_runs(path: str | os.PathLike[str]) -> dict[int, tuple[int, float]]:
    """Each kernel process that wrote to the database: run -> (pid, started)."""
    conn = _connect_readonly(Path(path))
    try:
        rows = conn.execute("SELECT run, pid, started FROM runs ORDER BY run").fetchall()
    finally:
        conn.close()
    return {run: (pid, started) for run, pid, started in rows}


def read_jobs(path: str | os.PathLike[str]) -> list[StoredJob]:
    """Every stored job, oldest run first. Jobs left running by a kernel that is gone are ``lost``."""
    conn = _connect_readonly(Path(path))
    try:
        alive = {run: pid_alive(pid) for run, pid in conn.execute("SELECT run, pid FROM runs").fetchall()}
        rows = conn.execute(
            "SELECT run, id, name, mode, status, started, ended, dropped FROM jobs ORDER BY run, id"
        ).fetchall()
        last_texts = [
            conn.execute(
                "SELECT content FROM records WHERE run = ? AND job = ? AND msg_type = 'stream' "
                "ORDER BY seq DESC LIMIT 1",
                row[:2],
            ).fetchone()
            for row in rows
        ]
    finally:
        conn.close()
    jobs = []
    for row, last_text in zip(rows, last_texts, strict=True):
        text = json.loads(last_text[0])["text"] if last_text else ""
        job = StoredJob(*row, last_output=last_line(text))
        if job.status in ("pending", "running") and alive.get(job.run) is False:
            job = StoredJob(**{**job.__dict__, "status": "lost"})
        jobs.append(job)
    return jobs


def read_job(
    path: str | os.PathLike[str], job_id: int, run: int | None = None
) -> tuple[StoredJob, list[Record]]:
    """Job `job_id` of `run` (default: the newest run that has one) and its records, in order.

    Raises LookupError when there is no such job.
    """
    candidates = [job for job in read_jobs(path) if job.id == job_id and (run is None or job.run == run)]
    if not candidates:
        where = f" in run {run}" if run is not None else ""
        raise LookupError(f"no job {job_id}{where} in {path}")
    job = candidates[-1]
    conn = _connect_readonly(Path(path))
    try:
        rows = conn.execute(
            "SELECT msg_type, content FROM records WHERE run = ? AND job = ? ORDER BY seq",
            (job.run, job.id),
        ).fetchall()
    finally:
        conn.close()
    records: list[Record] = [
        {"msg_type": msg_type, "content": json.loads(content)} for msg_type, content in rows
    ]
    if job.dropped:
        note = f"[polycell: {job.dropped:,} earlier records were dropped to keep the journal store small]\n"
        records.insert(0, {"msg_type": "stream", "content": {"name": "stderr", "text": note}})
    return job, records
