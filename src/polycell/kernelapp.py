"""``python -m polycell.kernelapp -f {connection_file}``: ipykernel's kernel app, running `PolycellKernel`.

Everything IPKernelApp offers (connection files, ``--debug``, profiles,
``--IPKernelApp.*`` options) works unchanged; only the kernel class differs,
and ipykernel's own threads start with SIGINT blocked, so that the kernel's
interrupt always wakes the main thread (see `polycell.interrupts`).
"""

from __future__ import annotations

import contextlib
from typing import Any

from ipykernel.kernelapp import IPKernelApp
from tornado.ioloop import IOLoop
from traitlets import Type, default

from polycell.interrupts import interrupts_blocked

__all__ = ["PolycellKernelApp", "main"]


class PolycellKernelApp(IPKernelApp):
    name = "polycell-kernel"
    kernel_class = Type(
        "polycell.kernel.PolycellKernel",
        klass="ipykernel.kernelbase.Kernel",
        help="The Kernel subclass to be used (polycell's by default).",
    ).tag(config=True)

    @default("log_format")
    def _log_format_default(self) -> str:
        # ipykernel's own prefix, not the class name: it *is* ipykernel's app, and headless
        # tools recognise ipykernel's known warnings by it (nbclient filters "[IPKernelApp]
        # WARNING | Kernel is running over TCP without encryption").
        return "[IPKernelApp]%(highlevel)s %(message)s"

    def initialize(self, argv: Any = None) -> None:
        # Every thread ipykernel starts from here on (iopub, heartbeat, control,
        # shell channel, the parent poller) inherits the blocked SIGINT; `start`
        # lifts it for the main thread alone, once its event loop runs.
        self._starting_threads = contextlib.ExitStack()
        self._starting_threads.enter_context(interrupts_blocked())
        super().initialize(argv)

    def start(self) -> None:
        if self.trio_loop:
            # No tornado loop will run: lift it now. (The parent poller, which
            # IPKernelApp.start starts next, then keeps SIGINT unblocked; it only
            # sleeps and polls, and never changes its signal mask, which is how a
            # thread comes to take the signal before the main thread.)
            self._starting_threads.close()
        else:
            IOLoop.current().add_callback(self._starting_threads.close)
        super().start()


def main() -> None:
    """Start the polycell kernel (as ipykernel's ``launch_new_instance`` does)."""
    PolycellKernelApp.launch_instance()


if __name__ == "__main__":
    main()
