"""``polycell run NOTEBOOK``: execute a notebook headlessly and keep every job's output in its cell.

Cells run in order, as nbclient runs them; then the run waits until every job
the notebook started has ended, putting each job's whole output (text, rich
outputs, figures, result, traceback) into the cell that started it and each
handle in its final state (`polycell.headless`). The terminal shows each cell
as it runs, its outputs as they arrive (a job's late ones tagged with the job),
and the jobs still running with their last line. ``--output`` is written as
the run goes (atomically: a killed run leaves what it had, never half a file).

Exit status: 0 when no cell and no job failed; 1 when one did (each named, with
its cell), or a job was still running at ``--timeout`` (it is killed); 2 for bad
input (one line); 130 after Ctrl-C, which kills the kernel's jobs first. With
``--allow-errors`` every cell runs even after one fails, and failed cells and
jobs are still named, but only a timeout or a dead kernel fails the run: as
with nbclient's (and ``nbconvert --execute``'s) option of that name.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from polycell.headless import NO_HISTORY, FollowJobs, JobOutcome

__all__ = ["RunError", "run_notebook"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RunError(Exception):
    """Bad input to ``polycell run``: one line, exit status 2."""


def output_text(output: dict[str, Any]) -> str:
    """An nbformat output as a terminal shows it: text, or a rich output's text/plain."""
    kind = output.get("output_type")
    if kind == "stream":
        return str(output.get("text", ""))
    if kind == "error":
        return _ANSI.sub("", "\n".join(output.get("traceback", []))) + "\n"
    data = output.get("data", {})
    if "text/plain" in data:
        return str(data["text/plain"]) + "\n"
    if data:
        return f"<{', '.join(sorted(data))}>\n"
    return ""


def _read(path: Path) -> Any:
    import nbformat

    try:
        return nbformat.read(path, as_version=4)
    except OSError as exc:
        raise RunError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - NotJSONError, ValidationError, ...: all one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"{path} is not a notebook: {first}") from None


def _check_kernel(name: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise RunError(f"no kernel named {name!r} (see: jupyter kernelspec list)") from None


def _check_writable(output: Path) -> None:
    if output.is_dir():
        raise RunError(f"cannot write {output}: it is a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"):
            pass
    except OSError as exc:
        raise RunError(f"cannot write {output}: {exc.strerror or exc}") from None


def save_atomically(nb: Any, output: Path) -> None:
    """Write next to `output`, then rename over it: never half a notebook in its place.

    The file keeps the mode it had (a new one gets the umask's), not mkstemp's 0600.
    """
    import nbformat

    try:
        mode = stat.S_IMODE(output.stat().st_mode)
    except FileNotFoundError:
        mask = os.umask(0)
        os.umask(mask)
        mode = 0o666 & ~mask
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            nbformat.write(nb, f)
        os.chmod(tmp, mode)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _client_class() -> type:
    from nbclient import NotebookClient

    class PolycellNotebookClient(FollowJobs, NotebookClient):  # type: ignore[misc]
        """nbclient's client, printing each output as it lands (see `run_notebook`)."""

        terminal: TextIO = sys.stdout

        def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
            output = super().process_message(msg, cell, cell_index)
            if output is not None:
                job = ((msg.get("metadata") or {}).get("polycell") or {}).get("job")
                text = output_text(output)
                late = self.watch is not None and job is not None and cell_index != self.running_index
                if text and late:
                    text = _tagged(text, f"[cell {cell_index + 1}, job {job}] ")
                self.terminal.write(text)
                self.terminal.flush()
            return output

        running_index = -1

    return PolycellNotebookClient


def run_notebook(
    path: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    kernel: str | None = None,
    timeout: float | None = None,
    allow_errors: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run the notebook and its jobs to the end; the exit status (see the module's docstring).

    Raises `RunError` for bad input, before a kernel is started.
    """
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    source = Path(path)
    nb = _read(source)
    kernel_name = kernel or nb.metadata.get("kernelspec", {}).get("name") or "python3"
    _check_kernel(kernel_name)
    target = Path(output) if output is not None else None
    if target is not None:
        _check_writable(target)
    if timeout is not None and timeout <= 0:
        raise RunError(f"--timeout must be a positive number of seconds, not {timeout:g}")

    client = _client_class()(
        nb,
        kernel_name=kernel_name,
        timeout=timeout,
        allow_errors=allow_errors,
        extra_arguments=[NO_HISTORY],
        resources={"metadata": {"path": str(source.parent.resolve())}},
    )
    client.terminal = out
    last_save = 0.0

    def save(force: bool = True) -> None:
        nonlocal last_save
        if target is not None and (force or time.monotonic() - last_save >= 1.0):
            save_atomically(nb, target)
            last_save = time.monotonic()

    shown: dict[str, Any] = {"jobs": None, "at": 0.0}

    def waiting(running: list[JobOutcome]) -> None:
        """The jobs still running and their last line: when that set changes, else every 5 s."""
        ids = [(job.id, job.status) for job in running]
        if ids != shown["jobs"] or time.monotonic() - shown["at"] >= 5:
            shown.update(jobs=ids, at=time.monotonic())
            lines = [
                f"  job {job.id} (cell {(client.cell_index_of(job) or 0) + 1}) {job.status}: {job.last_line}"
                for job in running
            ]
            err.write(f"[polycell run] waiting for {len(lines)} job(s)\n" + "\n".join(lines) + "\n")
            err.flush()
        save(force=False)

    problems: list[str] = []  # each fails the run
    errors: list[str] = []  # fail it unless --allow-errors
    code_cells = sum(1 for cell in nb.cells if cell.cell_type == "code")
    try:
        with client.setup_kernel():
            client.start_following()
            try:
                number = 0
                for index, cell in enumerate(nb.cells):
                    if cell.cell_type != "code":
                        continue
                    number += 1
                    first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
                    err.write(f"[polycell run] cell {index + 1} ({number}/{code_cells}): {first[:70]}\n")
                    err.flush()
                    client.running_index = index
                    try:
                        reply = client.execute_cell(cell, index)
                    except CellTimeoutError:
                        problems.append(f"cell {index + 1} did not finish within {timeout:g} s")
                        break
                    except CellExecutionError as exc:
                        errors.append(f"cell {index + 1} failed: {_error_line(exc)}")
                        break
                    finally:
                        client.running_index = -1
                        save()
                    if any(o.get("output_type") == "error" for o in reply.outputs):
                        errors.append(f"cell {index + 1} failed")
                settled = client.settle_jobs(timeout, waiting)
                errors += settled.failed
                problems += settled.unfinished
            except KeyboardInterrupt:
                client.kill_running_jobs()
                save()
                err.write("[polycell run] interrupted: the kernel's jobs were killed\n")
                return 130
            finally:
                client.stop_following()
    except DeadKernelError as exc:
        problems.append(f"the kernel died: {exc}")
    save()
    for problem in errors + problems:
        err.write(f"[polycell run] {problem}\n")
    if problems or (errors and not allow_errors):
        return 1
    err.write(
        f"[polycell run] done: {code_cells} cell(s), {len(client.watch.jobs) if client.watch else 0} job(s)\n"
    )
    return 0


def _tagged(text: str, tag: str) -> str:
    """Each line of `text` after `tag`, ended; of a line a progress bar redrew with ``\r``, its last state."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return "".join(f"{tag}{line.rsplit(chr(13), 1)[-1]}\n" for line in lines)


def _error_line(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", ""), getattr(exc, "evalue", "")
    if ename:
        return f"{ename}: {evalue}"
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__
