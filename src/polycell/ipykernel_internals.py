"""The ipykernel internals the polycell kernel relies on, in one place.

`PolycellKernel` (kernel.py) derives from `Ipykernel74`, which names every
private part of ipykernel's kernel it uses and wraps the few it calls into
helpers of its own (those of ipykernel's IOPub thread are in iopub_batch.py).
tests/test_kernel.py::test_ipykernel_internals_polycell_relies_on fails if any
of them moves.
"""

from __future__ import annotations

from hmac import compare_digest
from typing import Any

from ipykernel.ipkernel import IPythonKernel
from traitlets import Float

from polycell.shared_socket import DirectSender, SharedSocket

__all__ = ["Ipykernel74"]


class Ipykernel74(IPythonKernel):
    """ipykernel's kernel, with the internals polycell relies on named, written against ipykernel 7.4.0.

    Each is used only here or in `PolycellKernel`:

    * ``shell_channel_thread_main(msg)``: the coroutine the shell channel thread
      runs for every message arriving on the shell socket, before it is queued
      for the main thread (or a subshell). This is the interception point. It
      holds ``shell_channel_thread.asyncio_lock`` while it routes a message; a
      request taken out of the queue skips that lock, which is safe because
      everything here runs synchronously on that same thread's event loop (no
      ``await`` between looking at a message and answering it), so it cannot
      interleave with ipykernel's routing of another message.
    * ``dispatch_shell(msg, /, subshell_id, *, concurrent)``: where the main
      thread begins a queued request, run or aborted (see `MainThreadQueue`).
    * ``_shell_parent`` / ``_shell_parent_ident``: the context variables that
      ``get_parent("shell")`` and ``raw_input`` read. ``set_parent`` sets them
      too, but also resets the kernel-wide fallbacks, which must keep pointing
      at the foreground cell; so they are set directly, in a copied context.
    * ``_publish_status``, ``_publish_execute_input``, ``_topic``,
      ``_input_request``, ``_get_shell_context_var``: the kernel's own helpers,
      reused as ipykernel uses them.
    * ``_forward_input(allow_stdin)`` / ``_restore_input()``, called by
      ``do_execute`` around every cell, and the attributes they keep:
      ``_allow_stdin`` (read by ``raw_input``/``getpass``), ``_sys_raw_input``
      and ``_save_getpass`` (the originals that ``_restore_input`` puts back).
      polycell overrides both to keep input forwarded between cells.
    * ``_execute_sleep``: a 0.5 ms pause before each execute reply (FIXME there); 0 here.
    * ``shell_channel_thread.manager.get_subshell_to_shell_channel_socket(None)``:
      where the main thread sends its replies, for the shell channel thread to
      forward; polycell sends them itself, on the shell socket (`SharedSocket`).
    """

    _execute_sleep = Float(0.0).tag(config=True)

    def _send_replies_directly(self) -> Any:
        """The main thread sends its own replies; returns the sender for the shell channel thread's."""
        if self.shell_channel_thread is None or self.shell_stream is None:
            return self.shell_stream
        stream, manager = self.shell_stream, self.shell_channel_thread.manager
        shared = SharedSocket(stream.socket, stream.io_loop, stream)
        forwarded = manager.get_subshell_to_shell_channel_socket
        main = DirectSender(shared, forwarded(None))
        manager.get_subshell_to_shell_channel_socket = lambda sub: main if sub is None else forwarded(sub)
        shared.share()
        return DirectSender(shared, stream)

    def _set_request_parent(self, idents: list[bytes], msg: dict[str, Any]) -> None:
        """Make `msg` the parent in the current context only (kernel, shell, streams, displays)."""
        self._shell_parent.set(msg)
        self._shell_parent_ident.set(idents)
        self.shell.set_thread_parent(msg)

    def _peek(self, frames: list[Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Header, metadata and content of a raw message, unverified (a cheap look).

        `frames` is what ``session.feed_identities`` leaves: the Jupyter wire
        protocol's ``[signature, header, parent_header, metadata, content, *buffers]``
        as ``zmq.Frame`` objects (ipykernel 7.4 receives shell messages with
        ``copy=False``).
        """
        unpack = self.session.unpack
        return unpack(frames[1].bytes), unpack(frames[3].bytes), unpack(frames[4].bytes)

    def _signed(self, frames: list[Any]) -> bool:
        """Whether ipykernel will accept the message: its HMAC signature checks (as deserialize does)."""
        if self.session.auth is None:
            return True
        return compare_digest(frames[0].bytes, self.session.sign([f.bytes for f in frames[1:5]]))

    def _publish_error(self, content: dict[str, Any], parent: dict[str, Any]) -> None:
        """An ``error`` message on iopub, as ipykernel's shell sends for a failed cell."""
        self.session.send(self.iopub_socket, "error", content, parent=parent, ident=self._topic("error"))
