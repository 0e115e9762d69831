"""Shared fixtures: real kernels, and a check that no test leaves a thread or process behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from kernel_session import POLYCELL_KERNEL, KernelSession, kernel_env
from leak_check import RESIDENTS, leftovers

# A shell starts a background command (``pytest &``, a CI step run that way)
# with SIGINT ignored, and every process it starts inherits that: `polycell
# tail` would shrug off the Ctrl-C its test sends. Tests run as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_CLUSTER_SCRIPT = """
import sys
from distributed import LocalCluster
cluster = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0")
print(cluster.scheduler_address, flush=True)
sys.stdin.read()  # until the fixture closes our stdin
cluster.close()
"""


@pytest.fixture
def kernel() -> Iterator[KernelSession]:
    """A stock ipykernel with ``%load_ext polycell`` already run."""
    session = KernelSession()
    try:
        yield session
    finally:
        session.close()


@pytest.fixture(params=["extension", "kernel"])
def any_kernel(request: pytest.FixtureRequest) -> Iterator[KernelSession]:
    """Each test twice: a stock ipykernel with ``%load_ext polycell``, and the polycell kernel."""
    if request.param == "extension":
        session = KernelSession()
    else:
        session = KernelSession(POLYCELL_KERNEL, load_ext=False)
    try:
        yield session
    finally:
        session.close()


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[str]:
    """A real LocalCluster(n_workers=2, processes=True, threads_per_worker=1); yields its address.

    It runs in a process of its own, with this checkout's polycell importable
    (the scheduler and workers unpickle polycell's worker functions), and is
    closed at the end of the session.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLUSTER_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=kernel_env(),
    )
    RESIDENTS[proc.pid] = True
    try:
        address = proc.stdout.readline().strip() if proc.stdout else ""
        if not address.startswith("tcp://"):
            pytest.fail(f"the test Dask cluster did not start (said {address!r})")
        yield address
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        RESIDENTS.pop(proc.pid, None)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves threads of its own or child processes running."""
    threads_before = set(threading.enumerate())
    yield
    problem = leftovers(threads_before)
    if problem:
        pytest.fail(problem)
