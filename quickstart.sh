#!/usr/bin/env bash
# The main job, from a clean clone: set up, then train a small GPT on the Tang poems, write poems,
# evaluate them, and print where the run and its report are.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --corpora
exec .venv/bin/aigc quickstart "$@"
