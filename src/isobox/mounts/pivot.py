"""pivot_root into the prepared rootfs and drop the old root (runc's sequence).

pivot_root moves the root of every task sharing the old root, which is why only the
builder, in its own preparation namespace, ever calls this (locked-mounts.md)."""
from __future__ import annotations

import os

from isobox.linux import syscalls as k


def pivot(rootfs: str) -> None:
    newroot = os.open(rootfs, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    oldroot = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchdir(newroot)
        k.pivot_root(".", ".")
        os.fchdir(oldroot)
        # keep unmount events of the old root from propagating anywhere
        k.mount(None, ".", None, k.MS_SLAVE | k.MS_REC)
        k.umount2(".", k.MNT_DETACH)
        os.chdir("/")
    finally:
        os.close(newroot)
        os.close(oldroot)
