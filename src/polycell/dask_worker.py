"""What runs on a dask worker for polycell: a background cell, a map chunk, and a kill.

The kernel ships functions of this module to the workers by reference, so
polycell must be importable there (it is on a `LocalCluster`; a remote cluster
needs ``pip install polycell`` next to dask).

Output capture is per task, not per process: ``sys.stdout``/``sys.stderr`` of
the worker are replaced once by streams that send a write to the *sink* of
the task running in the calling context (a context variable), and pass it
through otherwise, so tasks running side by side on one worker's threads keep
their output apart. ``IPython.display.display`` is wrapped the same way, so
rich output of a cell reaches the notebook as ``display_data``.

A cell's sink publishes its records as dask events (``Worker.log_event`` on
the cell's topic; the kernel's client subscribes to it), numbered so the
kernel can tell when it has received all of them. A map chunk's sink just
collects records and returns them with the chunk's results.

Two reaches into dependencies' internals live here, each with a test in
tests/test_dask.py that fails if it moves: ``IPython.core.display_functions.display``
is replaced on the worker (IPython 9.18: ``IPython.display.display`` is that same
function, re-exported), and ``Worker.loop`` is used as a tornado ``IOLoop``
(``add_callback``/``call_later``; distributed 2026.8.0 ``Worker.log_event`` uses
it the same way).
"""

from __future__ import annotations

import builtins
import contextvars
import datetime
import linecache
import numbers
import signal
import sys
import threading
import time
import traceback
from typing import Any

import cloudpickle

from polycell.cell import cell_traceback_start
from polycell.job import JobKilled, one_line
from polycell.journal import error_record
from polycell.program_output import install_program_capture
from polycell.routing import RoutedStream
from polycell.stream_text import StreamText
from polycell.thread import KillSwitch, install_interruptible_sleep, remove_interruptible_sleep

__all__ = ["dask_setup", "interrupt_cell", "map_chunk", "run_cell"]

Record = dict[str, Any]

_sink: contextvars.ContextVar[Any] = contextvars.ContextVar("polycell_dask_sink", default=None)
_install_lock = threading.Lock()
_programs_captured = False
#: Stream text goes out as an event this long after it was written (or at
#: `polycell.stream_text.STREAM_CHUNK_CHARS`, whichever comes first).
_EVENT_SECONDS = 0.1
#: IPython's traceback colours for a dask cell's error (ipykernel 7.4's default ``colors``).
TRACEBACK_THEME = "neutral"


def dask_setup(worker: Any) -> None:
    """Preload of the worker processes of a `LocalCluster` the kernel starts: ignore SIGINT.

    Those processes are in the kernel's process group, which the kernel's
    interrupt (■) signals as a whole; a KeyboardInterrupt there would take a
    worker down with the foreground cell. A worker process runs its preloads
    on its main thread; a threaded worker inside the kernel does not, and is
    left alone.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _install_capture() -> None:
    """Wrap the worker's streams and ``display`` once per worker process."""
    with _install_lock:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            # Not `isinstance`: in a worker inside the kernel, the kernel's own
            # JobAwareStream is a RoutedStream too, and still needs this wrapper.
            if not (isinstance(stream, RoutedStream) and stream._polycell_sink == _sink.get):
                setattr(sys, name, RoutedStream(name, stream, _sink.get))
        global _programs_captured
        if not _programs_captured:
            install_program_capture()  # a cell's subprocess output goes with its prints
            _programs_captured = True
        try:
            import IPython.display
            from IPython.core import display_functions
        except ImportError:  # pragma: no cover - IPython is a dependency of polycell
            return
        # IPython 9.18: `display` is defined in display_functions and re-exported by
        # IPython.display; user code calls either name, so both are replaced.
        if not isinstance(display_functions.display, _CapturingDisplay):
            wrapper = _CapturingDisplay(display_functions.display)
            display_functions.display = wrapper
            IPython.display.display = wrapper  # type: ignore[attr-defined]


def _ipython_display() -> Any:
    """IPython's own ``display`` wherever this is unpickled (the kernel, or a worker)."""
    from IPython.core import display_functions

    display = display_functions.display
    return display.original if isinstance(display, _CapturingDisplay) else display


class _CapturingDisplay:
    """``IPython.display.display`` on the worker: rich output of a polycell task goes to its sink.

    A cell that imports ``display`` assigns it; when that name is sent back to
    the notebook it must become the notebook's own ``display`` again, hence
    `__reduce__`.
    """

    def __init__(self, original: Any) -> None:
        self.original = original

    def __call__(self, *objs: Any, **kwargs: Any) -> Any:
        sink = _sink.get()
        if sink is None or kwargs.get("display_id") is not None:
            return self.original(*objs, **kwargs)
        from IPython.core.formatters import DisplayFormatter

        formatter = DisplayFormatter()
        extra = kwargs.get("metadata") or {}
        for obj in objs:
            if kwargs.get("raw"):
                data, metadata = obj, dict(extra)
            else:
                data, metadata = formatter.format(
                    obj, include=kwargs.get("include"), exclude=kwargs.get("exclude")
                )
                if not data:
                    continue  # nothing to show (an _ipython_display_ that took over)
                metadata = {**metadata, **extra}  # given metadata wins, as in IPython's display
            sink.append({"msg_type": "display_data", "content": {"data": data, "metadata": metadata}})
        return None

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _ipython_display, ()


def plain(value: Any) -> Any:
    """`value` made of the exact types msgpack and JSON accept (dict, list, str, int, float...).

    ``Worker.log_event`` (distributed 2026.8.0) refuses anything else, even a
    numpy scalar or a tuple in a display's metadata; the notebook would turn
    them into the same JSON anyway. TypeError for a value with no plain form.
    """
    if value is None or type(value) in (str, int, float, bool, bytes):
        return value
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(item) for item in value]
    if isinstance(value, str):
        return str(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    item = getattr(value, "item", None)  # a numpy scalar that is no number (np.str_, np.bool_)
    if callable(item) and getattr(value, "shape", None) == ():
        return plain(item())
    raise TypeError(f"{type(value).__name__} cannot be sent as output")


class _Sink:
    """Collects a task's output records, merging consecutive text of one stream."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: list[Record] = []
        self._text = StreamText(self._emit_text)

    def write(self, name: str, text: str) -> None:
        if not text:
            return
        with self.lock:
            self._text.add(name, text)
            self._wrote_locked()

    def append(self, record: Record) -> None:
        with self.lock:
            self._flush_locked()
            self._emit_locked(record)

    def flush(self) -> None:
        with self.lock:
            self._flush_locked()

    def _wrote_locked(self) -> None:
        pass

    def _flush_locked(self) -> None:
        self._text.flush()

    def _emit_text(self, name: str, _tag: object, text: str) -> None:
        self._emit_locked({"msg_type": "stream", "content": {"name": name, "text": text}})

    def _emit_locked(self, record: Record) -> None:
        self.records.append(record)


class _EventSink(_Sink):
    """A cell's sink: records go to the kernel as numbered dask events, live."""

    def __init__(self, worker: Any, topic: str) -> None:
        super().__init__()
        self.worker = worker
        self.topic = topic
        self.sent = 0
        self._timer_armed = False
        self._since = time.monotonic()

    def _wrote_locked(self) -> None:
        if time.monotonic() - self._since >= _EVENT_SECONDS:
            self._flush_locked()
        elif not self._timer_armed:
            # Text printed just before a long pause must not wait for the next print.
            self._timer_armed = True
            self.worker.loop.add_callback(self.worker.loop.call_later, _EVENT_SECONDS, self._timer)

    def _timer(self) -> None:
        with self.lock:
            self._timer_armed = False
            self._flush_locked()

    def _flush_locked(self) -> None:
        super()._flush_locked()
        self._since = time.monotonic()

    def _emit_locked(self, record: Record) -> None:
        try:
            record = plain(record)
        except (TypeError, ValueError, RecursionError) as exc:
            reason = one_line(exc)
            note = (
                f"[polycell: a {record.get('msg_type')} output could not be sent from the worker: {reason}]\n"
            )
            record = {"msg_type": "stream", "content": {"name": "stderr", "text": note}}
        self.worker.log_event(self.topic, {"seq": self.sent, "record": record})
        self.sent += 1

    def event(self, msg: dict[str, Any]) -> None:
        """A control event (started, ended): not output, not counted."""
        self.worker.log_event(self.topic, msg)


# -- killing a running cell -----------------------------------------------------------------


_running: dict[str, KillSwitch] = {}
#: Topics killed before their cell started on this worker: if it starts here
#: later (a cancel that came too late), it stops before running user code.
#: Bounded, oldest first out: a topic whose cell never comes here is never removed.
_killed_early: dict[str, None] = {}
_KILLED_EARLY_MAX = 10_000
_running_lock = threading.Lock()


def interrupt_cell(topic: str) -> bool:
    """Run on the worker by ``Client.run``: raise `JobKilled` in the cell's thread.

    Works at the cell's next bytecode; a cell blocked in C code (``time.sleep``,
    a socket, a lock) only sees it when that call returns. True if the cell runs
    here; otherwise the topic is remembered so the cell never starts here.
    """
    with _running_lock:
        switch = _running.get(topic)
        if switch is None:
            _killed_early[topic] = None
            while len(_killed_early) > _KILLED_EARLY_MAX:
                del _killed_early[next(iter(_killed_early))]
            return False
    switch.pull()
    return True


# -- tasks --------------------------------------------------------------------------------------


def _format_error(exc: BaseException, filename: str) -> Record:
    """The error record a thread job would show: IPython's traceback, from the cell's frame on."""
    tb = cell_traceback_start(exc.__traceback__, filename)
    try:
        from IPython.core.ultratb import AutoFormattedTB

        # Context mode, as the kernel's own InteractiveTB (IPython 9.18 signature).
        lines = AutoFormattedTB(mode="Context", theme_name=TRACEBACK_THEME).structured_traceback(
            type(exc), exc, tb
        )
    except Exception:  # noqa: BLE001 - a broken formatter must not lose the error
        lines = traceback.format_exception(type(exc), exc, tb)
    return error_record(exc, lines)


def _pack(value: Any) -> tuple[bytes | None, str]:
    try:
        return cloudpickle.dumps(value), ""
    except Exception as exc:  # noqa: BLE001 - reported to the kernel by name
        return None, one_line(exc)


def run_cell(cell_bytes: bytes, names: dict[str, bytes], topic: str) -> dict[str, Any]:
    """Run a cell shipped by the kernel; its output goes out as events on `topic`.

    Returns the cell's status, its value and the names it assigned, each
    cloudpickled (or the reason it could not be), and how many output records
    were sent, so the kernel knows when it has all of them.
    """
    from distributed import get_worker

    worker = get_worker()
    _install_capture()
    sink = _EventSink(worker, topic)
    switch = KillSwitch()
    with _running_lock:
        _running[topic] = switch
        if topic in _killed_early:
            del _killed_early[topic]
            switch.pull()  # killed before it started: `armed` raises JobKilled at once
    sink.event({"started": worker.address, "thread": threading.current_thread().name})
    token = _sink.set(sink)
    status, value, exc_bytes = "done", None, None
    cell: Any = None
    try:
        cell = cloudpickle.loads(cell_bytes)
        linecache.cache[cell.filename] = (len(cell.source), None, cell.source.splitlines(True), cell.filename)
        namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        for name, data in names.items():
            namespace[name] = cloudpickle.loads(data)
        install_interruptible_sleep()  # a kill wakes the cell's time.sleep, as in thread mode
        try:
            with switch.armed():
                value = cell.run(namespace)
        finally:
            remove_interruptible_sleep()
    except BaseException as exc:  # noqa: BLE001 - the cell's failure goes back to its notebook
        if isinstance(exc, JobKilled) and switch.pulled:
            status = "killed"
        else:  # a JobKilled no kill raised (the cell awaited a killed job) is the cell's error
            status = "failed"
            sink.append(_format_error(exc, cell.filename if cell is not None else ""))
            exc_bytes, _ = _pack(exc)
    finally:
        _sink.reset(token)
        with _running_lock:
            _running.pop(topic, None)
    assigned: dict[str, bytes] = {}
    unsent: dict[str, str] = {}
    if status == "done":
        for name in cell.assigned:
            if name in namespace:
                data, why = _pack(namespace[name])
                if data is None:
                    unsent[name] = why
                else:
                    assigned[name] = data
    value_bytes, value_why = _pack(value) if value is not None else (None, "")
    if value_why:
        unsent["the cell's value"] = value_why
    sink.flush()
    sink.event({"ended": status, "records": sink.sent})
    return {
        "status": status,
        "records": sink.sent,
        "value": value_bytes,
        "names": assigned,
        "unsent": unsent,
        "exception": exc_bytes,
        "worker": worker.address,
    }


def map_chunk(func: Any, items: list[Any], start: int) -> dict[str, Any]:
    """Run `func` over one chunk of a map; the output it printed comes back with the results."""
    _install_capture()
    sink = _Sink()
    token = _sink.set(sink)
    results = []
    index = start
    try:
        for item in items:
            results.append(func(item))
            index += 1
    except Exception as exc:  # noqa: BLE001 - reported as the map's failure, with the index
        sink.flush()
        return {
            "status": "error",
            "index": index,
            "ename": type(exc).__name__,
            "evalue": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            "records": sink.records,
        }
    finally:
        _sink.reset(token)
    sink.flush()
    return {"status": "done", "start": start, "results": results, "records": sink.records}
