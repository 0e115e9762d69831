# ruff: noqa: RUF012 - jupyter_kernel_test is configured through (list) class attributes
"""The public Jupyter kernel conformance suite (jupyter_kernel_test) against the polycell kernel.

The kernel is found the way front ends find it: its kernelspec is installed
with ``python -m polycell install --prefix`` into a temporary directory that
JUPYTER_PATH points at.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jupyter_kernel_test

from kernel_session import kernel_env
from leak_check import RESIDENTS


class PolycellKernelConformance(jupyter_kernel_test.KernelTests):
    kernel_name = "polycell-conformance"
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise"
    code_execute_result = [
        {"code": "1+1", "result": "2"},
        {"code": "[n * n for n in range(1, 4)]", "result": "[1, 4, 9]"},
    ]
    code_display_data = [
        {
            "code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))",
            "mime": "text/html",
        },
        {
            "code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))",
            "mime": "text/latex",
        },
    ]
    code_history_pattern = "1?2*"
    # "search" reads IPython's history database, which a fresh session has not
    # written yet: stock ipykernel fails it the same way, so it is not claimed here.
    supported_history_operations = ("tail",)
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"

    _tmp: str
    _saved_env: dict[str, str | None]
    _kernel_pid: int

    @classmethod
    def setUpClass(cls) -> None:
        cls._tmp = tempfile.mkdtemp(prefix="polycell-spec-")
        env = kernel_env()
        subprocess.run(
            [sys.executable, "-m", "polycell", "install", "--prefix", cls._tmp, "--name", cls.kernel_name],
            check=True,
            env=env,
            capture_output=True,
        )
        cls._saved_env = {name: os.environ.get(name) for name in ("JUPYTER_PATH", "PYTHONPATH")}
        os.environ["JUPYTER_PATH"] = str(Path(cls._tmp) / "share" / "jupyter")
        os.environ["PYTHONPATH"] = env["PYTHONPATH"]
        super().setUpClass()
        # The suite keeps one kernel for the whole class: a resident, not a leak.
        cls._kernel_pid = cls.km.provisioner.pid
        RESIDENTS[cls._kernel_pid] = True

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            super().tearDownClass()
        finally:
            RESIDENTS.pop(cls._kernel_pid, None)
            for name, value in cls._saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            shutil.rmtree(cls._tmp, ignore_errors=True)

    def test_polycell_kernel_is_running(self) -> None:
        """The suite runs against polycell's kernel, not a stock one with the same name."""
        self.flush_channels()
        msg_id = self.kc.execute("import sys; print(type(get_ipython().kernel).__name__)")
        self.kc.get_shell_msg(timeout=15)
        text = ""
        while True:
            msg = self.kc.get_iopub_msg(timeout=15)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                text += msg["content"]["text"]
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        assert text.strip() == "PolycellKernel"
