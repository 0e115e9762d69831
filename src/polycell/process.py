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
leaves through ``os._exit``. Every fork is made by one long-lived thread of the
runner because Linux sends the parent-death signal when the *thread* that
forked the child ends, not the process.
"""

from __future__ import annotations

import atexit
import builtins
import codecs
import concurrent.futures
import contextvars
import ctypes
import faulthandler
import importlib
import io
import os
import pickle
import queue
import selectors
import signal
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

from polycell.job import Job, JobError, Runner
from polycell.journal import Record, stream_record

__all__ = ["ProcessDied", "ProcessRunner", "fork_available"]

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


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
        threading.Thread(target=self._flush_loop, name="polycell-child-flush", daemon=True).start()

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

    def send_end(self, outcome: dict[str, Any]) -> None:
        with self._lock:
            self._flush_locked()
            self._stopped.set()
            self._send(("end", outcome))

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
            note = f"[polycell: an output record could not be sent: {_one_line(exc)}]\n"
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


def _no_input(prompt: object = "") -> NoReturn:
    raise EOFError("input() is not available in a process job: it has no frontend to ask")


# -- the parent's side ------------------------------------------------------------------------


@dataclass
class _Launch:
    """Everything the child needs to run a job, handed across the fork."""

    job: Job
    body: Callable[[], Any]
    context: contextvars.Context
    namespace: dict[str, Any] | None
    names: list[str]


class _Forker:
    """The one long-lived thread that makes every fork.

    Linux delivers ``PR_SET_PDEATHSIG`` when the thread that forked the child
    exits. Forking from whichever thread calls `submit` (a thread job, say)
    would kill the child when that thread ends; this thread lives as long as
    the runner.
    """

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="polycell-forker", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Any]) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._requests.put((fn, future))
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


class _Child:
    """The parent's view of one job's child process."""

    def __init__(self, job: Job, pid: int, fds: dict[str, int], namespace: dict[str, Any] | None) -> None:
        self.job = job
        self.pid = pid
        self.fds = fds
        self.namespace = namespace
        #: Held around signalling and reaping: once reaped, the pid (and so the
        #: process group id) may belong to someone else and is never signalled.
        self.lock = threading.Lock()
        self.reaped = False
        self.reader: threading.Thread | None = None


class _FrameDecoder:
    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _FRAME_HEADER.size:
            (size,) = _FRAME_HEADER.unpack_from(self._buffer)
            end = _FRAME_HEADER.size + size
            if len(self._buffer) < end:
                break
            frames.append(pickle.loads(self._buffer[_FRAME_HEADER.size : end]))
            del self._buffer[:end]
        return frames


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
        self._children: dict[int, _Child] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._forker = _Forker()
        # Resolved here, never in the child: looking a symbol up takes the dynamic
        # loader's lock, which another kernel thread may hold at the fork.
        libc = ctypes.CDLL(None, use_errno=True)
        self._prctl = getattr(libc, "prctl", None) if sys.platform.startswith("linux") else None
        self._fflush = getattr(libc, "fflush", None)
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
        if os.getpid() != self._owner_pid:
            raise JobError("a process job cannot start process jobs of its own; start them from the notebook")
        context = self._prepare(job)
        if not job._set_running():
            return job
        launch = _Launch(job, body, context, namespace, list(names))
        try:
            child = self._forker.call(lambda: self._fork(launch))
        except OSError as exc:
            message = f"could not start a child process: {_one_line(exc)}"
            job.journal.write("stderr", f"[job {job.id} failed: {message}]\n")
            job._set_exception(JobError(message))
            return job
        job.info["pid"] = child.pid
        with self._lock:
            self._children[job.id] = child
        if job.kill_requested:  # killed while it was being forked
            self._signal(child, signal.SIGKILL)
        child.reader = threading.Thread(
            target=self._watch, args=(child,), name=f"polycell-process-{job.id}", daemon=True
        )
        child.reader.start()
        return job

    def _fork(self, launch: _Launch) -> _Child:
        pipes = {"stdout": os.pipe(), "stderr": os.pipe(), "records": os.pipe()}
        parent_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            for read_end, write_end in pipes.values():
                os.close(read_end)
                os.close(write_end)
            raise
        if pid == 0:
            self._child_main(launch, pipes, parent_pid)
        for _read_end, write_end in pipes.values():
            os.close(write_end)
        try:
            # Also done by the child; doing it here too means the group exists
            # before anyone can try to kill it.
            os.setpgid(pid, pid)
        except OSError:
            pass
        return _Child(launch.job, pid, {name: ends[0] for name, ends in pipes.items()}, launch.namespace)

    # -- in the child ----------------------------------------------------------------------

    def _child_main(self, launch: _Launch, pipes: dict[str, tuple[int, int]], parent_pid: int) -> NoReturn:
        code = 70
        try:
            os.setpgid(0, 0)
            if self._prctl is not None:
                self._prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent_pid:  # the kernel died before the line above
                os._exit(code)
            if self.niceness:
                os.nice(self.niceness)
            os.dup2(pipes["stdout"][1], 1)
            os.dup2(pipes["stderr"][1], 2)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            for name, (read_end, write_end) in pipes.items():
                os.close(read_end)
                if name != "records":
                    os.close(write_end)
            # A crash in C code then shows the job's Python stack in its cell.
            faulthandler.enable(file=2, all_threads=False)
            pipe = _RecordPipe(pipes["records"][1])
            sys.stdout = _ChildStream("stdout", pipe, 1)
            sys.stderr = _ChildStream("stderr", pipe, 2)
            sys.stdin = open(os.devnull)  # lives as long as the child
            builtins.input = _no_input
            launch.job.journal = pipe  # type: ignore[assignment]
            outcome = launch.context.run(self._outcome, launch, pipe)
            pipe.send_end(outcome)
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
            return {"ok": False, "exception": blob, "summary": _one_line(exc, 1000)}
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
            pipe.write("stderr", f"[job {job.id}: {what} not sent back ({_one_line(exc)}); {consequence}]\n")
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

    def _watch(self, child: _Child) -> None:
        """The reader thread: output into the journal as it comes, then end the job.

        Whatever goes wrong here, the child is killed and reaped and the job ends:
        a job that never ends would be worse than one that says why it failed.
        """
        job = child.job
        outcome: dict[str, Any] | None = None
        status: int | None = None
        try:
            outcome = self._read(child)
        except Exception as exc:  # noqa: BLE001 - reported on the job, never lost
            self._signal(child, signal.SIGKILL)
            lost: BaseException | None = JobError(f"polycell lost track of the job's child: {_one_line(exc)}")
        else:
            lost = None
        finally:
            if not child.reaped:
                status = self._reap(child)
            for fd in child.fds.values():
                os.close(fd)
            with self._lock:
                self._children.pop(job.id, None)
        try:
            if lost is not None:
                raise lost
            self._end(child, outcome, status)
        except Exception as exc:  # noqa: BLE001
            _note(job, f"failed: {_one_line(exc)}")
            job._set_exception(exc)

    def _read(self, child: _Child) -> dict[str, Any] | None:
        """Read the child's pipes into the journal until it exits; its outcome, if it sent one."""
        job = child.job
        decoders = {
            name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in ("stdout", "stderr")
        }
        frames = _FrameDecoder()
        outcome: dict[str, Any] | None = None

        def consume(name: str, data: bytes) -> None:
            nonlocal outcome
            if name == "records":
                for kind, payload in frames.feed(data):
                    if kind == "record":
                        job.journal.append(payload)
                    else:
                        outcome = payload
            else:
                job.journal.write(name, decoders[name].decode(data, final=not data))

        def drain(fd: int, name: str) -> bool:
            """Read what is there now; False at end of file."""
            while True:
                try:
                    data = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    return True
                consume(name, data)
                if not data:
                    return False

        selector = selectors.DefaultSelector()
        pidfd: int | None = None
        try:
            for name, fd in child.fds.items():
                os.set_blocking(fd, False)
                selector.register(fd, selectors.EVENT_READ, name)
            if hasattr(os, "pidfd_open"):
                try:
                    pidfd = os.pidfd_open(child.pid)
                except OSError:  # a kernel older than Linux 5.3: poll instead
                    pidfd = None
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
                    elif not drain(key.fd, key.data):
                        selector.unregister(key.fd)
                if pidfd is None:
                    exited = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
            # The child is a zombie now (not reaped, so its group id is still ours):
            # end what it left running, then take what is already in the pipes.
            self._signal(child, signal.SIGKILL)
            for key in list(selector.get_map().values()):
                if key.data is not None:
                    drain(key.fd, key.data)
        finally:
            selector.close()
            if pidfd is not None:
                os.close(pidfd)
        return outcome

    def _reap(self, child: _Child) -> int | None:
        with child.lock:
            try:
                _pid, status = os.waitpid(child.pid, 0)
            except ChildProcessError:  # somebody else's waitpid(-1) took it
                status = None
            child.reaped = True
        return status

    def _end(self, child: _Child, outcome: dict[str, Any] | None, status: int | None) -> None:
        job = child.job
        if job.kill_requested:
            job._set_killed()
        elif outcome is not None and outcome["ok"]:
            value = self._load(job, outcome["result"], "result")
            self._merge(child, outcome["names"])
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
            number = os.WTERMSIG(status)
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = "unknown signal"
            message = f"child process died: signal {number} ({name})"
            if number == signal.SIGKILL:
                message += ", killed from outside polycell (the out-of-memory killer?)"
            return ProcessDied(message, signal_number=number)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
        return ProcessDied(f"child process exited with code {code} without a result", exitcode=code)

    def _load(self, job: Job, data: bytes | None, what: str) -> Any:
        if data is None:
            return None
        try:
            return cloudpickle.loads(data)
        except Exception as exc:  # noqa: BLE001 - one line; the job still ends
            _note(job, f"{what} could not be loaded here ({_one_line(exc)})")
            return None

    def _merge(self, child: _Child, sent: dict[str, tuple[str, Any]]) -> None:
        """Set the names the job assigned in the parent's namespace, and say which."""
        job, namespace = child.job, child.namespace
        if namespace is None or not sent:
            return
        arrived: dict[str, Any] = {}
        for name, (kind, data) in sent.items():
            if kind == "module":
                try:
                    arrived[name] = importlib.import_module(data)
                except Exception as exc:  # noqa: BLE001
                    _note(job, f"{name!r} (module {data}) not re-imported ({_one_line(exc)})")
                continue
            try:
                arrived[name] = cloudpickle.loads(data)
            except Exception as exc:  # noqa: BLE001
                _note(job, f"{name!r} could not be loaded here ({_one_line(exc)})")
        namespace.update(arrived)
        if arrived:
            job.journal.write("stdout", f"[job {job.id} set: {', '.join(arrived)}]\n")

    # -- stopping ----------------------------------------------------------------------------

    def _signal(self, child: _Child, sig: int) -> None:
        with child.lock:
            if child.reaped or os.getpid() != self._owner_pid:
                return
            try:
                os.killpg(child.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self, job: Job) -> None:
        with self._lock:
            child = self._children.get(job.id)
        if child is None:
            job._set_killed()
            return
        self._signal(child, signal.SIGKILL)

    def pids(self) -> list[int]:
        """The pids of the children running now."""
        with self._lock:
            return [child.pid for child in self._children.values()]

    def _kill_all(self) -> list[_Child]:
        with self._lock:
            children = list(self._children.values())
        for child in children:
            child.job.kill_requested = True
            self._signal(child, signal.SIGKILL)
        return children

    def shutdown(self, timeout: float = 2.0) -> None:
        if self._closed or os.getpid() != self._owner_pid:
            return
        self._closed = True
        atexit.unregister(self._kill_all)
        children = self._kill_all()
        deadline = time.monotonic() + timeout
        for child in children:
            if child.reader is not None:
                child.reader.join(max(0.0, deadline - time.monotonic()))
        self._forker.stop(max(0.1, deadline - time.monotonic()))
