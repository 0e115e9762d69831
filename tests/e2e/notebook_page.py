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
from playwright.sync_api import TimeoutError as PlaywrightTimeout

# Generous: the machine may be busy; a healthy run takes a fraction of this.
TIMEOUT_MS = 60_000
#: A run the page sent shows "[*]" within this; one it dropped still shows "[ ]".
_SENT_MS = 10_000
_RUN_ATTEMPTS = 3
_PALETTE_ATTEMPTS = 5
_NOT_RUN = re.compile(r"^\s*\[ \]:\s*$")


class NotebookPage:
    """One notebook open in JupyterLab (or Notebook 7: `app="notebook"`), and what the page said.

    Besides the console's errors, it keeps every console message and every
    frame the page sent on its websockets, so a test can show what the page
    did not say or send.
    """

    def __init__(
        self,
        page: Page,
        lab: LabServer,
        path: str,
        *,
        kernel: str,
        cell_count: int,
        artifacts: Path,
        app: str = "lab",
    ) -> None:
        self.page = page
        self.kernel = kernel
        self.lab = lab
        self.path = path
        self.cell_count = cell_count
        self.artifacts = artifacts
        self.app = app
        self.console_errors: list[str] = []
        self.console_messages: list[str] = []
        self.sent_frames: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.console_errors.append(f"page error: {error}"))
        page.on("websocket", lambda ws: ws.on("framesent", self._on_frame))
        # Reloading a notebook with unsaved outputs raises a "leave the page?" dialog: leave.
        page.on("dialog", lambda dialog: dialog.accept())

    def _on_console(self, message: ConsoleMessage) -> None:
        self.console_messages.append(message.text)
        if message.type == "error":
            self.console_errors.append(message.text)

    def _on_frame(self, payload: str | bytes) -> None:
        self.sent_frames.append(payload if isinstance(payload, str) else payload.decode(errors="replace"))

    # -- the page -----------------------------------------------------------------------

    def open(self, workspace: str | None = None) -> None:
        if self.app == "notebook":
            self.page.goto(f"{self.lab.url}/notebooks/{self.path}?token={self.lab.token}")
        else:
            self.page.goto(self.lab.notebook_url(self.path, workspace=workspace or Path(self.path).stem))
        self.wait_ready()

    def open_again(self) -> NotebookPage:
        """The same notebook in another tab of the same browser (its own workspace)."""
        other = NotebookPage(
            self.page.context.new_page(),
            self.lab,
            self.path,
            kernel=self.kernel,
            cell_count=self.cell_count,
            artifacts=self.artifacts,
            app=self.app,
        )
        self._tabs += 1
        other.open(workspace=f"{Path(self.path).stem}-tab{self._tabs}")
        return other

    _tabs = 0

    def open_jobs_panel(self) -> Locator:
        """Open polycell's jobs panel from its tab in the left sidebar."""
        self.page.locator(".jp-SideBar li[title='Background jobs (polycell)']").click()
        panel = self.page.locator("#polycell-jobs")
        expect(panel).to_be_visible(timeout=TIMEOUT_MS)
        return panel

    def reload(self, *, busy: bool = False) -> None:
        self.page.reload()
        self.wait_ready(busy=busy)

    def wait_ready(self, *, busy: bool = False) -> None:
        """The notebook's cells are on the page and its kernel is connected and idle.

        The status bar says "<kernel> | Idle" only once the page is connected to the
        kernel; the toolbar's indicator already says idle before a kernel exists, and
        cells run then would silently not run.
        """
        expect(self.cells).to_have_count(self.cell_count, timeout=TIMEOUT_MS)
        if busy:  # a cell keeps the kernel busy: the page is connected once its cells show
            expect(self.page.locator(".jp-Notebook")).to_be_visible(timeout=TIMEOUT_MS)
            return
        if self.app == "notebook":
            # Notebook 7 has no status bar: its toolbar's kernel status says the same.
            status = self.page.locator(".jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator")
            expect(status).to_have_attribute("data-status", "idle", timeout=TIMEOUT_MS)
            return
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

    def run_to_end(self, index: int) -> None:
        """Run the cell and wait until it has finished: its prompt shows its number.

        A ``%%bg`` cell below starts as soon as this one has *started* (the polycell
        kernel does not wait for a running foreground cell), so one that uses what
        this cell defines must be run only after this.
        """
        prompt = self.cell(index).locator(".jp-InputPrompt")
        for _ in range(_RUN_ATTEMPTS):
            self.run(index)
            # A run sent shows "[*]" at once. One the page drops, because its kernel is not
            # connected yet (Notebook 7's toolbar says idle before that), leaves "[ ]": run it
            # again, as a user would; a dropped run ran nothing, so nothing runs twice.
            try:
                expect(prompt).not_to_have_text(_NOT_RUN, timeout=_SENT_MS)
                break
            except AssertionError:
                continue
        expect(prompt).to_have_text(re.compile(r"\[\d+\]"), timeout=TIMEOUT_MS)

    def run_from_palette(self, label: str, shows: Locator) -> None:
        """Run the command `label` from the command palette (Ctrl+Shift+C), as a user would.

        Notebook 7.2 (and not 7.5 or later) may give the focus back to the active cell
        a moment after the palette took it, with or without polycell, and the palette
        closes: then open it again, as a user would. `shows` is what the command shows.
        """
        palette = self.page.locator(".lm-CommandPalette-input")
        chosen = self.page.locator(".lm-CommandPalette-item.lm-mod-active", has_text=label)
        for _ in range(_PALETTE_ATTEMPTS):
            self.page.keyboard.press("Escape")  # command mode: the shortcut is the notebook's there too
            self.page.keyboard.press("Control+Shift+c")
            try:
                expect(palette).to_be_visible(timeout=_SENT_MS)
                palette.fill(label, timeout=_SENT_MS)
                expect(chosen).to_be_visible(timeout=_SENT_MS)
                self.page.keyboard.press("Enter")
                expect(shows).to_be_visible(timeout=_SENT_MS)
                return
            except (AssertionError, PlaywrightTimeout):
                continue
        raise AssertionError(f"the command palette never ran {label!r}")

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

    def screenshot_page(self, name: str) -> Path:
        """Save the whole page (sidebars, notifications) as `name`.png in the artifacts dir."""
        path = self.artifacts / f"{name}.png"
        path.write_bytes(self.page.screenshot())
        return path

    def polycell_console_errors(self) -> list[str]:
        return [text for text in self.console_errors if "polycell" in text.lower()]


# The `open_notebook` fixture: open_notebook(name, cells, kernel="python3") -> NotebookPage.
OpenNotebook = Callable[..., NotebookPage]
