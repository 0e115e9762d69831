"""``python -m polycell.kernelapp -f {connection_file}``: ipykernel's kernel app, running `PolycellKernel`.

Everything IPKernelApp offers (connection files, ``--debug``, profiles,
``--IPKernelApp.*`` options) works unchanged; only the kernel class differs.
"""

from __future__ import annotations

from ipykernel.kernelapp import IPKernelApp
from traitlets import Type

__all__ = ["PolycellKernelApp", "main"]


class PolycellKernelApp(IPKernelApp):
    name = "polycell-kernel"
    kernel_class = Type(
        "polycell.kernel.PolycellKernel",
        klass="ipykernel.kernelbase.Kernel",
        help="The Kernel subclass to be used (polycell's by default).",
    ).tag(config=True)


def main() -> None:
    """Start the polycell kernel (as ipykernel's ``launch_new_instance`` does)."""
    PolycellKernelApp.launch_instance()


if __name__ == "__main__":
    main()
