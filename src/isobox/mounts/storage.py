"""Which of a container's filesystems are its own, and which host users can reach.

A file with a set-uid or set-gid bit (or file capabilities), owned by host root, is root for
every host user who can run it. isoboxd lets a container make one only on storage no host
user can reach, and refuses it everywhere else (daemon/syscalls/storage.py decides). Which is
which is decided here, at create, from host paths that only the runtime sees, and registered
with isoboxd (the "storage" of the container's record):

- private_devs: superblocks that are the container's alone: the overlay isobox mounts for an
  engine's rootfs, when the engine's upper directory lies below a directory host users cannot
  enter (dockerd, containerd and Podman keep theirs root-only, so do `isobox run` containers);
- private_mounts: the container's root mount (its unique mount id) when the rootfs is a plain
  directory no host user can reach. Its superblock is the host's, so only that mount counts:
  not a bind of the same filesystem, not a copy made by a later unshare(CLONE_NEWNS);
- host_devs: every bind source's superblock, and the root's when host users reach it.

Nothing is decided from a path the container controls: the container's root is read through
/proc/<init>/root once the init stands in its final, locked mount namespace.
"""
from __future__ import annotations

import errno
import os
import stat

from isobox.linux import syscalls as k
from isobox.mounts.rootfs import find_mount, parse_overlay
from isobox.spec.plan import Plan

ACL_XATTR = "system.posix_acl_access"


def _has_acl(path: str) -> bool:
    try:
        os.getxattr(path, ACL_XATTR, follow_symlinks=False)
        return True
    except OSError as e:
        return e.errno not in (errno.ENODATA, errno.EOPNOTSUPP)   # unreadable: assume the worst


def reachable_by_host_users(path: str) -> bool:
    """False when some directory on the way to path (or path itself) lets no one but root in:
    owned by root, no search bit for others, and none for its group unless that group is
    root's, with no ACL. Everything below such a directory is out of host users' reach."""
    real = os.path.realpath(path)
    parts = [p for p in real.split("/") if p]
    for i in range(len(parts) + 1):
        where = "/" + "/".join(parts[:i])
        try:
            st = os.lstat(where)
        except OSError:
            return True                      # cannot tell: treat as reachable
        mode = st.st_mode
        if not stat.S_ISDIR(mode):
            continue
        closed = st.st_uid == 0 and not mode & 0o001 and (not mode & 0o010 or st.st_gid == 0)
        if closed and not _has_acl(where):
            return False
    return True


def _bind_sources(plan: Plan) -> list[str]:
    return [m.source for m in plan.mounts if m.options.is_bind and m.source.startswith("/")]


def registration(plan: Plan, init_pid: int) -> dict:
    """What isoboxd records for the container's storage (see the module doc)."""
    root = f"/proc/{init_pid}/root"
    st = os.stat(root)
    found = find_mount(plan.rootfs)
    private_devs: list[int] = []
    private_mounts: list[int] = []
    host_devs: list[int] = []
    if found and found[0] == "overlay":
        upper = parse_overlay(found[1]).upper
        # isobox's own overlay over the engine's layers: a superblock of its own
        if upper and not reachable_by_host_users(upper):
            private_devs.append(st.st_dev)
        else:
            host_devs.append(st.st_dev)
    elif not reachable_by_host_users(plan.rootfs):
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            private_mounts.append(k.statx_mount(fd, unique=True)[0])
        finally:
            os.close(fd)
    else:
        host_devs.append(st.st_dev)
    for src in _bind_sources(plan):
        try:
            host_devs.append(os.stat(src).st_dev)
        except OSError:
            pass                            # gone since the builder bound it: its mount says
    return {"private_devs": private_devs, "private_mounts": private_mounts,
            "host_devs": sorted(set(host_devs))}
