"""Where the journals on disk live, who can read them, and how long they stay.

A job's output can hold anything a user printed: a token, a password, a patient
record. So every journal is private to its user: one directory,
``<jupyter runtime dir>/polycell``, mode 0700, and in it one SQLite database per
kernel, ``polycell-<kernel id>.sqlite``, created 0600 before SQLite opens it
(SQLite gives its ``-wal`` and ``-shm`` files the database's own mode). Not
beside the connection file: jupyter_client's `KernelManager` (nbclient,
papermill) puts that in ``/tmp``, where the name alone would tell others a
kernel runs.

Journals do not pile up. Each time a kernel opens its journal, the others in
the directory are swept (from the store's writer thread, off the kernel's start):

* a journal whose kernels all shut down cleanly goes `KEEP_AFTER_SHUTDOWN`
  after the last shutdown (``POLYCELL_STORE_KEEP_HOURS``, default 24 h);
* one left by a kernel that died (no clean shutdown, its process gone) is kept
  `KEEP_AFTER_CRASH` after its last write (7 days), for ``polycell log``;
* past `DEFAULT_TOTAL_BYTES` for the whole directory
  (``POLYCELL_STORE_TOTAL_MB``, default 1,000 MB), the oldest go first.

A journal a live kernel still writes is never removed.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_TOTAL_BYTES",
    "KEEP_AFTER_CRASH",
    "KEEP_AFTER_SHUTDOWN",
    "JournalFileError",
    "create_private",
    "journal_dir",
    "pid_alive",
    "store_path",
    "sweep",
]

KEEP_AFTER_SHUTDOWN = 24 * 3600.0
KEEP_AFTER_CRASH = 7 * 24 * 3600.0
DEFAULT_TOTAL_BYTES = 1000 * 1024 * 1024
#: What a journal's database is made of: the database, then SQLite's own files beside it.
SUFFIXES = ("", "-wal", "-shm", "-journal")


class JournalFileError(OSError):
    """The journal directory cannot be made private to this user, or written."""


def journal_dir(runtime_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<runtime dir>/polycell`` (not created here)."""
    if runtime_dir is None:
        from jupyter_core.paths import jupyter_runtime_dir

        runtime_dir = jupyter_runtime_dir()
    return Path(runtime_dir) / "polycell"


def store_path(
    connection_file: str | os.PathLike[str], runtime_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The journal of the kernel with this connection file (which need not exist any more).

    ``kernel-<id>.json`` -> ``<runtime dir>/polycell/polycell-<id>.sqlite``.
    """
    stem = Path(connection_file).stem
    kernel_id = stem[len("kernel-") :] if stem.startswith("kernel-") else stem
    return journal_dir(runtime_dir) / f"polycell-{kernel_id}.sqlite"


def _make_private_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as exc:
        raise JournalFileError(f"cannot make {directory}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise JournalFileError(f"{directory} is not a directory")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise JournalFileError(f"{directory} belongs to another user")
    if stat.S_IMODE(info.st_mode) != 0o700:
        directory.chmod(0o700)  # made by an older polycell, or by hand


def create_private(path: Path) -> None:
    """Make the journal's directory (0700) and the database file itself (0600), before SQLite does.

    A database left by an older polycell (0644) and its ``-wal``/``-shm`` files are made
    private too. Raises `JournalFileError` when that cannot be done.
    """
    _make_private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for suffix in SUFFIXES:
            part = path.with_name(path.name + suffix)
            if part.exists() and stat.S_IMODE(part.stat().st_mode) != 0o600:
                part.chmod(0o600)
    except OSError as exc:
        raise JournalFileError(f"cannot write {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class _Journal:
    path: Path
    size: int
    last_write: float
    #: When it may go: None while a live kernel may still write it.
    expires: float | None


def pid_alive(pid: int) -> bool | None:
    """Whether a process exists; None where that cannot be asked safely (Windows)."""
    if os.name != "posix":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _inspect(path: Path, keep_after_shutdown: float, keep_after_crash: float) -> _Journal:
    parts = [path.with_name(path.name + suffix) for suffix in SUFFIXES]
    stats = [part.stat() for part in parts if part.exists()]
    size = sum(s.st_size for s in stats)
    last_write = max((s.st_mtime for s in stats), default=0.0)
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            runs = conn.execute("SELECT run, pid FROM runs").fetchall()
            closed = dict(conn.execute("SELECT run, at FROM closes").fetchall())
        finally:
            conn.close()
    except sqlite3.Error:  # not a journal of this polycell (an older one, a damaged file)
        return _Journal(path, size, last_write, last_write + keep_after_crash)
    open_runs = [pid for run, pid in runs if run not in closed]
    if any(pid_alive(pid) is not False for pid in open_runs):  # alive, or cannot tell
        return _Journal(path, size, last_write, None)
    if open_runs or not closed:  # a kernel died without its shutdown
        return _Journal(path, size, last_write, last_write + keep_after_crash)
    return _Journal(path, size, last_write, max(closed.values()) + keep_after_shutdown)


def sweep(
    directory: Path,
    *,
    keep: Path | None = None,
    keep_after_shutdown: float = KEEP_AFTER_SHUTDOWN,
    keep_after_crash: float = KEEP_AFTER_CRASH,
    total_bytes: int = DEFAULT_TOTAL_BYTES,
    now: float | None = None,
) -> list[Path]:
    """Remove the journals in `directory` that are due (see the module's docstring); returns them.

    `keep` (the caller's own journal) is never removed, but counts toward the total.
    """
    now = time.time() if now is None else now
    journals = []
    for path in directory.glob("polycell-*.sqlite"):
        try:
            journals.append(_inspect(path, keep_after_shutdown, keep_after_crash))
        except OSError:
            continue  # removed meanwhile by another kernel's sweep
    removed = []
    total = sum(j.size for j in journals)
    for journal in sorted(journals, key=lambda j: j.last_write):
        if journal.path == keep or journal.expires is None:
            continue
        if journal.expires <= now or total > total_bytes:
            for suffix in SUFFIXES:
                journal.path.with_name(journal.path.name + suffix).unlink(missing_ok=True)
            removed.append(journal.path)
            total -= journal.size
    return removed
