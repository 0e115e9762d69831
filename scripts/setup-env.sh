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
# In an environment with JupyterLab it also builds the frontend extension (package.json, src/*.ts,
# style/, schema/) into src/polycell/labextension when a source is newer than the build (Node.js
# needed then only), and links the environment's share/jupyter/labextensions/polycell to it.
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
# The link to the built extension (made below) goes before uv runs: uv reinstalls polycell each time,
# and its editable wheel's copy of the extension would go through the link, into the build itself.
_labext_link="$VENV/share/jupyter/labextensions/polycell"
if [ -L "$_labext_link" ]; then rm "$_labext_link"; fi
# An editable install made by hand (pip install -e .) did go through it: that copy's install.json,
# which hatchling would then find twice, says so. The build is made afresh.
_labext_build="$ROOT/src/polycell/labextension"
if [ -e "$_labext_build/install.json" ]; then rm -rf "$_labext_build"; fi
# Left in src/ by the setuptools backend polycell had before; with hatchling's editable install
# (src/ on sys.path) it would be found as a second, stale, polycell distribution.
rm -rf "$ROOT/src/polycell.egg-info"
# The editable install builds no JavaScript (SKIP_JUPYTER_BUILDER): the extension is built below,
# only when its sources changed, which uv cannot tell. The build backend (hatchling and its hook)
# is pinned too (--build-constraint), but for --latest.
case "$_mode" in
    pinned)
        _pip -c "$PINS" uv
        SKIP_JUPYTER_BUILDER=1 "$VENV/bin/uv" pip install --quiet --python "$PY" -c "$PINS" -b "$PINS" \
            -e "$ROOT[$POLYCELL_EXTRAS]"
        ;;
    latest)
        _pip --upgrade uv
        SKIP_JUPYTER_BUILDER=1 "$VENV/bin/uv" pip install --quiet --python "$PY" --upgrade --refresh \
            -e "$ROOT[$POLYCELL_EXTRAS]"
        ;;
    oldest)
        _pip -c "$PINS" uv
        SKIP_JUPYTER_BUILDER=1 "$VENV/bin/uv" pip install --quiet --python "$PY" -b "$PINS" --upgrade \
            --resolution lowest-direct -e "$ROOT[$POLYCELL_EXTRAS]"
        ;;
esac
unset _want_python _rest _base_python _version
export PATH="$VENV/bin:$PATH"

# The JupyterLab (and Notebook 7) extension, for an environment that has JupyterLab: built by jlpm
# (JupyterLab's yarn) and jupyter-builder, from the packages yarn.lock pins, into src/polycell/labextension.
_quietly() {  # runs "$@", showing its output only when it fails (jlpm prints hundreds of lines)
    local log status=0
    log="$(mktemp)"
    "$@" >"$log" 2>&1 || status=$?
    if [ "$status" != 0 ]; then cat "$log" >&2; fi
    rm -f "$log"
    return "$status"
}
_labext_stale() {  # the build is missing, or older than one of its sources
    local built="$_labext_build/package.json"  # the builder writes it last
    [ -f "$built" ] || return 0
    [ -n "$(cd "$ROOT" && find src -maxdepth 1 \( -name '*.ts' -o -name '*.tsx' \) -newer "$built" \
        && find style schema package.json tsconfig.json yarn.lock .yarnrc.yml -newer "$built")" ]
}
_need_node() {
    if ! command -v node >/dev/null; then
        # Debian's nodejs is all that jlpm and the builder need (not npm).
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq nodejs >/dev/null
        fi
        command -v node >/dev/null || {
            echo "setup-env: building the JupyterLab extension needs Node.js (20.19 or newer)" >&2
            exit 1
        }
    fi
    # The builder (rspack) needs ^20.19.0 || >=22.12.0; an older Node.js fails deep inside the build.
    node -e 'const [a, b] = process.versions.node.split(".").map(Number);
             process.exit((a === 20 && b >= 19) || a > 22 || (a === 22 && b >= 12) ? 0 : 1)' || {
        echo "setup-env: the JupyterLab extension's build needs Node.js ^20.19 or >=22.12, not $(node -v)" >&2
        exit 1
    }
}
if [ -x "$VENV/bin/jupyter-labextension" ]; then
    if _labext_stale; then
        _need_node
        # jupyter-builder comes with JupyterLab 4.6; an older JupyterLab (--oldest's) gets the pinned one.
        if [ ! -x "$VENV/bin/jupyter-builder" ]; then
            "$VENV/bin/uv" pip install --quiet --python "$PY" "$(grep '^jupyter-builder==' "$PINS")"
        fi
        # The packages of yarn.lock, exactly: --immutable fails on a yarn.lock that package.json outdates.
        _state="$ROOT/node_modules/.yarn-state.yml"
        if [ ! -f "$_state" ] || [ "$ROOT/yarn.lock" -nt "$_state" ] || [ "$ROOT/package.json" -nt "$_state" ]
        then
            echo "setup-env: installing the JupyterLab extension's packages (jlpm install)" >&2
            (cd "$ROOT" && _quietly jlpm install --immutable && touch "$_state") || {
                echo "setup-env: jlpm install failed (package.json changed? run jlpm install)" >&2
                exit 1
            }
        fi
        # The production build, what a wheel ships: the tests test that.
        echo "setup-env: building the JupyterLab extension (jlpm build:prod)" >&2
        (cd "$ROOT" && _quietly jlpm build:prod)
        unset _state
    fi
    # What `jupyter labextension develop` makes: JupyterLab serves the build from the checkout,
    # so a rebuild (jlpm build, jlpm watch) is picked up by a reload of the page.
    if [ -x "$VENV/bin/jupyter-builder" ]; then
        _quietly "$VENV/bin/jupyter-builder" develop --overwrite "$ROOT"
    else
        _quietly "$VENV/bin/jupyter-labextension" develop --overwrite "$ROOT"
    fi
fi
unset _mode _labext_link _labext_build
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
