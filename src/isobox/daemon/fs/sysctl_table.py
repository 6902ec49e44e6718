"""Which /proc/sys paths are emulated per container, which the kernel namespaces, and how the
kernel parses numbers written to them.

Paths are relative to /proc/sys ("net/ipv4/ip_forward"). The emulated list is Sysbox's
(sysbox-features.md §3a) minus what kernel 6.x namespaces itself: net/core/somaxconn and
net/unix/max_dgram_qlen are per netns, kernel/pid_max is per pid namespace since 6.14, so
those go to the reader's real namespaces instead of a per-container copy.

Only the emulated (host-global) sysctls are parsed here. Their bounds come from the kernel
source, because no scratch namespace has its own copy of them to ask: probing one means writing
the host's value. Namespaced sysctls are never parsed here: the write goes to the reader's own
namespace and the running kernel decides (a vendor kernel may bound net.ipv4.tcp_rmem at 4096
where mainline says 1). tests/unit/test_daemon_sysctl.py checks the edges of this table against
the running kernel; tests/integration/test_daemon_sysctl_ns.py derives bounds in a scratch netns.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1
LONG_MAX, ULONG_MAX = (1 << 63) - 1, (1 << 64) - 1
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
KMALLOC_MAX_SIZE = 1 << 22          # proc_sys_call_handler refuses count >= this with ENOMEM
TMPBUFLEN = 22                      # proc_get_long's scratch buffer (kernel/sysctl.c)

CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_SYS_RAWIO = 19, 21, 17


@dataclass(frozen=True)
class Spec:
    """One emulated sysctl: how the kernel's handler parses it and who may write it."""
    kind: str = "int"               # "int" (proc_dointvec*), "ulong" (proc_doulongvec_minmax)
    count: int = 1                  # vector length (printk has 4)
    lo: int | None = None           # minmax bounds; None = the type's own range
    hi: int | None = None
    mode: int = 0o644
    push: str = "ctr"               # "ctr" per container only; "max" host gets the max (max-push)
    cap: int | None = None          # capability the kernel handler demands on write (EPERM)
    readonly: bool = False          # 0444: open for write fails with EACCES
    fresh: bool = False             # read the host file every time (kernel/random/uuid)
    sticky_max: bool = False        # yama: once at hi it cannot be changed

    def bounds(self) -> tuple[int, int]:
        """The values the handler accepts: lo/hi, or the type's own range where unset."""
        lo_t, hi_t = (0, ULONG_MAX) if self.kind == "ulong" else (INT_MIN, INT_MAX)
        return (lo_t if self.lo is None else self.lo), (hi_t if self.hi is None else self.hi)


# Handlers and bounds as in kernel 6.18 (fs/file_table.c, fs/file.c, fs/namei.c, kernel/panic.c,
# kernel/printk/sysctl.c, lib/vsprintf.c, security/yama, mm/util.c, security/min_addr.c,
# net/netfilter/nf_conntrack_standalone.c).
EMULATED: dict[str, Spec] = {
    "fs/file-max": Spec("ulong", lo=0, hi=LONG_MAX, push="max"),
    "fs/nr_open": Spec("int", lo=64, hi=INT_MAX & -64, push="max"),
    "fs/protected_hardlinks": Spec("int", lo=0, hi=1, mode=0o600),
    "fs/protected_symlinks": Spec("int", lo=0, hi=1, mode=0o600),
    "kernel/panic": Spec("int"),
    "kernel/printk": Spec("int", count=4),
    "kernel/panic_on_oops": Spec("int"),
    "kernel/kptr_restrict": Spec("int", lo=0, hi=2, cap=CAP_SYS_ADMIN),
    "kernel/dmesg_restrict": Spec("int", lo=0, hi=1, cap=CAP_SYS_ADMIN),
    "kernel/sysrq": Spec("int"),
    "kernel/yama/ptrace_scope": Spec("int", lo=0, hi=3, cap=CAP_SYS_PTRACE, sticky_max=True),
    "vm/overcommit_memory": Spec("int", lo=0, hi=2),
    "vm/mmap_min_addr": Spec("ulong", cap=CAP_SYS_RAWIO),
    # read-only 0444 in a non-init netns: the kernel keeps the table size global
    "net/netfilter/nf_conntrack_max": Spec("int", lo=0, hi=INT_MAX, push="max"),
    "kernel/cap_last_cap": Spec(mode=0o444, readonly=True),
    "kernel/ngroups_max": Spec(mode=0o444, readonly=True),
    "kernel/random/uuid": Spec(mode=0o444, readonly=True, fresh=True),
}

_IPC = {"shmmax", "shmall", "shmmni", "shm_rmid_forced", "msgmax", "msgmni", "msgmnb", "auto_msgmni",
        "sem", "sem_next_id", "msg_next_id", "shm_next_id"}      # ipc/ipc_sysctl.c
_UTS = {"hostname", "domainname", "ostype", "osrelease", "version"}  # kernel/utsname_sysctl.c


def _pid_max_per_pidns() -> bool:
    """pid_max moved into the pid namespace in 6.14 (kernel/pid.c pid_table_root)."""
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (6, 14)


PID_NS_PID_MAX = _pid_max_per_pidns()
if not PID_NS_PID_MAX:
    EMULATED["kernel/pid_max"] = Spec("int", lo=301, hi=4194304)


def namespace_of(rel: str) -> str | None:
    """The kernel namespace that owns this sysctl ("net", "uts", "ipc", "user", "pid"), or None
    when it is host-global."""
    head, _, tail = rel.partition("/")
    if head == "net":
        return "net"
    if head == "user" and tail:
        return "user"
    if head == "fs" and tail.startswith("mqueue/"):
        return "ipc"
    if head == "kernel":
        if tail in _IPC:
            return "ipc"
        if tail in _UTS:
            return "uts"
        if tail == "ns_last_pid" or (tail == "pid_max" and PID_NS_PID_MAX):
            return "pid"
    return None


def emulated_children(rel_dir: str) -> list[str]:
    """Names of emulated files directly under rel_dir."""
    prefix = rel_dir + "/" if rel_dir else ""
    return [p[len(prefix):] for p in EMULATED if p.startswith(prefix) and "/" not in p[len(prefix):]]


# --- the kernel's number parser (kernel/sysctl.c __do_proc_dointvec, __do_proc_doulongvec_minmax) ---
_SPACES = b" \t\n\v\f\r\xa0"        # the kernel's isspace() (lib/ctype.c marks 0xa0 as space)
_SEPS = b" \t\n"                    # proc_wspace_sep: what may follow a number


def _skip_spaces(buf: bytes, i: int, end: int) -> int:
    while i < end and buf[i] in _SPACES:
        i += 1
    return i


def _strtoul(tmp: bytes) -> tuple[int, int] | None:
    """strtoul_lenient with base 0: (value, digits consumed) or None on overflow/no digits."""
    base, i = 10, 0
    if tmp[:1] == b"0":
        if tmp[1:2] in (b"x", b"X") and tmp[2:3] and tmp[2:3] in b"0123456789abcdefABCDEF":
            base, i = 16, 2
        else:
            base = 8
    start, val = i, 0
    while i < len(tmp):
        c = tmp[i]
        d = c - 48 if 48 <= c <= 57 else (c | 0x20) - 87 if 97 <= (c | 0x20) <= 102 else 99
        if d >= base:
            break
        val = val * base + d
        if val > ULONG_MAX:
            return None
        i += 1
    if i == start and base != 8:
        return None
    return val, i


def _get_long(buf: bytes, i: int, end: int) -> tuple[int, bool, int]:
    """proc_get_long: (magnitude, negative, new index); raises EINVAL like the kernel."""
    size = end - i
    tmp = buf[i:i + min(size, TMPBUFLEN - 1)].split(b"\0", 1)[0]
    neg = tmp[:1] == b"-" and size > 1
    p = 1 if neg else 0
    if p >= len(tmp) or not (48 <= tmp[p] <= 57):
        raise OSError(errno.EINVAL, "not a number")
    got = _strtoul(tmp[p:])
    if got is None:
        raise OSError(errno.EINVAL, "number out of range")
    val, used = got
    length = p + used
    if length == TMPBUFLEN - 1:     # may be a truncated number: the kernel refuses it
        raise OSError(errno.EINVAL, "number too long")
    if length < size and buf[i + length] not in _SEPS:
        raise OSError(errno.EINVAL, "junk after number")
    return val, neg, i + length


def _convert(spec: Spec, val: int, neg: bool, current: int) -> int:
    """do_proc_dointvec(_minmax)_conv / the ulong range check."""
    if spec.kind == "ulong":
        if neg:
            raise OSError(errno.EINVAL, "negative")
    elif val > INT_MAX + (1 if neg else 0):
        raise OSError(errno.EINVAL, "int overflow")
    lo, hi = spec.bounds()
    v = -val if neg else val
    if spec.sticky_max and current == hi:
        lo = hi                     # yama_dointvec_minmax: scope 3 is a one-way trip
    if not lo <= v <= hi:
        raise OSError(errno.EINVAL, "out of range")
    return v


def parse_write(spec: Spec, data: bytes, current: list[int]) -> tuple[list[int], int, OSError | None]:
    """Parse a write at offset 0 as the kernel does.

    Returns (new vector, bytes consumed, deferred error). Like the kernel, values parsed before a
    bad one in a vector are kept and the error is still returned; an error on the first value, or
    no value at all, raises.
    """
    count = len(data)
    if count >= KMALLOC_MAX_SIZE:
        raise OSError(errno.ENOMEM, "write too large")
    if count == 0:
        return list(current), 0, None
    end = min(count, PAGE_SIZE - 1)   # the kernel parses at most one page
    out, i, err, parsed = list(current), 0, None, 0
    for k in range(spec.count):
        i = _skip_spaces(data, i, end)
        if i >= end:
            break
        try:
            val, neg, i = _get_long(data, i, end)
            out[k] = _convert(spec, val, neg, current[k])
        except OSError as e:
            if parsed == 0:
                raise
            err = e
            break
        parsed += 1
    if parsed == 0:
        raise OSError(errno.EINVAL, "no number")
    if err is None:
        i = _skip_spaces(data, i, end)
    return out, count - (end - i), err


def format_value(vals: list[int]) -> str:
    return "\t".join(str(v) for v in vals)


def parse_value(text: str) -> list[int]:
    return [int(x) for x in text.split()]
