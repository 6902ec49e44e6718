"""What the engines the tests start leave on the host, removed when they stop: mounts below
their data dirs, and the /run/containerd directories containerd 1.6 uses whatever its
configured state dir says (the shims' sockets in s/, ctr's FIFOs in fifo/ and, under runc/,
the runc shim's default --root)."""
from __future__ import annotations

import os
import subprocess
import time

DIRS = ("/run/containerd/runc", "/run/containerd/fifo", "/run/containerd/s", "/run/containerd")


def umount_below(path: str) -> None:
    """Lazily unmounts every mount at or below path, deepest first."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for mp in sorted((p for p in points if p == path or p.startswith(path + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


def absent() -> list[str]:
    """The directories that do not exist yet: the ones an engine started now will have made."""
    return [d for d in DIRS if not os.path.exists(d)]


def remove(made: list[str], wait: float = 5.0) -> None:
    """rmdir each of `made` once empty. The shims of just-removed tasks unlink their sockets
    as they exit, so s/ gets up to `wait` seconds to empty."""
    sockets = "/run/containerd/s"
    end = time.monotonic() + wait
    while sockets in made and os.path.isdir(sockets) and os.listdir(sockets) and time.monotonic() < end:
        time.sleep(0.1)
    for d in made:  # DIRS order: children before /run/containerd
        try:
            os.rmdir(d)
        except OSError:
            pass
