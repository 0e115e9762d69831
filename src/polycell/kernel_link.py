"""A second client of a running kernel that asks it about its jobs, over the control channel.

The kernel answers ``polycell_request`` messages (`polycell.control`) from its
control thread, so an answer comes even while a cell keeps the main thread
busy. The ``polycell`` command (`polycell.cli`) and headless runs
(`polycell.headless`, to kill what is left) use this client.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["CliError", "KernelLink"]


class CliError(Exception):
    """A failure to report as one line on stderr."""


class KernelLink:
    """A control-channel client of one kernel, for ``polycell_request`` messages."""

    def __init__(self, connection_file: str, timeout: float = 3.0) -> None:
        from jupyter_client import BlockingKernelClient

        self.connection_file = connection_file
        self.timeout = timeout
        self._client = BlockingKernelClient()
        try:
            self._client.load_connection_file(connection_file)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CliError(f"{connection_file} is not a kernel connection file ({exc})") from None
        self._client.start_channels(shell=False, iopub=False, stdin=False, hb=False, control=True)
        self._verified = False
        self._early: dict[str, dict[str, Any]] = {}

    def close(self) -> None:
        self._client.stop_channels()

    def __enter__(self) -> KernelLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, msg_type: str, content: dict[str, Any]) -> str:
        msg = self._client.session.msg(msg_type, content)
        self._client.control_channel.send(msg)
        return str(msg["header"]["msg_id"])

    def _next_reply(self, deadline: float, waiting_for: set[str]) -> dict[str, Any]:
        """The next control reply to one of `waiting_for`; replies to older requests are dropped."""
        import queue

        while True:
            for msg_id in waiting_for:
                if msg_id in self._early:
                    return self._early.pop(msg_id)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CliError(
                    f"no answer from the kernel of {self.connection_file} within {self.timeout:g}s: "
                    "is it still running? (the connection file may be stale)"
                )
            try:
                msg = self._client.control_channel.get_msg(timeout=remaining)
            except queue.Empty:
                continue
            parent_id = msg.get("parent_header", {}).get("msg_id")
            if parent_id in waiting_for:
                self._early[parent_id] = msg

    def request(self, action: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return the reply content; a polycell error becomes a `CliError`."""
        deadline = time.monotonic() + self.timeout
        request_id = self._send("polycell_request", {"action": action, **fields})
        if not self._verified:
            # The control channel answers in order: a kernel_info reply that comes
            # before ours means the kernel skipped our request (no polycell there).
            probe_id = self._send("kernel_info_request", {})
            first = self._next_reply(deadline, {request_id, probe_id})
            if first["parent_header"]["msg_id"] == probe_id:
                raise CliError(
                    f"the kernel of {self.connection_file} does not answer polycell requests: "
                    "run %load_ext polycell in it, or start it with the polycell kernel"
                )
            self._verified = True
            reply = first
        else:
            reply = self._next_reply(deadline, {request_id})
        content = reply["content"]
        if content.get("status") != "ok":
            raise CliError(str(content.get("evalue") or content))
        return content
