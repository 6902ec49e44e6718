#!/usr/bin/env bash
# Sets up isobox on a fresh Debian 12 machine, as root: Debian packages, the venv, the
# entry points, the ID pool; then runs the main job (`isobox demo`) on the built-in image.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=/opt/isobox/venv
export DEBIAN_FRONTEND=noninteractive
if ! dpkg -s busybox-static python3-venv runc crun uidmap hyperfine iproute2 gcc libc6-dev >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq busybox-static python3-venv runc crun uidmap hyperfine iproute2 gcc libc6-dev >/dev/null
fi
# Debian's interpreter by absolute path: a pyenv shim costs 50-90 ms per runtime call
[ -x "$venv/bin/python3" ] || /usr/bin/python3 -m venv "$venv"
"$venv/bin/pip" install -q -e "$here[test]"
# PYTHONDONTWRITEBYTECODE may be set for the caller; the runtime must never compile at start-up
"$venv/bin/python3" -m compileall -q "$here/src" >/dev/null
site=$("$venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for cmd in isobox isobox-runc; do
  # -I: engines call us with arbitrary environments, so ignore PYTHON* variables;
  # -S: skip site (about 5 ms per call) and name the two import roots directly
  if [ "$cmd" = isobox ]; then
    cat > "/usr/local/bin/$cmd.tmp" <<EOS
#!$venv/bin/python3 -IS
import sys
sys.path[:0] = ["$here/src", "$site"]
from isobox.cli.main import main
sys.exit(main())
EOS
  else
    # isobox-runc first offers the call to isoboxd's warm worker (runc/warm_client.py)
    cat > "/usr/local/bin/$cmd.tmp" <<EOS
#!$venv/bin/python3 -IS
import sys
sys.path[:0] = ["$here/src", "$site"]
from isobox.runc.warm_client import forward
code = forward(sys.argv[1:])
if code is not None:
    import posix
    posix._exit(code)      # the worker wrote the output: nothing here to flush or tear down
from isobox.runc.main import main
sys.exit(main())
EOS
  fi
  chmod 755 "/usr/local/bin/$cmd.tmp"
  mv "/usr/local/bin/$cmd.tmp" "/usr/local/bin/$cmd"
done
/usr/local/bin/isobox setup
# a running isoboxd (an upgrade) starts a new server and warm worker on the code just installed
/usr/local/bin/isobox daemon --reload
if [ "${ISOBOX_SETUP_ONLY:-}" != 1 ]; then
  /usr/local/bin/isobox demo
fi
