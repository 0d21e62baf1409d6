#!/usr/bin/env bash
# The test suite (slow multi-process tests included), as CI runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
exec python -m pytest -q -p no:cacheprovider --timeout=900 tests "$@"
