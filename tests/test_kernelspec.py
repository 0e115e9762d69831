"""``python -m polycell install|uninstall``, run as users run it, against a temporary Jupyter path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_session import kernel_env


def polycell(*args: str, jupyter_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = kernel_env()
    if jupyter_path is not None:
        env["JUPYTER_PATH"] = str(jupyter_path)
    return subprocess.run(
        [sys.executable, "-m", "polycell", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_install_writes_the_polycell_kernelspec(tmp_path):
    done = polycell("install", "--prefix", str(tmp_path))
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "polycell"
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"Installed kernelspec polycell in {spec_dir}"
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["argv"] == [sys.executable, "-m", "polycell.kernelapp", "-f", "{connection_file}"]
    assert spec["display_name"] == "Python 3 (polycell)"
    assert spec["language"] == "python"
    assert spec["interrupt_mode"] == "message"
    assert (spec_dir / "logo-64x64.png").exists()
    listed = subprocess.run(
        [sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
        env={**kernel_env(), "JUPYTER_PATH": str(tmp_path / "share" / "jupyter")},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(listed.stdout)["kernelspecs"]["polycell"]["resource_dir"] == str(spec_dir)


def test_reinstall_replaces_and_uninstall_removes(tmp_path):
    jupyter = tmp_path / "share" / "jupyter"
    assert (
        polycell("install", "--prefix", str(tmp_path), "--name", "pc", "--display-name", "Mine").returncode
        == 0
    )
    spec_file = jupyter / "kernels" / "pc" / "kernel.json"
    assert json.loads(spec_file.read_text())["display_name"] == "Mine"
    assert polycell("install", "--prefix", str(tmp_path), "--name", "pc").returncode == 0
    assert json.loads(spec_file.read_text())["display_name"] == "pc"  # like ipykernel: the name
    removed = polycell("uninstall", "--name", "pc", "-y", jupyter_path=jupyter)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.strip() == f"Removed {spec_file.parent}"
    assert not spec_file.parent.exists()
    again = polycell("uninstall", "--name", "pc", "-y", jupyter_path=jupyter)
    assert again.returncode == 1
    assert again.stderr.strip() == "Couldn't find kernel spec(s): pc"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["install", "--user", "--sys-prefix"], "argument --sys-prefix: not allowed with argument --user"),
        (["install", "--name", "no spaces!"], "polycell install: Invalid kernel name 'no spaces!'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required"),
    ],
)
def test_bad_command_lines_fail_with_one_clear_line(args, message, tmp_path):
    if args[:1] == ["install"] and "--user" not in args:
        args = [*args, "--prefix", str(tmp_path)]
    done = polycell(*args)
    assert done.returncode != 0
    assert message in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr


def test_help_describes_both_commands():
    done = polycell("--help")
    assert done.returncode == 0
    assert "install" in done.stdout and "uninstall" in done.stdout
    install_help = polycell("install", "--help").stdout
    for option in ("--user", "--sys-prefix", "--prefix", "--name", "--display-name"):
        assert option in install_help
