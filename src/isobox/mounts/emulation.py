"""isoboxd's emulated /proc and /sys nodes, mounted over the container's own before the
builder enters the user namespace, so the kernel locks them like every initial mount."""
from __future__ import annotations

import os

from isobox.linux import syscalls as k
from isobox.mounts import dev, resolve


def bind(rootfd: int, mounts: list[tuple[str, str, str]]) -> None:
    for kind, source, dest in mounts:
        fd = resolve.exists_in_root(rootfd, dest)
        if fd is None:
            continue    # the spec mounts no /proc, or this kernel has no such node (configfs)
        try:
            if kind == "overlay":
                target = resolve.fd_path(fd)
                # lower layers only: read-only, the container's own directory stays the bottom one
                k.mount("isobox-emulation", target, "overlay", k.MS_RDONLY | k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC,
                        f"lowerdir={source}:{target}")
            else:
                dev.bind_node(source, fd)
        finally:
            os.close(fd)
