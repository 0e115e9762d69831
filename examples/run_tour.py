"""Execute a notebook headlessly with nbclient and print what each cell showed.

    python examples/run_tour.py examples/tour.ipynb [--save] [--kernel NAME]

This is the screenless way to see the tour: every cell runs in a real kernel,
exactly as JupyterLab would run it, and its outputs are printed as text.
``--save`` writes the outputs back into the notebook.
"""

from __future__ import annotations

import argparse
import re
import sys

import nbformat
from nbclient import NotebookClient

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def output_text(output: dict) -> str:
    kind = output["output_type"]
    if kind == "stream":
        return output["text"]
    if kind == "error":
        return ANSI.sub("", "\n".join(output["traceback"])) + "\n"
    data = output.get("data", {})
    if "text/plain" in data:
        return data["text/plain"] + "\n"
    return f"<{', '.join(data)}>\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook")
    parser.add_argument("--save", action="store_true", help="write the outputs back into the notebook")
    parser.add_argument("--kernel", default=None, help="kernel name (default: the notebook's)")
    args = parser.parse_args()
    nb = nbformat.read(args.notebook, as_version=4)
    kernel_name = args.kernel or nb.metadata.get("kernelspec", {}).get("name", "python3")
    NotebookClient(nb, timeout=300, kernel_name=kernel_name).execute()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        print(f"\n── In [{cell.execution_count}] " + "─" * 50)
        print(cell.source)
        print("── Out " + "─" * 56)
        for output in cell.outputs:
            sys.stdout.write(output_text(output))
    if args.save:
        nbformat.write(nb, args.notebook)
    return 0


if __name__ == "__main__":
    sys.exit(main())
