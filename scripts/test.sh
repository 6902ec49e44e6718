#!/usr/bin/env bash
# Runs the whole test suite as root (needs scripts/setup.sh first).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
exec /opt/isobox/venv/bin/python3 -m pytest -q "$@" tests
