#!/usr/bin/env bash
# CI for the Python SDK: a venv, `pip install ./python[test]`, pytest against the real agentd.
#
#   python/ci.sh              from anywhere; uses $AGENTD_BIN, target/release/agentd, or target/ci/agentd
#                             (a release build is made if none exists)
#   AGENTD_PY_MYPY=0 ...      skip `mypy --strict` (default: run it)
#   PYTHON=python3.12 ...     the interpreter to use (default: python3, at least 3.9)
#
# Works on a fresh Debian machine with Python 3 and access to PyPI: when
# `python3 -m venv` is missing (Debian's python3-venv) it installs that
# package as root, or falls back to `pip install --user`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
py="${PYTHON:-python3}"
venv="${AGENTD_PY_VENV:-$repo/target/python-venv}"
if [ -z "${AGENTD_BIN:-}" ] && [ ! -x "$repo/target/release/agentd" ] && [ -x "$repo/target/ci/agentd" ]; then
    AGENTD_BIN="$repo/target/ci/agentd"  # what `cargo build --profile ci` made
fi
export AGENTD_BIN="${AGENTD_BIN:-$repo/target/release/agentd}"

step() { printf '\n== %s\n' "$*"; }

if [ ! -x "$AGENTD_BIN" ]; then
    step "building $AGENTD_BIN"
    (cd "$repo" && cargo build --release --bin agentd)
fi

"$py" - <<'EOF'
import sys
if sys.version_info < (3, 9):
    sys.exit(f"python/ci.sh: Python >= 3.9 is needed, this is {sys.version.split()[0]}")
EOF

step "environment ($("$py" --version))"
python=""
if [ -x "$venv/bin/python" ] || "$py" -m venv "$venv" 2>/dev/null; then
    python="$venv/bin/python"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # Debian ships venv separately; the package is named after the interpreter.
    ver="$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${ver}-venv" >/dev/null \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$venv"
    "$py" -m venv "$venv"
    python="$venv/bin/python"
fi

extras="test"
[ "${AGENTD_PY_MYPY:-1}" = 1 ] && extras="test,dev"
if [ -n "$python" ]; then
    echo "venv: $venv"
    "$python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    "$python" -m pip install -q "$here[$extras]"
else
    echo "no venv available: pip install --user"
    python="$py"
    "$python" -m pip install -q --user "$here[$extras]" \
        || "$python" -m pip install -q --user --break-system-packages "$here[$extras]"
fi
# pip builds in the source tree; leave nothing behind there.
rm -rf "$here/build" "$here/src/agentd.egg-info"

if [ "${AGENTD_PY_MYPY:-1}" = 1 ]; then
    step "mypy --strict"
    (cd "$here" && "$python" -m mypy --strict src/agentd)
fi

step "pytest (agentd: $AGENTD_BIN)"
# Run from the tests directory against the installed package, not the source tree.
cd "$here/tests"
set +e
"$python" -m pytest -q -p no:cacheprovider --rootdir "$here" -c "$here/pyproject.toml" "$here/tests" "$@"
rc=$?
set -e
step "summary"
if [ $rc = 0 ]; then
    echo "python SDK: all tests passed"
else
    echo "python SDK: pytest exited with status $rc"
fi
exit $rc
