"""ctypes bindings for the syscalls the runtime needs, named as the kernel names them.

Everything that talks to the kernel below the os module lives here, so the rest of the
code reads like the kernel documentation. Raw syscall numbers are x86_64 (the only
architecture isobox targets today); every argument of the variadic libc.syscall is passed
as c_long/c_ulong because bare Python ints are truncated to 32 bits.
"""
from __future__ import annotations

import ctypes
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# --- namespaces (linux/sched.h) ---
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_FILES = 0x00000400
CLONE_FS = 0x00000200

NS_GET_USERNS = 0xB701  # linux/nsfs.h: _IO(0xb7, 0x1)
NS_GET_PARENT = 0xB702  # _IO(0xb7, 0x2)
NS_GET_OWNER_UID = 0xB704  # _IO(0xb7, 0x4)

NS_FLAGS = {
    "mnt": CLONE_NEWNS, "cgroup": CLONE_NEWCGROUP, "uts": CLONE_NEWUTS, "ipc": CLONE_NEWIPC,
    "user": CLONE_NEWUSER, "pid": CLONE_NEWPID, "net": CLONE_NEWNET, "time": CLONE_NEWTIME,
}

# --- mount(2) flags (linux/mount.h) ---
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

MNT_FORCE = 1
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# --- new mount API ---
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x100000
MOUNT_ATTR_NOSYMFOLLOW = 0x200000
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6

# --- openat2 resolve flags ---
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# --- prctl ---
PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# x86_64 syscall numbers
SYS_clone = 56
SYS_pivot_root = 155
SYS_capget = 125
SYS_capset = 126
SYS_setfsuid = 122
SYS_setfsgid = 123
SYS_pidfd_open = 434
SYS_pidfd_send_signal = 424
SYS_open_tree = 428
SYS_move_mount = 429
SYS_fsopen = 430
SYS_fsconfig = 431
SYS_fsmount = 432
SYS_openat2 = 437
SYS_mount_setattr = 442
SYS_close_range = 436

_L = ctypes.c_long
_UL = ctypes.c_ulong
_P = ctypes.c_char_p


def _fs(path: str | bytes | None) -> bytes | None:
    return os.fsencode(path) if path is not None else None


def _check(ret: int, name: str, detail: object = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}" + (f" ({detail})" if detail else ""))
    return ret


# --- namespaces ---
def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare", hex(flags))


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns", hex(nstype))


def ioctl_ns_get_userns(fd: int) -> int:
    """A new fd of the user namespace that owns the namespace `fd` refers to."""
    return _check(_libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(NS_GET_USERNS)), "ioctl(NS_GET_USERNS)")


def ioctl_ns_get_parent(fd: int) -> int:
    """A new fd of the parent of the user namespace fd (EPERM at the top)."""
    return _check(_libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(NS_GET_PARENT)), "ioctl(NS_GET_PARENT)")


def ioctl_ns_get_owner_uid(fd: int) -> int:
    """The uid that created the user namespace fd, as the calling process's namespace sees it."""
    uid = ctypes.c_uint32()
    _check(_libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(NS_GET_OWNER_UID), ctypes.byref(uid)),
           "ioctl(NS_GET_OWNER_UID)")
    return uid.value


def clone(flags: int) -> int:
    """fork-like clone(2) on the same stack: returns 0 in the child, the pid in the parent.

    Used instead of os.fork() because only clone can create the user namespace and the
    namespaces it owns in one step, saving the intermediate process (locked-mounts.md).
    The child must stay single-threaded and exec or _exit soon.
    """
    return _check(_syscall(_L(SYS_clone), _UL(flags | 17), _L(0), _L(0), _L(0), _L(0)), "clone", hex(flags))


# --- mounts ---
def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(_libc.mount(_fs(source), _fs(target), _fs(fstype), _UL(flags), _fs(data)),
           "mount", f"{fstype or ''} on {target}")


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_fs(target), ctypes.c_int(flags)), "umount2", target)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_syscall(_L(SYS_pivot_root), _P(_fs(new_root)), _P(_fs(put_old))), "pivot_root")


def open_tree(dfd: int, path: str, flags: int) -> int:
    return _check(_syscall(_L(SYS_open_tree), _L(dfd), _P(_fs(path)), _UL(flags)), "open_tree", path)


def move_mount(from_dfd: int, from_path: str, to_dfd: int, to_path: str, flags: int) -> None:
    _check(_syscall(_L(SYS_move_mount), _L(from_dfd), _P(_fs(from_path)), _L(to_dfd), _P(_fs(to_path)),
                    _UL(flags)), "move_mount", to_path)


class mount_attr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(dfd: int, path: str, flags: int, attr_set: int = 0, attr_clr: int = 0,
                  propagation: int = 0, userns_fd: int = 0) -> None:
    attr = mount_attr(attr_set, attr_clr, propagation, userns_fd)
    _check(_syscall(_L(SYS_mount_setattr), _L(dfd), _P(_fs(path)), _UL(flags), ctypes.byref(attr),
                    _UL(ctypes.sizeof(attr))), "mount_setattr", path)


def fsopen(fstype: str, flags: int = FSOPEN_CLOEXEC) -> int:
    return _check(_syscall(_L(SYS_fsopen), _P(_fs(fstype)), _UL(flags)), "fsopen", fstype)


def fsconfig(fd: int, cmd: int, key: str | None = None, value: str | None = None, aux: int = 0) -> None:
    _check(_syscall(_L(SYS_fsconfig), _L(fd), _UL(cmd), _P(_fs(key)), _P(_fs(value)), _L(aux)),
           "fsconfig", f"{key}={value}" if key else cmd)


def fsconfig_fd(fd: int, key: str, value_fd: int) -> None:
    """FSCONFIG_SET_FD: a parameter given as an fd (overlay layers, Linux 6.13): the kernel
    takes what the fd refers to, never a path resolved again."""
    _check(_syscall(_L(SYS_fsconfig), _L(fd), _L(FSCONFIG_SET_FD), _P(key.encode()), _P(None), _L(value_fd)),
           "fsconfig", key)


def fsmount(fd: int, flags: int = FSMOUNT_CLOEXEC, attr_flags: int = 0) -> int:
    return _check(_syscall(_L(SYS_fsmount), _L(fd), _UL(flags), _UL(attr_flags)), "fsmount")


class open_how(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    how = open_how(flags | os.O_CLOEXEC, mode, resolve)
    return _check(_syscall(_L(SYS_openat2), _L(dfd), _P(_fs(path)), ctypes.byref(how),
                           _UL(ctypes.sizeof(how))), "openat2", path)


# --- processes and credentials ---
def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(ctypes.c_int(option), _UL(arg2), _UL(arg3), _UL(arg4), _UL(arg5)), "prctl", option)


def close_range(first: int, last: int, flags: int = 0) -> None:
    _check(_syscall(_L(SYS_close_range), _UL(first), _UL(last), _UL(flags)), "close_range")


def pidfd_open(pid: int) -> int:
    return _check(_syscall(_L(SYS_pidfd_open), _L(pid), _UL(0)), "pidfd_open", pid)


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    _check(_syscall(_L(SYS_pidfd_send_signal), _L(pidfd), _L(sig), _L(0), _UL(0)), "pidfd_send_signal", sig)


def setfsuid(uid: int) -> int:
    return _syscall(_L(SYS_setfsuid), _L(uid))


def setfsgid(gid: int) -> int:
    return _syscall(_L(SYS_setfsgid), _L(gid))


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) as 64-bit masks."""
    hdr = struct.pack("Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    data = ctypes.create_string_buffer(24)
    _check(_syscall(_L(SYS_capget), ctypes.c_char_p(hdr), data), "capget")
    e0, p0, i0, e1, p1, i1 = struct.unpack("6I", data.raw)
    return e0 | e1 << 32, p0 | p1 << 32, i0 | i1 << 32


def capset(effective: int, permitted: int, inheritable: int) -> None:
    hdr = struct.pack("Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    m = 0xFFFFFFFF
    data = struct.pack("6I", effective & m, permitted & m, inheritable & m,
                       effective >> 32, permitted >> 32, inheritable >> 32)
    _check(_syscall(_L(SYS_capset), ctypes.c_char_p(hdr), ctypes.c_char_p(data)), "capset")


def sethostname(name: str) -> None:
    b = name.encode()
    _check(_libc.sethostname(b, _UL(len(b))), "sethostname", name)


def setdomainname(name: str) -> None:
    b = name.encode()
    _check(_libc.setdomainname(b, _UL(len(b))), "setdomainname", name)


# --- mount-point queries (statx, linux/stat.h) and the rest of the mount attributes ---
SYS_statx = 332
STATX_MNT_ID = 0x1000
STATX_ATTR_MOUNT_ROOT = 0x2000
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MS_MGC_VAL = 0xC0ED0000
MS_MGC_MSK = 0xFFFF0000


STATX_MNT_ID_UNIQUE = 0x4000       # Linux 6.8: 64-bit mount ids that are never reused


def statx_mount(fd: int, unique: bool = False) -> tuple[int, bool]:
    """(mount id, is the root of its mount) of what fd points at (an O_PATH fd is fine);
    unique: the never-reused id (Linux 6.8), for ids kept beyond the life of an fd."""
    buf = ctypes.create_string_buffer(256)            # struct statx
    mask = STATX_MNT_ID_UNIQUE if unique else STATX_MNT_ID
    _check(_syscall(_L(SYS_statx), _L(fd), _P(b""), _L(AT_EMPTY_PATH), _UL(mask), buf), "statx")
    attributes, = struct.unpack_from("Q", buf.raw, 8)     # stx_attributes
    mnt_id, = struct.unpack_from("Q", buf.raw, 0x90)      # stx_mnt_id
    return mnt_id, bool(attributes & STATX_ATTR_MOUNT_ROOT)


# --- filesystem type (statfs(2)) ---
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
OVERLAYFS_SUPER_MAGIC = 0x794C7630
FUSE_SUPER_MAGIC = 0x65735546


def fstatfs(fd: int) -> int:
    """f_type of the filesystem fd is on (an O_PATH fd is fine): the only field isobox reads."""
    buf = ctypes.create_string_buffer(120)            # struct statfs; f_type is its first long
    _check(_libc.fstatfs(ctypes.c_int(fd), buf), "fstatfs")
    return struct.unpack_from("l", buf.raw, 0)[0] & 0xFFFFFFFF


# --- seccomp(2) with a raw classic-BPF program ---
SYS_seccomp = 317
SECCOMP_SET_MODE_FILTER = 1


def seccomp_set_mode_filter(bpf: bytes, flags: int = 0) -> int:
    """seccomp(SECCOMP_SET_MODE_FILTER, flags, &(struct sock_fprog){len, filter}): bpf is the
    array of struct sock_filter (8 bytes each). Returns the syscall's result (a listener fd
    with SECCOMP_FILTER_FLAG_NEW_LISTENER, else 0)."""
    import struct
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = ctypes.create_string_buffer(struct.pack("<H6xQ", len(bpf) // 8, ctypes.addressof(buf)), 16)
    return _check(_syscall(ctypes.c_long(SYS_seccomp), ctypes.c_long(SECCOMP_SET_MODE_FILTER), ctypes.c_long(flags),
                           fprog), "seccomp", hex(flags))


# --- another process's memory (process_vm_readv(2), process_vm_writev(2)) ---
# Unlike /proc/<pid>/mem, these honour the target's page protections (a write to a read-only
# page is EFAULT, as copy_to_user would be) and need no open: one syscall per access.
class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_vm_local: list = []      # [threading.local()]: per thread, a page buffer and two iovecs, made once


def _vm_iovs(size: int):
    if not _vm_local:
        import threading     # only the daemon reads other processes' memory; the runtime never
        _vm_local.append(threading.local())
    t = _vm_local[0]
    if getattr(t, "size", 0) < size:
        t.buf = ctypes.create_string_buffer(max(size, 4096))
        t.size = max(size, 4096)
        t.local, t.remote = _IOVec(), _IOVec()
        t.local.iov_base = ctypes.cast(t.buf, ctypes.c_void_p).value
    return t


_process_vm_readv = _libc.process_vm_readv
_process_vm_writev = _libc.process_vm_writev
for _f in (_process_vm_readv, _process_vm_writev):
    _f.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong)
    _f.restype = ctypes.c_ssize_t


def process_vm_readv(pid: int, addr: int, size: int) -> bytes:
    """Up to size bytes from pid's addr (fewer when the range runs into an unmapped page)."""
    t = _vm_iovs(size)
    t.local.iov_len = size
    t.remote.iov_base, t.remote.iov_len = addr, size
    n = _check(_process_vm_readv(pid, ctypes.addressof(t.local), 1, ctypes.addressof(t.remote), 1, 0),
               "process_vm_readv", pid)
    return t.buf.raw[:n] if n < 256 else ctypes.string_at(t.buf, n)


def process_vm_writev(pid: int, addr: int, data: bytes) -> int:
    t = _vm_iovs(len(data))
    ctypes.memmove(t.buf, data, len(data))
    t.local.iov_len = len(data)
    t.remote.iov_base, t.remote.iov_len = addr, len(data)
    return _check(_process_vm_writev(pid, ctypes.addressof(t.local), 1, ctypes.addressof(t.remote), 1, 0),
                  "process_vm_writev", pid)
