"""The new mount API: fsopen, fspick, open_tree.

fsopen("proc"/"sysfs"/"overlay") answers ENOSYS: libmount (util-linux >= 2.39) and runc then
fall back to mount(2), which isoboxd emulates or vets (mount.py); an overlay's upper
directory named through fsconfig would bypass that vetting. Answering ENOSYS rather than letting it
through matters: the kernel would refuse the too-revealing fsmount with EPERM, which callers
report as an error instead of falling back.
  Measured (kernel 6.18, privileged isobox container with all capabilities, trap off):
  fsopen("proc") and fsopen("sysfs") succeed, FSCONFIG_CMD_CREATE succeeds, fsmount fails
  EPERM (mount_too_revealing is checked at fsmount), while tmpfs goes through all three —
  so other types may continue: the kernel refuses a too-revealing fsmount itself.
fspick and open_tree continue: reconfiguring or cloning existing mounts is checked by the
kernel (superblock owner for fspick's reconfigure; a non-recursive clone of a tree with
locked submounts is EINVAL, a recursive one keeps them locked)."""
from __future__ import annotations

import errno

from isobox.daemon.syscalls.call import Call, Verdict, proceed, refuse
from isobox.daemon.syscalls.registry import handles

# proc and sysfs are emulated, overlay vetted (mount.py): all three only through mount(2)
FALLBACK_TYPES = ("proc", "sysfs", "overlay")


@handles("fsopen")
def fsopen(call: Call) -> Verdict:
    fstype = call.read_str(call.args[0], 256)
    call.detail.update(fstype=fstype, flags=hex(call.args[1]))
    if fstype in FALLBACK_TYPES:
        return refuse(errno.ENOSYS, f"fsopen({fstype}) is handled through mount(2): callers fall back to it")
    return proceed("the kernel checks fsmount (mount_too_revealing, FS_USERNS_MOUNT)")


@handles("fspick", "open_tree")
def existing_mount(call: Call) -> Verdict:
    return proceed("works on an existing mount: the kernel's checks on locked mounts apply")
