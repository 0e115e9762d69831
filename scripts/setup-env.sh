# Sourced by scripts/demo and scripts/test: makes .venv and installs polycell with the
# extras named in POLYCELL_EXTRAS. Needs only python3 (with venv and pip) on the machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        rm -rf "$VENV"
        # Debian's python3 ships venv (with ensurepip) separately.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        fi
        python3 -m venv "$VENV" || {
            echo "python3 -m venv failed: install Debian's python3-venv (apt-get install -y python3-venv)" >&2
            exit 1
        }
    fi
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[$POLYCELL_EXTRAS]"
export PATH="$VENV/bin:$PATH"
