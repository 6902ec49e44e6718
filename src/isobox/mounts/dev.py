"""/dev inside the container: device files bound from the host, the standard links.

mknod cannot make usable nodes in a user namespace, so every device is a bind of the host
node onto an empty file (it shows as nobody, mode 0666 still lets everyone use it).
"""
from __future__ import annotations

import os

from isobox.linux import syscalls as k
from isobox.mounts import resolve
from isobox.spec.plan import Device

_LINKS = (("/proc/self/fd", "fd"), ("/proc/self/fd/0", "stdin"), ("/proc/self/fd/1", "stdout"),
          ("/proc/self/fd/2", "stderr"), ("/proc/kcore", "core"))


def bind_node(host_path: str, target_fd: int) -> None:
    """Bind a host file (a device node) onto the file target_fd points at."""
    attach(k.open_tree(k.AT_FDCWD, host_path, k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC), target_fd)


def attach(src: int, target_fd: int) -> None:
    """Moves the detached clone src (open_tree) onto target_fd's file; closes src."""
    try:
        k.move_mount(src, "", target_fd, "", k.MOVE_MOUNT_F_EMPTY_PATH | k.MOVE_MOUNT_T_EMPTY_PATH)
    finally:
        os.close(src)


def populate(rootfd: int, devices: list[Device], has_devpts: bool) -> None:
    for dev in devices:
        tfd = resolve.ensure_in_root(rootfd, dev.path, directory=False)
        try:
            bind_node(dev.host_path, tfd)
        finally:
            os.close(tfd)
    dfd = resolve.ensure_in_root(rootfd, "/dev", True)
    try:
        links = list(_LINKS)
        if has_devpts:
            links.append(("pts/ptmx", "ptmx"))
        for target, name in links:
            if name == "core" and not os.path.exists("/proc/kcore"):
                continue
            try:
                os.symlink(target, name, dir_fd=dfd)
            except FileExistsError:
                pass
        for d in ("shm", "pts"):
            try:
                os.mkdir(d, 0o755, dir_fd=dfd)
            except FileExistsError:
                pass
    finally:
        os.close(dfd)
