"""mknod(2) / mknodat(2): the safe character devices are made for the container.

The kernel refuses device nodes to anyone without CAP_MKNOD in the initial user namespace,
so container root cannot `mknod /dev/null c 1 3` (image builds, chroot-style setup scripts
and some package post-install scripts do). isoboxd makes these seven for the caller:

  1:3 null  1:5 zero  1:7 full  1:8 random  1:9 urandom  5:0 tty  5:2 ptmx

They are the container's device cgroup's CORE (cgroups/devices.py), which the container may
open whatever the policy says, so a node made here is always usable. 5:1 (console) is not
one: it is the host's system console, which the clamp denies (EPERM here, not a dead node).

Everything the kernel already allows a container (regular files, FIFOs, sockets, the 0:0
overlayfs whiteout) continues into the kernel unchanged; a regular file with a set-id mode
is left to the set-id module; every other device is refused with EPERM.

How a node is made, so that the kernel still makes every decision it would make for the
caller: a short-lived helper (forked; the daemon is threaded) chroots into the caller's root
(/proc/<pid>/root) and resolves the path from the caller's cwd or dirfd, so "..", symlinks
and the idmapped rootfs mount behave exactly as for the caller. It takes the caller's fsuid,
fsgid, groups and umask, and of its host capabilities keeps CAP_MKNOD plus the caller's DAC
overrides (only where the caller's own would apply). The node is therefore owned by the
caller as the kernel would own it (root:root inside for container root, through the rootfs
idmapping). A node on a filesystem the container mounted itself (a superblock owned by the
container's user namespace, SB_I_NODEV) or on a nodev mount could never be opened; the
helper checks by opening it and refuses with EPERM instead of leaving a dead node.
"""
from __future__ import annotations

import contextlib
import errno
import importlib
import os
import socket
import stat
import struct
from dataclasses import dataclass

from isobox.linux import nscaps
from isobox.daemon.fs import nsexec
from isobox.daemon.syscalls.call import Call, Verdict, done, proceed, refuse
from isobox.daemon.syscalls.registry import handles
from isobox.linux import sealed
from isobox.linux import syscalls as sc

SAFE = {(1, 3): "null", (1, 5): "zero", (1, 7): "full", (1, 8): "random", (1, 9): "urandom",
        (5, 0): "tty", (5, 2): "ptmx"}
HARMLESS_OPEN = {"null", "zero", "full", "random", "urandom"}   # opening them has no side effect
WHITEOUT = (0, 0)             # overlayfs whiteout: the kernel allows it in a user namespace itself
AT_FDCWD = -100
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_MKNOD = 1, 2, 27
DAC_CAPS = (1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)
HELPER_TIMEOUT = 5.0
_REPLY = struct.Struct("=ii")  # errno (0 = done), reason code
NODEV = 1                      # reason: the node would be unusable where it was asked for

_TYPES = {stat.S_IFCHR: "character device", stat.S_IFBLK: "block device"}


@dataclass
class Request:
    dirfd: int                # AT_FDCWD or the caller's descriptor number
    path_addr: int
    mode: int                 # umode_t: type and permission bits
    major: int
    minor: int


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def decode_dev(dev: int) -> tuple[int, int]:
    """include/linux/kdev_t.h new_decode_dev(): the syscall's 32-bit dev -> (major, minor)."""
    dev &= 0xFFFFFFFF
    return (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def decode(call: Call) -> Request:
    a = call.args
    if call.name == "mknod":            # mknod(path, mode, dev)
        return Request(AT_FDCWD, a[0], a[1] & 0xFFFF, *decode_dev(a[2]))
    return Request(_s32(a[0]), a[1], a[2] & 0xFFFF, *decode_dev(a[3]))   # mknodat(dirfd, path, mode, dev)


def classify(mode: int, major: int, minor: int) -> str:
    """"kernel": let the kernel do it (it allows it, or refuses with its own errno);
    "setid": a set-id regular file, for the set-id module; "make": a safe device to make;
    "refuse": a device the container may not have."""
    kind = stat.S_IFMT(mode)
    if kind in (0, stat.S_IFREG):
        return "setid" if mode & (stat.S_ISUID | stat.S_ISGID) else "kernel"
    if kind == stat.S_IFCHR:
        if (major, minor) == WHITEOUT:
            return "kernel"
        return "make" if (major, minor) in SAFE else "refuse"
    if kind == stat.S_IFBLK:
        return "refuse"
    return "kernel"                     # FIFOs, sockets; S_IFDIR and junk get the kernel's errno


# -- the caller ----------------------------------------------------------------------------

@dataclass
class Caller:
    fsuid: int                # host ids (/proc/<pid>/status as the host reads it)
    fsgid: int
    groups: list[int]
    cap_eff: int              # in the caller's own user namespace
    umask: int
    uid_map: str
    gid_map: str


def _proc_text(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/{name}") as f:
        return f.read()


def caller(pid: int) -> Caller:
    fields = dict(ln.split(":", 1) for ln in _proc_text(pid, "status").splitlines() if ":" in ln)
    umask = fields.get("Umask")
    return Caller(fsuid=int(fields["Uid"].split()[3]), fsgid=int(fields["Gid"].split()[3]),
                  groups=[int(g) for g in fields.get("Groups", "").split()],
                  cap_eff=int(fields["CapEff"], 16), umask=int(umask, 8) if umask else 0o022,
                  uid_map=_proc_text(pid, "uid_map"), gid_map=_proc_text(pid, "gid_map"))


def mapped(host_id: int, id_map: str) -> bool:
    for line in id_map.splitlines():
        parts = line.split()
        if len(parts) == 3 and int(parts[1]) <= host_id < int(parts[1]) + int(parts[2]):
            return True
    return False


# -- the helper ----------------------------------------------------------------------------

@dataclass
class Plan:
    """Everything the helper needs, opened before fork (the child only makes syscalls)."""
    root: int                 # O_PATH fd of the caller's root
    base: int                 # O_PATH fd the path is relative to (cwd or dirfd); root for absolute paths
    parent: str               # the path's directory part ("." for a bare name)
    name: str                 # its last component
    mode: int
    dev: int
    harmless: bool            # the node itself may be opened to prove it usable
    who: Caller


def split(path: str) -> tuple[str, str]:
    """(directory, last component). A trailing slash leaves an empty last component."""
    head, _, tail = path.rpartition("/")
    if not head and path.startswith("/"):
        head = "/"
    return head or ".", tail


def _open_base(pid: int, dirfd: int, path: str, root: int) -> int:
    if path.startswith("/"):
        return os.dup(root)
    where = f"/proc/{pid}/cwd" if dirfd == AT_FDCWD else f"/proc/{pid}/fd/{dirfd}"
    try:
        fd = os.open(where, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OSError(errno.EBADF, "bad dirfd") from None
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.ENOTDIR, "dirfd is not a directory")
    return fd


def _caps_for(plan: Plan, parent_st: os.stat_result) -> int:
    """CAP_MKNOD, plus the caller's DAC overrides where the kernel would honour them: only
    on a directory whose owner and group are mapped into the caller's user namespace."""
    caps = 1 << CAP_MKNOD
    dac = plan.who.cap_eff & DAC_CAPS
    if dac and mapped(parent_st.st_uid, plan.who.uid_map) and mapped(parent_st.st_gid, plan.who.gid_map):
        caps |= dac
    return caps


def _usable(parent: int, name: str, plan: Plan) -> bool:
    """Whether device nodes work in that directory: open one (with a DAC override, so only
    a nodev mount or an SB_I_NODEV superblock can say EACCES). tty and ptmx have
    side effects on open, so a scratch null node stands in for them."""
    probe = name if plan.harmless else f".isobox-mknod-probe-{os.getpid()}"
    if not plan.harmless:
        os.mknod(probe, stat.S_IFCHR | 0o600, os.makedev(1, 3), dir_fd=parent)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=parent)
        os.close(fd)
        return True
    except PermissionError:
        return False
    finally:
        if not plan.harmless:
            with contextlib.suppress(OSError):
                os.unlink(probe, dir_fd=parent)


def _make(plan: Plan) -> int:
    """In the child, chrooted and with the caller's identity: 0 or NODEV (raises OSError)."""
    os.umask(plan.who.umask)
    os.setgroups(plan.who.groups)
    sc.setfsgid(plan.who.fsgid)
    sc.setfsuid(plan.who.fsuid)       # clears the fs capabilities from the effective set
    sc.prctl(sc.PR_SET_DUMPABLE, 0)   # the fsuid change reset it to fs.suid_dumpable
    _eff, prm, _inh = sc.capget()
    sc.capset((1 << CAP_MKNOD | plan.who.cap_eff & DAC_CAPS) & prm, prm, 0)   # for the walk
    if not plan.name:
        raise OSError(errno.ENOENT, "trailing slash")
    if plan.name in (".", ".."):
        raise OSError(errno.EEXIST, "exists")
    parent = os.open(plan.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=plan.base)
    sc.capset(_caps_for(plan, os.fstat(parent)) & prm, prm, 0)
    if os.fstatvfs(parent).f_flag & os.ST_NODEV:
        return NODEV
    os.mknod(plan.name, plan.mode, plan.dev, dir_fd=parent)
    sc.capset(prm, prm, 0)            # the usability probe must not fail on permissions
    if not _usable(parent, plan.name, plan):
        with contextlib.suppress(OSError):
            os.unlink(plan.name, dir_fd=parent)
        return NODEV
    return 0


def _child(plan: Plan, sock: socket.socket) -> None:
    """Never returns."""
    code, err = 0, errno.EIO
    try:
        sealed.seal((plan.root, plan.base, sock.fileno()))
        os.fchdir(plan.root)
        os.chroot(".")                # the caller's "/": absolute paths and ".." stop there
        code, err = _make(plan), 0
    except OSError as e:
        err = e.errno or errno.EIO
    except BaseException:  # noqa: BLE001 - the child must reach os._exit
        pass
    with contextlib.suppress(OSError):
        sock.send(_REPLY.pack(err, code))
    os._exit(0)


def run_helper(plan: Plan) -> tuple[int, int]:
    """(errno, reason code) from a forked helper; (EIO, 0) when it died or hung."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        child = os.fork()
        if child == 0:
            ours.close()
            _child(plan, theirs)
        theirs.close()
        ours.settimeout(HELPER_TIMEOUT)
        try:
            reply = ours.recv(_REPLY.size)
        except (TimeoutError, OSError):
            reply = b""
        nsexec.reap(child, finished=len(reply) == _REPLY.size)
    finally:
        ours.close()
        theirs.close()
    return _REPLY.unpack(reply) if len(reply) == _REPLY.size else (errno.EIO, 0)


# -- the handler ---------------------------------------------------------------------------

def _describe(req: Request) -> str:
    kind = _TYPES.get(stat.S_IFMT(req.mode), f"type {stat.S_IFMT(req.mode):o}")
    return f"{kind} {req.major}:{req.minor}"


def _vet_setid(call: Call, req: Request) -> Verdict:
    """A set-id regular file: the set-id module decides (it knows which filesystems are
    host binds); without that module the kernel's own checks apply."""
    try:
        mod = importlib.import_module("isobox.daemon.syscalls.setid")
    except ModuleNotFoundError as e:
        if e.name != "isobox.daemon.syscalls.setid":
            raise
        return proceed("mknod of a set-id file: no set-id module")
    vet = getattr(mod, "vet_mknod", None)
    if vet is None:
        return proceed("mknod of a set-id file: no set-id module")
    return vet(call, req.dirfd, call.read_str(req.path_addr), req.mode, os.makedev(req.major, req.minor))


def make_node(call: Call, req: Request) -> Verdict:
    path = call.read_str(req.path_addr)
    call.detail["path"] = path
    what = f"mknod {path} c {req.major}:{req.minor} ({SAFE[(req.major, req.minor)]})"
    if not path:
        return refuse(errno.ENOENT, f"{what}: empty path")
    who = caller(call.pid)
    init_pid = call.container.init_pid if call.container is not None else 0
    if init_pid <= 0 or not nscaps.capable_in_container(call.pid, init_pid, CAP_MKNOD):
        # judged in the container's user namespace: the root of one nested in it holds a
        # full CapEff, but the kernel would not let it make devices for the container
        return refuse(errno.EPERM, f"{what}: the caller lacks CAP_MKNOD in the container's user namespace")
    root = os.open(f"/proc/{call.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        base = _open_base(call.pid, req.dirfd, path, root)
        try:
            # Everything was read from the caller; from here on isoboxd acts as host root.
            if call.valid is not None and not call.valid():
                return Verdict("error", errno=errno.ESRCH, reason=f"{what}: caller went away", audit=False)
            parent, name = split(path)
            plan = Plan(root, base, parent, name, req.mode, os.makedev(req.major, req.minor),
                        SAFE[(req.major, req.minor)] in HARMLESS_OPEN, who)
            err, code = run_helper(plan)
        finally:
            os.close(base)
    finally:
        os.close(root)
    if code == NODEV:
        return refuse(errno.EPERM, f"{what}: device nodes cannot be used there (a nodev mount, or a "
                                   "filesystem the container mounted itself)")
    if err:
        return refuse(err, f"{what}: {os.strerror(err)}")
    return done(0, f"{what} made for the container")


@handles("mknod", "mknodat", slow=True)
def handle(call: Call) -> Verdict:
    req = decode(call)
    kind = classify(req.mode, req.major, req.minor)
    if kind == "kernel":
        return proceed()
    if kind == "setid":
        return _vet_setid(call, req)
    call.detail.update({"mode": oct(req.mode), "dev": f"{req.major}:{req.minor}"})
    if kind == "refuse":
        with contextlib.suppress(OSError):          # the path only names it in the audit line
            call.detail["path"] = call.read_str(req.path_addr)
        return refuse(errno.EPERM, f"mknod of {_describe(req)} is not allowed in a container")
    try:
        return make_node(call, req)
    except (FileNotFoundError, ProcessLookupError):
        return Verdict("error", errno=errno.ESRCH, reason="mknod: caller went away", audit=False)
