"""Who can talk to a polycell kernel: encrypted transport, signed control requests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zmq
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.session import Session

from kernel_session import POLYCELL_KERNEL, KernelSession, kernel_env, polycell
from polycell.control import REPLY_TYPE, REQUEST_TYPE
from polycell.kernelspec import kernel_dict


@pytest.fixture
def encrypted_kernel(tmp_path: Path) -> KernelSession:
    """The polycell kernel, started as jupyter_client starts it when encryption is required."""
    km = KernelManager(transport_encryption="required", connection_file=str(tmp_path / "kernel-curve.json"))
    # The installed kernelspec's own declaration decides whether "required" may start it.
    km._kernel_spec = KernelSpec(**{**kernel_dict(), "argv": POLYCELL_KERNEL})
    km.start_kernel(env=kernel_env())
    try:
        session = KernelSession(attach_to=km)
        try:
            yield session
        finally:
            session.close()
    finally:
        km.shutdown_kernel(now=True)


def test_the_kernelspec_declares_curve_encryption():
    assert kernel_dict()["metadata"] == {"debugger": True, "supported_encryption": ["curve"]}


def test_every_polycell_path_works_over_an_encrypted_connection(encrypted_kernel, dask_cluster, tmp_path):
    kernel = encrypted_kernel
    info = json.loads(Path(kernel.connection_file).read_text())
    assert info["curve_publickey"] and info["curve_secretkey"]
    # The kernel's own sockets are CurveZMQ servers: nothing reaches it in plain text.
    assert kernel.eval(
        "[s.get(__import__('zmq').CURVE_SERVER) for s in (get_ipython().kernel.parent.shell_socket,"
        " get_ipython().kernel.parent.control_socket, get_ipython().kernel.parent.iopub_socket)]"
    ) == [1, 1, 1]

    thread = kernel.execute("%%bg --name t\nprint('from a thread job')")
    process = kernel.execute("%%bg --mode process --name p\nvalue = 6 * 7\nprint('from a process job')")
    kernel.run(f"import polycell\n_ = polycell.use_dask({dask_cluster!r})")
    dask = kernel.execute("%%bg --mode dask --name d\nprint('from a dask job')\nfrom_dask = 2 * 3")
    sleeper = kernel.execute("%%bg --name s\nimport time\ntime.sleep(120)")
    jobs = [kernel.job_id(msg_id) for msg_id in (thread, process, dask, sleeper)]
    for job in jobs[:3]:
        kernel.wait_job_end(job, timeout=60)
    assert kernel.text(thread, "stdout") == "from a thread job\n"
    assert "from a process job\n" in kernel.text(process, "stdout")
    assert kernel.text(dask, "stdout") == "from a dask job\n"
    assert kernel.eval("(value, from_dask)") == (42, 6)

    # The command line, a second client with the same connection file, over the control channel.
    listed = polycell("jobs", "--json", "--existing", kernel.connection_file, runtime=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [(r["id"], r["status"]) for r in json.loads(listed.stdout)] == [
        (jobs[0], "done"),
        (jobs[1], "done"),
        (jobs[2], "done"),
        (jobs[3], "running"),
    ]
    killed = polycell("kill", str(jobs[3]), "--existing", kernel.connection_file, runtime=tmp_path)
    assert (killed.returncode, killed.stdout) == (0, f"job {jobs[3]} killed\n"), killed.stderr


def test_a_control_request_not_signed_with_the_kernels_key_gets_no_answer():
    kernel = KernelSession(POLYCELL_KERNEL, load_ext=False)
    context = zmq.Context()
    control = context.socket(zmq.DEALER)
    control.linger = 0
    try:
        km = kernel.km
        control.connect(f"{km.transport}://{km.ip}:{km.control_port}")
        request = {"action": "jobs"}
        unsigned = Session(key=b"", username="intruder")
        wrong_key = Session(key=b"not the kernel's key", signature_scheme=km.session.signature_scheme)
        rightful = Session(key=km.session.key, signature_scheme=km.session.signature_scheme)
        unsigned.send(control, REQUEST_TYPE, request)
        wrong_key.send(control, REQUEST_TYPE, request)
        sent = rightful.send(control, REQUEST_TYPE, request)
        # The control channel answers in order: a reply to either bad request would come first.
        assert control.poll(30_000), "no reply at all, not even to the signed request"
        _, reply = rightful.feed_identities(control.recv_multipart())
        reply = rightful.deserialize(reply)
        assert reply["msg_type"] == REPLY_TYPE
        assert reply["parent_header"]["msg_id"] == sent["header"]["msg_id"]
        assert reply["content"]["status"] == "ok"
    finally:
        control.close()
        context.term()
        kernel.close()
