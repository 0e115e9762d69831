"""The dask cluster that dask mode and ``jobs.map(mode="dask")`` run on, and the client to it.

In order of preference: the client or address given to `polycell.use_dask`,
the scheduler named by ``DASK_SCHEDULER_ADDRESS``, or a `LocalCluster` started
on first use, listening on loopback only, and closed with the runner. Connecting
can take the whole connect timeout (a scheduler that does not answer), so it is
done under a lock of its own, never under the runner's.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from polycell.interrupts import interrupts_blocked
from polycell.job import JobError, one_line

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "DaskCluster", "require_distributed"]

DEFAULT_CONNECT_TIMEOUT = 10.0
INSTALL_HINT = "dask mode needs dask.distributed, which is not installed: pip install polycell[dask]"


def require_distributed() -> None:
    """JobError with the install command when ``distributed`` cannot be imported."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise JobError(INSTALL_HINT) from None


class DaskCluster:
    """The client of one runner: given by the user, or connected (a cluster started) on first use."""

    def __init__(self) -> None:
        require_distributed()
        #: Held while connecting, which can take the whole connect timeout.
        self._connect_lock = threading.Lock()
        self._client: Any = None
        self._cluster: Any = None
        self._owns_client = False
        #: Set by `close`: nothing connects any more.
        self._closed = False

    @property
    def current(self) -> Any:
        """The client if there is one now, else None: never connects."""
        return self._client

    def use(self, client_or_address: Any = None, *, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Any:
        """Switch to a given `distributed.Client` or scheduler address (None: the default choice)."""
        from distributed import Client

        with self._connect_lock:
            if isinstance(client_or_address, Client):
                self._release()
                self._client = client_or_address
                return self._client
            if client_or_address is not None and not isinstance(client_or_address, str):
                raise JobError(
                    "use_dask: give a distributed.Client or a scheduler address such as "
                    f"'tcp://10.0.0.5:8786', not {type(client_or_address).__name__}"
                )
            self._release()
            return self._connect(client_or_address, timeout)

    @property
    def client(self) -> Any:
        """The client, connected (or a LocalCluster started) on first use."""
        with self._connect_lock:
            if self._closed:
                raise JobError("dask: this runner was shut down")
            if self._client is None:
                self._connect(None, DEFAULT_CONNECT_TIMEOUT)
                if self._closed:  # shut down while this connected: nothing may use it now
                    self._release()
                    raise JobError("dask: this runner was shut down")
            return self._client

    def _connect(self, address: str | None, timeout: float) -> Any:
        address = address or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
        # The client's threads, and a local cluster's processes, inherit the
        # blocked SIGINT: the kernel's interrupt is the foreground's alone.
        with interrupts_blocked():
            return self._connect_unmasked(address, timeout)

    def _connect_unmasked(self, address: str | None, timeout: float) -> Any:
        from distributed import Client, LocalCluster

        if address is None:
            import logging

            # Loopback only, the dashboards too (":0" would serve them on every interface;
            # distributed 2024.x workers open theirs whatever `dashboard` says): a cluster
            # anyone on the network can reach runs their code. For a wider one, users start
            # it themselves and pass its client to `polycell.use_dask`.
            self._cluster = LocalCluster(
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                worker_dashboard_address="127.0.0.1:0",
                silence_logs=logging.ERROR,
                preload=["polycell.dask_worker"],  # its dask_setup: the kernel's interrupt is not theirs
            )
            self._client = Client(self._cluster, set_as_default=False)
        else:
            try:
                self._client = Client(address, timeout=timeout, set_as_default=False)
            except (OSError, TimeoutError, ValueError) as exc:
                raise JobError(
                    f"dask: cannot reach the scheduler at {address} within {timeout:g} s ({one_line(exc)})"
                ) from None
        self._owns_client = True
        return self._client

    def _release(self) -> None:
        client, cluster, owned = self._client, self._cluster, self._owns_client
        self._client = self._cluster = None
        self._owns_client = False
        if owned and client is not None:
            client.close()
        if cluster is not None:
            cluster.close()

    def close(self, timeout: float) -> None:
        """Connect no more; release the client (and the cluster started here).

        A thread still connecting holds the connect lock up to its timeout: then
        it sees `_closed` and releases what it got itself.
        """
        self._closed = True
        if self._connect_lock.acquire(timeout=max(0.0, timeout)):
            try:
                self._release()
            finally:
                self._connect_lock.release()
