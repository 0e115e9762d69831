"""``python -m polycell``: the ``polycell`` command (jobs, tail, kill, top, log, install, uninstall)."""

from __future__ import annotations

import sys

from polycell.cli import main

if __name__ == "__main__":
    sys.exit(main())
