"""Output routing: what a job writes goes to its journal, never to the foreground cell.

``print`` writes to ``sys.stdout`` and ``display`` calls the shell's display
publisher, whichever thread or task they run in. While the extension is loaded
both are wrapped: when `current_job` is set in the calling context (a runner
sets it for the job's code), the output becomes a record in that job's
journal; otherwise it goes where it always went. The journal's followers
(`polycell.iopub`) then send it to the cell that started the job. Threads a job
starts inherit its context, so their output is the job's too.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from polycell.cell import cell_traceback_start
from polycell.job import Job, current_job
from polycell.journal import OutputJournal, error_record

__all__ = ["JobAwareStream", "OutputRouter", "RoutedStream"]


class RoutedStream:
    """Stands in for ``sys.stdout``/``sys.stderr``: text goes to the sink the calling
    context names (``sink()`` returns an object with ``write(name, text)``), else through.

    Every attribute it does not define (``set_parent``, ``fileno``, ``encoding``,
    ipykernel's ``OutStream`` internals) is the wrapped stream's. The kernel routes
    to the current job's journal (`JobAwareStream`); a dask worker routes to the
    running cell's event sink (`polycell.dask_worker`).
    """

    def __init__(self, name: str, inner: TextIO, sink: Callable[[], Any]) -> None:
        self._polycell_name = name
        self._polycell_inner = inner
        self._polycell_sink = sink

    def routes_to_job(self) -> bool:
        """Whether text written now, from this context, goes to a job rather than through."""
        return self._polycell_sink() is not None

    def write(self, text: str) -> int:
        target = self._polycell_sink()
        if target is None:
            return self._polycell_inner.write(text)
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        target.write(self._polycell_name, text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self._polycell_sink() is None and _has_unsent_output(self._polycell_inner):
            self._polycell_inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._polycell_inner, name)


def _has_unsent_output(stream: Any) -> bool:
    """False only when `stream` is an ipykernel ``OutStream`` holding nothing to send.

    ipykernel's ``OutStream.flush`` waits for a round trip to its iopub thread
    even when nothing was written, and ipykernel flushes both streams several
    times per cell: about a quarter of a trivial cell's round trip. Private
    reach, written against ipykernel 7.4.0 (tests/test_kernel.py::
    test_outstream_marks_unsent_output_as_routing_expects fails if it moves):
    ``write`` sets ``_flush_pending`` until the iopub thread's ``_flush`` takes
    the buffers. A stream without it (another version, a plain file) is always
    flushed.
    """
    return getattr(stream, "_flush_pending", True) is not False


def _current_journal() -> OutputJournal | None:
    job = current_job.get()
    return job.journal if job is not None else None


class JobAwareStream(RoutedStream):
    """The kernel's ``sys.stdout``/``sys.stderr``: a job's text to its journal, the rest through."""

    def __init__(self, name: str, inner: TextIO) -> None:
        super().__init__(name, inner, _current_journal)


def _display_record(
    data: dict[str, Any], metadata: dict[str, Any] | None, transient: dict[str, Any] | None, update: bool
) -> dict[str, Any]:
    content = {"data": data, "metadata": metadata or {}, "transient": transient or {}}
    return {"msg_type": "update_display_data" if update else "display_data", "content": content}


_thread_start = threading.Thread.start


def _start_in_job_context(thread: threading.Thread) -> None:
    """`Thread.start` that, called from a job, runs the new thread in that job's context.

    Before Python 3.14 a new thread starts with an empty context, so the output of
    a thread a job starts (a worker pool, a progress bar's monitor) would land in
    the cell that ran last: the very problem polycell exists to fix.
    """
    if current_job.get() is not None:
        context = contextvars.copy_context()
        run = thread.run
        thread.run = lambda: context.run(run)  # type: ignore[method-assign]
    _thread_start(thread)


class OutputRouter:
    """Installs and removes the wrappers on one shell; one per loaded extension."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._installed = False
        self._saved: dict[str, Any] = {}
        #: Where output with no job in its context goes instead of the kernel; set
        #: only in a forked child, where every output is the one job's.
        self.default_job: Job | None = None

    def install(self) -> None:
        if self._installed:
            return
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            self._saved[name] = stream
            setattr(sys, name, JobAwareStream(name, stream))
        pub = self.shell.display_pub
        original_publish, original_clear = pub.publish, pub.clear_output
        self._saved["display_pub"] = (pub, original_publish, original_clear)

        def publish(
            data: dict[str, Any], metadata: dict[str, Any] | None = None, *args: Any, **kwargs: Any
        ) -> None:
            job = current_job.get() or self.default_job
            if job is None:
                return original_publish(data, metadata, *args, **kwargs)
            job.journal.append(
                _display_record(data, metadata, kwargs.get("transient"), bool(kwargs.get("update")))
            )
            return None

        def clear_output(wait: bool = False) -> None:
            job = current_job.get() or self.default_job
            if job is None:
                return original_clear(wait)
            job.journal.append({"msg_type": "clear_output", "content": {"wait": wait}})
            return None

        pub.publish = publish
        pub.clear_output = clear_output
        threading.Thread.start = _start_in_job_context  # type: ignore[method-assign]
        self._installed = True

    def uninstall(self) -> None:
        if not self._installed:
            return
        for name in ("stdout", "stderr"):
            current = getattr(sys, name)
            if isinstance(current, JobAwareStream):
                setattr(sys, name, self._saved[name])
        pub, _publish, _clear = self._saved["display_pub"]
        # Dropping the instance attributes uncovers the class's own methods again.
        pub.__dict__.pop("publish", None)
        pub.__dict__.pop("clear_output", None)
        if threading.Thread.start is _start_in_job_context:
            threading.Thread.start = _thread_start  # type: ignore[method-assign]
        self._installed = False


def write_result(job: Job, shell: Any, value: Any, execution_count: int) -> None:
    """Record the value of a job's last expression as its cell's ``Out[n]``."""
    if value is None:
        return
    data, metadata = shell.display_formatter.format(value)
    if not data:
        return
    job.journal.append(
        {
            "msg_type": "execute_result",
            "content": {"data": data, "metadata": metadata, "execution_count": execution_count},
        }
    )


def write_error(job: Job, shell: Any, exc: BaseException, cell_filename: str) -> None:
    """Record an exception with IPython's usual traceback, starting at the cell's own frame."""
    tb = cell_traceback_start(exc.__traceback__, cell_filename)
    try:
        stb = shell.InteractiveTB.structured_traceback(type(exc), exc, tb)
    except Exception:  # noqa: BLE001 - a broken formatter must not lose the error
        import traceback

        stb = traceback.format_exception(type(exc), exc, tb)
    job.journal.append(error_record(exc, stb))
