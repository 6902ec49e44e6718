#!/usr/bin/env bash
# Runs the whole test suite as root (needs scripts/setup.sh first); extra arguments go to pytest.
# The end-to-end tests start their own dockerd, containerd and Podman: only the packages are
# installed here, no service is started (containernetworking-plugins: the CNI bridge of tests/e2e/test_cri.py).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
e2e="docker.io containerd podman iptables gcc libc6-dev containernetworking-plugins"
if ! dpkg -s $e2e >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq $e2e >/dev/null
fi
if [ $# -eq 0 ]; then set -- tests; fi
exec /opt/isobox/venv/bin/python3 -m pytest -q "$@"
