"""``python -m polycell.kernelapp -f {connection_file}``: ipykernel's kernel app, running `PolycellKernel`.

Everything IPKernelApp offers (connection files, ``--debug``, profiles,
``--IPKernelApp.*`` options) works unchanged; only the kernel class differs,
ipykernel's own threads start with SIGINT blocked, so that the kernel's
interrupt always wakes the main thread (see `polycell.interrupts`), and
ZeroMQ's I/O threads ask for short time slices (`polycell.zmq_io_threads`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from ipykernel.kernelapp import IPKernelApp
from tornado.ioloop import IOLoop
from traitlets import Type, default

from polycell.interrupts import interrupts_blocked
from polycell.zmq_io_threads import shorten_io_thread_slices

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
        _log_only_what_is_shown(self.log)
        # The kernel's sockets exist now, and with them ZeroMQ's I/O threads.
        self.log.debug("libzmq I/O threads with short time slices: %s", shorten_io_thread_slices())

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


def _log_only_what_is_shown(log: logging.Logger | logging.LoggerAdapter) -> None:
    """Set the app's logger to the lowest level one of its handlers shows.

    traitlets leaves the logger at DEBUG and lets its handlers filter (WARNING by
    default). ipykernel logs each shell request at DEBUG several times, and each of
    those calls then builds a record (walking the stack for its caller) that no
    handler shows: about 4% of a trivial cell's time on the main thread. ``--debug``,
    ``log_level`` and a handler added by ``logging_config`` still show what they did.
    """
    logger = log.logger if isinstance(log, logging.LoggerAdapter) else log
    if logger.handlers:
        logger.setLevel(max(1, min(handler.level for handler in logger.handlers)))


def main() -> None:
    """Start the polycell kernel (as ipykernel's ``launch_new_instance`` does)."""
    PolycellKernelApp.launch_instance()


if __name__ == "__main__":
    main()
