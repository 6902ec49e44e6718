"""mount(2) for containers.

New proc and sysfs mounts are performed by isoboxd (nsmount.new_fs), because the kernel
refuses them to everyone inside a container whose /proc carries locked overmounts; the new
filesystem gets the same isoboxd nodes and masks as the container's own, locked. Filesystems
no user namespace may mount (block-device filesystems, anything exposing host state) are
refused with EPERM and a reason. A new overlay is performed by isoboxd too, as the caller,
and refused when its upper directory is not the container's own storage (copy-up would carry
an image's set-uid files there). Everything else — remounts, binds, moves, propagation
changes, tmpfs, devpts, mqueue, cgroup, fuse — continues: the kernel's own checks on the
caller (capabilities in the owning user namespace, locked mounts) are the policy there."""
from __future__ import annotations

import errno
import functools
import os

from isobox.linux import nscaps
from isobox.linux.nscaps import CAP_SYS_ADMIN
from isobox.daemon.syscalls import nsmount
from isobox.daemon.syscalls.call import Call, Verdict, defer, done, own_fd, proceed, refuse
from isobox.daemon.syscalls.registry import handles
from isobox.daemon.syscalls.storage import Storage, host_devices
from isobox.linux import syscalls as sc

# the namespace whose owner must grant CAP_SYS_ADMIN for a new one (fs/proc/root.c: the
# caller's pid namespace; fs/sysfs/mount.c: its net namespace), besides its mount namespace's
CREATOR_NS = {"proc": "pid", "sysfs": "net"}
OVERLAY_DATA_MAX = 4096       # legacy mount data is one page (copy_mount_options)
EMULATED_TYPES = ("proc", "sysfs")
# FS_USERNS_MOUNT filesystems (the kernel mounts them for a user namespace's root itself)
USERNS_TYPES = frozenset({"tmpfs", "ramfs", "devpts", "mqueue", "cgroup", "cgroup2", "fuse",
                          "binfmt_misc", "bpf", "tracefs"})
# flags that change or move an existing mount: the kernel decides, on locked mounts too
EXISTING = sc.MS_REMOUNT | sc.MS_BIND | sc.MS_MOVE | sc.MS_SHARED | sc.MS_PRIVATE | sc.MS_SLAVE | sc.MS_UNBINDABLE
FLAG_NAMES = {v: n for n, v in vars(sc).items() if n.startswith("MS_") and n not in ("MS_MGC_VAL", "MS_MGC_MSK")}
ATTRS = ((sc.MS_RDONLY, sc.MOUNT_ATTR_RDONLY), (sc.MS_NOSUID, sc.MOUNT_ATTR_NOSUID),
         (sc.MS_NODEV, sc.MOUNT_ATTR_NODEV), (sc.MS_NOEXEC, sc.MOUNT_ATTR_NOEXEC),
         (sc.MS_NOATIME, sc.MOUNT_ATTR_NOATIME), (sc.MS_NODIRATIME, sc.MOUNT_ATTR_NODIRATIME),
         (sc.MS_STRICTATIME, sc.MOUNT_ATTR_STRICTATIME), (sc.MS_NOSYMFOLLOW, sc.MOUNT_ATTR_NOSYMFOLLOW))
# runc mounts on the rootfs through its own O_PATH descriptors ("/proc/self/fd/6"): the
# mount helper is not the caller, so it gets the caller's descriptor instead of the magic link


@functools.lru_cache(maxsize=256)
def flag_names(flags: int) -> str:
    names = [n for bit, n in sorted(FLAG_NAMES.items()) if bit & flags]
    rest = flags & ~sum(FLAG_NAMES)
    return "|".join(names + ([hex(rest)] if rest else [])) or "0"


def _opt_str(call: Call, addr: int, limit: int = 4096) -> str | None:
    return call.read_str(addr, limit) if addr else None


@handles("mount")
def mount(call: Call) -> Verdict:
    src_p, target_p, type_p, flags, data_p = call.args[:5]
    if flags & sc.MS_MGC_MSK == sc.MS_MGC_VAL:      # the pre-2.4 magic: the kernel ignores it
        flags &= ~sc.MS_MGC_MSK
    if not target_p:
        raise OSError(errno.EFAULT, "NULL pointer")
    type_p = type_p if not flags & (sc.MS_BIND | sc.MS_MOVE) else 0
    source, target, fstype = call.read_strs((src_p, 4096), (target_p, 4096), (type_p, 256))
    call.detail.update(source=source, target=target, fstype=fstype, flags=flag_names(flags))
    if flags & EXISTING:
        return proceed("changes an existing mount: the kernel's checks (locked mounts) apply")
    if fstype == "overlay":
        # performed by isoboxd: its upper directory is where copy-up writes (see _overlay)
        data = _opt_str(call, data_p, OVERLAY_DATA_MAX) if data_p else None
        call.detail["data"] = data
        return defer(lambda: _overlay(call, target, flags, data))
    if fstype in EMULATED_TYPES:
        # proc and sysfs data are short option strings (hidepid=, gid=, subset=)
        data = _opt_str(call, data_p, 4096) if data_p else None
        call.detail["data"] = data
        return defer(lambda: _new_fs(call, fstype, target, flags, data))
    if fstype is None or fstype in USERNS_TYPES or fstype.startswith("fuse."):
        return proceed("a filesystem user namespaces may mount: the kernel checks the caller")
    return refuse(errno.EPERM, f"{fstype} cannot be mounted in a container (block device or host filesystem)")


def fs_options(data: str | None) -> list[tuple[str, str | None]]:
    """Legacy mount data "a=b,c" as fsconfig (key, value) pairs; a flag has no value."""
    out: list[tuple[str, str | None]] = []
    for item in (data or "").split(","):
        if item:
            k, eq, v = item.partition("=")
            out.append((k, v if eq else None))
    return out


def mount_attrs(flags: int) -> int:
    return sum(attr for ms, attr in ATTRS if flags & ms)


def _target_fd(call: Call, target: str) -> int | None:
    """The daemon's O_PATH fd of a /proc/self/fd/N target (runc's form), else None."""
    n = own_fd(target)
    if n is None:
        return None
    try:
        return os.open(f"/proc/{call.pid}/fd/{n}", os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OSError(errno.ENOENT, f"caller has no descriptor {n}") from None


def _overlay(call: Call, target: str, flags: int, data: str | None) -> Verdict:
    """An overlay whose upper directory may not hold set-id files is refused: copy-up copies
    the lower file's mode, so touching an image's set-uid root binary through it would put a
    set-uid root file there (a host bind, say). Otherwise mounted for the caller, as the
    caller (nsmount.new_overlay): the kernel makes every other check it would make."""
    if call.container is None:
        return refuse(errno.EPERM, "not a registered container")
    if not nscaps.capable_over(call.pid, "mnt", CAP_SYS_ADMIN):
        return refuse(errno.EPERM, "overlay mount without CAP_SYS_ADMIN over the caller's mount namespace")
    caller = nsmount.open_caller(call.pid)
    target_fd = None
    try:
        target_fd = _target_fd(call, target)
        if not call.valid():
            return refuse(errno.ESRCH, "caller went away")
        req = nsmount.NewOverlay(target, call.detail.get("source"), fs_options(data), mount_attrs(flags),
                                 Storage.of(call.container.storage), host_devices(), target_fd)
        why = nsmount.new_overlay(caller, req)
    finally:
        caller.close()
        if target_fd is not None:
            os.close(target_fd)
    if why:
        return refuse(errno.EPERM, f"overlay refused: its upper directory is on {why}, where copy-up would "
                                   "put the image's set-uid files within host users' reach")
    if not call.valid():
        return refuse(errno.EINTR, "caller went away while mounting")
    return done(0, "overlay mounted as the caller (upper directory on the container's own storage)")


def _new_fs(call: Call, fstype: str, target: str, flags: int, data: str | None) -> Verdict:
    if call.container is None:
        return refuse(errno.EPERM, "not a registered container")
    for kind in ("mnt", CREATOR_NS[fstype]):
        if not nscaps.capable_over(call.pid, kind, CAP_SYS_ADMIN):
            # the kernel's rule, not CapEff: a user namespace nested in the container has a
            # full CapEff but owns neither the container's pid nor its net namespace
            return refuse(errno.EPERM, f"{fstype} mount without CAP_SYS_ADMIN over the caller's {kind} namespace")
    caller = nsmount.open_caller(call.pid)
    target_fd = None
    try:
        target_fd = _target_fd(call, target)
        if not call.valid():                    # the fds above are the caller's, not a reused pid's
            return refuse(errno.ESRCH, "caller went away")
        c = call.container
        nsmount.new_fs(caller, nsmount.NewFs(fstype, target, fs_options(data), mount_attrs(flags), c.key,
                                             call.detail.get("source"), target_fd,
                                             *nsmount.masks_of(c.masked, c.readonly)))
    finally:
        caller.close()
        if target_fd is not None:
            os.close(target_fd)
    if not call.valid():
        return refuse(errno.EINTR, "caller went away while mounting")
    return done(0, f"new {fstype} with isoboxd's nodes and masks")

