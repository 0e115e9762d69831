"""The tour notebook, the README's main job, runs start to end on the polycell kernel.

Run as ``scripts/demo`` runs it (``polycell run``), with the kernelspec installed
the way users install it, into a prefix of the test's own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat

from kernel_session import kernel_env

ROOT = Path(__file__).resolve().parent.parent


def test_the_tour_runs_and_shows_every_feature(tmp_path):
    prefix = tmp_path / "prefix"
    env = kernel_env()
    env.update(
        JUPYTER_PATH=str(prefix / "share" / "jupyter"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        JUPYTER_DATA_DIR=str(tmp_path / "data"),
        PATH=os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", ""))),  # `!polycell jobs`
    )
    env.pop("DASK_SCHEDULER_ADDRESS", None)  # the tour's dask cell starts a LocalCluster
    install = [sys.executable, "-m", "polycell", "install", "--prefix", str(prefix)]
    subprocess.run(install, check=True, env=env, capture_output=True)
    run_tour = [sys.executable, "-m", "polycell.cli", "run", str(ROOT / "examples" / "tour.ipynb")]
    tour = subprocess.run(
        [*run_tour, "--kernel", "polycell", "--allow-errors", "--output", str(tmp_path / "tour.ipynb")],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert tour.returncode == 0, tour.stderr
    out = tour.stdout
    for shown in (
        "this cell ran while job 1 was still ticking",  # a foreground cell while a job runs
        "{'answer': 42}",  # await jobs[2]: a task job's result
        "output of a subprocess lands here too",  # a process job's fd 1
        "[job 4 killed after",  # kill
        "failed  ",  # the broken job, in the %jobs table
        "[0, 3, 6, 9, 12]",  # names back from a dask worker
        "tick 4",  # %job show 1 replays the journal
    ):
        assert shown in out, f"{shown!r} not in the tour's output:\n{out}"
    assert "KeyboardInterrupt" not in tour.stderr
    # Saved as it would be in JupyterLab: every job's output in the cell that started it.
    cells = [c for c in nbformat.read(tmp_path / "tour.ipynb", as_version=4).cells if c.cell_type == "code"]
    ticker = next(c for c in cells if c.source.startswith("%%bg --name ticker"))
    ticks = "".join(o["text"] for o in ticker.outputs if o["output_type"] == "stream")
    assert ticks == "".join(f"tick {i}\n" for i in range(5))
    broken = next(c for c in cells if c.source.startswith("%%bg --name broken"))
    assert [o["ename"] for o in broken.outputs if o["output_type"] == "error"] == ["ValueError"]
    assert re.search(r"\[polycell run\] job \d+ \(cell 24\) failed: ValueError: invalid literal", tour.stderr)
