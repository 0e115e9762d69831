# Sourced by scripts/demo, scripts/test and benchmarks/run: makes a virtual environment and
# installs polycell (editable) with the extras named in POLYCELL_EXTRAS. Needs only a python3
# (with venv and pip) on the machine; uv, from PyPI, does the installing.
#
# Which versions it installs, taken from the caller's arguments (the rest are left in "$@"):
#   (default)       the pins in requirements/constraints.txt: what the README's commands are tested with
#   --latest        the newest releases, ignoring the pins (run it at the start of each session)
#   --oldest        the lowest versions pyproject.toml allows for polycell's direct dependencies
#   --python X.Y    that Python instead of python3 (found on PATH or under pyenv's versions)
# The pinned environment of the default python3 is .venv; every other one is .venvs/MODE-pyX.Y.
# Sets ROOT, VENV and PY, and puts the environment's bin first on PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PINS="$ROOT/requirements/constraints.txt"
_mode=pinned
_want_python=""
_rest=()
while [ $# -gt 0 ]; do
    case "$1" in
        --latest | --oldest) _mode="${1#--}" ;;
        --python)
            [ $# -ge 2 ] || { echo "setup-env: --python needs a version, e.g. --python 3.13" >&2; exit 2; }
            _want_python="$2"
            shift
            ;;
        --python=*) _want_python="${1#--python=}" ;;
        *) _rest+=("$1") ;;
    esac
    shift
done
set -- ${_rest[@]+"${_rest[@]}"}

# The interpreter: python3, or the X.Y asked for. A pyenv shim on PATH may name a version
# that is not selected (and then fails), so each candidate is asked for its version.
_python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
_find_python() {
    local candidate
    for candidate in "$(command -v "python$1" || true)" /usr/bin/"python$1" /usr/local/bin/"python$1" \
        $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$1".*/bin/"python$1" 2>/dev/null | sort -rV); do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && [ "$(_python_version "$candidate")" = "$1" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}
if [ -n "$_want_python" ]; then
    _base_python="$(_find_python "$_want_python")" || {
        echo "setup-env: no Python $_want_python on this machine (looked on PATH and in pyenv's versions)" >&2
        exit 2
    }
else
    _base_python="$(command -v python3)" || { echo "setup-env: python3 is not on PATH" >&2; exit 2; }
fi
_version="$(_python_version "$_base_python")"
if ! "$_base_python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup-env: polycell needs Python 3.11 or newer; $_base_python is $_version" >&2
    exit 2
fi

if [ "$_mode" = pinned ] && [ -z "$_want_python" ]; then
    VENV="$ROOT/.venv"
else
    VENV="$ROOT/.venvs/$_mode-py$_version"
fi
if [ -x "$VENV/bin/python" ] && [ "$(_python_version "$VENV/bin/python")" != "$_version" ]; then
    rm -rf "$VENV"  # made by another Python (python3 was upgraded): start again
fi
if [ ! -x "$VENV/bin/python" ]; then
    if ! "$_base_python" -m venv "$VENV" 2>/dev/null; then
        rm -rf "$VENV"
        # Debian's python3 ships venv (with ensurepip) separately.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        fi
        "$_base_python" -m venv "$VENV" || {
            echo "setup-env: '$_base_python -m venv' failed: install Debian's python3-venv" >&2
            exit 1
        }
    fi
fi
PY="$VENV/bin/python"

# uv resolves and installs in seconds, and can resolve lowest versions; it comes from PyPI,
# pinned like everything else, into the environment itself. It never downloads a Python.
export UV_PYTHON_DOWNLOADS=never
_pip() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }
case "$_mode" in
    pinned)
        _pip -c "$PINS" uv
        "$VENV/bin/uv" pip install --quiet --python "$PY" -c "$PINS" -e "$ROOT[$POLYCELL_EXTRAS]"
        ;;
    latest)
        _pip --upgrade uv
        "$VENV/bin/uv" pip install --quiet --python "$PY" --upgrade --refresh -e "$ROOT[$POLYCELL_EXTRAS]"
        ;;
    oldest)
        _pip -c "$PINS" uv
        "$VENV/bin/uv" pip install --quiet --python "$PY" --upgrade --resolution lowest-direct \
            -e "$ROOT[$POLYCELL_EXTRAS]"
        ;;
esac
unset _mode _want_python _rest _base_python _version
export PATH="$VENV/bin:$PATH"
# One line in the log saying what this run is tested with.
"$PY" - "${VENV#"$ROOT"/}" >&2 <<'PYTHON'
import platform, sys
from importlib.metadata import PackageNotFoundError, version
found = []
for name in ("ipython", "ipykernel", "jupyter_client", "pyzmq", "cloudpickle", "distributed", "jupyterlab"):
    try:
        found.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        pass
print(f"setup-env: {sys.argv[1]}: Python {platform.python_version()}, " + ", ".join(found))
PYTHON
