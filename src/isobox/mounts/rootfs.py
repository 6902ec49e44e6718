"""The container's root filesystem, ID-mapped so nothing on disk is chowned.

Two shapes (locked-mounts.md):
- a plain directory: an idmapped clone of it, moved over the rootfs path;
- an overlay that the engine already mounted there (dockerd, containerd, Podman): overlays
  cannot be idmapped themselves, so a new overlay is built from idmapped clones of each
  lower layer and of the upper/work directory, and mounted over the engine's one. The
  mounter's fsuid/fsgid is the container root's host ID while mounting: overlay does its
  internal work (work/work, xattrs, copy-up) with the mounter's credentials, which must be
  representable in the idmapped upper or overlay falls back to read-only.
Both are made by host root in the preparation mount namespace, so trusted.overlay.* xattrs
(opaque dirs, whiteouts written by the engines) keep working.
"""
from __future__ import annotations

import errno
import os
import stat
from contextlib import contextmanager
from isobox.plain import record  # not dataclasses: see isobox.plain

from isobox.errors import IsoboxError
from isobox.linux import syscalls as k
from isobox.mounts import resolve


@record
class OverlaySource:
    lowers: list[str]
    upper: str
    work: str
    other: list[str]      # remaining super options (index=off, userxattr, ...)


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal
    return s.encode().decode("unicode_escape") if "\\" in s else s


def find_mount(path: str, mountinfo: str | None = None) -> tuple[str, str] | None:
    """(fstype, super options) of the topmost mount exactly at path, or None."""
    if mountinfo is None:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    found = None
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        fields = pre.split()
        if len(fields) >= 5 and _unescape(fields[4]) == path:
            parts = post.split()
            found = (parts[0], parts[2] if len(parts) > 2 else "")
    return found


def _fstype_of(path: str) -> str:
    st = os.stat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if pre.split()[2] == dev:
                return post.split()[0]
    return "unknown"


def split_options(opts: str) -> list[str]:
    """Split super options on commas that are not escaped (overlay escapes ',' as '\\,')."""
    out, cur, esc = [], "", False
    for ch in opts:
        if esc:
            cur += ch
            esc = False
        elif ch == "\\":
            cur += ch
            esc = True
        elif ch == ",":
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [o for o in out if o]


def parse_overlay(opts: str) -> OverlaySource:
    lowers: list[str] = []
    upper = work = ""
    other = []
    for o in split_options(opts):
        key, _, val = o.partition("=")
        if key == "lowerdir":
            lowers += [_unescape(p) for p in val.split(":") if p]
        elif key == "lowerdir+":
            lowers.append(_unescape(val))
        elif key == "upperdir":
            upper = _unescape(val)
        elif key == "workdir":
            work = _unescape(val)
        elif key in ("rw", "ro") or key.startswith("lowerdir") or key.startswith("datadir"):
            continue
        else:
            other.append(o)
    return OverlaySource(lowers, upper, work, other)


def idmapped_clone(path: str, userns_fd: int, recursive: bool = False) -> int:
    """A detached, ID-mapped copy of the mount tree at path (O(1), nothing on disk changes)."""
    rec = k.AT_RECURSIVE if recursive else 0
    fd = k.open_tree(k.AT_FDCWD, path, k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC | rec)
    try:
        k.mount_setattr(fd, "", k.AT_EMPTY_PATH | rec, attr_set=k.MOUNT_ATTR_IDMAP, userns_fd=userns_fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _common_parent(a: str, b: str) -> str:
    return os.path.commonpath([a, b])


def mount_overlay(src: OverlaySource, target: str, userns_fd: int, uid: int, gid: int) -> int:
    """Build the overlay over idmapped layers; returns a detached mount fd of it."""
    held: list[int] = []
    try:
        lower_paths = []
        for lower in src.lowers:
            fd = idmapped_clone(lower, userns_fd)
            held.append(fd)
            lower_paths.append(f"/proc/self/fd/{fd}")
        upper_fd = None
        if src.upper:
            # A workdir of our own beside the engine's (inside the layer dir, which the engine
            # removes with the container). Mounting an overlay empties and recreates its
            # work/work: over the engine's workdir that unlinks the directory the engine's own
            # overlay (still mounted on the host, where `docker cp` writes) stages every
            # copy-up in, and its copy-ups then fail with ENOENT. Also, the engine's volatile
            # overlay (podman run --rm) leaves work/work/incompat/volatile, over which the
            # kernel refuses another mount (EINVAL).
            work = os.path.join(os.path.dirname(src.work), "isobox-work")
            import shutil
            shutil.rmtree(work, ignore_errors=True)
            os.mkdir(work, 0o700)
            src = OverlaySource(src.lowers, src.upper, work, src.other)
        if src.upper:
            top = _common_parent(src.upper, src.work)
            upper_fd = idmapped_clone(top, userns_fd)
            held.append(upper_fd)
        return _overlay_as(uid, gid, lower_paths, upper_fd, top if src.upper else "", src)
    finally:
        for fd in held:
            os.close(fd)


@contextmanager
def fs_ids(uid: int, gid: int):
    """Filesystem IDs of the container root's host IDs, with the fs capabilities that
    setfsuid drops raised again; restored to 0 afterwards."""
    eff, perm, inh = k.capget()
    k.setfsgid(gid)
    k.setfsuid(uid)
    k.capset(perm, perm, inh)
    try:
        yield
    finally:
        k.setfsuid(0)
        k.setfsgid(0)
        k.capset(eff, perm, inh)


def _overlay_as(uid: int, gid: int, lowers: list[str], upper_fd: int | None, top: str, src: OverlaySource) -> int:
    # overlay records the mounter's credentials at fsopen/create time (see the module doc)
    with fs_ids(uid, gid):
        fs = k.fsopen("overlay")
        try:
            for p in lowers:
                k.fsconfig(fs, k.FSCONFIG_SET_STRING, "lowerdir+", p)
            if upper_fd is not None:
                base = f"/proc/self/fd/{upper_fd}"
                k.fsconfig(fs, k.FSCONFIG_SET_STRING, "upperdir", base + src.upper[len(top):])
                k.fsconfig(fs, k.FSCONFIG_SET_STRING, "workdir", base + src.work[len(top):])
            for o in src.other:
                key, eq, val = o.partition("=")
                if eq:
                    k.fsconfig(fs, k.FSCONFIG_SET_STRING, key, val)
                else:
                    k.fsconfig(fs, k.FSCONFIG_SET_FLAG, key)
            k.fsconfig(fs, k.FSCONFIG_CMD_CREATE)
            return k.fsmount(fs, k.FSMOUNT_CLOEXEC)
        finally:
            os.close(fs)


def copy_up(rootfs: str, dirs: list[str]) -> None:
    """Copy the directories up in the engine's own overlay (a same-owner chown), before
    isobox's overlay shares its upper directory.

    Two overlays over one upper do not see each other's copy-ups of a directory the other one
    has already looked up: its cached dentry says "lower only" for as long as it lives. The
    directories holding the container's bind mounts (/etc for Docker's /etc/hosts...) are
    pinned by those mounts, so a file `docker cp` later puts there (through the engine's
    overlay, which copies the directory up then) would never show inside. Copied up first,
    both overlays find the directory in the upper and look names up there."""
    rootfd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for d in dirs:
            fd = resolve.exists_in_root(rootfd, d)     # never out of the rootfs through a symlink
            if fd is None:
                continue
            try:
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    os.chown(resolve.fd_path(fd), st.st_uid, st.st_gid)
            except OSError:
                pass              # a read-only layer store, say: the container still starts
            finally:
                os.close(fd)
    finally:
        os.close(rootfd)


def prepare_rootfs(rootfs: str, userns_fd: int, uid: int, gid: int, copy_up_dirs: list[str] = ()) -> str:
    """Mount the idmapped rootfs over rootfs; returns the method used (for the log)."""
    found = find_mount(rootfs)
    if found and found[0] == "overlay":
        src = parse_overlay(found[1])
        if src.upper and copy_up_dirs:
            copy_up(rootfs, copy_up_dirs)
        fd = mount_overlay(src, rootfs, userns_fd, uid, gid)
        method = f"overlay over {len(src.lowers)} idmapped layer(s)" + (" + idmapped upper" if src.upper else "")
    else:
        try:
            fd = idmapped_clone(rootfs, userns_fd)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            fstype = _fstype_of(rootfs)
            # The only fallback the design allows is chowning a runtime-owned copy, which
            # costs O(files); refuse instead, and say what works.
            raise IsoboxError(f"rootfs {rootfs} is on a {fstype} filesystem, which cannot be ID-mapped; isobox "
                              "never chowns images: put the rootfs on ext4, xfs, btrfs or tmpfs, or hand it "
                              "over as an overlay mount") from None
        method = "idmapped bind"
    try:
        k.move_mount(fd, "", k.AT_FDCWD, rootfs, k.MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(fd)
    return method
