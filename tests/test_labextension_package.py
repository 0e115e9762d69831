"""The JupyterLab extension's packaging: enabled in this environment, and shipped in the sdist and wheel.

scripts/setup-env.sh builds the extension (package.json, src/*.ts) into src/polycell/labextension and
links this environment's share/jupyter/labextensions/polycell to it; a wheel carries a copy of it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import polycell

ROOT = Path(__file__).resolve().parent.parent
BUILT = ROOT / "src" / "polycell" / "labextension"
BIN = Path(sys.executable).parent
NOT_BUILT = "the extension is not built: source scripts/setup-env.sh (bash scripts/test does)"


def test_the_versions_agree() -> None:
    python_version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    npm = json.loads((ROOT / "package.json").read_text())
    assert npm["name"] == "polycell"
    assert npm["version"] == python_version == polycell.__version__
    assert npm["jupyterlab"]["outputDir"] == "src/polycell/labextension"
    assert json.loads((ROOT / "install.json").read_text())["packageName"] == "polycell"


def test_the_extension_is_enabled_in_this_environment() -> None:
    assert (BUILT / "package.json").exists(), NOT_BUILT
    assert json.loads((BUILT / "package.json").read_text())["version"] == polycell.__version__
    # What `jupyter labextension develop` makes: this environment serves the checkout's build.
    assert (Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "polycell").resolve() == BUILT
    listed = subprocess.run(
        [str(BIN / "jupyter"), "labextension", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    text = re.sub(r"\x1b\[[0-9;]*m", "", listed.stdout + listed.stderr)  # its colours
    entries = []  # (the directory it is listed under, its line)
    directory = ""
    for line in text.splitlines():
        if line.startswith("/"):
            directory = line.strip()
        elif line.strip().startswith("polycell "):
            entries.append((directory, line.strip()))
    assert len(entries) == 1, text
    assert entries[0][0] == str(Path(sys.prefix) / "share" / "jupyter" / "labextensions"), text
    # "(python, polycell)" is said by a wheel's install.json, which a link to the build has not.
    assert re.fullmatch(r"polycell v0\.1\.0 enabled OK( \(python, polycell\))?", entries[0][1]), text


@pytest.mark.timeout(150)
def test_the_sdist_and_the_wheel_built_from_it_carry_the_extension(tmp_path) -> None:
    assert (BUILT / "static" / "style.js").exists(), NOT_BUILT  # else the build hook would build it
    # As `uv build` does by default: the sdist, then the wheel from the unpacked sdist (needing
    # no Node.js, since the sdist has the built extension); the build backend pinned like setup-env's.
    uv_build = [str(BIN / "uv"), "build", "--python", sys.executable]
    pins = ROOT / "requirements" / "constraints.txt"
    built = subprocess.run(
        [*uv_build, "--build-constraint", str(pins), "--out-dir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    with tarfile.open(tmp_path / "polycell-0.1.0.tar.gz") as sdist:
        in_sdist = {name.removeprefix("polycell-0.1.0/") for name in sdist.getnames()}
    for needed in (
        "pyproject.toml",
        "package.json",
        "yarn.lock",
        ".yarnrc.yml",
        "tsconfig.json",
        "install.json",
        "src/index.ts",
        "style/index.css",
        "style/index.js",
        "schema/plugin.json",
        "src/polycell/cell.py",
        "src/polycell/labextension/package.json",
        "src/polycell/labextension/static/style.js",
    ):
        assert needed in in_sdist, needed
    for unwanted in ("node_modules", ".yarn", "lib", ".venv", ".venvs", "test-artifacts"):
        assert not any(name == unwanted or name.startswith(f"{unwanted}/") for name in in_sdist), unwanted
    assert not any(name.endswith(".tsbuildinfo") for name in in_sdist)

    with zipfile.ZipFile(tmp_path / "polycell-0.1.0-py3-none-any.whl") as wheel:
        in_wheel = set(wheel.namelist())
    shared = "polycell-0.1.0.data/data/share/jupyter/labextensions/polycell/"
    for needed in (
        f"{shared}package.json",
        f"{shared}install.json",
        f"{shared}static/style.js",
        f"{shared}schemas/polycell/plugin.json",
        "polycell/__init__.py",
        "polycell/cell.py",
        "polycell/kernelapp.py",
    ):
        assert needed in in_wheel, needed
    assert any(re.fullmatch(rf"{shared}static/remoteEntry\.[0-9a-f]+\.js", name) for name in in_wheel)
    # The extension once, where JupyterLab looks; not again inside the package, and no sources.
    assert not any(name.startswith("polycell/labextension/") for name in in_wheel)
    assert not any(name.endswith((".ts", ".tsx")) for name in in_wheel)
