"""A real JupyterLab server for the browser tests, sealed inside a temporary directory.

Every Jupyter directory (config, data, runtime, kernelspecs, Lab settings and
workspaces) points into the temporary directory, so the tests neither read nor
write the user's Jupyter setup. The kernels it starts get this checkout's
``src`` first on ``PYTHONPATH``, so they run the polycell under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import nbformat
import psutil

CHECKOUT = Path(__file__).resolve().parents[2]
SRC = CHECKOUT / "src"

STOCK_KERNEL = "python3"
POLYCELL_KERNEL = "polycell"
DISPLAY_NAMES = {STOCK_KERNEL: "Python 3 (ipykernel)", POLYCELL_KERNEL: "Python 3 (polycell)"}

# The server must not reach out to the internet (news feed, update check, PyPI
# extension manager): written as the server's config file in the temp dir.
_SERVER_CONFIG = {
    "LabApp": {
        "news_url": None,
        "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
        "extension_manager": "readonly",
    },
    # Test machines and CI containers often run as root; the server refuses to without this.
    "ServerApp": {"allow_root": True},
}

# JupyterLab 4 asks, in a toast, whether to fetch news and check for updates; both
# would also reach out to the internet. Written as user settings in the temp dir.
_QUIET_LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    # A job's end is a notification after 1 s, not the default 10 s: the tests' jobs are short.
    "polycell/plugin.jupyterlab-settings": {"notifyAfterSeconds": 1},
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LabServer:
    """One ``jupyter lab`` process, its token, and a small client for its REST API."""

    def __init__(self, base: Path, python: str = sys.executable) -> None:
        self.base = base
        self.python = python
        self.root = base / "notebooks"
        self.token = secrets.token_hex(16)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "jupyterlab.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.kernels = [STOCK_KERNEL, POLYCELL_KERNEL]

    # -- setup ------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "PYTEST_"))}
        env.update(
            JUPYTER_CONFIG_DIR=str(self.base / "config"),
            JUPYTER_DATA_DIR=str(self.base / "data"),
            JUPYTER_RUNTIME_DIR=str(self.base / "runtime"),
            JUPYTER_PATH=os.pathsep.join(
                [str(self.base / "path"), str(self.base / "prefix" / "share" / "jupyter")]
            ),
            JUPYTERLAB_SETTINGS_DIR=str(self.base / "lab-settings"),
            JUPYTERLAB_WORKSPACES_DIR=str(self.base / "lab-workspaces"),
            JUPYTER_PLATFORM_DIRS="1",
            PYTHONPATH=os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p),
            MPLBACKEND="module://matplotlib_inline.backend_inline",
        )
        return env

    def _install_kernelspec(self, name: str, display_name: str, argv: list[str]) -> None:
        spec_dir = self.base / "path" / "kernels" / name
        spec_dir.mkdir(parents=True, exist_ok=True)
        spec = {"argv": argv, "display_name": display_name, "language": "python"}
        (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))

    def _prepare(self) -> None:
        for sub in ("config", "data", "runtime", "path", "notebooks", "lab-workspaces"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "config" / "jupyter_server_config.json").write_text(json.dumps(_SERVER_CONFIG))
        for relative, values in _QUIET_LAB_SETTINGS.items():
            path = self.base / "lab-settings" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        self._install_kernelspec(
            STOCK_KERNEL,
            DISPLAY_NAMES[STOCK_KERNEL],
            [self.python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        )
        # The polycell kernelspec is installed the way users install it.
        subprocess.run(
            [self.python, "-m", "polycell", "install", "--prefix", str(self.base / "prefix")],
            check=True,
            capture_output=True,
            env=self._environment(),
        )

    # -- lifecycle --------------------------------------------------------------------

    def start(self, timeout: float = 120) -> None:
        self._prepare()
        command = [
            self.python,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--ServerApp.terminals_enabled=False",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, env=self._environment(), stdout=log, stderr=subprocess.STDOUT, cwd=self.root
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                self.api("GET", "/api/status", timeout=2)
                return
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"jupyter lab did not answer in {timeout}s:\n{self.log()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 30) -> list[int]:
        """Shut the server down through its API (it ends its kernels first).

        Returns the pids of the server's process tree that were still alive after
        `timeout` seconds (and then killed), so the caller can fail on them.
        """
        if self.process is None:
            return []
        tree = [psutil.Process(self.process.pid)]
        with contextlib.suppress(psutil.Error):
            tree += tree[0].children(recursive=True)
        with contextlib.suppress(OSError):
            self.api("POST", "/api/shutdown", timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=5)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        self.process.wait(5)
        self.process = None
        return [proc.pid for proc in alive]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- REST API ---------------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def shutdown_kernels(self, timeout: float = 30) -> None:
        """End every session and kernel (what "Shut Down All" in the Running panel does)."""
        for session in self.api("GET", "/api/sessions"):
            self.api("DELETE", f"/api/sessions/{session['id']}", timeout=timeout)
        for kernel in self.api("GET", "/api/kernels"):
            self.api("DELETE", f"/api/kernels/{kernel['id']}", timeout=timeout)

    # -- notebooks --------------------------------------------------------------------

    def write_notebook(self, name: str, cells: list[str], kernel: str = POLYCELL_KERNEL) -> str:
        """Write a notebook of code cells into the root dir; returns its path relative to the root."""
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {
            "name": kernel,
            "display_name": DISPLAY_NAMES[kernel],
            "language": "python",
        }
        nb.metadata["language_info"] = {"name": "python"}
        nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
        path = f"{name}.ipynb"
        nbformat.write(nb, self.root / path)
        return path

    def notebook_url(self, path: str, workspace: str) -> str:
        """The notebook opened in its own JupyterLab workspace.

        JupyterLab saves the open tabs of a workspace on the server; in the default
        one every test would also reopen (and start kernels for) the notebooks of the
        tests before it.
        """
        return f"{self.url}/lab/workspaces/{workspace}/tree/{path}?token={self.token}"
