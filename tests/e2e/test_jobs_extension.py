"""polycell's JupyterLab / Notebook 7 extension, in a real server and a real headless Chromium.

A job's output comes back into its own cell when the page reloads or another
tab opens the notebook, with every line once; the job handle is live (its
status, its clock, a Kill button); the jobs panel lists, kills and jumps to a
job's cell; a long job's end is a notification. A kernel without polycell is
sent nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")

from lab_server import LabServer
from notebook_page import TIMEOUT_MS, NotebookPage, OpenNotebook
from playwright.sync_api import expect

SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "e2e"


def numbered(text: str, prefix: str = "line") -> list[int]:
    return [int(n) for n in re.findall(rf"^{prefix} (\d+)$", text, flags=re.MULTILINE)]


def handle(nb: NotebookPage, index: int):
    return nb.cell(index).locator(".jp-polycell-handle")


def gated_job(gate: Path, name: str = "reloaded") -> str:
    """A job printing a line every 0.1 s until `gate` exists, then one more line.

    `gate` is in the server's root, the kernel's working directory, and named
    from there. The counter is a function's own: jobs share the notebook's namespace.
    """
    return (
        f"%%bg --name {name}\nimport os, time\n\ndef count(gate):\n    n = 0\n"
        "    while not (os.path.exists(gate) and n >= 3):\n"
        '        print(f"line {n}")\n        n += 1\n        time.sleep(0.1)\n'
        f'    print("final line")\n\ncount({gate.name!r})'
    )


def expect_whole_output(nb: NotebookPage, index: int) -> list[int]:
    """The cell shows the job's end, its handle says done, and every line once, in order."""
    nb.expect_output(index, "final line")
    expect(handle(nb, index)).to_have_attribute("data-status", "done", timeout=TIMEOUT_MS)
    text = nb.output_text(index)
    lines = numbered(text)
    assert lines == list(range(len(lines))) and len(lines) >= 3, text
    assert text.count("final line") == 1, text
    return lines


@pytest.mark.parametrize("kernel", ["polycell", "python3"])
def test_a_running_job_continues_in_its_own_cell_after_a_reload(
    open_notebook: OpenNotebook, lab: LabServer, kernel: str
) -> None:
    gate = lab.root / f"gate-{kernel}"
    setup = "%load_ext polycell" if kernel == "python3" else "import polycell"
    nb = open_notebook(f"reattach-{kernel}", [setup, gated_job(gate)], kernel=kernel)
    nb.run_to_end(0)
    nb.run(1)
    nb.expect_output(1, "line 3")
    nb.reload()  # the notebook was never saved: the cell comes back empty, then is rebuilt
    nb.expect_output(1, "line 0")
    expect(handle(nb, 1)).to_have_attribute("data-status", "running", timeout=TIMEOUT_MS)
    seen = max(numbered(nb.output_text(1)))
    nb.expect_output(1, f"line {seen + 3}")  # and followed live
    nb.screenshot(f"reattached-after-reload-{kernel}")
    gate.touch()
    expect_whole_output(nb, 1)
    assert nb.polycell_console_errors() == []


def test_a_reload_while_a_foreground_cell_runs_still_gets_the_job_back(
    open_notebook: OpenNotebook, lab: LabServer
) -> None:
    """The kernel is asked over its control channel, which answers while the main thread is busy."""
    gate = lab.root / "gate-busy"
    nb = open_notebook("busy", ["import polycell, time", gated_job(gate, "busy"), "time.sleep(600)"])
    nb.run_to_end(0)
    nb.run(1)
    nb.expect_output(1, "line 3")
    nb.run(2)
    nb.expect_running(2)
    nb.reload(busy=True)
    nb.expect_output(1, "line 0")
    expect(handle(nb, 1)).to_have_attribute("data-status", "running", timeout=TIMEOUT_MS)
    seen = max(numbered(nb.output_text(1)))
    nb.expect_output(1, f"line {seen + 3}")
    gate.touch()
    expect_whole_output(nb, 1)
    nb.interrupt()
    assert nb.polycell_console_errors() == []


def test_another_tab_sees_the_job_and_a_job_that_ended_meanwhile(
    open_notebook: OpenNotebook, lab: LabServer
) -> None:
    gate = lab.root / "gate-tabs"
    first = open_notebook("tabs", ["import polycell", gated_job(gate, "tabs")])
    first.run(0)
    first.run(1)
    first.expect_output(1, "line 3")
    second = first.open_again()  # a second tab on the same notebook and kernel
    second.expect_output(1, "line 0")
    expect(handle(second, 1)).to_have_attribute("data-status", "running", timeout=TIMEOUT_MS)
    second.page.close()
    gate.touch()  # the job ends while no page shows it ...
    expect_whole_output(first, 1)
    third = first.open_again()  # ... and a page opened afterwards shows its whole output
    lines = expect_whole_output(third, 1)
    assert lines == numbered(first.output_text(1))
    third.screenshot("ended-while-away")
    # What was put back is the notebook's: saving writes it to the file.
    third.page.keyboard.press("Control+s")
    expect(third.page.locator("li.lm-TabBar-tab.jp-mod-dirty")).to_have_count(0, timeout=TIMEOUT_MS)
    saved = nbformat.read(lab.root / third.path, as_version=4).cells[1].outputs
    assert saved[0]["data"]["application/vnd.polycell.job+json"]["status"] == "done"
    assert "done</span> after" in saved[0]["data"]["text/html"]  # for front ends without the extension
    text = "".join(output.get("text", "") for output in saved)
    assert numbered(text) == lines and text.endswith("final line\n")
    assert first.polycell_console_errors() == third.polycell_console_errors() == []


def test_a_cell_run_again_gets_back_only_its_new_job(open_notebook: OpenNotebook, lab: LabServer) -> None:
    gate = lab.root / "gate-rerun"
    nb = open_notebook("rerun", ["import polycell", gated_job(gate, "again")])
    nb.run_to_end(0)
    nb.run(1)
    nb.expect_output(1, "line 3")
    nb.run(1)  # the same cell again: job 2; job 1 runs on, its output no longer this cell's
    expect(handle(nb, 1)).to_have_attribute("data-job", "2", timeout=TIMEOUT_MS)
    nb.reload()
    expect(handle(nb, 1)).to_have_attribute("data-status", "running", timeout=TIMEOUT_MS)
    expect(handle(nb, 1)).to_have_count(1)
    expect(handle(nb, 1)).to_have_attribute("data-job", "2")
    gate.touch()
    expect_whole_output(nb, 1)  # "final line" once: job 1's did not come here
    assert nb.polycell_console_errors() == []


def test_the_handles_kill_button_kills_the_job(open_notebook: OpenNotebook) -> None:
    nb = open_notebook(
        "kill-button",
        ["import time", '%%bg --name sleeper\nprint("going to sleep")\ntime.sleep(600)\nprint("woke up")'],
    )
    nb.run_to_end(0)
    nb.run(1)
    nb.expect_output(1, "going to sleep")
    expect(handle(nb, 1)).to_have_attribute("data-status", "running", timeout=TIMEOUT_MS)
    clock = handle(nb, 1).locator(".jp-polycell-elapsed")
    first = clock.inner_text()
    expect(clock).not_to_have_text(first, timeout=TIMEOUT_MS)  # it ticks
    nb.screenshot("handle-running")
    handle(nb, 1).locator(".jp-polycell-kill").click()
    expect(handle(nb, 1)).to_have_attribute("data-status", "killed", timeout=TIMEOUT_MS)
    expect(handle(nb, 1).locator(".jp-polycell-kill")).to_have_count(0)
    assert "woke up" not in nb.output_text(1)
    nb.screenshot("handle-killed")
    assert nb.polycell_console_errors() == []


def test_the_jobs_panel_lists_kills_and_goes_to_the_cell(open_notebook: OpenNotebook) -> None:
    nb = open_notebook(
        "panel",
        [
            "import time",
            '%%bg --name quick\nprint("quick one")',
            '%%bg --name sleeper\nprint("zzz")\ntime.sleep(600)',
            "# a cell to move away to",
        ],
    )
    nb.run_to_end(0)
    for index in range(1, 4):
        nb.run(index)
    expect(handle(nb, 2)).to_have_attribute("data-status", "running", timeout=TIMEOUT_MS)
    panel = nb.open_jobs_panel()
    rows = panel.locator(".jp-polycell-job")
    expect(rows).to_have_count(2, timeout=TIMEOUT_MS)
    expect(rows.nth(0)).to_have_attribute("data-status", "done", timeout=TIMEOUT_MS)
    expect(rows.nth(0)).to_contain_text("quick one")
    expect(rows.nth(1)).to_contain_text("sleeper")
    nb.screenshot_page("jobs-panel")
    rows.nth(1).locator(".jp-polycell-kill").click()
    expect(rows.nth(1)).to_have_attribute("data-status", "killed", timeout=TIMEOUT_MS)
    expect(handle(nb, 2)).to_have_attribute("data-status", "killed", timeout=TIMEOUT_MS)
    rows.nth(0).click()
    expect(nb.cell(1)).to_have_class(re.compile(r"\bjp-mod-active\b"), timeout=TIMEOUT_MS)
    assert nb.polycell_console_errors() == []


def test_a_long_jobs_end_is_a_notification_that_goes_to_its_cell(open_notebook: OpenNotebook) -> None:
    # The test server sets the threshold to 1 s (tests/e2e/lab_server.py).
    nb = open_notebook(
        "notify",
        ["import time", '%%bg --name train\ntime.sleep(1.5)\nprint("trained")', "# elsewhere"],
    )
    nb.run_to_end(0)
    nb.run(1)
    nb.run(2)
    toast = nb.page.locator(".Toastify__toast", has_text="job 1 'train' done after")
    expect(toast).to_be_in_viewport(ratio=1, timeout=TIMEOUT_MS)
    nb.screenshot_page("notification")
    toast.get_by_role("button", name="Go to cell").click()
    expect(nb.cell(1)).to_have_class(re.compile(r"\bjp-mod-active\b"), timeout=TIMEOUT_MS)
    assert nb.polycell_console_errors() == []


def test_notebook_7_puts_a_job_back_in_its_cell_after_a_reload_and_kills_it(
    open_notebook: OpenNotebook, lab: LabServer
) -> None:
    gate = lab.root / "gate-notebook7"
    nb = open_notebook("notebook7", ["import polycell", gated_job(gate)], app="notebook")
    nb.run_to_end(0)
    nb.run(1)
    nb.expect_output(1, "line 3")
    nb.reload()
    nb.expect_output(1, "line 0")
    expect(handle(nb, 1)).to_have_attribute("data-status", "running", timeout=TIMEOUT_MS)
    nb.screenshot("notebook7-reattached")
    handle(nb, 1).locator(".jp-polycell-kill").click()
    expect(handle(nb, 1)).to_have_attribute("data-status", "killed", timeout=TIMEOUT_MS)
    lines = numbered(nb.output_text(1))
    assert lines == list(range(len(lines))), nb.output_text(1)
    assert nb.polycell_console_errors() == []


def test_a_kernel_without_polycell_is_sent_nothing(open_notebook: OpenNotebook) -> None:
    nb = open_notebook("stock", ["print('plain ipykernel')"], kernel="python3")
    nb.run(0)
    nb.expect_output(0, "plain ipykernel")
    nb.reload()
    nb.run(0)
    nb.expect_output(0, "plain ipykernel")
    assert nb.sent_frames and not [frame for frame in nb.sent_frames if "polycell" in frame]
    assert [text for text in nb.console_messages if "polycell" in text.lower()] == []


def test_notebook_7_opens_the_jobs_panel_from_the_command_palette(open_notebook: OpenNotebook) -> None:
    nb = open_notebook(
        "notebook7-panel",
        ["import time", '%%bg --name sleeper\nprint("zzz")\ntime.sleep(600)'],
        app="notebook",
    )
    nb.run_to_end(0)
    nb.run(1)
    expect(handle(nb, 1)).to_have_attribute("data-status", "running", timeout=TIMEOUT_MS)
    nb.run_from_palette("Show Background Jobs", nb.page.locator("#polycell-jobs"))
    rows = nb.page.locator("#polycell-jobs .jp-polycell-job")
    expect(rows).to_have_count(1, timeout=TIMEOUT_MS)
    expect(rows.nth(0)).to_contain_text("sleeper")
    nb.screenshot_page("notebook7-jobs-panel")
    rows.nth(0).locator(".jp-polycell-kill").click()
    expect(handle(nb, 1)).to_have_attribute("data-status", "killed", timeout=TIMEOUT_MS)
    assert nb.polycell_console_errors() == []
