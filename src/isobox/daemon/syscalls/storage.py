"""May a set-id file (or one with file capabilities) be made here, for this container?

Decided on what the target *is*, from an fd the helper resolved as the caller, against what
the runtime registered at create (mounts/storage.py) and what the host mounts: never on a
path, nor on the caller's idea of "/", which it controls (pivot_root into a host bind, a
chroot, a nested mount namespace). In order:

1. the container's own storage, registered at create: its rootfs overlay's superblock, or
   the very mount of a plain-directory rootfs that no host user can reach: yes;
2. a superblock registered as reachable by host users (bind sources, a reachable rootfs), or
   one mounted anywhere in the host's mount namespace: no;
3. a filesystem the container mounted itself, which no host user can reach: tmpfs, ramfs,
   FUSE (its server's own writes are vetted here in turn) and overlay (mount.py performs
   every overlay a container mounts, and refuses one whose upper directory fails this very
   test, so copy-up cannot carry an image's set-uid file onto host storage): yes;
4. anything else: no.

The helper calls may_hold_setid in a forked child of the threaded daemon: syscalls only.
"""
from __future__ import annotations

import os

from isobox.linux import syscalls as sc

IN_CONTAINER = frozenset({sc.TMPFS_MAGIC, sc.RAMFS_MAGIC, sc.FUSE_SUPER_MAGIC, sc.OVERLAYFS_SUPER_MAGIC})


class Storage:
    """A container's registered storage, as sets (built in the daemon, before the fork)."""
    __slots__ = ("private_devs", "private_mounts", "host_devs")

    def __init__(self, private_devs: frozenset[int], private_mounts: frozenset[int], host_devs: frozenset[int]):
        self.private_devs = private_devs
        self.private_mounts = private_mounts
        self.host_devs = host_devs

    @classmethod
    def of(cls, doc: dict | None) -> "Storage":
        doc = doc or {}
        return cls(*(frozenset(int(v) for v in doc.get(k, ())) for k in ("private_devs", "private_mounts",
                                                                           "host_devs")))


def host_devices() -> frozenset[int]:
    """st_dev of every superblock mounted in the host's mount namespace (isoboxd's own)."""
    out = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            major, minor = line.split()[2].split(":")
            out.add(os.makedev(int(major), int(minor)))
    return frozenset(out)


def may_hold_setid(fd: int, storage: Storage, host_devs: frozenset[int]) -> tuple[bool, str]:
    """(allowed, why) for the file or directory fd (an O_PATH fd is fine)."""
    dev = os.fstat(fd).st_dev
    if dev in storage.private_devs:
        return True, "the container's own root filesystem"
    if storage.private_mounts and sc.statx_mount(fd, unique=True)[0] in storage.private_mounts:
        return True, "the container's own root filesystem"
    if dev in storage.host_devs:
        return False, "a host directory bound into the container"
    if dev in host_devs:
        return False, "a filesystem mounted on the host"
    if sc.fstatfs(fd) in IN_CONTAINER:
        return True, "a filesystem the container mounted itself"
    return False, "a filesystem that is not the container's own"
