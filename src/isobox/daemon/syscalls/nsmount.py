"""Forked helpers that mount and unmount in a caller's namespaces (shared by mount.py and umount.py).

Why a fresh procfs needs this dance: the kernel refuses a new proc or sysfs (mount_too_revealing)
in any mount namespace owned by a non-init user namespace while the existing /proc has locked
overmounts, which every container has (isoboxd's nodes, the masks), and host root entering
the container's mount namespace is refused too. It does not check in a namespace owned by the
initial user namespace. So, per new mount:

  H  forked from the daemon: unshare(CLONE_NEWNS) (host-owned, private), a scratch tmpfs,
     setns into the caller's pid namespace (and net namespace, for sysfs), then forks
  G  born into the caller's pid namespace, as host root: fsopen/fsconfig/fsmount the new
     filesystem (its superblock belongs to the caller's pid or net namespace), attach it
     on the scratch directory, bind isoboxd's nodes and the masks into it;
     setns into the caller's user namespace and unshare(CLONE_NEWNS) there: the kernel
     copies the tree and locks every submount (as it locked the container's own), and
     open_tree(OPEN_TREE_CLONE|AT_RECURSIVE) detaches that locked copy;
     setns into the caller's mount namespace, chroot to its root, take its uids, gids and
     capabilities, let the kernel check that the caller may create this filesystem there
     (fsopen + FSCONFIG_CMD_CREATE as the caller), resolve the target from its cwd, and
     move_mount the tree onto it (may_mount is checked on the caller's credentials too).

The daemon is multithreaded and setns(CLONE_NEWNS/NEWUSER) needs a single-threaded task, so
every step runs in forked children that only make syscalls and leave with os._exit; the
result (an errno, and a little payload) comes back over a pipe; the daemon reaps by PID with
a deadline (nsexec.fork_helper). Nothing outlives the helpers but the mount they attached.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import struct
from dataclasses import dataclass

from isobox.daemon import paths
from isobox.daemon.fs.nsexec import _HDR, fork_helper, host_to_ns, read_creds
from isobox.daemon.syscalls.storage import Storage, may_hold_setid
from isobox.linux import syscalls as sc
from isobox.spec.rewrite import DEFAULT_MASKED, DEFAULT_READONLY

SCRATCH = f"{paths.RUN_DIR}/mount-scratch"   # only ever mounted on in a helper's private namespace
NODE_FLAGS = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
_MNT = struct.Struct("=QB")                  # umount probe payload: mount id, is a mount root


@dataclass
class Caller:
    """Handles on the caller's namespaces, root and cwd, and its identity inside its user
    namespace, opened by the daemon before acting (then call.valid() proves they are its)."""
    pid: int
    fds: dict[str, int]              # "user", "mnt", "pid", "net", "root", "cwd" -> fd
    groups: list[int]                # host gids (set while still host root)
    uids: tuple[int, int, int]       # as seen in its user namespace
    gids: tuple[int, int, int]
    cap_eff: int
    cap_prm: int

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)


def open_caller(pid: int) -> Caller:
    creds = read_creds(pid)
    fds: dict[str, int] = {}
    try:
        for kind in ("user", "mnt", "pid", "net"):
            fds[kind] = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
        for kind in ("root", "cwd"):
            fds[kind] = os.open(f"/proc/{pid}/{kind}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        uid_map = _read(f"/proc/{pid}/uid_map")
        gid_map = _read(f"/proc/{pid}/gid_map")
    except FileNotFoundError:
        _close(fds)
        raise OSError(errno.ESRCH, f"caller {pid} is gone") from None
    except BaseException:
        _close(fds)
        raise
    uids = tuple(host_to_ns(u, uid_map) for u in creds.uids)
    gids = tuple(host_to_ns(g, gid_map) for g in creds.gids)
    if None in uids or None in gids:
        _close(fds)
        raise OSError(errno.EPERM, "caller's ids are not mapped in its user namespace")
    return Caller(pid, fds, creds.groups, uids, gids, creds.cap_eff, creds.cap_prm)  # type: ignore[arg-type]


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _close(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)


# ------------------------------------------------------------------ fork, report, collect

def _run(child_fn, c: Caller, *extra: int | None) -> tuple[int, bytes]:
    """Fork child_fn(wfd) (it must report and os._exit); (result, payload) or OSError(errno).
    The helper is sealed before it does anything: not traceable by the container it is about
    to enter, holding only the caller's namespace, root and cwd fds and extra."""
    keep = [*c.fds.values(), *(fd for fd in extra if fd is not None)]
    return fork_helper(lambda wfd: _guard(child_fn, wfd), "mount helper", keep)


def _guard(fn, wfd: int, *args) -> None:
    """Runs fn in a forked child; any OSError is reported with its errno. Never returns.
    (Not dumpable: inherited from the sealed first helper; the death signal is not.)"""
    try:
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        fn(wfd, *args)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.write(wfd, _HDR.pack(e.errno or errno.EIO, 0))
    except BaseException:
        pass
    os._exit(1)


def _ok(wfd: int, payload: bytes = b"") -> None:
    os.write(wfd, _HDR.pack(0, 0) + payload)
    os._exit(0)


def _become_caller(c: Caller, root: bool = True) -> None:
    """From host root: the caller's user namespace, mount namespace, root and identity.
    setns(mnt) comes before the credentials drop so that it needs no CAP_SYS_CHROOT of the
    caller; everything after (lookups, fsopen, move_mount, umount) runs on its own rights."""
    os.setgroups(c.groups)                    # host gids, while still privileged in the init user namespace
    sc.setns(c.fds["user"], sc.CLONE_NEWUSER)
    sc.setns(c.fds["mnt"], sc.CLONE_NEWNS)
    if root:
        os.fchdir(c.fds["root"])
        os.chroot(".")
    _drop(c)


def _drop(c: Caller) -> None:
    sc.prctl(sc.PR_SET_KEEPCAPS, 1)
    os.setresgid(*c.gids)
    os.setresuid(*c.uids)
    sc.capset(c.cap_eff & c.cap_prm, c.cap_prm, 0)
    # a credential change resets dumpable to fs.suid_dumpable, which may be 1 on a host
    sc.prctl(sc.PR_SET_DUMPABLE, 0)


def _open_target(c: Caller, target: str, nofollow: bool = False) -> int:
    """The target as the kernel resolves it for the caller: from its root and cwd."""
    if not target.startswith("/"):
        os.fchdir(c.fds["cwd"])
    return os.open(target, os.O_PATH | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0))


# ------------------------------------------------------------------ new proc / sysfs

@dataclass
class NewFs:
    fstype: str                     # "proc" or "sysfs"
    target: str                     # as the caller passed it
    options: list[tuple[str, str | None]]   # fsconfig key/value pairs from the mount data
    attrs: int                      # MOUNT_ATTR_* from the mount flags
    key: str                        # the container's isoboxd key (its nodes under FS_ROOT/key)
    source: str | None = None       # shown in mountinfo, as mount(2) would record it
    target_fd: int | None = None    # the daemon's O_PATH fd of the caller's /proc/self/fd/N target
    masked: tuple[str, ...] = DEFAULT_MASKED      # the container's own masks (its spec's and isobox's)
    readonly: tuple[str, ...] = DEFAULT_READONLY


def masks_of(masked: list[str], readonly: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A container's registered masks with isobox's defaults (a container registered by an
    older runtime has none of its own)."""
    def clean(paths_: list[str]) -> list[str]:
        # the engine's strings, used below a staging directory: no "..", no relative forms
        return [p for p in paths_ if p.startswith(("/proc/", "/sys/")) and os.path.normpath(p) == p]
    return (tuple(dict.fromkeys([*clean(masked), *DEFAULT_MASKED])),
            tuple(dict.fromkeys([*clean(readonly), *DEFAULT_READONLY])))


def new_fs(c: Caller, req: NewFs) -> None:
    """Mounts a fresh proc or sysfs carrying the container's emulation and masks on the
    caller's target. Raises OSError with the kernel's errno for the caller."""
    os.makedirs(SCRATCH, mode=0o700, exist_ok=True)
    _run(lambda wfd: _outer(wfd, c, req), c, req.target_fd)


def _outer(wfd: int, c: Caller, req: NewFs) -> None:
    """H: a private host-owned mount namespace, born-into the caller's pid namespace for G."""
    sc.unshare(sc.CLONE_NEWNS)
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)      # nothing here reaches the host
    sc.mount("isobox-scratch", SCRATCH, "tmpfs", NODE_FLAGS, "mode=700,size=64k")
    if req.fstype == "sysfs":
        sc.setns(c.fds["net"], sc.CLONE_NEWNET)     # sysfs shows the net namespace of its creator
    sc.setns(c.fds["pid"], sc.CLONE_NEWPID)         # procfs belongs to the creator's *active* pid ns
    g = os.fork()
    if g == 0:
        _guard(_inner, wfd, c, req)
    os.close(wfd)
    os.waitpid(g, 0)
    os._exit(0)


def _inner(wfd: int, c: Caller, req: NewFs) -> None:
    """G: build as host root, lock in the caller's user namespace, attach as the caller."""
    stage = f"{SCRATCH}/fs"
    os.mkdir(stage)
    fs = _create(req, host=True)
    sc.move_mount(fs, "", sc.AT_FDCWD, stage, sc.MOVE_MOUNT_F_EMPTY_PATH)
    os.close(fs)
    decorate(stage, req.fstype, req.key, bool(req.attrs & sc.MOUNT_ATTR_RDONLY), req.masked, req.readonly)
    os.setgroups(c.groups)
    sc.setns(c.fds["user"], sc.CLONE_NEWUSER)
    sc.unshare(sc.CLONE_NEWNS)          # copied into a namespace of the caller's user ns: submounts locked
    tree = sc.open_tree(sc.AT_FDCWD, stage, sc.OPEN_TREE_CLONE | sc.OPEN_TREE_CLOEXEC | sc.AT_RECURSIVE)
    sc.setns(c.fds["mnt"], sc.CLONE_NEWNS)
    os.fchdir(c.fds["root"])
    os.chroot(".")
    _drop(c)
    os.close(_create(req, host=False))  # may the caller create this fs? (mount_capable, netns/pidns owner)
    tfd = req.target_fd if req.target_fd is not None else _open_target(c, req.target)
    sc.move_mount(tree, "", tfd, "", sc.MOVE_MOUNT_F_EMPTY_PATH | sc.MOVE_MOUNT_T_EMPTY_PATH)
    _ok(wfd)


def _create(req: NewFs, host: bool) -> int:
    """fsopen + options + CMD_CREATE; as host root also fsmount (the mount fd), as the caller
    only the context (the kernel's permission check; mount_too_revealing is at fsmount)."""
    ctx = sc.fsopen(req.fstype)
    try:
        if req.source:
            sc.fsconfig(ctx, sc.FSCONFIG_SET_STRING, "source", req.source)
        for key, value in req.options:
            if value is None:
                sc.fsconfig(ctx, sc.FSCONFIG_SET_FLAG, key)
            else:
                sc.fsconfig(ctx, sc.FSCONFIG_SET_STRING, key, value)
        sc.fsconfig(ctx, sc.FSCONFIG_CMD_CREATE)
        if not host:
            return os.dup(ctx)
        return sc.fsmount(ctx, sc.FSMOUNT_CLOEXEC, req.attrs)
    finally:
        os.close(ctx)


def decorate(stage: str, fstype: str, key: str, ro: bool, masked: tuple[str, ...] = DEFAULT_MASKED,
             readonly: tuple[str, ...] = DEFAULT_READONLY) -> None:
    """isoboxd's nodes, the masks and the read-only paths of the container's own /proc or
    /sys (the spec's maskedPaths and readonlyPaths with isobox's defaults), onto the new
    filesystem attached at stage (builder.py does the same, same order)."""
    prefix = "/proc" if fstype == "proc" else "/sys"
    extra = sc.MS_RDONLY if ro else 0
    for kind, source, dest in paths.emulated(key):
        where = _under(stage, prefix, dest)
        if where is None or not os.path.lexists(where):
            continue        # this kernel has no such node (configfs, say), as the builder skips it
        if kind == "overlay":
            sc.mount("isobox-emulation", where, "overlay", sc.MS_RDONLY | NODE_FLAGS, f"lowerdir={source}:{where}")
        else:
            _bind(source, where, NODE_FLAGS | extra)
    for dest in masked:
        where = _under(stage, prefix, dest)
        if where is None or not os.path.lexists(where) or not _plain(stage, where):
            continue        # (a path through a symlink, /proc/self/..., would leave the new tree)
        if os.path.isdir(where):
            sc.mount("tmpfs", where, "tmpfs", sc.MS_RDONLY | NODE_FLAGS, "size=0,mode=555")
        else:
            sc.mount("/dev/null", where, None, sc.MS_BIND)
    for dest in readonly:
        where = _under(stage, prefix, dest)
        if where is not None and os.path.lexists(where) and _plain(stage, where):
            _bind(where, where, sc.MS_RDONLY | NODE_FLAGS)


def _plain(stage: str, where: str) -> bool:
    """where, below stage, is reached without following a symlink."""
    return os.path.realpath(where) == os.path.realpath(stage) + where[len(stage):]


def _under(stage: str, prefix: str, dest: str) -> str | None:
    if not dest.startswith(prefix + "/"):
        return None
    return stage + dest[len(prefix):]


def _bind(source: str, where: str, flags: int) -> None:
    sc.mount(source, where, None, sc.MS_BIND)
    sc.mount(None, where, None, sc.MS_BIND | sc.MS_REMOUNT | flags)


# ------------------------------------------------------------------ overlay

@dataclass
class NewOverlay:
    target: str                     # as the caller passed it
    source: str | None
    options: list[tuple[str, str | None]]   # the caller's mount data, in order
    attrs: int                      # MOUNT_ATTR_* from the mount flags
    storage: Storage                # the container's registered storage (setid's decision)
    host_devs: frozenset[int]
    target_fd: int | None = None    # the daemon's O_PATH fd of a /proc/self/fd/N target


LAYER_FDS = ("upperdir", "workdir")     # handed to the kernel as fds (FSCONFIG_SET_FD, Linux 6.13)


def unescape(value: str) -> str:
    """overlayfs' own unescaping of a layer path in legacy mount data (a backslash quotes the
    next character: "\\," is a comma, "\\:" a colon)."""
    out, esc = [], False
    for ch in value:
        if esc or ch != "\\":
            out.append(ch)
            esc = False
        else:
            esc = True
    return "".join(out)


def new_overlay(c: Caller, req: NewOverlay) -> str:
    """Mounts an overlay for the caller, as the caller, unless its upper directory may not hold
    set-id files (storage.may_hold_setid): copy-up would then copy an image's set-uid root
    file onto storage host users reach. Returns "" when mounted, else why it was refused.
    The upper and work directories are resolved once, by the helper as the caller, checked
    through those fds and given to the kernel as fds: nothing is looked up twice."""
    _, payload = _run(lambda wfd: _overlay(wfd, c, req), c, req.target_fd)
    return payload.decode(errors="replace")


def _overlay(wfd: int, c: Caller, req: NewOverlay) -> None:
    _become_caller(c)
    os.fchdir(c.fds["cwd"])
    layers: dict[str, int] = {}
    for key, value in req.options:
        if key in LAYER_FDS and value is not None:
            layers[key] = os.open(unescape(value), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    upper = layers.get("upperdir")
    if upper is not None:
        ok, why = may_hold_setid(upper, req.storage, req.host_devs)
        if not ok:
            _ok(wfd, why.encode())
    ctx = sc.fsopen("overlay")
    if req.source:
        sc.fsconfig(ctx, sc.FSCONFIG_SET_STRING, "source", req.source)
    for key, value in req.options:
        if key in LAYER_FDS and value is not None:
            sc.fsconfig_fd(ctx, key, layers[key])
        elif value is None:
            sc.fsconfig(ctx, sc.FSCONFIG_SET_FLAG, key)
        else:
            sc.fsconfig(ctx, sc.FSCONFIG_SET_STRING, key, value)
    sc.fsconfig(ctx, sc.FSCONFIG_CMD_CREATE)
    tree = sc.fsmount(ctx, sc.FSMOUNT_CLOEXEC, req.attrs)
    tfd = req.target_fd if req.target_fd is not None else _open_target(c, req.target)
    sc.move_mount(tree, "", tfd, "", sc.MOVE_MOUNT_F_EMPTY_PATH | sc.MOVE_MOUNT_T_EMPTY_PATH)
    _ok(wfd)


# ------------------------------------------------------------------ umount

def probe_target(c: Caller, target: str, nofollow: bool) -> tuple[int, bool]:
    """(mount id, is a mount root) of the target as the caller's root and cwd resolve it.
    Only looks (no action), as host root in the caller's mount namespace."""
    _, payload = _run(lambda wfd: _probe(wfd, c, target, nofollow), c)
    mnt_id, root = _MNT.unpack(payload[:_MNT.size])
    return mnt_id, bool(root)


def _probe(wfd: int, c: Caller, target: str, nofollow: bool) -> None:
    sc.setns(c.fds["mnt"], sc.CLONE_NEWNS)
    os.fchdir(c.fds["root"])
    os.chroot(".")
    fd = _open_target(c, target, nofollow)
    mnt_id, root = sc.statx_mount(fd)
    _ok(wfd, _MNT.pack(mnt_id, int(root)))


def detach_as_caller(c: Caller, target: str, flags: int) -> None:
    """umount2(target, flags | MNT_DETACH) with the caller's own rights: a proc or sysfs that
    isoboxd mounted has its (locked) nodes as submounts, so a plain umount would be EBUSY."""
    _run(lambda wfd: _detach(wfd, c, target, flags), c)


def _detach(wfd: int, c: Caller, target: str, flags: int) -> None:
    _become_caller(c)
    if not target.startswith("/"):
        os.fchdir(c.fds["cwd"])
    sc.umount2(target, flags | sc.MNT_DETACH)
    _ok(wfd)
