"""The magics users type: ``%%bg``, ``%bg``, ``%jobs`` and ``%job``.

Every mistake a user can make here (an unknown option, a bad mode, a job id
that does not exist) becomes a `UsageError`, which IPython shows as one line
with no traceback.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import threading
from typing import TYPE_CHECKING, Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.display import display

from polycell import view
from polycell.job import Job, JobError, JobState, KillOutcome, one_line
from polycell.job_table import MODES

if TYPE_CHECKING:
    from polycell.extension import Polycell

__all__ = ["PolycellMagics"]


class _CellSyntaxError(Exception):
    """A background cell that does not compile, shown exactly as IPython shows a syntax error.

    Raising the SyntaxError itself from the magic would make IPython show the
    magic's own stack above it (a syntax error raised while running code gets
    the full traceback). IPython renders an exception through its
    ``_render_traceback_`` when it has one, and this one renders the plain
    syntax error; the reply's ``ename`` still reads "SyntaxError".
    """

    def __init__(self, shell: Any, error: SyntaxError) -> None:
        super().__init__(str(error))
        self._stb = shell.SyntaxTB.structured_traceback(type(error), error, [])

    def _render_traceback_(self) -> list[str]:
        return self._stb


_CellSyntaxError.__name__ = _CellSyntaxError.__qualname__ = "SyntaxError"


class _StoppedWaiting(KeyboardInterrupt):
    """■ during ``%job wait N``: the interrupt stops the waiting, not the job; said in one line."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


_StoppedWaiting.__name__ = _StoppedWaiting.__qualname__ = "KeyboardInterrupt"


class _Parser(argparse.ArgumentParser):
    """argparse that raises a one-line UsageError instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(message.strip() if message else f"{self.prog}: see {self.prog}?")


class _Once(argparse.Action):
    """An option that may be given once: ``--mode thread --mode process`` is a mistake, not a choice."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)!r}, then {values!r})")
        setattr(namespace, self.dest, values)


@functools.cache  # building one costs more than starting a job; parsing does not change it
def _bg_parser(prog: str) -> _Parser:
    parser = _Parser(prog=prog, add_help=False)
    parser.add_argument("--mode", choices=list(MODES), default=None, action=_Once)
    parser.add_argument("--name", default=None, action=_Once)
    parser.add_argument("--backend", default=None, action=_Once)
    return parser


def _split(line: str, prog: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"{prog}: {exc}") from None


@magics_class
class PolycellMagics(Magics):
    def __init__(self, shell: Any, polycell: Polycell) -> None:
        super().__init__(shell)
        self.polycell = polycell

    def _job(self, text: str) -> Job:
        try:
            return self.polycell.jobs[int(text)]
        except ValueError:
            raise UsageError(f"%job: {text!r} is not a job id (job ids are whole numbers)") from None
        except JobError as exc:
            raise UsageError(str(exc)) from None

    def _start(self, code: str, mode: str | None, name: str | None, backend: str | None = None) -> None:
        try:
            self.polycell.run_cell(code, mode=mode, name=name, backend=backend)
        except JobError as exc:
            raise UsageError(str(exc)) from None
        except SyntaxError as exc:
            raise _CellSyntaxError(self.shell, exc) from None
        except (OSError, RuntimeError) as exc:  # no thread, no fork, no cluster: the machine said no
            raise UsageError(f"could not start the job: {one_line(exc)}") from None

    @cell_magic
    def bg(self, line: str, cell: str) -> None:
        """Run this cell as a background job: %%bg [--mode M] [--name NAME] [--backend asyncio|trio]

        The cell returns at once and shows the job's handle; the job's output
        appears in this cell while other cells run. Default mode: task when
        the cell has a top-level await, else thread. ``--backend trio`` runs a
        task job on a trio event loop instead of asyncio.
        """
        args = _bg_parser("%%bg").parse_args(_split(line, "%%bg"))
        self._start(cell, args.mode, args.name, args.backend)

    @line_magic("bg")
    def bg_line(self, line: str) -> None:
        """Run one statement as a background job: %bg [--mode M] [--name NAME] STATEMENT"""
        options, statement = _split_line_options(line)
        args = _bg_parser("%bg").parse_args(_split(options, "%bg"))
        if not statement.strip():
            raise UsageError("%bg: give a statement to run, e.g. %bg time.sleep(5)")
        self._start(statement, args.mode, args.name, args.backend)

    @line_magic
    def jobs(self, line: str) -> None:
        """Show the table of jobs (id, name, mode, status, elapsed time, last output):
        %jobs [--threads]. With --threads, the kernel's other threads follow it:
        what else is running in this process (ipykernel's own, a cluster's, yours)."""
        parser = _Parser(prog="%jobs", add_help=False)
        parser.add_argument("--threads", action="store_true")
        args = parser.parse_args(_split(line, "%jobs"))
        jobs = list(self.polycell.jobs)
        job_threads = {job.info.get("thread") for job in jobs if not job.done}
        display(JobsView(jobs, other_threads(job_threads) if args.threads else None))

    @line_magic
    def job(self, line: str) -> Any:
        """Act on one job: %job kill N | wait N [--timeout S] | show N"""
        words = _split(line, "%job")
        if not words or words[0] not in ("kill", "wait", "show"):
            raise UsageError("%job: use %job kill N, %job wait N [--timeout S] or %job show N")
        action, rest = words[0], words[1:]
        parser = _Parser(prog=f"%job {action}", add_help=False)
        parser.add_argument("id")
        if action == "wait":
            parser.add_argument("--timeout", type=float, default=None)
        args = parser.parse_args(rest)
        job = self._job(args.id)
        if action == "kill":
            return self._kill(job)
        if action == "wait":
            return self._wait(job, args.timeout)
        self.polycell.show(job)
        return None

    def _kill(self, job: Job) -> None:
        if job.done:
            raise UsageError(f"%job kill: job {job.id} already ended ({job.status})")
        outcome = job.kill()
        if outcome is KillOutcome.KILLED:
            print(f"job {job.id} killed")
        elif outcome is KillOutcome.STILL_BLOCKED:
            print(
                f"job {job.id}: kill requested; it has not stopped yet: it is in C code that cannot be "
                "interrupted (it stops when that call returns), or its code caught the kill. "
                "Its cell will say how it ends."
            )
        else:
            print(f"job {job.id} ended ({job.status}) before it could be killed")

    def _wait(self, job: Job, timeout: float | None) -> Any:
        if timeout is not None and timeout < 0:
            raise UsageError("%job wait: --timeout must be zero or more seconds")
        try:
            ended = job.wait(timeout)
        except KeyboardInterrupt:
            raise _StoppedWaiting(f"stopped waiting; job {job.id} is still {view.status_text(job)}") from None
        if not ended:
            print(f"job {job.id} is still {view.status_text(job)} after {timeout:g}s")
            return None
        if job.status is JobState.DONE:
            return job.result
        if job.status is JobState.FAILED:
            exc = job.exception
            print(f"job {job.id} failed: {one_line(exc, 1000)}")
        else:
            print(f"job {job.id} {job.status}")
        return None


def other_threads(job_threads: set[str | None]) -> list[str]:
    """One line per live thread that is not running a job: its name, and whether it is a daemon."""
    threads = [t for t in threading.enumerate() if t.name not in job_threads]
    lines = [f"{len(threads)} other thread(s) in this kernel:"]
    for thread in sorted(threads, key=lambda t: (t is not threading.main_thread(), t.name)):
        kind = "daemon" if thread.daemon else "non-daemon"
        lines.append(f"  {thread.name} ({kind})")
    return lines


def _split_line_options(line: str) -> tuple[str, str]:
    """Split ``--mode task --name x STATEMENT`` into its options and its statement."""
    words = line.split(" ")
    options: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "":
            i += 1
            continue
        if word.startswith("--"):
            options.append(word)
            if "=" not in word and i + 1 < len(words):
                options.append(words[i + 1])
                i += 1
            i += 1
            continue
        break
    return " ".join(options), " ".join(words[i:])


class JobsView:
    """The ``%jobs`` table as it was when asked for: HTML in notebooks, text elsewhere."""

    def __init__(self, jobs: list[Job], extra: list[str] | None = None) -> None:
        self.jobs = jobs
        self.extra = extra or []

    def __repr__(self) -> str:
        return view.jobs_text(self.jobs, self.extra)

    def _repr_html_(self) -> str:
        return view.jobs_html(self.jobs, self.extra)
