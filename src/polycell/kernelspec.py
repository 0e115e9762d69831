"""``python -m polycell install`` / ``uninstall``: the ``polycell`` kernelspec.

Shaped like ``ipykernel install`` (same options, same messages) and built on
jupyter_client's `KernelSpecManager`, so the spec lands exactly where
``jupyter kernelspec list`` looks for it. Installing again replaces the spec.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

__all__ = ["KERNEL_NAME", "install", "kernel_dict", "main", "uninstall"]

KERNEL_NAME = "polycell"
DISPLAY_NAME = "Python 3 (polycell)"


def kernel_dict(display_name: str = DISPLAY_NAME) -> dict[str, object]:
    """The kernel.json of the polycell kernel, for this Python."""
    return {
        "argv": [sys.executable, "-m", "polycell.kernelapp", "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        # Interrupts come as interrupt_request messages, so the kernel can keep them
        # away from background jobs' processes (a signal would reach its whole group).
        "interrupt_mode": "message",
        # jupyter_client encrypts the connection (CurveZMQ) only for kernels that say
        # they can, as ipykernel's own spec does; polycell needs no port of its own.
        "metadata": {"debugger": True, "supported_encryption": ["curve"]},
    }


def install(
    *,
    user: bool = False,
    prefix: str | None = None,
    name: str = KERNEL_NAME,
    display_name: str | None = None,
    manager: KernelSpecManager | None = None,
) -> str:
    """Install (or replace) the kernelspec; returns the directory it went to."""
    manager = manager or KernelSpecManager()
    if display_name is None:
        display_name = DISPLAY_NAME if name == KERNEL_NAME else name
    with tempfile.TemporaryDirectory() as tmp:
        source = write_kernel_spec(Path(tmp) / name, overrides=kernel_dict(display_name))
        return manager.install_kernel_spec(source, kernel_name=name, user=user, prefix=prefix)


def uninstall(name: str = KERNEL_NAME, manager: KernelSpecManager | None = None) -> str:
    """Remove the kernelspec `name`; returns the directory removed. Raises NoSuchKernel."""
    manager = manager or KernelSpecManager()
    return manager.remove_kernel_spec(name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m polycell", description="Install or remove the polycell Jupyter kernel."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{install,uninstall}")
    add = commands.add_parser("install", help="install the kernelspec (replacing one of the same name)")
    where = add.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user only")
    where.add_argument(
        "--sys-prefix",
        action="store_const",
        const=sys.prefix,
        dest="prefix",
        help=f"install into this Python's environment ({sys.prefix})",
    )
    where.add_argument("--prefix", help="install under this prefix (PREFIX/share/jupyter/kernels)")
    add.add_argument("--name", default=KERNEL_NAME, help=f"kernelspec name (default: {KERNEL_NAME})")
    add.add_argument(
        "--display-name", help=f"name shown in front ends (default: {DISPLAY_NAME!r}, or the --name)"
    )
    remove = commands.add_parser("uninstall", help="remove the kernelspec")
    remove.add_argument("--name", default=KERNEL_NAME, help=f"kernelspec name (default: {KERNEL_NAME})")
    remove.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "install":
        try:
            dest = install(user=args.user, prefix=args.prefix, name=args.name, display_name=args.display_name)
        except PermissionError as exc:
            hint = "" if args.user else " (perhaps you want --user or --sys-prefix?)"
            print(f"polycell install: {exc}{hint}", file=sys.stderr)
            return 1
        except ValueError as exc:  # jupyter_client refuses names outside [a-zA-Z0-9._-]
            print(f"polycell install: {exc}", file=sys.stderr)
            return 1
        print(f"Installed kernelspec {args.name} in {dest}")
        return 0
    manager = KernelSpecManager()
    try:
        path = manager.get_kernel_spec(args.name).resource_dir
    except NoSuchKernel:
        print(f"Couldn't find kernel spec(s): {args.name}", file=sys.stderr)
        return 1
    if not args.yes and sys.stdin.isatty():
        answer = input(f"Kernel spec to remove: {args.name} {path}\nRemove it [y/N]? ")
        if not answer.strip().lower().startswith("y"):
            return 1
    try:
        removed = uninstall(args.name, manager)
    except PermissionError as exc:
        print(f"polycell uninstall: {exc}", file=sys.stderr)
        return 1
    print(f"Removed {removed}")
    return 0
