"""``polycell``: see and steer a running kernel's jobs from a terminal.

    polycell jobs [--json]        the jobs table
    polycell tail N               job N's output so far, then live until it ends (Ctrl-C detaches)
    polycell kill N               kill job N
    polycell top [--once]         a live table of jobs and their last line
    polycell log [N] [--run R]    the jobs, or job N's output, from the on-disk journal; no kernel needed

Every command but ``log`` is a second client of the kernel (``--existing FILE``,
or the newest ``kernel-*.json`` in the Jupyter runtime directory) and talks to
it over the control channel, which the kernel answers from a thread of its own:
the answer comes even while a cell keeps the main thread busy.

Every failure is one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from polycell import view
from polycell.job import one_line
from polycell.journal import Record
from polycell.kernel_link import CliError, KernelLink

__all__ = ["main"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_POLL_SECONDS = 0.1


# -- finding things --------------------------------------------------------------------------------


def find_connection_file(existing: str | None) -> str:
    """The connection file named by ``--existing``, or the newest one in the runtime directory."""
    from jupyter_client import find_connection_file as find
    from jupyter_core.paths import jupyter_runtime_dir

    try:
        if existing:
            return str(find(existing))
        return str(find())
    except OSError:
        if existing:
            raise CliError(
                f"no kernel connection file {existing!r} (here or in {jupyter_runtime_dir()})"
            ) from None
        runtime = jupyter_runtime_dir()
        raise CliError(
            f"no running kernel found: no kernel-*.json in {runtime}; give one with --existing FILE"
        ) from None


def find_store(existing: str | None) -> Path:
    """The on-disk journal of the kernel named by ``--existing`` (its connection file or the
    database itself; the kernel may be long gone), or the newest one in the runtime directory."""
    from jupyter_core.paths import jupyter_runtime_dir

    from polycell.journal_files import journal_dir, store_path

    runtime = Path(jupyter_runtime_dir())
    if existing:
        given = Path(existing)
        if given.suffix == ".sqlite":
            for candidate in (given, journal_dir(runtime) / given):
                if candidate.is_file():
                    return candidate
        path = store_path(given, runtime)
        if path.is_file():
            return path
        raise CliError(f"no polycell journal for {existing!r} (looked for {path})")
    stores = sorted(journal_dir(runtime).glob("polycell-*.sqlite"), key=lambda p: p.stat().st_mtime)
    if not stores:
        raise CliError(f"no polycell journal found in {journal_dir(runtime)}; give one with --existing FILE")
    return stores[-1]


# -- printing records ------------------------------------------------------------------------------


def record_text(record: Record, *, colour: bool) -> tuple[str, str]:
    """(stream name, text) for a record in a terminal: rich outputs as their text/plain."""
    kind, content = record["msg_type"], record["content"]
    if kind == "stream":
        return content["name"], content["text"]
    if kind in ("display_data", "update_display_data", "execute_result"):
        text = content.get("data", {}).get("text/plain", "")
        if not text and content.get("data"):
            text = f"<{', '.join(content['data'])}>"
        prefix = f"Out[{content['execution_count']}]: " if kind == "execute_result" else ""
        return "stdout", f"{prefix}{text}\n" if text else ""
    if kind == "error":
        text = "\n".join(content.get("traceback") or [f"{content.get('ename')}: {content.get('evalue')}"])
        return "stderr", (text if colour else _ANSI.sub("", text)) + "\n"
    return "stdout", ""  # clear_output and the like have no text


def write_records(records: Sequence[Record], out: TextIO, err: TextIO) -> None:
    for record in records:
        name, text = record_text(record, colour=err.isatty())
        if not text:
            continue
        if name == "stderr":
            out.flush()  # keep stdout and stderr in journal order on a terminal
            err.write(text)
            err.flush()
        else:
            out.write(text)
    out.flush()


# -- the commands --------------------------------------------------------------------------------------


def cmd_jobs(link: KernelLink, as_json: bool) -> int:
    rows = link.request("jobs")["jobs"]
    print(json.dumps(rows, indent=2) if as_json else view.rows_text(rows))
    return 0


def cmd_kill(link: KernelLink, job_id: int) -> int:
    reply = link.request("kill", job=job_id)
    outcome, row = reply["outcome"], reply["job"]
    if outcome == "already ended":
        raise CliError(f"job {job_id} already ended ({row['status']})")
    if outcome == "killed":
        print(f"job {job_id} killed")
    else:
        why = "in a call that cannot be interrupted, or it caught the kill"
        print(f"job {job_id}: kill requested, not stopped yet ({why})")
    return 0


def cmd_tail(link: KernelLink, job_id: int) -> int:
    position = 0
    try:
        while True:
            reply = link.request("tail", job=job_id, since=position)
            write_records(reply["records"], sys.stdout, sys.stderr)
            position = reply["position"]
            if reply["ended"]:
                row = reply["job"]
                print(
                    f"[job {job_id} {row['status']} after {view.format_elapsed(row['elapsed'])}]",
                    file=sys.stderr,
                )
                return 0
            if not reply["records"]:
                time.sleep(_POLL_SECONDS)
    except KeyboardInterrupt:
        print(f"\n[detached from job {job_id}; it keeps running]", file=sys.stderr)
        return 0


def _top_table(rows: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    colours = {"running": "blue", "done": "green", "failed": "red", "killed": "yellow", "killing": "yellow"}
    table = Table(title=title, title_justify="left", expand=False)
    for column in view.COLUMNS:
        table.add_column(column, no_wrap=column != "last output")
    for row in rows:
        status = f"[{colours.get(row['status'], 'white')}]{row['status']}[/]"
        table.add_row(
            str(row["id"]),
            row["name"],
            row["mode"],
            status,
            view.format_elapsed(row["elapsed"]),
            row["last_output"],
        )
    if not rows:
        table.add_row("", "no jobs", "", "", "", "")
    return table


def cmd_top(link: KernelLink, once: bool, interval: float) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console()

    def frame() -> Any:
        reply = link.request("jobs")
        return _top_table(reply["jobs"], f"polycell: kernel pid {reply['pid']}  {time.strftime('%H:%M:%S')}")

    if once:
        console.print(frame())
        return 0
    try:
        with Live(frame(), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        return 0


def cmd_log(existing: str | None, job_id: int | None, run: int | None) -> int:
    from polycell.stored_jobs import read_job, read_jobs, read_runs

    path = find_store(existing)
    try:
        if job_id is not None:
            _job, records = read_job(path, job_id, run)
            write_records(records, sys.stdout, sys.stderr)
            return 0
        runs = read_runs(path)
        stored = [job for job in read_jobs(path) if run is None or job.run == run]
    except LookupError as exc:
        raise CliError(str(exc)) from None
    except (sqlite3.Error, OSError, ValueError) as exc:  # a damaged or foreign file
        raise CliError(f"cannot read {path}: {exc}") from None
    if len({job.run for job in stored}) <= 1:
        print(view.rows_text([job.row() for job in stored]))
        return 0
    for number, (pid, started) in runs.items():
        in_run = [job.row() for job in stored if job.run == number]
        if in_run:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
            print(f"run {number}: kernel pid {pid}, started {when}")
            print(view.rows_text(in_run))
            print()
    return 0


# -- the command line -----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> _Parser:
    parser = _Parser(
        prog="polycell",
        description="See and steer the background jobs of a running kernel.",
        epilog="polycell install|uninstall [--help] manage the 'polycell' kernelspec.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run_help = "run a notebook headlessly, then wait for its jobs: every job's output saved in its cell"
    notebook = commands.add_parser("run", help=run_help, description=run_help)
    notebook.add_argument("notebook", metavar="NOTEBOOK", help="the .ipynb to run")
    notebook.add_argument(
        "--output", metavar="OUT.ipynb", help="write the executed notebook here, as it runs"
    )
    notebook.add_argument(
        "--kernel", metavar="NAME", help="kernelspec to run it with (default: the notebook's)"
    )
    notebook.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds a cell, and then the jobs, may take (default: no limit)",
    )
    notebook.add_argument(
        "--allow-errors",
        action="store_true",
        help="run every cell even after one fails (the exit status still says so)",
    )

    def command(name: str, help_text: str, *, job: str | None = None, kernel: bool = True) -> _Parser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if job == "required":
            sub.add_argument("job", type=int, metavar="N", help="the job id")
        elif job == "optional":
            sub.add_argument("job", type=int, metavar="N", nargs="?", help="the job id")
        sub.add_argument(
            "--existing",
            metavar="FILE",
            help="the kernel's connection file (default: the newest in the Jupyter runtime directory)",
        )
        if kernel:
            sub.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the kernel (3)")
        return sub

    command("jobs", "the jobs table").add_argument("--json", action="store_true", help="as JSON rows")
    command("tail", "job N's output so far, then live until it ends; Ctrl-C detaches", job="required")
    command("kill", "kill job N", job="required")
    top = command("top", "a live table of the jobs and their last line")
    top.add_argument("--once", action="store_true", help="print the table once and exit")
    top.add_argument("--interval", type=float, default=0.5, help="seconds between refreshes (0.5)")
    log = command(
        "log",
        "the jobs, or job N's output, from the journal on disk (no kernel needed)",
        job="optional",
        kernel=False,
    )
    log.add_argument(
        "--run", type=int, default=None, help="which kernel run (default: the newest with job N)"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "run":
        from polycell.notebook_run import RunError, run_notebook

        try:
            return run_notebook(
                args.notebook,
                output=args.output,
                kernel=args.kernel,
                timeout=args.timeout,
                allow_errors=args.allow_errors,
            )
        except RunError as exc:
            print(f"polycell run: {exc}", file=sys.stderr)
            return 2
    if args.command == "log":
        return cmd_log(args.existing, args.job, args.run)
    if args.timeout <= 0:
        raise CliError("--timeout must be more than 0 seconds")
    with KernelLink(find_connection_file(args.existing), args.timeout) as link:
        if args.command == "jobs":
            return cmd_jobs(link, args.json)
        if args.command == "kill":
            return cmd_kill(link, args.job)
        if args.command == "tail":
            return cmd_tail(link, args.job)
        return cmd_top(link, args.once, args.interval)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``polycell`` console script, and ``python -m polycell``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("install", "uninstall"):
        from polycell import kernelspec

        return kernelspec.main(argv)
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except CliError as exc:
        print(f"polycell {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `polycell tail 3 | head`
        return 0
    except Exception as exc:  # noqa: BLE001 - the promise is one line, never a traceback
        print(f"polycell {args.command}: unexpected error: {one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
