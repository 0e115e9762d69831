"""A JupyterLab notebook in headless Chromium, driven the way a user drives it.

Cells are clicked and run with Shift+Enter, the kernel is interrupted with the
toolbar's stop button, and everything is checked in the page's DOM. Every wait
is a Playwright `expect` with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from lab_server import DISPLAY_NAMES, LabServer
from playwright.sync_api import ConsoleMessage, Locator, Page, expect

# Generous: the machine may be busy; a healthy run takes a fraction of this.
TIMEOUT_MS = 60_000


class NotebookPage:
    """One notebook open in JupyterLab, and what the browser console said meanwhile."""

    def __init__(
        self, page: Page, lab: LabServer, path: str, *, kernel: str, cell_count: int, artifacts: Path
    ) -> None:
        self.page = page
        self.kernel = kernel
        self.lab = lab
        self.path = path
        self.cell_count = cell_count
        self.artifacts = artifacts
        self.console_errors: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.console_errors.append(f"page error: {error}"))
        # Reloading a notebook with unsaved outputs raises a "leave the page?" dialog: leave.
        page.on("dialog", lambda dialog: dialog.accept())

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    # -- the page -----------------------------------------------------------------------

    def open(self) -> None:
        self.page.goto(self.lab.notebook_url(self.path, workspace=Path(self.path).stem))
        self.wait_ready()

    def reload(self) -> None:
        self.page.reload()
        self.wait_ready()

    def wait_ready(self) -> None:
        """The notebook's cells are on the page and its kernel is connected and idle.

        The status bar says "<kernel> | Idle" only once the page is connected to the
        kernel; the toolbar's indicator already says idle before a kernel exists, and
        cells run then would silently not run.
        """
        expect(self.cells).to_have_count(self.cell_count, timeout=TIMEOUT_MS)
        status = self.page.locator(".jp-StatusBar-TextItem", has_text=f"{DISPLAY_NAMES[self.kernel]} | ")
        expect(status).to_have_text(f"{DISPLAY_NAMES[self.kernel]} | Idle", timeout=TIMEOUT_MS)

    @property
    def cells(self) -> Locator:
        return self.page.locator(".jp-Notebook .jp-Cell")

    def cell(self, index: int) -> Locator:
        return self.cells.nth(index)

    def outputs(self, index: int) -> Locator:
        """The output area of cell `index` (everything shown under it)."""
        return self.cell(index).locator(".jp-OutputArea")

    def output_text(self, index: int) -> str:
        return "\n".join(self.cell(index).locator(".jp-OutputArea-output").all_inner_texts()).strip()

    def run(self, index: int) -> None:
        """Click into the cell's editor and press Shift+Enter, as a user would."""
        self.cell(index).locator(".cm-content").click()
        self.page.keyboard.press("Shift+Enter")

    def expect_running(self, index: int) -> None:
        """The cell is still executing: its prompt shows ``[*]``."""
        expect(self.cell(index).locator(".jp-InputPrompt")).to_contain_text("*", timeout=TIMEOUT_MS)

    def expect_output(self, index: int, text: str | re.Pattern[str]) -> None:
        expect(self.outputs(index)).to_contain_text(text, timeout=TIMEOUT_MS)

    def interrupt(self) -> None:
        """Press the toolbar's ■ (interrupt the kernel)."""
        self.page.locator(".jp-NotebookPanel-toolbar [data-command='notebook:interrupt-kernel']").click()

    # -- evidence -----------------------------------------------------------------------

    def screenshot(self, name: str) -> Path:
        """Save the notebook panel (toolbar and cells) as `name`.png in the artifacts dir."""
        path = self.artifacts / f"{name}.png"
        # Written here, not with screenshot(path=...): that would start a thread pool in
        # Playwright's event loop which outlives the test and trips the leak check.
        path.write_bytes(self.page.locator(".jp-NotebookPanel").first.screenshot())
        return path

    def polycell_console_errors(self) -> list[str]:
        return [text for text in self.console_errors if "polycell" in text.lower()]


# The `open_notebook` fixture: open_notebook(name, cells, kernel="python3") -> NotebookPage.
OpenNotebook = Callable[..., NotebookPage]
