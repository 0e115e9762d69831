"""polycell in a real JupyterLab, in headless Chromium, used the way a user uses it.

Every notebook runs on the polycell kernel (installed with ``python -m polycell install``).

Each test opens a notebook, runs its cells with Shift+Enter and checks what the
page shows under each cell. Each saves a screenshot of the notebook into
test-artifacts/e2e/, and fails on any browser console error mentioning polycell.
Run them alone with ``pytest tests/e2e``.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")

from notebook_page import NotebookPage, OpenNotebook
from playwright.sync_api import expect


def numbered_lines(text: str, prefix: str) -> list[int]:
    """The numbers of the lines ``<prefix> <n>`` in `text`, in the order shown."""
    return [int(n) for n in re.findall(rf"^{re.escape(prefix)} (\d+)$", text, flags=re.MULTILINE)]


def finish(notebook: NotebookPage, screenshot: str) -> None:
    notebook.screenshot(screenshot)
    assert notebook.polycell_console_errors() == []


def test_each_job_prints_under_its_own_cell(open_notebook: OpenNotebook) -> None:
    nb = open_notebook(
        "side_by_side",
        [
            "import threading, time\nstop = threading.Event()",
            "%%bg --name ticker\nn = 0\nwhile not (stop.is_set() and n >= 5):\n"
            '    print(f"tick {n}")\n    n += 1\n    time.sleep(0.2)\nprint("ticker done")',
            'print("ordinary A")',
            "6 * 7",
            '%%bg --name second\nfor k in range(5):\n    print(f"second {k}")\n    time.sleep(0.2)',
            "stop.set()",
        ],
    )
    nb.run_to_end(0)
    nb.run(1)
    nb.expect_output(1, "tick 2")
    # The ticker runs until cell 5 sets `stop`: everything below happens while it prints.
    nb.run(2)
    nb.expect_output(2, "ordinary A")
    nb.run(3)
    nb.expect_output(3, "42")
    nb.run(4)
    nb.expect_output(4, "second 4")
    expect(nb.cell(1).locator(".jp-polycell-handle")).to_contain_text("running")
    nb.screenshot("1-each-job-in-its-cell-while-running")
    nb.run(5)
    expect(nb.cell(1).locator(".jp-polycell-handle")).to_contain_text("done", timeout=60_000)
    expect(nb.cell(4).locator(".jp-polycell-handle")).to_contain_text("done", timeout=60_000)

    ticker = nb.output_text(1)
    ticks = numbered_lines(ticker, "tick")
    assert len(ticks) >= 5 and ticks == list(range(len(ticks))), ticker
    assert "ticker done" in ticker
    assert "second" not in ticker and "ordinary" not in ticker and "42" not in ticker
    assert nb.output_text(2) == "ordinary A"
    assert "42" in nb.output_text(3) and "tick" not in nb.output_text(3)
    second = nb.output_text(4)
    assert numbered_lines(second, "second") == [0, 1, 2, 3, 4], second
    assert "tick" not in second and "ordinary" not in second
    for quiet in (0, 5):
        expect(nb.cell(quiet).locator(".jp-OutputArea-output")).to_have_count(0)
    finish(nb, "1-each-job-in-its-cell")


def test_interrupt_stops_only_the_foreground_cell(open_notebook: OpenNotebook) -> None:
    nb = open_notebook(
        "interrupt",
        [
            "import threading, time\ninterrupted = threading.Event()",
            "try:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n    interrupted.set()\n    raise",
            "%%bg --name survivor\nk = 0\nwhile not interrupted.is_set():\n"
            '    print(f"waiting {k}")\n    k += 1\n    time.sleep(0.2)\n'
            'for j in range(3):\n    print(f"after interrupt {j}")\n    time.sleep(0.2)\n'
            'print("survivor finished")',
        ],
    )
    nb.run_to_end(0)
    nb.run(1)
    nb.expect_running(1)
    nb.run(2)
    # The %%bg cell starts while the foreground cell still sleeps (well before its 30 s end).
    expect(nb.outputs(2)).to_contain_text("waiting 2", timeout=20_000)
    nb.expect_running(1)
    nb.screenshot("2-bg-output-while-foreground-blocks")
    nb.interrupt()
    nb.expect_output(1, "KeyboardInterrupt")
    nb.expect_output(2, "survivor finished")
    expect(nb.cell(2).locator(".jp-polycell-handle")).to_contain_text("done", timeout=60_000)
    survivor = nb.output_text(2)
    assert numbered_lines(survivor, "after interrupt") == [0, 1, 2], survivor
    assert "KeyboardInterrupt" not in survivor
    assert "waiting" not in nb.output_text(1)
    finish(nb, "2-interrupt-stops-only-the-foreground")


def test_job_show_after_reload_replays_and_follows(open_notebook: OpenNotebook) -> None:
    nb = open_notebook(
        "reload",
        [
            "import threading, time\nrelease = threading.Event()",
            "%%bg --name reloaded\nn = 0\nwhile not (release.is_set() and n >= 3):\n"
            '    print(f"line {n}")\n    n += 1\n    time.sleep(0.2)\nprint("final line")',
            "%job show 1",
            "release.set()",
        ],
    )
    nb.run_to_end(0)
    nb.run(1)
    nb.expect_output(1, "line 3")
    nb.screenshot("3-before-reload")
    nb.reload()
    nb.run(2)
    nb.expect_output(2, "line 0")  # the whole output, from its first line
    replayed = max(numbered_lines(nb.output_text(2), "line"))
    # Still following: lines printed after the replay arrive in this cell too.
    nb.expect_output(2, f"line {replayed + 3}")
    nb.screenshot("3-job-show-after-reload")
    nb.run(3)
    nb.expect_output(2, "final line")
    expect(nb.cell(2).locator(".jp-polycell-handle")).to_contain_text("done", timeout=60_000)
    shown = nb.output_text(2)
    lines = numbered_lines(shown, "line")
    assert lines == list(range(len(lines))) and len(lines) > replayed + 3, shown
    finish(nb, "3-job-show-after-reload-done")


def test_job_kill_marks_the_jobs_cell_killed(open_notebook: OpenNotebook) -> None:
    nb = open_notebook(
        "kill",
        [
            "import time",
            '%%bg --name sleeper\nprint("going to sleep")\ntime.sleep(600)\nprint("woke up")',
            "%job kill 1",
        ],
    )
    nb.run_to_end(0)
    nb.run(1)
    nb.expect_output(1, "going to sleep")
    expect(nb.cell(1).locator(".jp-polycell-handle")).to_contain_text("running")
    nb.run(2)
    nb.expect_output(2, "job 1 killed")
    expect(nb.cell(1).locator(".jp-polycell-handle")).to_contain_text("killed", timeout=60_000)
    nb.expect_output(1, "job 1 killed after")
    assert "woke up" not in nb.output_text(1)
    finish(nb, "4-job-kill")


def test_jobs_renders_an_html_table(open_notebook: OpenNotebook) -> None:
    nb = open_notebook(
        "jobs_table",
        [
            "import time",
            '%%bg --name quick\nprint("quick work")\n6 * 7',
            "%%bg --name broken\n1 / 0",
            '%%bg --name sleeper\nprint("going to sleep")\ntime.sleep(600)',
            "%jobs",
            "%job kill 3",
        ],
    )
    nb.run_to_end(0)
    for index in range(1, 4):
        nb.run(index)
    expect(nb.cell(1).locator(".jp-polycell-handle")).to_contain_text("done", timeout=60_000)
    nb.expect_output(2, "ZeroDivisionError")
    expect(nb.cell(2).locator(".jp-polycell-handle")).to_contain_text("failed", timeout=60_000)
    nb.expect_output(3, "going to sleep")
    nb.run(4)
    rows = nb.cell(4).locator("table.polycell-jobs tbody tr")
    expect(rows).to_have_count(3, timeout=60_000)
    expect(nb.cell(4).locator("table.polycell-jobs thead")).to_contain_text("status")
    for row, (name, status) in enumerate([("quick", "done"), ("broken", "failed"), ("sleeper", "running")]):
        expect(rows.nth(row)).to_contain_text(name)
        expect(rows.nth(row)).to_contain_text(status)
    nb.screenshot("5-jobs-table")
    nb.run(5)
    expect(nb.cell(3).locator(".jp-polycell-handle")).to_contain_text("killed", timeout=60_000)
    finish(nb, "5-jobs-table-after-kill")


def test_input_in_a_job_prompts_in_its_own_cell(open_notebook: OpenNotebook) -> None:
    nb = open_notebook(
        "input",
        [
            "import time",
            '%%bg --name asker\nanswer = input("your name? ")\nprint(f"hello {answer}")',
            'print("after the answer")',
        ],
    )
    nb.run_to_end(0)
    nb.run(1)
    # The question is asked in the job's own cell, after that cell has finished running.
    prompt = nb.cell(1).locator(".jp-Stdin-input")
    expect(prompt).to_be_visible(timeout=60_000)
    nb.screenshot("6-input-prompt-in-the-jobs-cell")
    # JupyterLab itself runs no other cell while an input is pending (it guards against
    # a deadlock), so the answer comes first.
    prompt.fill("Ada")
    prompt.press("Enter")
    nb.expect_output(1, "hello Ada")
    expect(nb.cell(1).locator(".jp-polycell-handle")).to_contain_text("done", timeout=60_000)
    nb.run(2)
    nb.expect_output(2, "after the answer")
    assert "hello" not in nb.output_text(2)
    finish(nb, "6-input-in-a-job")
