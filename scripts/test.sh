#!/usr/bin/env bash
# Runs the whole test suite as root (needs scripts/setup.sh first); extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
if [ $# -eq 0 ]; then set -- tests; fi
exec /opt/isobox/venv/bin/python3 -m pytest -q "$@"
