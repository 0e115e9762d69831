"""``python -m polycell.kernelapp -f {connection_file}``: ipykernel's kernel app, running `PolycellKernel`.

Everything IPKernelApp offers (connection files, ``--debug``, profiles,
``--IPKernelApp.*`` options) works unchanged; only the kernel class differs,
and ipykernel's own threads start with SIGINT blocked, so that the kernel's
interrupt always wakes the main thread (see `polycell.interrupts`).
"""

from __future__ import annotations

import signal
from functools import partial
from typing import Any

from ipykernel.kernelapp import IPKernelApp
from tornado.ioloop import IOLoop
from traitlets import Type

__all__ = ["PolycellKernelApp", "main"]


class PolycellKernelApp(IPKernelApp):
    name = "polycell-kernel"
    kernel_class = Type(
        "polycell.kernel.PolycellKernel",
        klass="ipykernel.kernelbase.Kernel",
        help="The Kernel subclass to be used (polycell's by default).",
    ).tag(config=True)

    def initialize(self, argv: Any = None) -> None:
        # Every thread ipykernel starts from here on (iopub, heartbeat, control,
        # shell channel, the parent poller) inherits this mask; `start` lifts it
        # for the main thread alone, once its event loop runs.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        super().initialize(argv)

    def start(self) -> None:
        if hasattr(signal, "pthread_sigmask"):
            unblock = partial(signal.pthread_sigmask, signal.SIG_UNBLOCK, {signal.SIGINT})
            if self.trio_loop:  # no tornado loop will run: lift it now
                unblock()
            else:
                IOLoop.current().add_callback(unblock)
        super().start()


def main() -> None:
    """Start the polycell kernel (as ipykernel's ``launch_new_instance`` does)."""
    PolycellKernelApp.launch_instance()


if __name__ == "__main__":
    main()
