"""What a test may leave running: nothing, except the long-lived processes registered here.

The autouse `no_leaks` fixture (tests/conftest.py) fails any test that leaves a
child process or a thread of its own behind. A few fixtures legitimately keep a
process across tests (the test Dask cluster, a JupyterLab server, a browser, the
conformance suite's kernel); they register it in `RESIDENTS` for as long as it
lives. The only threads exempt are those a library keeps for the life of the
process, named in `RESIDENT_THREADS`.
"""

from __future__ import annotations

import contextlib
import threading
import time

import psutil

#: pid -> whether its descendants are exempt too.
RESIDENTS: dict[int, bool] = {}

#: Thread name prefixes of a library's process-wide singletons, which live until exit:
#: distributed runs every future's done-callback on one such thread (distributed 2026.8).
RESIDENT_THREADS = ("Dask-Callback-Thread",)


def _exempt_pids() -> set[int]:
    exempt = set()
    for pid, with_descendants in list(RESIDENTS.items()):
        exempt.add(pid)
        if with_descendants:
            with contextlib.suppress(psutil.Error):
                exempt.update(p.pid for p in psutil.Process(pid).children(recursive=True))
    return exempt


def leftovers(threads_before: set[threading.Thread], timeout: float = 20) -> str | None:
    """Wait up to `timeout` for non-resident children and new threads to end; describe what remains."""
    deadline = time.monotonic() + timeout
    while True:
        exempt = _exempt_pids()
        children = []
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if p.pid not in exempt and p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    children.append(p)
        threads = [
            t
            for t in threading.enumerate()
            if t not in threads_before and t.is_alive() and not t.name.startswith(RESIDENT_THREADS)
        ]
        if not children and not threads:
            return None
        if time.monotonic() > deadline:
            names = []
            for p in children:
                with contextlib.suppress(psutil.Error):
                    names.append((p.pid, p.name()))
            return f"left behind: processes {names}, threads {[t.name for t in threads]}"
        time.sleep(0.05)
