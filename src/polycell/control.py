"""Answering ``polycell_request`` messages on the kernel's control channel.

The control channel is served by a thread of its own in ipykernel 7, so a
request there is answered even while the main thread is stuck in a long call
(that releases the GIL): this is how ``polycell jobs``, ``kill``, ``tail`` and
``top`` see a busy kernel. The request is signed with the kernel's own key
like every Jupyter message, and needs no new port.

Request content: ``{"action": "jobs"}``, ``{"action": "kill", "job": N}`` or
``{"action": "tail", "job": N, "since": P}``. The reply (``polycell_reply``)
has ``status`` "ok" or "error" (with ``evalue``, one line).

``jobs`` lists every job (`polycell.view.job_row`: its ``info`` has the
``cell_id`` and ``request``, the msg_id of the request that started it) and,
under ``cells``, the last request each of those cells ran: a front end
replays a job into its cell only while the cell still shows that request's
output. ``tail`` answers with the job's records after journal position P,
the position they reach, whether that was the journal's end (a reply
is at most `TAIL_MAX_CHARS`; see `OutputJournal.since`), and the job's
handle as its cell shows it (`polycell.view.handle_bundle`); live messages carry
positions too (`polycell.iopub`), so a client that replays and then follows
keeps each output once. The client polls, and nothing is kept per client
here, so a client that goes away costs nothing. ``polycell tail`` and the
JupyterLab extension use the same requests.
"""

from __future__ import annotations

import os
from typing import Any

from polycell import view
from polycell.job import JobError, one_line
from polycell.job_table import JobTable

__all__ = ["REPLY_TYPE", "REQUEST_TYPE", "ControlHandler", "answer"]

REQUEST_TYPE = "polycell_request"
REPLY_TYPE = "polycell_reply"
#: Text per tail reply; a client behind gets the rest on its next poll.
TAIL_MAX_CHARS = 1_000_000


def _error(message: str) -> dict[str, Any]:
    return {"status": "error", "ename": "PolycellError", "evalue": message}


def _job_id(request: dict[str, Any]) -> int:
    value = request.get("job")
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobError(f"{request.get('action')}: 'job' must be a job id (a whole number), not {value!r}")
    return value


def answer(
    table: JobTable, request: dict[str, Any], cells: dict[str, str] | None = None, kernel_process: str = ""
) -> dict[str, Any]:
    """The reply content for one request; never raises.

    `cells` maps a cell id to the msg_id of the last request that cell ran (a
    plain dict: other threads store into it, and copying it is one step under
    the GIL); `kernel_process` is the tag the kernel's job handles carry to say
    they are of this kernel process (`polycell.view.handle_data`).
    """
    action = request.get("action")
    try:
        if action == "jobs":
            rows = [view.job_row(job) for job in table]
            ids = {row["info"].get("cell_id") for row in rows}
            last = {cell: msg_id for cell, msg_id in dict(cells or {}).items() if cell in ids}
            return {
                "status": "ok",
                "pid": os.getpid(),
                "kernel_process": kernel_process,
                "jobs": rows,
                "cells": last,
            }
        if action == "kill":
            job = table[_job_id(request)]
            outcome = job.kill()
            return {"status": "ok", "outcome": outcome.value, "job": view.job_row(job)}
        if action == "tail":
            job = table[_job_id(request)]
            since = request.get("since", 0)
            if isinstance(since, bool) or not isinstance(since, int) or since < 0:
                raise JobError(f"tail: 'since' must be a journal position (a number ≥ 0), not {since!r}")
            records, position, caught_up, ended = job.journal.since(since, TAIL_MAX_CHARS)
            return {
                "status": "ok",
                "records": records,
                "position": position,
                "caught_up": caught_up,
                "ended": ended,
                "job": view.job_row(job),
                "handle": view.handle_bundle(job, kernel_process),
            }
    except JobError as exc:
        return _error(str(exc))
    except Exception as exc:  # noqa: BLE001 - a client waits for a reply: always send one
        return _error(f"{action}: {one_line(exc)}")
    return _error(f"unknown action {action!r}: use jobs, kill or tail")


class ControlHandler:
    """Registers `answer` as the kernel's handler for ``polycell_request``."""

    def __init__(
        self, table: JobTable, cells: dict[str, str] | None = None, kernel_process: str = ""
    ) -> None:
        self.table = table
        self.cells = cells if cells is not None else {}
        self.kernel_process = kernel_process
        self.kernel: Any = None

    def install(self, kernel: Any) -> None:
        # ipykernel 7.4.0 internals: Kernel.__init__ builds `control_handlers`
        # (msg_type -> handler(stream, idents, msg)) and `process_control` looks
        # the msg_type up there, on the control thread. There is no public way to
        # add a message type; tests/test_cli.py::test_ipykernel_control_dispatch_is_where_we_reach
        # fails if this moves.
        kernel.control_handlers[REQUEST_TYPE] = self._handle
        self.kernel = kernel

    def uninstall(self) -> None:
        if self.kernel is not None and self.kernel.control_handlers.get(REQUEST_TYPE) == self._handle:
            del self.kernel.control_handlers[REQUEST_TYPE]
        self.kernel = None

    def _handle(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        content = parent.get("content")
        if isinstance(content, dict):
            reply = answer(self.table, content, self.cells, self.kernel_process)
        else:
            reply = _error("a polycell_request's content must be an object")
        self.kernel.session.send(stream, REPLY_TYPE, reply, parent, ident)
