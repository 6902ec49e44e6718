"""containerd 1.6 keeps some state in /run/containerd whatever its configured state dir says:
the shims' sockets (s/), ctr's FIFOs (fifo/) and, under runc/, the runc shim's default
--root. The engines the tests start (their own containerd, dockerd's) remove what they made."""
from __future__ import annotations

import os
import time

DIRS = ("/run/containerd/runc", "/run/containerd/fifo", "/run/containerd/s", "/run/containerd")


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
