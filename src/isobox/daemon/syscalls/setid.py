"""Set-user-ID, set-group-ID and file capabilities: no root shells planted in host directories.

A host directory bound into a container with an idmapped mount shows the host's root-owned
files as the container root's, so the container's root may chmod 4755 a copy of a shell there,
and then any host user who runs it is root. nosuid inside the container protects nothing on the
host. The seccomp trap (profile.py TRAPPED/CONDITIONAL) sends here every chmod/creat/open that
asks for a set-id mode, every openat2 and setxattr, and io_uring_setup.

TOCTOU: the path, xattr name and open_how live in the caller's memory, which another of its
threads may rewrite after we read it, so nothing here ever answers CONTINUE after looking at a
pointer. A forked helper (nsexec.run_fn) chroots into the caller's root, takes its cwd, user
namespace and credentials, resolves the target itself to an fd, decides on that fd, and performs
the operation on it; the kernel still applies its own permission rules (owner or CAP_FOWNER,
set-gid clearing without CAP_FSETID, idmapped mounts). Opens return the helper's fd to the
caller with SECCOMP_IOCTL_NOTIF_ADDFD.

The decision (storage.may_hold_setid, for a set-id mode on a regular file or any
security.capability): on what the resolved target is, against the storage the runtime
registered for the container at create: its own root filesystem and filesystems it mounted
itself (memory, FUSE, vetted overlays) may hold set-id files; host binds, a rootfs that host
users can reach, anything mounted on the host, and anything unknown may not (EPERM). Never
on "/" of the caller's mount namespace, which pivot_root into a host bind would move.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from isobox.daemon.fs import nsexec
from isobox.daemon.syscalls import notify
from isobox.daemon.syscalls.call import Call, Verdict, done, own_fd, refuse
from isobox.daemon.syscalls.registry import handles
from isobox.daemon.syscalls.storage import Storage, host_devices, may_hold_setid
from isobox.linux import syscalls as sc

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
SETID = stat.S_ISUID | stat.S_ISGID
CAPS_XATTR = "security.capability"
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
OPEN_HOW_SIZE_VER0 = 24
O_TMPFILE = os.O_TMPFILE                      # includes O_DIRECTORY
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
REFUSED = -1                                  # helper result: the policy said no (payload: "mount id|why")


# ------------------------------------------------------------------ arguments, per ABI

def _check_arch(call: Call) -> None:
    if call.arch not in (AUDIT_ARCH_X86_64, AUDIT_ARCH_I386):
        raise OSError(errno.ENOSYS, f"unknown ABI {call.arch:#x}")


def _int(call: Call, i: int) -> int:
    """A C int argument: only the low 32 bits count (the kernel ignores the rest), signed."""
    v = call.args[i] & 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _uint(call: Call, i: int) -> int:
    return call.args[i] & 0xFFFFFFFF


def _ptr(call: Call, i: int) -> int:
    return call.args[i] & (0xFFFFFFFF if call.arch == AUDIT_ARCH_I386 else 0xFFFFFFFFFFFFFFFF)


def _mode(call: Call, i: int) -> int:
    return call.args[i] & 0o7777              # umode_t; the kernel keeps S_IALLUGO


def _path(call: Call, i: int) -> str:
    return call.read_str(_ptr(call, i))


# ------------------------------------------------------------------ what the helper gets

@dataclass
class _Env:
    """Descriptors prepared by the daemon (host root) before the helper forks."""
    pid: int
    root: int                                 # the caller's root (O_PATH)
    cwd: int                                  # its cwd
    mntns: int                                # its mount namespace
    proc: int                                 # the daemon's /proc (host pid namespace)
    cgroup: int                               # its cgroup.procs (v2), -1 when unknown
    umask: int
    storage: Storage                          # what the runtime registered (mounts/storage.py)
    host_devs: frozenset[int]                 # st_dev of every mount in the host's namespace
    fds: dict[int, int] = field(default_factory=dict)   # caller fd number -> our O_PATH fd of it

    def held(self) -> list[int]:
        return [self.root, self.cwd, self.mntns, self.proc, self.cgroup, *self.fds.values()]

    def close(self) -> None:
        for fd in self.held():
            if fd >= 0:
                os.close(fd)


def _proc_open(pid: int, name: str, flags: int) -> int:
    try:
        return os.open(f"/proc/{pid}/{name}", flags | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise OSError(errno.ESRCH, f"caller {pid} is gone") from None


def _caller_fd(env: _Env, n: int, need_io: bool = False) -> int:
    """Our O_PATH fd of the caller's descriptor n (EBADF like the kernel when it has none;
    need_io: fchmod/fsetxattr refuse O_PATH descriptors, as they do for the caller)."""
    if n in env.fds:
        return env.fds[n]
    try:
        fd = os.open(f"/proc/{env.pid}/fd/{n}", os.O_PATH | os.O_CLOEXEC)
    except OSError:
        raise OSError(errno.EBADF, f"bad file descriptor {n}") from None
    env.fds[n] = fd
    if need_io and _fd_flags(env.pid, n) & os.O_PATH:
        raise OSError(errno.EBADF, f"descriptor {n} is O_PATH")
    return fd


def _fd_flags(pid: int, n: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{n}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    return 0


def _umask(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _cgroup_procs(pid: int) -> int:
    """cgroup.procs of the caller's v2 cgroup: the helper joins it, so the device controller
    and limits that bind the caller bind what the helper opens for it too."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            rel = next((ln.strip()[3:] for ln in f if ln.startswith("0::")), None)
        if rel is None:
            return -1
        return os.open(f"/sys/fs/cgroup{rel}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _env(pid: int, registered: dict | None) -> _Env:
    fds: list[int] = []
    try:
        for name, flags in (("root", os.O_PATH | os.O_DIRECTORY), ("cwd", os.O_PATH | os.O_DIRECTORY),
                            ("ns/mnt", os.O_RDONLY)):
            fds.append(_proc_open(pid, name, flags))
        fds.append(os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        fds.append(_cgroup_procs(pid))
        return _Env(pid, *fds, umask=_umask(pid), storage=Storage.of(registered), host_devs=host_devices())
    except BaseException:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        raise


# ------------------------------------------------------------------ in the helper (syscalls only)

def _enter(env: _Env) -> None:
    """Still host root: join the caller's cgroup and mount namespace, then take the caller's
    root and cwd."""
    if env.cgroup >= 0:
        os.write(env.cgroup, b"0")
    sc.setns(env.mntns, sc.CLONE_NEWNS)
    os.fchdir(env.root)
    os.chroot(".")
    os.fchdir(env.cwd)
    os.umask(env.umask)


def _safe_mount(env: _Env, fd: int) -> tuple[bool, bytes]:
    """(may a set-id file live where fd is, the refusal's payload: "mount id|why")."""
    ok, why = may_hold_setid(fd, env.storage, env.host_devs)
    return ok, b"" if ok else f"{sc.statx_mount(fd)[0]}|{why}".encode()


def _resolve(dirfd: int, path: str, follow: bool, empty_ok: bool) -> int:
    """O_PATH fd of what the caller named, resolved as the caller (its root, cwd, credentials)."""
    if path == "":
        if not empty_ok:
            raise OSError(errno.ENOENT, "empty path")
        return os.dup(dirfd) if dirfd != sc.AT_FDCWD else os.open(".", os.O_PATH | os.O_CLOEXEC)
    return sc.openat2(dirfd, path, os.O_PATH | (0 if follow else os.O_NOFOLLOW))


def _magic(env: _Env, fd: int) -> str:
    """fd as a path through the host's /proc, relative to env.proc (the helper is not in the
    caller's pid namespace, so the container's /proc/self would not be the helper)."""
    return f"self/fd/{fd}"


def _chmod_in_helper(env: _Env, dirfd: int, path: str | None, mode: int, follow: bool, empty_ok: bool
                     ) -> tuple[int, bytes, int]:
    fd = _resolve(dirfd, path, follow, empty_ok) if path is not None else dirfd
    st = os.fstat(fd)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.EOPNOTSUPP, "chmod of a symlink")
    if mode & SETID and stat.S_ISREG(st.st_mode):
        ok, mnt = _safe_mount(env, fd)
        if not ok:
            return REFUSED, mnt, -1
    os.chmod(_magic(env, fd), mode, dir_fd=env.proc)
    return 0, b"", -1


def _setxattr_in_helper(env: _Env, dirfd: int, path: str | None, name: str, value: bytes, flags: int,
                        follow: bool) -> tuple[int, bytes, int]:
    fd = _resolve(dirfd, path, follow, False) if path is not None else dirfd
    if name == CAPS_XATTR and stat.S_ISREG(os.fstat(fd).st_mode):
        ok, mnt = _safe_mount(env, fd)
        if not ok:
            return REFUSED, mnt, -1
    os.fchdir(env.proc)               # setxattr has no dirfd form: the magic link, relative to /proc
    os.setxattr(_magic(env, fd), name, value, flags)
    return 0, b"", -1


def _split(path: str) -> tuple[str, str]:
    parent, _, base = path.rstrip("/").rpartition("/") if "/" in path.rstrip("/") else ("", "", path)
    if path.startswith("/") and parent == "":
        parent = "/"
    return parent or ".", base


def _open_in_helper(env: _Env, dirfd: int, path: str, flags: int, mode: int, resolve: int
                    ) -> tuple[int, bytes, int]:
    creating = flags & os.O_CREAT or flags & O_TMPFILE == O_TMPFILE
    if not (creating and mode & SETID):
        return 0, b"", sc.openat2(dirfd, path, flags, mode, resolve)
    if flags & O_TMPFILE == O_TMPFILE:          # an unnamed file, linkable later: decide on its directory
        d = sc.openat2(dirfd, path, os.O_PATH | os.O_DIRECTORY, 0, resolve)
        ok, mnt = _safe_mount(env, d)
        if not ok:
            return REFUSED, mnt, -1
        return 0, b"", sc.openat2(d, ".", flags, mode, 0)
    for _hop in range(40):
        parent, base = _split(path)
        if base in ("", ".", "..") or path.endswith("/"):
            return 0, b"", sc.openat2(dirfd, path, flags, mode, resolve)   # EISDIR: nothing created
        pfd = sc.openat2(dirfd, parent, os.O_PATH | os.O_DIRECTORY, 0, resolve)
        got = _create_in(env, pfd, base, flags, mode)
        if isinstance(got, tuple):
            return got
        if resolve & sc.RESOLVE_NO_SYMLINKS:
            raise OSError(errno.ELOOP, "symlink")
        path = got if got.startswith("/") else f"{parent}/{got}"       # follow the trailing symlink
    raise OSError(errno.ELOOP, "too many symlinks")


def _create_in(env: _Env, pfd: int, base: str, flags: int, mode: int) -> tuple[int, bytes, int] | str:
    """Create (or open) base in pfd without leaving pfd's mount; the target of a trailing
    symlink (str) is returned for the caller to follow, so the mount decided on is the one the
    file is created on."""
    ok, mnt = _safe_mount(env, pfd)
    strict = sc.RESOLVE_NO_XDEV | sc.RESOLVE_NO_SYMLINKS
    try:
        if ok:
            return 0, b"", sc.openat2(pfd, base, flags, mode, strict)
        # a host directory: only an existing file may be opened (the mode then does not apply)
        fd = sc.openat2(pfd, base, flags & ~(os.O_CREAT | os.O_EXCL), 0, strict)
        if flags & os.O_EXCL:
            os.close(fd)
            raise OSError(errno.EEXIST, "exists")
        return 0, b"", fd
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EXDEV, errno.ENOENT):
            raise
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            if ok:
                raise
            return REFUSED, mnt, -1
        if stat.S_ISLNK(st.st_mode):
            if flags & os.O_NOFOLLOW or flags & (os.O_CREAT | os.O_EXCL) == os.O_CREAT | os.O_EXCL:
                raise OSError(errno.EEXIST if flags & os.O_EXCL else errno.ELOOP, "symlink") from None
            return os.readlink(base, dir_fd=pfd)
        if flags & os.O_EXCL:
            raise OSError(errno.EEXIST, "exists") from None
        # a mount point (EXDEV): it exists, so nothing is created and the mode does not apply
        return 0, b"", sc.openat2(pfd, base, flags & ~os.O_CREAT, 0, 0)


def _mknod_in_helper(env: _Env, dirfd: int, path: str, mode: int, dev: int) -> tuple[int, bytes, int]:
    parent, base = _split(path)
    pfd = sc.openat2(dirfd, parent, os.O_PATH | os.O_DIRECTORY, 0, 0)
    ok, mnt = _safe_mount(env, pfd)
    if not ok:
        return REFUSED, mnt, -1
    os.mknod(base, mode, dev, dir_fd=pfd)     # mknod never follows a trailing symlink: same mount
    return 0, b"", -1


# ------------------------------------------------------------------ daemon side

def _mount_point(pid: int, mnt: int) -> str:
    """Where mount mnt is, as the caller sees it (for the message only, never for a decision)."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            for line in f:
                parts = line.split()
                if int(parts[0]) == mnt:
                    return parts[4].encode().decode("unicode_escape")
    except OSError:
        pass
    return f"mount {mnt}"


def _dirfd(env: _Env, n: int, path: str | None = None, resolve: int = 0) -> int:
    """The dirfd the helper resolves from. The kernel ignores dirfd for an absolute path (runc
    passes -1 then) unless openat2 scopes it with RESOLVE_IN_ROOT/RESOLVE_BENEATH."""
    scoped = resolve & (sc.RESOLVE_IN_ROOT | sc.RESOLVE_BENEATH)
    if n == sc.AT_FDCWD or (path and path.startswith("/") and not scoped):
        return sc.AT_FDCWD
    return _caller_fd(env, n)


def _self_fd(env: _Env, path: str) -> int | None:
    """/proc/self/fd/N names the caller's own descriptor N (glibc's fchmodat fallback uses it);
    the helper is not the caller, so it gets that descriptor instead of the magic link."""
    n = own_fd(path)
    return _caller_fd(env, n) if n is not None else None


def _run(call: Call, env: _Env, fn, what: str, target: str,
         harm: str = "a set-uid file there would be root for host users") -> tuple[int, int] | Verdict:
    """Runs fn in the helper; (result, fd) or the refusal."""
    if not call.valid():
        raise OSError(errno.ESRCH, "caller gone")
    res, payload, fd = nsexec.run_fn(call.pid, fn, before=lambda: _enter(env), keep=env.held())
    if res == REFUSED:
        mnt, _, why = payload.decode(errors="replace").partition("|")
        where = _mount_point(call.pid, int(mnt or 0))
        return refuse(errno.EPERM, f"{what} on {target} refused: {where} is {why} ({harm})")
    return res, fd


def _answer_fd(call: Call, fd: int, cloexec: bool, reason: str) -> Verdict:
    """The fd becomes the syscall's return value: ADDFD_FLAG_SEND answers the notification
    itself, so the loop must not answer again ("answered")."""
    try:
        newfd = notify.add_fd(call.listener, call.id, fd, cloexec)
    finally:
        os.close(fd)
    return Verdict("answered", value=newfd, reason=reason)


def _what(mode: int) -> str:
    bits = [n for b, n in ((stat.S_ISUID, "set-uid"), (stat.S_ISGID, "set-gid")) if mode & b]
    return " and ".join(bits) + (" bits" if len(bits) > 1 else " bit")


def _with_env(call: Call, body) -> Verdict:
    _check_arch(call)
    env = _env(call.pid, call.container.storage if call.container is not None else None)
    try:
        return body(env)
    finally:
        env.close()


# ------------------------------------------------------------------ handlers

@handles("chmod", "fchmod", "fchmodat", "fchmodat2", slow=True)
def chmod_family(call: Call) -> Verdict:
    _check_arch(call)
    if call.name == "fchmod":
        fdn, path, mode, flags = _int(call, 0), None, _mode(call, 1), 0
        call.detail = {"fd": fdn, "mode": oct(mode)}
        dirfd_n = fdn
    else:
        i = 0 if call.name == "chmod" else 1
        dirfd_n = sc.AT_FDCWD if call.name == "chmod" else _int(call, 0)
        path, mode = _path(call, i), _mode(call, i + 1)
        flags = _uint(call, 3) if call.name == "fchmodat2" else 0
        call.detail = {"dirfd": dirfd_n, "path": path, "mode": oct(mode), "flags": hex(flags)}
        if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH):
            return refuse(errno.EINVAL, "unknown fchmodat2 flags")

    def body(env: _Env) -> Verdict:
        follow, empty_ok, p = not flags & AT_SYMLINK_NOFOLLOW, bool(flags & AT_EMPTY_PATH), path
        if path is None:
            d = _caller_fd(env, dirfd_n, need_io=True)
        else:
            magic = _self_fd(env, path)
            d, p, follow, empty_ok = (magic, "", True, True) if magic is not None else (_dirfd(env, dirfd_n, p), p,
                                                                                         follow, empty_ok)
        got = _run(call, env, lambda: _chmod_in_helper(env, d, p, mode, follow, empty_ok),
                   _what(mode), path if path is not None else f"fd {dirfd_n}")
        return got if isinstance(got, Verdict) else done(0, f"mode {oct(mode)} set as the caller")
    return _with_env(call, body)


@handles("open", "openat", "creat", slow=True)
def open_family(call: Call) -> Verdict:
    _check_arch(call)
    resolve = 0
    if call.name == "creat":
        dirfd_n, path, flags, mode = sc.AT_FDCWD, _path(call, 0), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, _mode(call, 1)
    elif call.name == "open":
        dirfd_n, path, flags, mode = sc.AT_FDCWD, _path(call, 0), _int(call, 1), _mode(call, 2)
    elif call.name == "openat":
        dirfd_n, path, flags, mode = _int(call, 0), _path(call, 1), _int(call, 2), _mode(call, 3)
    else:
        dirfd_n, path = _int(call, 0), _path(call, 1)
        size = call.args[3]
        if size < OPEN_HOW_SIZE_VER0 or size > 4096:
            return refuse(errno.EINVAL, "bad open_how size")
        raw = call.read(_ptr(call, 2), size)
        if len(raw) < size:
            return refuse(errno.EFAULT, "open_how unreadable")
        if any(raw[OPEN_HOW_SIZE_VER0:]):
            return refuse(errno.E2BIG, "open_how has fields this kernel interface does not know")
        flags, mode, resolve = (int.from_bytes(raw[i:i + 8], "little") for i in (0, 8, 16))
        if flags >> 32 or mode & ~0o7777:
            return refuse(errno.EINVAL, "bad open_how")
    call.detail = {"dirfd": dirfd_n, "path": path, "flags": oct(flags & 0xFFFFFFFF), "mode": oct(mode)}
    if resolve:
        call.detail["resolve"] = hex(resolve)
    flags &= 0xFFFFFFFF

    def body(env: _Env) -> Verdict:
        d = _dirfd(env, dirfd_n, path, resolve)
        got = _run(call, env, lambda: _open_in_helper(env, d, path, flags & ~os.O_CLOEXEC, mode, resolve),
                   f"creating {path} with the {_what(mode)}" if mode & SETID else "open", path)
        if isinstance(got, Verdict):
            return got
        return _answer_fd(call, got[1], bool(flags & os.O_CLOEXEC), "opened as the caller")
    return _with_env(call, body)


@handles("openat2")
def openat2(call: Call) -> Verdict:
    """ENOSYS, as on a kernel before 5.6. open_how (flags, mode) lives in the caller's memory,
    so a decision on it could only be kept by performing every openat2 in a forked helper
    (runc resolves each cgroup and rootfs path with it); its callers (runc, systemd,
    libpathrs) fall back to openat, whose set-id creates the filter traps by argument."""
    # audited like every refusal: callers such as runc stop trying after the first ENOSYS
    return refuse(errno.ENOSYS, "openat2 is not available in isobox containers (callers fall back to openat)")


@handles("setxattr", "lsetxattr", "fsetxattr", slow=True)
def setxattr_family(call: Call) -> Verdict:
    _check_arch(call)
    target = _int(call, 0) if call.name == "fsetxattr" else _path(call, 0)
    name = call.read_str(_ptr(call, 1), XATTR_NAME_MAX + 1)
    size, flags = _ptr(call, 3), _int(call, 4)          # size_t: as wide as a pointer
    if size > XATTR_SIZE_MAX:
        return refuse(errno.E2BIG, "xattr value too large")
    value = call.read(_ptr(call, 2), size) if size else b""
    call.detail = {"target": target, "name": name, "size": size, "flags": flags}

    def body(env: _Env) -> Verdict:
        if isinstance(target, int):
            d, p = _caller_fd(env, target, need_io=True), None
        else:
            magic = _self_fd(env, target)
            d, p = (magic, None) if magic is not None else (sc.AT_FDCWD, target)
        follow = call.name != "lsetxattr"
        got = _run(call, env, lambda: _setxattr_in_helper(env, d, p, name, value, flags, follow),
                   f"file capabilities ({CAPS_XATTR})", str(target),
                   "a file with capabilities there would give them to host users")
        return got if isinstance(got, Verdict) else done(0, f"{name} set as the caller")
    return _with_env(call, body)


@handles("io_uring_setup")
def io_uring_setup(call: Call) -> Verdict:
    return refuse(errno.EPERM, "io_uring is not available in isobox containers: its operations bypass syscall vetting")


def vet_mknod(call: Call, dirfd: int, path: str, mode: int, dev: int) -> Verdict:
    """For the mknod module: mknod/mknodat of S_IFREG with a set-id mode (an empty set-uid file
    that a later write fills). dirfd is the caller's (AT_FDCWD for mknod), path already read from
    its memory. Refused on a host directory, else created by the helper as the caller."""
    _check_arch(call)
    call.detail.update({"dirfd": dirfd, "path": path, "mode": oct(mode)})

    def body(env: _Env) -> Verdict:
        d = _dirfd(env, dirfd, path)
        got = _run(call, env, lambda: _mknod_in_helper(env, d, path, mode, dev), _what(mode), path)
        return got if isinstance(got, Verdict) else done(0, "created as the caller")
    return _with_env(call, body)
