"""``python -m polycell install|uninstall``: see `polycell.kernelspec`."""

from __future__ import annotations

import sys

from polycell.kernelspec import main

if __name__ == "__main__":
    sys.exit(main())
