"""Resolving mount targets inside the rootfs without ever leaving it.

openat2(RESOLVE_IN_ROOT) treats the rootfs as "/" for every component, symlinks included,
so a symlink planted in an image (/etc -> /host/etc, ../../..) cannot redirect a mount onto
the host. Mounts are then made onto /proc/self/fd/N of the resolved O_PATH descriptor, so
nothing can swap the path between the check and the mount.
"""
from __future__ import annotations

import errno
import os

from isobox.linux import syscalls as k

_RESOLVE = k.RESOLVE_IN_ROOT | k.RESOLVE_NO_MAGICLINKS


def open_in_root(rootfd: int, path: str, flags: int = os.O_PATH) -> int:
    return k.openat2(rootfd, path.lstrip("/") or ".", flags, 0, _RESOLVE)


def ensure_in_root(rootfd: int, path: str, directory: bool = True, _depth: int = 0) -> int:
    """O_PATH fd of path inside the root, creating missing directories (and the last
    component as an empty file when directory is False). A dangling symlink on the way is
    followed inside the root, as the kernel would resolve it for the container."""
    if _depth > 40:
        raise OSError(errno.ELOOP, f"too many symlinks resolving {path}")
    rel = os.path.normpath("/" + path).strip("/")
    if not rel:
        return os.dup(rootfd)
    try:
        return open_in_root(rootfd, rel)
    except FileNotFoundError:
        pass
    parent, _, name = rel.rpartition("/")
    pfd = ensure_in_root(rootfd, parent, True, _depth + 1)
    try:
        try:
            target = os.readlink(name, dir_fd=pfd)
        except OSError:
            target = None
        if target is not None:
            dest = target if target.startswith("/") else f"{parent}/{target}"
            return ensure_in_root(rootfd, dest, directory, _depth + 1)
        if directory:
            try:
                os.mkdir(name, 0o755, dir_fd=pfd)
            except FileExistsError:
                pass
        else:
            try:
                fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                             dir_fd=pfd)
                os.close(fd)
            except FileExistsError:
                pass
        return open_in_root(rootfd, rel)
    finally:
        os.close(pfd)


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def is_dir_fd(fd: int) -> bool:
    import stat
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def exists_in_root(rootfd: int, path: str) -> int | None:
    """O_PATH fd of an existing path, or None."""
    try:
        return open_in_root(rootfd, path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise
