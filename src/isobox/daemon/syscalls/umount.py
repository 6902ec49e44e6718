"""umount(2)/umount2(2) for containers.

The kernel already refuses to unmount a locked mount (every initial mount, and the nodes of
a proc or sysfs isoboxd mounted); isoboxd adds the answers Sysbox gives: the caller's own
/proc and /sys are EBUSY (unmounting them would only expose what is beneath), an emulated
node or mask is EINVAL (said explicitly, and audited), and a proc or sysfs that isoboxd
mounted elsewhere is detached with its nodes, as the caller (a plain umount would be EBUSY
because of those submounts). Everything else continues."""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from isobox.daemon import paths
from isobox.daemon.syscalls import nsmount
from isobox.daemon.syscalls.call import Call, Verdict, defer, done, proceed, refuse
from isobox.linux import nscaps
from isobox.linux.nscaps import CAP_SYS_ADMIN
from isobox.daemon.syscalls.registry import handles
from isobox.linux import syscalls as sc

UMOUNT_FLAGS = {sc.MNT_FORCE: "MNT_FORCE", sc.MNT_DETACH: "MNT_DETACH", 4: "MNT_EXPIRE",
                sc.UMOUNT_NOFOLLOW: "UMOUNT_NOFOLLOW"}


@dataclass
class MountInfo:
    id: int
    parent: int
    dev: str
    root: str
    point: str          # relative to the caller's root
    fstype: str
    source: str
    super_opts: str


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mountinfo(pid: int) -> dict[int, MountInfo]:
    out = {}
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            m = MountInfo(int(a[0]), int(a[1]), a[2], _unescape(a[3]), _unescape(a[4]), b[0],
                          _unescape(b[1]) if len(b) > 1 else "", b[2] if len(b) > 2 else "")
            out[m.id] = m
    return out


def is_emulated(m: MountInfo, table: dict[int, MountInfo]) -> bool:
    """isoboxd's FUSE node, its dmi overlay, a mask or a read-only re-bind over proc or sysfs."""
    if m.fstype == "fuse.isoboxd" or m.source.startswith(paths.FS_ROOT):
        return True
    if m.fstype == "overlay" and m.source == "isobox-emulation":
        return True
    parent = table.get(m.parent)
    if parent is None or parent.fstype not in ("proc", "sysfs"):
        return False
    if m.root == "/null":                                          # /dev/null over a file
        return True
    if m.fstype == "tmpfs" and "size=0" in m.super_opts:           # empty read-only tmpfs over a dir
        return True
    return m.fstype == parent.fstype and m.dev == parent.dev and m.root != "/"   # ro re-bind of itself


@handles("umount", "umount2")
def umount(call: Call) -> Verdict:
    target = call.read_str(call.args[0])
    flags = call.args[1] if call.name == "umount2" else 0
    call.detail.update(target=target, flags="|".join(n for b, n in UMOUNT_FLAGS.items() if flags & b) or "0")
    if not nscaps.capable_over(call.pid, "mnt", CAP_SYS_ADMIN):
        return proceed("no CAP_SYS_ADMIN: the kernel refuses")
    if target.startswith("/"):
        # Fast path, no helper: an absolute target is looked up by name in the caller's
        # mountinfo (mount points there are relative to its root). Answering CONTINUE on a
        # name that another thread then changes is safe: every node and mask is locked, so
        # the kernel refuses them itself; only the errno could differ.
        table = mountinfo(call.pid)
        point = os.path.normpath(target).replace("//", "/")
        tops = [m for m in table.values() if m.point == point]
        if not tops:
            return proceed("not a mount point: the kernel answers")
        m = tops[-1]
        children = [c for c in table.values() if c.parent == m.id]
        if not (m.fstype in ("proc", "sysfs") and children and all(is_emulated(c, table) for c in children)
                and m.point not in ("/proc", "/sys")):
            call.detail.update(fstype=m.fstype, source=m.source)
            return _quick(m, table)
    return defer(lambda: _resolved(call, target, flags))


def _quick(m: MountInfo, table: dict[int, MountInfo]) -> Verdict:
    if m.fstype in ("proc", "sysfs") and m.point in ("/proc", "/sys"):
        return refuse(errno.EBUSY, f"{m.point} of the container cannot be unmounted")
    if is_emulated(m, table):
        return refuse(errno.EINVAL, f"{m.point} is an isoboxd node or mask")
    return proceed("the kernel's checks apply")


def _resolved(call: Call, target: str, flags: int) -> Verdict:
    """The target resolved by a helper in the caller's root and cwd (relative paths, and a
    proc or sysfs isoboxd mounted, which is detached as the caller)."""
    caller = nsmount.open_caller(call.pid)
    try:
        if not call.valid():
            return refuse(errno.ESRCH, "caller went away")
        try:
            mnt_id, is_root = nsmount.probe_target(caller, target, bool(flags & sc.UMOUNT_NOFOLLOW))
        except OSError:
            return proceed("target does not resolve: the kernel answers")
        table = mountinfo(call.pid)
        m = table.get(mnt_id)
        if m is None or not is_root:
            return proceed("not a mount point: the kernel answers")
        call.detail.update(fstype=m.fstype, source=m.source)
        return _decide(call, caller, m, table, target, flags)
    finally:
        caller.close()


def _decide(call: Call, caller: nsmount.Caller, m: MountInfo, table: dict[int, MountInfo], target: str,
            flags: int) -> Verdict:
    if m.fstype in ("proc", "sysfs") and m.point in ("/proc", "/sys"):
        return refuse(errno.EBUSY, f"{m.point} of the container cannot be unmounted")
    if is_emulated(m, table):
        return refuse(errno.EINVAL, f"{m.point} is an isoboxd node or mask")
    children = [c for c in table.values() if c.parent == m.id]
    if m.fstype in ("proc", "sysfs") and children and all(is_emulated(c, table) for c in children):
        nsmount.detach_as_caller(caller, target, flags)
        return done(0, f"{m.fstype} detached with its isoboxd nodes")
    return proceed("the kernel's checks apply")
