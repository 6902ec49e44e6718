"""The host-root builder (C): pid 2 of the container, in its own preparation mount
namespace, builds the whole tree, pivots, then enters the container's user namespace and
unshares a new mount namespace. Because that namespace is owned by the container's user
namespace, the kernel locks every mount copied into it (MNT_LOCKED and the MNT_LOCK_* flags),
which is what makes the initial mounts impossible to undo from inside."""
from __future__ import annotations

import os
from collections.abc import Callable

from isobox.linux import syscalls as k
from isobox.mounts import dev, emulation, masks, pivot, resolve, rootfs, specmounts
from isobox.spec.plan import Plan


def build(plan: Plan, ns_fds: dict[str, int], cgroupns: Callable[[], int], cgroup_inside: tuple[list, list],
          log: list[str]) -> str:
    """Runs in the forked builder (sealed by launch.py); returns the rootfs method. Raises on
    any failure.

    cgroupns() blocks until the init has its cgroup namespace and returns an fd of it."""
    k.prctl(k.PR_SET_DUMPABLE, 0)
    k.unshare(k.CLONE_NEWNS)
    k.mount(None, "/", None, k.MS_REC | k.MS_PRIVATE)
    # superblocks of sysfs, mqueue and cgroupfs belong to the mounter's namespaces
    for name, flag in (("net", k.CLONE_NEWNET), ("ipc", k.CLONE_NEWIPC), ("uts", k.CLONE_NEWUTS)):
        if name in ns_fds:
            k.setns(ns_fds[name], flag)
    if plan.hostname:
        k.sethostname(plan.hostname)
    if plan.domainname:
        k.setdomainname(plan.domainname)
    method = rootfs.prepare_rootfs(plan.rootfs, ns_fds["user"], plan.uid_base, plan.gid_base,
                                   _bind_parents(plan))
    rootfd = os.open(plan.rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    has_devpts = False
    # Missing mount targets are created in the idmapped rootfs, where host uid 0 has no
    # mapping (EOVERFLOW): create them as the container root's host IDs (on disk: 0).
    with rootfs.fs_ids(plan.uid_base, plan.gid_base):
        for m in plan.mounts:
            if m.type == "isobox-cgroup":
                fd = cgroupns()
                try:
                    k.setns(fd, k.CLONE_NEWCGROUP)   # cgroupfs roots at the mounter's cgroup namespace
                finally:
                    os.close(fd)
                specmounts.cgroups(rootfd, m.destination, cgroup_inside[0], cgroup_inside[1], plan.uid_base,
                                   plan.gid_base)
            elif m.options.is_bind:
                specmounts.bind(rootfd, m, ns_fds["user"], log, plan.policy)
            else:
                specmounts.filesystem(rootfd, m, plan.uid_base, plan.gid_base)
                has_devpts |= m.type == "devpts" and m.destination == "/dev/pts"
        dev.populate(rootfd, plan.devices, has_devpts)
    _sysctl(rootfd, plan.sysctl)        # through the kernel's /proc/sys, before isoboxd's covers it
    emulation.bind(rootfd, plan.emulation, plan.emulation_prefetch.fds if plan.emulation_prefetch else None)
    masks.mask(rootfd, plan.masked_paths)
    masks.readonly(rootfd, plan.readonly_paths)
    os.close(rootfd)
    if plan.readonly_root:
        specmounts.remount_readonly_root(plan.rootfs)
    pivot.pivot(plan.rootfs)
    k.setns(ns_fds["user"], k.CLONE_NEWUSER)
    k.unshare(k.CLONE_NEWNS)
    # all that is left is waiting in the container's pid namespace until the runtime opened
    # this namespace: as container root, not host uid 0 (and still not dumpable)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    k.prctl(k.PR_SET_DUMPABLE, 0)        # the new credentials set it to fs.suid_dumpable
    return method


def _bind_parents(plan: Plan) -> list[str]:
    """The directories that hold the spec's bind mounts (each mount pins its parents)."""
    out = []
    for m in plan.mounts:
        parent = os.path.dirname(os.path.normpath("/" + m.destination))
        if m.options.is_bind and parent != "/" and parent not in out:
            out.append(parent)
    return out


def _sysctl(rootfd: int, values: dict[str, str]) -> None:
    from isobox.errors import IsoboxError
    for key, val in values.items():
        path = "/proc/sys/" + key.replace(".", "/")
        try:
            fd = resolve.open_in_root(rootfd, path)
            try:
                w = os.open(resolve.fd_path(fd), os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(w, val.encode())
                finally:
                    os.close(w)
            finally:
                os.close(fd)
        except OSError as e:
            raise IsoboxError(f"sysctl {key}={val}: {e.strerror}") from None
