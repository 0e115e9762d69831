"""Shared fixtures: real kernels, and a check that no test leaves a thread or process behind."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from kernel_session import KernelSession


@pytest.fixture
def kernel() -> Iterator[KernelSession]:
    """A stock ipykernel with ``%load_ext polycell`` already run."""
    session = KernelSession()
    try:
        yield session
    finally:
        session.close()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves threads of its own or child processes running."""
    threads_before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 10
    while True:
        children = [
            p
            for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        ]
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        if not children and not threads:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"left behind: processes {[p.pid for p in children]}, threads {[t.name for t in threads]}"
            )
        time.sleep(0.05)
