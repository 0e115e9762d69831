"""Making a forked child of the kernel: one thread forks them all, and each child is set up alike.

Process jobs and ``jobs.map`` workers are both forked children, made the same way:

* their own process group (``setpgid``), so a kernel interrupt, which
  jupyter_client sends to the kernel's process group, never reaches them, and a
  kill is ``killpg(SIGKILL)``: at once, in any state, with every process the
  child started;
* on Linux ``PR_SET_PDEATHSIG`` kills a child when the kernel dies;
* file descriptors 1 and 2 and a record pipe (`polycell.child_pipe`) to the
  kernel, no stdin, ``input()``/``getpass()`` failing at once in one line (they
  would ask over the kernel's stdin socket), listening sockets closed, and no
  jobs of its own (its copies of the kernel's output threads cannot work).

Fork safety: the kernel has threads (iopub, heartbeat, control...) whose locks
may be held at the instant of the fork. The child touches none of that
machinery: it gets fresh streams and a fresh pipe, never logs, and always
leaves through ``os._exit``. Every fork is made by one long-lived thread
(`Forker`), because Linux sends the parent-death signal when the *thread* that
forked the child ends, not the process. `ForkedChild` is the parent's side: it
reads the pipes and signals the child's group only until the one thread that
reaps it has.
"""

from __future__ import annotations

import builtins
import codecs
import concurrent.futures
import ctypes
import faulthandler
import gc
import getpass
import os
import queue
import signal
import socket
import stat
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from polycell.child_pipe import BadFrame, ChildStream, FrameDecoder, RecordPipe, send_frame
from polycell.interrupts import BackgroundThread, reset_interrupts_in_child
from polycell.job import Job, one_line, refuse_jobs_here

__all__ = [
    "ChildMain",
    "ForkedChild",
    "Forker",
    "acquire_forker",
    "close_listening_sockets",
    "describe_status",
    "fork_available",
    "release_forker",
]

_READ_SIZE = 1 << 20
_PR_SET_PDEATHSIG = 1

# Python >= 3.12 warns when a multi-threaded process forks; this module exists to
# do exactly that, carefully (see above). Only warnings raised from here are hidden.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"polycell\.fork")


def fork_available() -> bool:
    return hasattr(os, "fork") and hasattr(os, "killpg") and hasattr(os, "setpgid")


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


def refuse_input(what: str) -> None:
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
        self._frames = FrameDecoder()

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
            send_frame(self.fds["tasks"], message)
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
                    if isinstance(frame, BadFrame):
                        self.job.note(f"an output record could not be read here ({one_line(frame.error)})")
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


ChildMain = Callable[[RecordPipe, int | None], None]


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
        code = 70
        try:
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
            pipe = RecordPipe(pipes["records"][1])
            sys.stdout = ChildStream("stdout", pipe, 1)
            sys.stderr = ChildStream("stderr", pipe, 2)
            sys.stdin = open(os.devnull)  # lives as long as the child
            refuse_input(what)
            refuse_jobs_here(what)
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
