"""The spec's mounts, made by host root inside the rootfs before anything is locked.

Filesystems whose superblock the builder creates (tmpfs, devpts, mqueue, proc, sysfs,
cgroup) are owned by whichever namespaces the builder has joined, so the builder joins the
container's pid, net, ipc and cgroup namespaces first; tmpfs and devpts get uid=/gid= of
the container root's host IDs so container root owns them. Bind sources are idmapped where
the filesystem allows it; otherwise (devices, procfs, ...) they are bound as they are and
their files show as nobody, never chowned.
"""
from __future__ import annotations

import os
import stat

from isobox.errors import IsoboxError
from isobox.linux import syscalls as k
from isobox.mounts import resolve
from isobox.spec import mountopts
from isobox.spec.plan import Mount

_ID_OWNED = {"tmpfs", "devpts"}
_LOCK_FLAGS = k.MS_RDONLY | k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC


def _target(rootfd: int, dest: str, directory: bool) -> int:
    try:
        return resolve.ensure_in_root(rootfd, dest, directory)
    except OSError as e:
        raise IsoboxError(f"mount {dest}: cannot create the target inside the rootfs: {e.strerror}") from None


def bind(rootfd: int, m: Mount, userns_fd: int, log: list[str], pol) -> None:
    """pol: the isobox.policy.model.Policy in force (Plan.policy)."""
    from isobox.policy import check
    src = m.source
    # One descriptor is checked against the policy and is the one mounted (policy/check.py).
    try:
        sfd = os.open(src, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise IsoboxError(f"mount {m.destination}: bind source {src}: {e.strerror}") from None
    try:
        st = os.fstat(sfd)
        check.bind_source(pol, src, sfd, readonly=bool(mountopts.attr_flags(m.options.flags) & k.MOUNT_ATTR_RDONLY))
        is_dir = stat.S_ISDIR(st.st_mode)
        rec = k.AT_RECURSIVE if m.options.recursive_bind else 0
        tfd = _target(rootfd, m.destination, is_dir)
        try:
            fd = k.open_tree(sfd, "", k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC | k.AT_EMPTY_PATH | rec)
        except BaseException:
            os.close(tfd)
            raise
    finally:
        os.close(sfd)
    try:
        idmapped = False
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            log.append(f"{m.destination}: device bound as is (shows as nobody)")
        else:
            try:
                k.mount_setattr(fd, "", k.AT_EMPTY_PATH | rec, attr_set=k.MOUNT_ATTR_IDMAP, userns_fd=userns_fd)
                idmapped = True
            except OSError as e:
                log.append(f"{m.destination}: {src} cannot be idmapped ({e.strerror}); its files show as nobody")
        attrs = mountopts.attr_flags(m.options.flags)
        if idmapped and not pol.writable_idmapped_binds and not attrs & k.MOUNT_ATTR_RDONLY:
            attrs |= k.MOUNT_ATTR_RDONLY
            log.append(f"{m.destination}: {src} bound read-only ({pol.path}: mounts.writable_idmapped_binds = false)")
        if attrs:
            k.mount_setattr(fd, "", k.AT_EMPTY_PATH | rec, attr_set=attrs)
        k.move_mount(fd, "", tfd, "", k.MOVE_MOUNT_F_EMPTY_PATH | k.MOVE_MOUNT_T_EMPTY_PATH)
    finally:
        os.close(fd)
        os.close(tfd)
    if m.options.propagation:
        _propagate(rootfd, m)


def _propagate(rootfd: int, m: Mount) -> None:
    fd = resolve.open_in_root(rootfd, m.destination)
    try:
        k.mount(None, resolve.fd_path(fd), None, m.options.propagation)
    finally:
        os.close(fd)


def filesystem(rootfd: int, m: Mount, uid: int, gid: int) -> None:
    data = list(m.options.data)
    if m.type in _ID_OWNED:
        data = mountopts.shift_id_options(data, uid, gid)
        if m.type == "devpts":
            data = [o for o in data if not o.startswith("uid=")]
    tfd = _target(rootfd, m.destination, True)
    try:
        flags = m.options.flags & ~(k.MS_BIND | k.MS_REC | k.MS_REMOUNT)
        k.mount(m.source or m.type, resolve.fd_path(tfd), m.type, flags, ",".join(data) or None)
    except OSError as e:
        raise IsoboxError(f"mount {m.type} on {m.destination}: {os.strerror(e.errno)}") from None
    finally:
        os.close(tfd)
    if m.options.propagation:
        _propagate(rootfd, m)


def cgroups(rootfd: int, dest: str, inside: list, symlinks: list, uid: int, gid: int) -> None:
    """isobox's own /sys/fs/cgroup: a container-root-owned tmpfs holding each hierarchy,
    mounted from inside the container's cgroup namespace so each root is the container's
    cgroup, and writable so systemd or dockerd inside can make sub-cgroups."""
    for source, rel, fstype, flags, data in inside:
        dest_rel = "/" + rel if not rel.startswith("/") else rel
        tfd = _target(rootfd, dest_rel, True)
        try:
            if fstype == "tmpfs":
                data = ",".join(filter(None, [data, f"uid={uid},gid={gid},mode=755"]))
            k.mount(source, resolve.fd_path(tfd), fstype, flags, data or None)
        except OSError as e:
            raise IsoboxError(f"mount {fstype} on /{rel.lstrip('/')}: {os.strerror(e.errno)}") from None
        finally:
            os.close(tfd)
    for target, link in symlinks:
        parent, _, name = link.strip("/").rpartition("/")
        pfd = resolve.ensure_in_root(rootfd, parent, True)
        try:
            os.symlink(target, name, dir_fd=pfd)
        except FileExistsError:
            pass
        finally:
            os.close(pfd)


def remount_readonly_root(rootfs: str) -> None:
    fd = k.open_tree(k.AT_FDCWD, rootfs, k.OPEN_TREE_CLOEXEC)
    try:
        k.mount_setattr(fd, "", k.AT_EMPTY_PATH, attr_set=k.MOUNT_ATTR_RDONLY)
    finally:
        os.close(fd)
