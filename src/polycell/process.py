"""Process mode: a job runs in a forked child of the kernel.

Why fork: the child starts with the whole namespace exactly as it was, shared
copy-on-write, so a job can use a 2 GB array without a byte being pickled or
copied on the way in. Only what comes back (the last expression's value and
the names the cell assigns) is pickled, with cloudpickle.

The child is the job:

* its own process group (``setpgid``), so a kernel interrupt, which
  jupyter_client sends to the kernel's process group, never reaches it, and a
  kill is ``killpg(SIGKILL)``: at once, in any state, with every process the
  job started;
* on Linux ``PR_SET_PDEATHSIG`` kills it when the kernel dies; a normal
  shutdown (and ``atexit``) kills every job's group;
* file descriptors 1 and 2 are pipes read by the parent, so output of C code
  and subprocesses arrives too; Python-level output (``sys.stdout``,
  ``sys.stderr``) and every structured record (display data, results,
  tracebacks) go, in order, as length-prefixed pickle frames over a third
  pipe. In the child the job's `OutputJournal` is replaced by that pipe
  (`_RecordPipe`, which has the journal's ``write``/``append``), so the output
  routing layer works unchanged.

Fork safety: the kernel has threads (iopub, heartbeat, control...) whose locks
may be held at the instant of the fork. The child touches none of that
machinery: it gets fresh streams and a fresh pipe, never logs, and always
leaves through ``os._exit``; ``input()``/``getpass()`` fail at once in one
line (they would ask over the kernel's stdin socket) and starting a job there
is a one-line `JobError` (its copy of the job table has no output threads).
Every fork of the process, process jobs and ``jobs.map`` workers alike, is
made by one long-lived thread (`Forker`), with the same child setup, because
Linux sends the parent-death signal when the *thread* that forked the child
ends, not the process. `ForkedChild` is the parent's side: it reads the pipes
(a frame the kernel cannot unpickle becomes a one-line note, never a lost job)
and signals the child's group only until the one thread that reaps it has.
"""

from __future__ import annotations

import atexit
import builtins
import codecs
import concurrent.futures
import contextvars
import ctypes
import faulthandler
import gc
import getpass
import importlib
import io
import os
import pickle
import queue
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

import cloudpickle

from polycell import job_table
from polycell.interrupts import BackgroundThread, reset_interrupts_in_child
from polycell.job import Job, JobError, Runner, one_line
from polycell.journal import Record, stream_record

__all__ = [
    "ForkedChild",
    "Forker",
    "ProcessDied",
    "ProcessRunner",
    "acquire_forker",
    "describe_status",
    "fork_available",
    "receive_frame",
    "release_forker",
]

_FRAME_HEADER = struct.Struct("!Q")
_READ_SIZE = 1 << 20
#: Python-level stream text is sent at once when a line ends and nothing was sent
#: for this long; otherwise it is batched and sent by the child's flusher thread.
_QUIET_SECONDS = 0.005
_FLUSH_SECONDS = 0.01
_CHUNK_CHARS = 64_000
_PR_SET_PDEATHSIG = 1
DEFAULT_NICENESS = 10
#: Cap on one pickled value sent back (the result, or one name); larger ones are skipped.
DEFAULT_MAX_VALUE_BYTES = 1 << 30


# Python >= 3.12 warns when a multi-threaded process forks; this module exists to
# do exactly that, carefully (see above). Only warnings raised from here are hidden.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"polycell\.process")


def fork_available() -> bool:
    return hasattr(os, "fork") and hasattr(os, "killpg") and hasattr(os, "setpgid")


class ProcessDied(JobError):
    """The child ended without sending an outcome: killed by a signal, or an exit code."""

    def __init__(
        self, message: str, *, signal_number: int | None = None, exitcode: int | None = None
    ) -> None:
        super().__init__(message)
        self.signal_number = signal_number
        self.exitcode = exitcode


def _note(job: Job, text: str) -> None:
    """One line about the job, in its cell's stderr."""
    job.journal.write("stderr", f"[job {job.id}: {text}]\n")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _size_text(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} bytes"  # pragma: no cover


# -- the child's side -------------------------------------------------------------------------


class _RecordPipe:
    """The child's journal: records go to the parent as frames, in the order they were made.

    Stream text is batched (a tight ``print`` loop becomes a few frames, not one
    per line) but a line that ends after a quiet spell is sent at once, so
    Python output keeps its place among output the job's subprocesses write
    straight to file descriptors 1 and 2.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._name: str | None = None
        self._texts: list[str] = []
        self._size = 0
        self._last_send = 0.0
        self._stopped = threading.Event()
        BackgroundThread(target=self._flush_loop, name="polycell-child-flush", daemon=True).start()

    # The journal API the routing layer uses.
    def write(self, name: str, text: str) -> None:
        if not text:
            return
        with self._lock:
            if self._name is not None and self._name != name:
                self._flush_locked()
            self._name = name
            self._texts.append(text)
            self._size += len(text)
            if self._size >= _CHUNK_CHARS or (
                text.endswith("\n") and time.monotonic() - self._last_send >= _QUIET_SECONDS
            ):
                self._flush_locked()

    def append(self, record: Record) -> None:
        with self._lock:
            self._flush_locked()
            self._send(("record", record))

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def send(self, message: tuple[Any, ...]) -> None:
        """Any frame, after the text written before it."""
        with self._lock:
            self._flush_locked()
            self._send(message)

    def send_end(self, outcome: dict[str, Any]) -> None:
        with self._lock:
            self._flush_locked()
            self._stopped.set()
            self._send(("end", outcome))

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            self._stopped.set()

    def _flush_loop(self) -> None:
        while not self._stopped.wait(_FLUSH_SECONDS):
            self.flush()

    def _flush_locked(self) -> None:
        if self._texts and self._name is not None:
            record = stream_record(self._name, "".join(self._texts))
            self._texts, self._size = [], 0
            self._send(("record", record))

    def _send(self, message: tuple[str, Any]) -> None:
        try:
            data = pickle.dumps(message, protocol=5)
        except Exception as exc:  # noqa: BLE001 - a record that cannot travel becomes a line that can
            note = f"[polycell: an output record could not be sent: {one_line(exc)}]\n"
            data = pickle.dumps(("record", stream_record("stderr", note)), protocol=5)
        _write_all(self._fd, _FRAME_HEADER.pack(len(data)) + data)
        self._last_send = time.monotonic()


class _ChildStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` in the child: every write is the job's output."""

    encoding = "utf-8"
    errors = "strict"

    def __init__(self, name: str, pipe: _RecordPipe, fd: int) -> None:
        super().__init__()
        self.name = name
        self._pipe = pipe
        self._fd = fd

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._pipe.write(self.name, text)
        return len(text)

    def flush(self) -> None:
        self._pipe.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        # The real descriptor: what C code and subprocesses write there reaches the job's cell too.
        return self._fd


def _refuse_input(what: str) -> None:
    """Make ``input()`` and ``getpass.getpass()`` fail at once, in one line, in a forked child.

    The kernel's versions (ipykernel's ``raw_input``/``getpass``, or the polycell
    kernel's) ask the front end over the kernel's stdin socket and wait for the
    kernel's own threads, none of which exist after a fork: the call would stall
    and then talk on a ZMQ socket that is not fork-safe.
    """

    def no_input(prompt: object = "") -> NoReturn:
        raise EOFError(f"input() is not available in {what}: it has no front end to ask")

    def no_getpass(prompt: object = "Password: ", stream: object = None) -> NoReturn:
        raise EOFError(f"getpass() is not available in {what}: it has no front end to ask")

    builtins.input = no_input
    getpass.getpass = no_getpass  # type: ignore[assignment]


#: In a forked child: what it is ("a process job", "a map worker"); None in the kernel.
_in_child: str | None = None


def refusal(what: str) -> str:
    return f"{what} cannot start jobs of its own; start them from the notebook"


def check_not_in_child() -> None:
    """JobError in a forked child: its copies of the kernel's threads (output, journal store) are gone."""
    if _in_child is not None:
        raise JobError(refusal(_in_child))


# -- forking, shared by process jobs and map workers ----------------------------------------


def describe_status(status: int | None) -> str:
    """How a child ended, from its wait status: ``signal 9 (SIGKILL)``, ``exit code 3``."""
    if status is None:
        return "unknown exit status (it was taken elsewhere)"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        text = f"signal {number} ({name})"
        if number == signal.SIGKILL:
            text += ", killed from outside polycell (the out-of-memory killer?)"
        return text
    return f"exit code {os.WEXITSTATUS(status) if os.WIFEXITED(status) else status}"


class _BadFrame:
    """A frame the parent could not unpickle; reported in one line, the rest still arrives."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _FrameDecoder:
    """Length-prefixed pickle frames out of a byte stream, each decoded on its own."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        frames: list[Any] = []
        offset = 0
        while len(self._buffer) - offset >= _FRAME_HEADER.size:
            (size,) = _FRAME_HEADER.unpack_from(self._buffer, offset)
            end = offset + _FRAME_HEADER.size + size
            if len(self._buffer) < end:
                break
            try:
                frames.append(pickle.loads(memoryview(self._buffer)[offset + _FRAME_HEADER.size : end]))
            except Exception as exc:  # noqa: BLE001 - e.g. a class the kernel does not have yet
                frames.append(_BadFrame(exc))
            offset = end
        if offset:
            del self._buffer[:offset]  # once per read, not once per frame
        return frames


def _send_frame(fd: int, message: Any) -> None:
    data = pickle.dumps(message, protocol=5)
    _write_all(fd, _FRAME_HEADER.pack(len(data)) + data)


def _read_exactly(fd: int, size: int) -> bytes | None:
    parts, left = [], size
    while left:
        data = os.read(fd, left)
        if not data:
            return None
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def receive_frame(fd: int) -> Any:
    """Block for the next frame on `fd`; None at end of file."""
    header = _read_exactly(fd, _FRAME_HEADER.size)
    if header is None:
        return None
    (size,) = _FRAME_HEADER.unpack(header)
    data = _read_exactly(fd, size)
    return None if data is None else pickle.loads(data)


class ForkedChild:
    """The parent's side of one forked child: its pipes, and signalling that cannot go astray.

    Only the thread that reads the child reaps it (`reap`). Until then the
    child's pid, and so its process group id, cannot be reused, so `signal_group`
    from any thread reaches the child's group or nobody.
    """

    def __init__(self, job: Job, pid: int, fds: dict[str, int]) -> None:
        self.job = job
        self.pid = pid
        #: Read ends of "stdout", "stderr", "records"; the write end of "tasks", if any.
        self.fds = fds
        self._owner_pid = os.getpid()
        self.lock = threading.Lock()
        self.reaped = False
        self.status: int | None = None
        self._decoders = {
            name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in ("stdout", "stderr")
        }
        self._frames = _FrameDecoder()

    def signal_group(self, sig: int) -> None:
        with self.lock:
            if self.reaped or os.getpid() != self._owner_pid:
                return
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def reap(self) -> int | None:
        """Wait for the child to end; its wait status (None if someone else's ``waitpid`` took it)."""
        with self.lock:
            if not self.reaped:
                try:
                    _pid, self.status = os.waitpid(self.pid, 0)
                except ChildProcessError:
                    self.status = None
                self.reaped = True
        return self.status

    def exited(self) -> bool:
        """Whether the child has ended (without reaping it: its group id stays ours)."""
        if self.reaped:
            return True
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def open_pidfd(self) -> int | None:
        """A descriptor that becomes readable when the child ends; None before Linux 5.3."""
        if not hasattr(os, "pidfd_open"):
            return None
        try:
            return os.pidfd_open(self.pid)
        except OSError:
            return None

    def send(self, message: Any) -> bool:
        """A frame on the "tasks" pipe; False if the child is gone."""
        try:
            _send_frame(self.fds["tasks"], message)
        except OSError:  # BrokenPipeError: it died; its end shows up as its exit
            return False
        return True

    def read(self, name: str) -> tuple[list[Any], bool]:
        """Take what the `name` pipe holds now into the job's journal.

        Stream text and "record" frames go to the journal; other frames are
        returned. The flag is False once the pipe is at end of file.
        """
        fd, messages = self.fds[name], []
        while True:
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return messages, True
            if name != "records":
                self.job.journal.write(name, self._decoders[name].decode(data, final=not data))
            else:
                for frame in self._frames.feed(data):
                    if isinstance(frame, _BadFrame):
                        _note(self.job, f"an output record could not be read here ({one_line(frame.error)})")
                    elif frame[0] == "record":
                        self.job.journal.append(frame[1])
                    else:
                        messages.append(frame)
            if not data:
                return messages, False

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


ChildMain = Callable[[_RecordPipe, int | None], None]


class Forker:
    """The one long-lived thread that makes every fork of this process, and the child's setup.

    Linux delivers ``PR_SET_PDEATHSIG`` when the *thread* that forked the child
    exits. Forking from whichever thread asks (a thread job, a map's coordinator)
    would kill the child when that thread ends; this thread lives as long as
    anybody uses it (`acquire_forker`/`release_forker`).

    Every child, process job or map worker, is set up the same way: its own
    process group, the parent-death signal, fds 1 and 2 and a record pipe to
    the parent, no stdin, ``input``/``getpass`` failing in one line, and no new
    jobs (its copies of the kernel's job table and output threads cannot work).
    """

    def __init__(self) -> None:
        # Resolved here, never in a child: looking a symbol up takes the dynamic
        # loader's lock, which another kernel thread may hold at the fork.
        libc = ctypes.CDLL(None, use_errno=True)
        self._prctl = getattr(libc, "prctl", None) if sys.platform.startswith("linux") else None
        self._fflush = getattr(libc, "fflush", None)
        self.users = 0
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = BackgroundThread(target=self._serve, name="polycell-forker", daemon=True)
        self._thread.start()

    def fork(
        self, job: Job, main: ChildMain, *, what: str, niceness: int = 0, tasks: bool = False
    ) -> ForkedChild:
        """Fork a child running ``main(pipe, tasks_fd)``; `tasks` adds a pipe from parent to child."""
        check_not_in_child()
        future: concurrent.futures.Future[ForkedChild] = concurrent.futures.Future()
        self._requests.put((lambda: self._fork(job, main, what, niceness, tasks), future))
        return future.result()

    def _serve(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            fn, future = item
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

    def stop(self, timeout: float) -> None:
        self._requests.put(None)
        self._thread.join(timeout)

    def _fork(self, job: Job, main: ChildMain, what: str, niceness: int, tasks: bool) -> ForkedChild:
        pipes = {"stdout": os.pipe(), "stderr": os.pipe(), "records": os.pipe()}
        if tasks:
            pipes["tasks"] = os.pipe()
        parent_pid = os.getpid()
        # Objects that exist at the fork go to the permanent generation in the
        # child, so its collector never walks (and so copies) the kernel's whole
        # heap; the kernel's own collection is unchanged.
        gc.freeze()
        try:
            pid = os.fork()
            if pid == 0:
                self._child_main(main, pipes, parent_pid, what, niceness)
        except OSError:
            for ends in pipes.values():
                for fd in ends:
                    os.close(fd)
            raise
        finally:
            gc.unfreeze()
        fds = {}
        for name, (read_end, write_end) in pipes.items():
            if name == "tasks":
                os.close(read_end)
                fds[name] = write_end
            else:
                os.close(write_end)
                fds[name] = read_end
        try:
            # Also done by the child; doing it here too means the group exists
            # before anyone can try to kill it.
            os.setpgid(pid, pid)
        except OSError:
            pass
        return ForkedChild(job, pid, fds)

    def _child_main(
        self, main: ChildMain, pipes: dict[str, tuple[int, int]], parent_pid: int, what: str, niceness: int
    ) -> NoReturn:
        global _in_child
        code = 70
        try:
            _in_child = what
            os.setpgid(0, 0)
            reset_interrupts_in_child()
            if self._prctl is not None:
                self._prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent_pid:  # the kernel died before the line above
                os._exit(code)
            close_listening_sockets()
            if niceness:
                os.nice(niceness)
            os.dup2(pipes["stdout"][1], 1)
            os.dup2(pipes["stderr"][1], 2)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            for name, (read_end, write_end) in pipes.items():
                if name == "tasks":
                    os.close(write_end)
                    continue
                os.close(read_end)
                if name != "records":
                    os.close(write_end)
            # A crash in C code then shows the job's Python stack in its cell.
            faulthandler.enable(file=2, all_threads=False)
            pipe = _RecordPipe(pipes["records"][1])
            sys.stdout = _ChildStream("stdout", pipe, 1)
            sys.stderr = _ChildStream("stderr", pipe, 2)
            sys.stdin = open(os.devnull)  # lives as long as the child
            _refuse_input(what)
            job_table.jobs.refusal = refusal(what)
            main(pipe, pipes["tasks"][0] if "tasks" in pipes else None)
            code = 0
        except BaseException:  # noqa: BLE001 - the child must always reach os._exit
            try:
                os.write(2, traceback.format_exc().encode(errors="replace"))
            except BaseException:  # noqa: BLE001
                pass
        finally:
            if self._fflush is not None:
                self._fflush(None)  # C stdio buffers: os._exit would drop them
            os._exit(code)


def close_listening_sockets() -> None:
    """Close, in a forked child, every listening socket it inherited from the kernel.

    The kernel's ZeroMQ ports (and a LocalCluster's scheduler, when it runs in the
    kernel) are listening sockets. A process a job leaves behind, still holding
    them after the kernel died, would make jupyter_client's restart, which binds the
    same ports again, fail with "Address already in use". The child never serves
    on them: nothing of ZeroMQ runs after a fork (its I/O threads are not copied).
    """
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            fds = [int(name) for name in os.listdir(directory)]
            break
        except (OSError, ValueError):
            continue
    else:
        return
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
            try:
                listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            finally:
                sock.detach()
            if listening:
                os.close(fd)
        except OSError:
            continue  # gone already (the listing's own descriptor), or not a socket we can ask


_forker_lock = threading.Lock()
_forker: Forker | None = None


def acquire_forker() -> Forker:
    """The process's `Forker`, started on first use; pair with `release_forker`."""
    global _forker
    check_not_in_child()
    with _forker_lock:
        if _forker is None:
            _forker = Forker()
        _forker.users += 1
        return _forker


def release_forker(timeout: float = 2.0) -> None:
    """One user fewer; the last one stops the thread (its children are gone by then)."""
    global _forker
    with _forker_lock:
        forker = _forker
        if forker is None:
            return
        forker.users -= 1
        if forker.users:
            return
        _forker = None
    forker.stop(timeout)


# -- the parent's side ------------------------------------------------------------------------


@dataclass
class _Launch:
    """Everything the child needs to run a job, handed across the fork."""

    job: Job
    body: Callable[[], Any]
    context: contextvars.Context
    namespace: dict[str, Any] | None
    names: list[str]


class ProcessRunner(Runner):
    """Runs each job in a forked child; see the module docstring for why and how."""

    mode = "process"

    def __init__(
        self, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES, niceness: int = DEFAULT_NICENESS
    ) -> None:
        if not fork_available():
            raise JobError(
                f"--mode process needs os.fork, which {sys.platform} does not have; use --mode thread or dask"
            )
        self.max_value_bytes = max_value_bytes
        #: Added to each child's nice value: background work yields the CPU to the
        #: kernel and the notebook, and still takes every core nobody else wants.
        self.niceness = niceness
        self._owner_pid = os.getpid()
        self._children: dict[int, ForkedChild] = {}
        self._readers: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._forker = acquire_forker()
        atexit.register(self._kill_all)

    # -- starting ------------------------------------------------------------------------

    def submit(
        self,
        job: Job,
        body: Callable[[], Any],
        *,
        namespace: dict[str, Any] | None = None,
        names: Iterable[str] = (),
    ) -> Job:
        """Run `body()` in a forked child; its return value becomes the job's result.

        When the job succeeds, each of `names` that `namespace` holds in the child
        is sent back and set in the parent's `namespace`.
        """
        if self._closed:
            raise RuntimeError("this ProcessRunner has been shut down")
        if _in_child is not None or os.getpid() != self._owner_pid:
            raise JobError(refusal(_in_child or "a process job"))
        context = self._prepare(job)
        if not job._set_running():
            return job
        launch = _Launch(job, body, context, namespace, list(names))
        try:
            child = self._forker.fork(
                job,
                lambda pipe, _tasks: self._child_body(launch, pipe),
                what="a process job",
                niceness=self.niceness,
            )
        except OSError as exc:
            message = f"could not start a child process: {one_line(exc)}"
            job.journal.write("stderr", f"[job {job.id} failed: {message}]\n")
            job._set_exception(JobError(message))
            return job
        job.info["pid"] = child.pid
        reader = BackgroundThread(
            target=self._watch, args=(child, launch), name=f"polycell-process-{job.id}", daemon=True
        )
        with self._lock:
            self._children[job.id] = child
            self._readers[job.id] = reader
        if job.kill_requested:  # killed while it was being forked
            child.signal_group(signal.SIGKILL)
        reader.start()
        return job

    # -- in the child ----------------------------------------------------------------------

    def _child_body(self, launch: _Launch, pipe: _RecordPipe) -> None:
        launch.job.journal = pipe  # type: ignore[assignment]
        pipe.send_end(launch.context.run(self._outcome, launch, pipe))

    def _outcome(self, launch: _Launch, pipe: _RecordPipe) -> dict[str, Any]:
        """Run the body; what the parent needs to end the job, ready to pickle."""
        job, namespace = launch.job, launch.namespace
        try:
            value = launch.body()
        except BaseException as exc:  # noqa: BLE001 - a job's failure is data, not a crash
            try:
                blob: bytes | None = cloudpickle.dumps(exc, protocol=5)
            except Exception:  # noqa: BLE001
                blob = None
            return {"ok": False, "exception": blob, "summary": one_line(exc, 1000)}
        result = None
        if value is not None:
            result = self._dump(job, pipe, value, "result", f"jobs[{job.id}].result is None")
        sent: dict[str, tuple[str, Any]] = {}
        if namespace is not None:
            for name in launch.names:
                if name not in namespace:
                    continue  # bound only on a branch that did not run, or deleted
                value = namespace[name]
                if isinstance(value, types.ModuleType):
                    sent[name] = ("module", value.__name__)
                    continue
                data = self._dump(job, pipe, value, repr(name), "skipped")
                if data is not None:
                    sent[name] = ("pickle", data)
        return {"ok": True, "result": result, "names": sent}

    def _dump(self, job: Job, pipe: _RecordPipe, value: Any, what: str, consequence: str) -> bytes | None:
        try:
            data = cloudpickle.dumps(value, protocol=5)
        except Exception as exc:  # noqa: BLE001 - reported in one line, the rest still arrives
            pipe.write("stderr", f"[job {job.id}: {what} not sent back ({one_line(exc)}); {consequence}]\n")
            return None
        if len(data) > self.max_value_bytes:
            pipe.write(
                "stderr",
                f"[job {job.id}: {what} not sent back ({_size_text(len(data))} pickled, over the "
                f"{_size_text(self.max_value_bytes)} limit); {consequence}]\n",
            )
            return None
        return data

    # -- in the parent: reading and ending ---------------------------------------------------

    def _watch(self, child: ForkedChild, launch: _Launch) -> None:
        """The reader thread: output into the journal as it comes, then end the job.

        Whatever goes wrong here, the child is killed and reaped and the job ends:
        a job that never ends would be worse than one that says why it failed.
        """
        job = child.job
        outcome: dict[str, Any] | None = None
        lost: BaseException | None = None
        try:
            outcome = self._read(child)
        except Exception as exc:  # noqa: BLE001 - reported on the job, never lost
            child.signal_group(signal.SIGKILL)
            lost = JobError(f"polycell lost track of the job's child: {one_line(exc)}")
        finally:
            status = child.reap()
            child.close()
            with self._lock:
                self._children.pop(job.id, None)
                self._readers.pop(job.id, None)
        try:
            if lost is not None:
                raise lost
            self._end(launch, outcome, status)
        except Exception as exc:  # noqa: BLE001
            _note(job, f"failed: {one_line(exc)}")
            job._set_exception(exc)

    def _read(self, child: ForkedChild) -> dict[str, Any] | None:
        """Read the child's pipes into the journal until it exits; its outcome, if it sent one."""
        outcome: dict[str, Any] | None = None

        def drain(name: str) -> bool:
            nonlocal outcome
            messages, still_open = child.read(name)
            for kind, payload in messages:
                if kind == "end":
                    outcome = payload
            return still_open

        selector = selectors.DefaultSelector()
        pidfd = child.open_pidfd()
        try:
            for name, fd in child.fds.items():
                os.set_blocking(fd, False)
                selector.register(fd, selectors.EVENT_READ, name)
            if pidfd is not None:
                selector.register(pidfd, selectors.EVENT_READ, None)
            exited = False
            while not exited:
                ready = selector.select(None if pidfd is not None else 0.02)
                # Records first: when Python output and fd output are both waiting,
                # the Python output was usually first (print, then a subprocess).
                ready.sort(key=lambda event: event[0].data != "records")
                for key, _events in ready:
                    if key.data is None:
                        exited = True
                    elif not drain(key.data):
                        selector.unregister(key.fd)
                if pidfd is None:
                    exited = child.exited()
            # The child is a zombie now (not reaped, so its group id is still ours):
            # end what it left running, then take what is already in the pipes.
            child.signal_group(signal.SIGKILL)
            for key in list(selector.get_map().values()):
                if key.data is not None:
                    drain(key.data)
        finally:
            selector.close()
            if pidfd is not None:
                os.close(pidfd)
        return outcome

    def _end(self, launch: _Launch, outcome: dict[str, Any] | None, status: int | None) -> None:
        job = launch.job
        if job.kill_requested:
            job._set_killed()
        elif outcome is not None and outcome["ok"]:
            value = self._load(job, outcome["result"], "result")
            self._merge(launch, outcome["names"])
            job._set_result(value)
        elif outcome is not None:
            exc: BaseException | None = None
            if outcome["exception"] is not None:
                try:
                    exc = cloudpickle.loads(outcome["exception"])
                except Exception:  # noqa: BLE001 - fall back to its text
                    exc = None
            job._set_exception(exc if isinstance(exc, BaseException) else JobError(outcome["summary"]))
        else:
            died = self._death(status)
            job.journal.write("stderr", f"[job {job.id} failed: {died}]\n")
            job._set_exception(died)

    @staticmethod
    def _death(status: int | None) -> ProcessDied:
        if status is None:
            return ProcessDied("child process ended without a result (its exit status was taken elsewhere)")
        if os.WIFSIGNALED(status):
            return ProcessDied(
                f"child process died: {describe_status(status)}", signal_number=os.WTERMSIG(status)
            )
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
        return ProcessDied(f"child process exited with code {code} without a result", exitcode=code)

    def _load(self, job: Job, data: bytes | None, what: str) -> Any:
        if data is None:
            return None
        try:
            return cloudpickle.loads(data)
        except Exception as exc:  # noqa: BLE001 - one line; the job still ends
            _note(job, f"{what} could not be loaded here ({one_line(exc)})")
            return None

    def _merge(self, launch: _Launch, sent: dict[str, tuple[str, Any]]) -> None:
        """Set the names the job assigned in the parent's namespace, and say which."""
        job, namespace = launch.job, launch.namespace
        if namespace is None or not sent:
            return
        arrived: dict[str, Any] = {}
        for name, (kind, data) in sent.items():
            if kind == "module":
                try:
                    arrived[name] = importlib.import_module(data)
                except Exception as exc:  # noqa: BLE001
                    _note(job, f"{name!r} (module {data}) not re-imported ({one_line(exc)})")
                continue
            try:
                arrived[name] = cloudpickle.loads(data)
            except Exception as exc:  # noqa: BLE001
                _note(job, f"{name!r} could not be loaded here ({one_line(exc)})")
        namespace.update(arrived)
        if arrived:
            job.journal.write("stdout", f"[job {job.id} set: {', '.join(arrived)}]\n")

    # -- stopping ----------------------------------------------------------------------------

    def kill(self, job: Job) -> None:
        with self._lock:
            child = self._children.get(job.id)
        if child is None:
            job._set_killed()
            return
        child.signal_group(signal.SIGKILL)

    def pids(self) -> list[int]:
        """The pids of the children running now."""
        with self._lock:
            return [child.pid for child in self._children.values()]

    def _kill_all(self) -> list[threading.Thread]:
        with self._lock:
            children = list(self._children.values())
            readers = list(self._readers.values())
        for child in children:
            child.job.kill_requested = True
            child.signal_group(signal.SIGKILL)
        return readers

    def shutdown(self, timeout: float = 2.0) -> None:
        with self._lock:
            if self._closed or os.getpid() != self._owner_pid:
                return
            self._closed = True
        atexit.unregister(self._kill_all)
        readers = self._kill_all()
        deadline = time.monotonic() + timeout
        for reader in readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        release_forker(max(0.1, deadline - time.monotonic()))
