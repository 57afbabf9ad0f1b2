#!/usr/bin/env bash
# Refresh requirements.lock: install the newest releases that pyproject.toml allows into a fresh
# virtual environment, run the test suite against them, and write what was installed as the lock.
#
#   scripts/lock.sh            refresh the lock (about 5 minutes), then review `git diff requirements.lock`
#   scripts/lock.sh --check    the same into a scratch file; requirements.lock is left as it is
#
# The lock is `pip freeze` of the environment the suite passed in, less torch, nvidia-* and triton
# (AIGC_TORCH chooses the torch build: the CPU one here, a CUDA one elsewhere). scripts/setup.sh installs
# with it as a constraints file. The new lock is written even when a test fails, so that the diff shows
# which upgrade broke it; the script then exits non-zero: commit the lock only once the suite passes
# (docs/dependencies.md).
set -euo pipefail
cd "$(dirname "$0")/.."

out=requirements.lock
[ "${1:-}" = "--check" ] && out=$(mktemp /tmp/aigc-lock.XXXXXX)
venv=$(mktemp -d /tmp/aigc-lock-venv.XXXXXX)
trap 'rm -rf "$venv"' EXIT

PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv "$venv"
echo "installing the newest releases pyproject.toml allows (torch: ${AIGC_TORCH:-torch==2.13.0})..." >&2
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${AIGC_TORCH:-torch==2.13.0}"
torch_version=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
if [ "$("$venv/bin/python" -c 'import torch; print(torch.__version__)')" != "$torch_version" ]; then
    echo "lock: installing the package replaced torch $torch_version; keep AIGC_TORCH within pyproject's range" >&2
    exit 1
fi

status=0
echo "running the test suite against them..." >&2
"$venv/bin/python" -m pytest -q --ignore=tests/test_lock.py || status=$?

{
    echo "# The exact releases the test suite passed with (scripts/lock.sh; do not edit by hand)."
    echo "# $(date -u +%Y-%m-%d), $("$venv/bin/python" --version), $("$venv/bin/python" -c 'import platform; print(platform.machine())')," \
         "torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)') (not pinned: AIGC_TORCH chooses it)"
    [ "$status" -eq 0 ] || echo "# THE SUITE FAILED WITH THESE RELEASES (pytest exit $status): do not commit this lock"
    "$venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
        | grep -v -i -E '^(torch|triton|nvidia-[a-z0-9-]+)==' | sort -f
} > "$out"

if [ "$out" = requirements.lock ]; then
    git --no-pager diff --stat -- requirements.lock || true
    # the lock's own tests read the file just written
    [ "$status" -ne 0 ] || "$venv/bin/python" -m pytest -q tests/test_lock.py || status=$?
fi
if [ "$status" -ne 0 ]; then
    echo "lock: the suite failed with the newest releases (exit $status); the lock in $out shows which" >&2
    exit "$status"
fi
echo "lock: the suite passed with the newest releases; $(grep -c '==' "$out") packages written to $out" >&2
