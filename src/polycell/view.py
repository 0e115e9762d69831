"""How jobs look: the ``%jobs`` table and a job's handle, as plain text and HTML.

Plain text goes to terminals (jupyter console, ``polycell jobs``) and HTML to
notebooks; both are built from the same rows so they never disagree.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any, NamedTuple

from polycell.job import Job, JobState

__all__ = [
    "HANDLE_MIME",
    "HandleState",
    "format_elapsed",
    "handle_bundle",
    "handle_data",
    "handle_html",
    "handle_state",
    "handle_text",
    "job_row",
    "jobs_html",
    "jobs_text",
    "rows_text",
]

COLUMNS = ("id", "name", "mode", "status", "elapsed", "last output")
_STATUS_COLOURS = {
    JobState.PENDING: "#6c757d",
    JobState.RUNNING: "#0d6efd",
    JobState.DONE: "#198754",
    JobState.FAILED: "#dc3545",
    JobState.KILLED: "#fd7e14",
}
_LAST_LINE_WIDTH = 60


def format_elapsed(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def status_text(job: Job) -> str:
    return _status_label(job.status, job.kill_requested)


def _status_label(status: JobState, kill_requested: bool) -> str:
    return "killing" if kill_requested and not status.ended else str(status)


def make_row(
    *,
    job_id: int,
    name: str,
    mode: str,
    status: str,
    elapsed: float,
    last_output: str,
    info: dict[str, Any],
    where: str = "",
) -> dict[str, Any]:
    """A table row as a plain dict: for live jobs, jobs read back from disk, and ``--json``."""
    if len(last_output) > _LAST_LINE_WIDTH:
        last_output = last_output[: _LAST_LINE_WIDTH - 1] + "…"
    return {
        "id": job_id,
        "name": name,
        "mode": mode,
        "where": where,
        "status": status,
        "elapsed": round(elapsed, 3),
        "last_output": last_output,
        "info": {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))},
    }


def job_row(job: Job) -> dict[str, Any]:
    info = dict(job.info)  # runner threads add keys while the control thread reads
    return make_row(
        job_id=job.id,
        name=job.name,
        mode=job.mode,
        status=status_text(job),
        elapsed=job.elapsed,
        last_output=job.last_line(),
        info=info,
        # Where it runs, when that is not this kernel: a dask worker, a map's worker pool.
        where=str(info.get("worker") or info.get("workers") or ""),
    )


def _cells(row: dict[str, Any]) -> list[str]:
    return [
        str(row["id"]),
        row["name"],
        f"{row['mode']} @ {row['where']}" if row.get("where") else row["mode"],  # older stored rows lack it
        row["status"],
        format_elapsed(row["elapsed"]),
        row["last_output"],
    ]


def jobs_text(jobs: Sequence[Job], extra: Sequence[str] = ()) -> str:
    return rows_text([job_row(job) for job in jobs], extra)


def rows_text(job_rows: Sequence[dict[str, Any]], extra: Sequence[str] = ()) -> str:
    """The plain-text table of `job_row` dicts: also what ``polycell jobs`` prints from a reply."""
    if not job_rows:
        return "\n".join(["no jobs", *extra])
    rows = [list(COLUMNS)] + [_cells(row) for row in job_rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join([*lines, *extra])


def _badge(status: JobState, label: str) -> str:
    colour = _STATUS_COLOURS[status]
    return (
        f'<span style="color:white;background:{colour};border-radius:3px;'
        f'padding:0 4px;font-size:90%">{html.escape(label)}</span>'
    )


def jobs_html(jobs: Sequence[Job], extra: Sequence[str] = ()) -> str:
    if not jobs:
        body = "<p><i>no jobs</i></p>"
    else:
        head = "".join(f"<th style='text-align:left'>{c}</th>" for c in COLUMNS)
        rows = []
        for job in jobs:
            cells = _cells(job_row(job))
            cells_html = [html.escape(c) for c in cells]
            cells_html[3] = _badge(job.status, cells[3])
            cells_html[5] = f"<code>{cells_html[5]}</code>"
            rows.append(
                "<tr>" + "".join(f"<td style='text-align:left'>{c}</td>" for c in cells_html) + "</tr>"
            )
        body = (
            f"<table class='polycell-jobs'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
    tail = "".join(f"<div><small>{html.escape(line)}</small></div>" for line in extra)
    return body + tail


class HandleState(NamedTuple):
    """What a handle shows of its job, read once: its text, HTML and data agree."""

    status: JobState
    label: str  # "killing" while a kill is on its way
    elapsed: float

    @property
    def done(self) -> bool:
        return self.status.ended


def handle_state(job: Job, *, ended_as_running: bool = False) -> HandleState:
    """The job's handle as of now.

    With `ended_as_running`, a job that has already ended is shown running: a handle
    that says a job ended promises that all the job's output came before it (headless
    runs stop listening to the job there), and the first handle of a job that ended
    as it started comes before that output.
    """
    status = job.status
    if ended_as_running and status.ended:
        return HandleState(JobState.RUNNING, str(JobState.RUNNING), job.elapsed)
    return HandleState(status, _status_label(status, job.kill_requested), job.elapsed)


def handle_text(job: Job, state: HandleState) -> str:
    text = f"[polycell] job {job.id} '{job.name}' ({job.mode}): {state.label}"
    if state.done:
        text += f" after {format_elapsed(state.elapsed)}"
    return text


#: The job handle's own MIME type, which the JupyterLab extension renders live (a status
#: badge, a ticking clock, a Kill button); text/plain and text/html stay for other front ends.
HANDLE_MIME = "application/vnd.polycell.job+json"


def handle_data(job: Job, kernel_process: str, state: HandleState) -> dict[str, Any]:
    """The handle as data; `kernel_process` tells a front end whether the job is of the kernel it talks to
    (job ids start again at 1 in every kernel process)."""
    return {
        "job": job.id,
        "name": job.name,
        "mode": job.mode,
        "status": state.label,
        "done": state.done,
        "elapsed": state.elapsed,
        "kernel_process": kernel_process,
        "cell_id": job.info.get("cell_id"),
    }


def handle_bundle(job: Job, kernel_process: str, state: HandleState | None = None) -> dict[str, Any]:
    """The handle as a display's data: text for a terminal, HTML for a front end without
    polycell's extension, and the data that extension renders live; of `state`, or as of now."""
    if state is None:
        state = handle_state(job)
    return {
        "text/plain": handle_text(job, state),
        "text/html": handle_html(job, state),
        HANDLE_MIME: handle_data(job, kernel_process, state),
    }


def handle_html(job: Job, state: HandleState) -> str:
    elapsed = f" after {format_elapsed(state.elapsed)}" if state.done else ""
    return (
        f"<div class='polycell-handle' data-job='{job.id}' style='font-family:monospace'>"
        f"⧉ job <b>{job.id}</b> <i>{html.escape(job.name)}</i> ({html.escape(job.mode)}) "
        f"{_badge(state.status, state.label)}{html.escape(elapsed)}</div>"
    )
