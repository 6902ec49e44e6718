"""Capabilities judged as the kernel judges them: in the user namespace that owns the object.

CapEff is what a task may do in its *own* user namespace, and a nested user namespace
(`unshare -U -r`, allowed in any container) gives anyone a full CapEff. A decision made on
CapEff alone therefore let the root of a namespace nested in an unprivileged container make
isoboxd act on the container's mounts. The kernel's rule (security/commoncap.c,
cap_capable) is: a task holds capability C over an object owned by user namespace T when
- T is the task's own user namespace and C is in its effective set, or
- T descends from the task's user namespace, and the namespace on that path right below the
  task's was created by the task's euid (a namespace's creator holds every capability in it).
Handlers ask with the owner of what they act on: the caller's mount namespace for mount and
umount, its pid namespace for a new proc, its net namespace for sysfs, the container's own
user namespace for what isoboxd emulates beyond the kernel (mknod, non-namespaced sysctls).
"""
from __future__ import annotations

import errno
import os

from isobox.linux import syscalls as sc

CAP_MKNOD = 27
CAP_SYS_ADMIN = 21


def _euid_and_caps(pid: int) -> tuple[int, int]:
    """(euid as the host sees it, CapEff) from /proc/PID/status."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except (FileNotFoundError, ProcessLookupError):
        raise OSError(errno.ESRCH, f"process {pid} is gone") from None
    return int(fields["Uid"].split()[1]), int(fields["CapEff"], 16)


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise OSError(errno.ESRCH, f"{path}: the caller is gone") from None


def capable_in(pid: int, userns_fd: int, cap: int) -> bool:
    """pid holds cap over objects owned by the user namespace userns_fd (cap_capable)."""
    euid, cap_eff = _euid_and_caps(pid)
    own_fd = _open(f"/proc/{pid}/ns/user")
    try:
        own = _ident(own_fd)
    finally:
        os.close(own_fd)
    ns = os.dup(userns_fd)
    try:
        while True:
            if _ident(ns) == own:
                return bool(cap_eff >> cap & 1)
            try:
                parent = sc.ioctl_ns_get_parent(ns)
            except OSError:
                return False            # the top (the host's): pid's namespace is not above it
            try:
                if _ident(parent) == own and sc.ioctl_ns_get_owner_uid(ns) == euid:
                    return True
            except BaseException:
                os.close(parent)
                raise
            os.close(ns)
            ns = parent
    finally:
        os.close(ns)


def capable_over(pid: int, kind: str, cap: int) -> bool:
    """pid holds cap over its own namespace of kind ("mnt", "pid", "net", ...), as the kernel
    asks before mounting (mnt), creating a proc (pid) or a sysfs (net)."""
    fd = _open(f"/proc/{pid}/ns/{kind}")
    try:
        owner = sc.ioctl_ns_get_userns(fd)
    finally:
        os.close(fd)
    try:
        return capable_in(pid, owner, cap)
    finally:
        os.close(owner)


def capable_in_container(pid: int, init_pid: int, cap: int) -> bool:
    """pid holds cap in the user namespace of the container whose init is init_pid: for what
    isoboxd does beyond the kernel on the container's behalf (container root may; the root of
    a user namespace nested in it may not)."""
    fd = _open(f"/proc/{init_pid}/ns/user")
    try:
        return capable_in(pid, fd, cap)
    finally:
        os.close(fd)
