"""Programs a job starts: what they write to file descriptors 1 and 2 goes to the job's cell.

A program (``subprocess.run(["ls"])``, ``os.system("make")``) writes to the file
descriptors it inherits, not to ``sys.stdout``. In a kernel those are shared by
every thread: ipykernel sends what arrives there to whichever cell is running,
so a thread or task job's program output would land in the foreground cell.

While polycell is loaded, ``subprocess.Popen`` is `JobPopen` and ``os.system``
is a `BuiltinStandIn`. Outside a job both are exactly the originals. In a job,
a program's stdout and stderr that would be inherited become pipes; a reader
thread, in the job's context, writes what arrives to ``sys.stdout`` and
``sys.stderr``, which route it to the job. ``wait()`` returns only once the
readers have drained the pipes, so a job's ``print`` after ``subprocess.run``
comes after the program's lines. Pipes, files and ``DEVNULL`` the caller chose
are left alone.

A forked process job needs none of this (its file descriptors are the job's
own), nor does C code in a thread job, which this cannot reach.
"""

from __future__ import annotations

import codecs
import contextvars
import os
import subprocess
import sys
import threading
from typing import Any

from polycell.builtin_standin import BuiltinStandIn
from polycell.routing import RoutedStream

__all__ = ["JobPopen", "install_program_capture", "remove_program_capture"]

_Popen = subprocess.Popen
_system = os.system

#: How long ``wait()`` waits for a finished program's last output. A program that
#: left a child of its own holding the pipe (``cmd &``) keeps it open past its exit;
#: that output still reaches the job's cell, just not before ``wait()`` returns.
DRAIN_TIMEOUT = 2.0


def _job_stream(name: str) -> RoutedStream | None:
    """``sys.stdout``/``sys.stderr`` when the calling context belongs to a job, else None."""
    stream = getattr(sys, name)
    if isinstance(stream, RoutedStream) and stream.routes_to_job():
        return stream
    return None


def _forward(fd: int, stream: RoutedStream) -> None:
    """Copy a pipe to `stream` until every writer has closed it."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        while chunk := os.read(fd, 65536):
            if text := decoder.decode(chunk):
                stream.write(text)
        if tail := decoder.decode(b"", final=True):
            stream.write(tail)
    finally:
        os.close(fd)


class JobPopen(_Popen):  # type: ignore[misc, type-arg]
    """``subprocess.Popen`` that, in a job, pipes the output the program would inherit to the job."""

    def __init__(self, args: Any, *posargs: Any, **kwargs: Any) -> None:
        self._polycell_readers: list[threading.Thread] = []
        if posargs:  # stdout and stderr given by position (rare): the caller chose them
            super().__init__(args, *posargs, **kwargs)
            return
        redirects: dict[str, tuple[int, int, RoutedStream]] = {}
        for name in ("stdout", "stderr"):
            stream = _job_stream(name) if kwargs.get(name) is None else None
            if stream is not None:
                read_fd, write_fd = os.pipe()
                redirects[name] = (read_fd, write_fd, stream)
                kwargs[name] = write_fd
        try:
            super().__init__(args, **kwargs)
        except BaseException:
            for read_fd, write_fd, _stream in redirects.values():
                os.close(read_fd)
                os.close(write_fd)
            raise
        for name, (read_fd, write_fd, stream) in redirects.items():
            os.close(write_fd)  # the program holds the only write end now
            reader = threading.Thread(
                target=contextvars.copy_context().run,  # one each: a context runs in one thread at a time
                args=(_forward, read_fd, stream),
                name=f"polycell-program-{name}-{self.pid}",
                daemon=True,
            )
            reader.start()
            self._polycell_readers.append(reader)

    def wait(self, timeout: float | None = None) -> int:
        returncode: int = super().wait(timeout)
        for reader in self._polycell_readers:
            reader.join(DRAIN_TIMEOUT)
        return returncode


def _system_in_job(command: str) -> int:
    """``os.system`` for a job: the shell's output to the job, the same return value."""
    with JobPopen(command, shell=True) as proc:
        returncode = proc.wait()
    # os.system returns the raw wait status: the exit code shifted, or the signal number.
    return returncode << 8 if returncode >= 0 else -returncode


def _system_for_calling_context() -> Any:
    return _system_in_job if _job_stream("stdout") is not None else None


_system_standin = BuiltinStandIn(_system, _system_for_calling_context, "os")
_users = 0
_users_lock = threading.Lock()


def install_program_capture() -> None:
    """Make ``subprocess.Popen`` and ``os.system`` job-aware (counted, like the routing)."""
    global _users
    with _users_lock:
        _users += 1
        subprocess.Popen = JobPopen  # type: ignore[misc]
        os.system = _system_standin  # type: ignore[assignment]


def remove_program_capture() -> None:
    global _users
    with _users_lock:
        _users -= 1
        if _users == 0:
            if subprocess.Popen is JobPopen:
                subprocess.Popen = _Popen  # type: ignore[misc]
            if os.system is _system_standin:
                os.system = _system  # type: ignore[assignment]
