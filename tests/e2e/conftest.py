"""Fixtures for the browser tests: one JupyterLab server and one headless Chromium per module.

Starting JupyterLab and Chromium takes seconds, so both live for a whole test
module, registered as residents of the suite's leak check (tests/leak_check.py)
while they live. The server itself is exempt but not its children (every kernel
a test starts must be gone when the test ends), and the Playwright driver is exempt
with its browser processes.
Both are checked at module teardown: stopping them must leave nothing behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
from lab_server import LabServer

from leak_check import RESIDENTS

if TYPE_CHECKING:
    from notebook_page import OpenNotebook
    from playwright.sync_api import Browser

CHROMIUM = Path("/usr/bin/chromium")
# The browser the tests drive is Debian's chromium (scripts/install-browser); Playwright's
# own browsers are never downloaded.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "e2e"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """A JupyterLab server with its own Jupyter dirs, kernelspecs and root dir."""
    server = LabServer(tmp_path_factory.mktemp("jupyterlab"))
    server.start()
    assert server.process is not None
    RESIDENTS[server.process.pid] = False
    try:
        yield server
    finally:
        RESIDENTS.pop(server.process.pid, None)
        left = server.stop()
        if left:
            pytest.fail(f"JupyterLab left processes {left} running after shutdown")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium driven by Playwright (sync API); the tests skip without them."""
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM}: run scripts/install-browser (as root)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    before = {p.pid for p in psutil.Process().children()}
    playwright = sync_playwright().start()
    drivers = [p for p in psutil.Process().children() if p.pid not in before]
    for driver in drivers:
        RESIDENTS[driver.pid] = True
    try:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        tree = list(drivers)
        for driver in drivers:
            with contextlib.suppress(psutil.Error):
                tree += driver.children(recursive=True)
        playwright.stop()
        for driver in drivers:
            RESIDENTS.pop(driver.pid, None)
        _, alive = psutil.wait_procs(tree, timeout=10)
        if alive:
            pytest.fail(f"the browser left processes {[p.pid for p in alive]} running")


@pytest.fixture
def open_notebook(browser: Browser, lab: LabServer, request: pytest.FixtureRequest) -> Iterator[OpenNotebook]:
    """Write a notebook of the given cells, open it in a fresh browser context, and clean up.

    At the end the kernels are shut down through the server's API, so the leak
    check can prove no kernel outlived the test.
    """
    from notebook_page import NotebookPage

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    opened: list[NotebookPage] = []
    context = browser.new_context(viewport={"width": 1240, "height": 1000})

    def open_(name: str, cells: list[str], kernel: str = "polycell", app: str = "lab") -> NotebookPage:
        path = lab.write_notebook(name, cells, kernel)
        notebook = NotebookPage(
            context.new_page(), lab, path, kernel=kernel, cell_count=len(cells), artifacts=ARTIFACTS, app=app
        )
        opened.append(notebook)
        notebook.open()
        return notebook

    try:
        yield open_
    finally:
        for notebook in opened:
            with contextlib.suppress(Exception):
                notebook.screenshot(f"{request.node.name}-last")
        context.close()
        lab.shutdown_kernels()
