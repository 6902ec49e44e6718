"""Masked and read-only paths: files get /dev/null over them, directories an empty
read-only tmpfs; read-only paths are re-bound read-only. Locked later with the rest."""
from __future__ import annotations

import os

from isobox.linux import syscalls as k
from isobox.mounts import dev, resolve


def mask(rootfd: int, paths: list[str]) -> None:
    for p in paths:
        fd = resolve.exists_in_root(rootfd, p)
        if fd is None:
            continue   # e.g. /proc/kcore does not exist on this kernel
        try:
            if resolve.is_dir_fd(fd):
                k.mount("tmpfs", resolve.fd_path(fd), "tmpfs", k.MS_RDONLY | k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC,
                        "size=0,mode=555")
            else:
                dev.bind_node("/dev/null", fd)
        finally:
            os.close(fd)


def readonly(rootfd: int, paths: list[str]) -> None:
    for p in paths:
        fd = resolve.exists_in_root(rootfd, p)
        if fd is None:
            continue
        try:
            clone = k.open_tree(fd, "", k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC | k.AT_RECURSIVE | k.AT_EMPTY_PATH)
            try:
                k.mount_setattr(clone, "", k.AT_EMPTY_PATH | k.AT_RECURSIVE,
                                attr_set=k.MOUNT_ATTR_RDONLY | k.MOUNT_ATTR_NOSUID | k.MOUNT_ATTR_NODEV
                                | k.MOUNT_ATTR_NOEXEC)
                k.move_mount(clone, "", fd, "", k.MOVE_MOUNT_F_EMPTY_PATH | k.MOVE_MOUNT_T_EMPTY_PATH)
            finally:
                os.close(clone)
        finally:
            os.close(fd)
