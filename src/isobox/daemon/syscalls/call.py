"""What a handler gets (Call) and returns (Verdict).

TOCTOU: arguments are read from the caller's memory (/proc/<pid>/mem) while the caller is
stopped in the syscall; a handler that acts with more privilege than the caller must call
call.valid() after reading and before acting, so that a caller that died (and a pid that
was reused) cannot be confused with it. Paths are resolved in the caller's root and cwd
(/proc/<pid>/root, /proc/<pid>/cwd), never in the daemon's."""
from __future__ import annotations

import errno
from dataclasses import dataclass, field

from isobox.daemon.fs.context import Container
from isobox.linux.syscalls import process_vm_readv


SPAN = 16384            # bytes read at once for read_strs when the strings are that close


def own_fd(path: str) -> int | None:
    """N when path is /proc/self/fd/N or /proc/thread-self/fd/N: the caller's own descriptor,
    which a daemon or helper must open through /proc/<caller>/fd, not through its own /proc/self."""
    for prefix in ("/proc/self/fd/", "/proc/thread-self/fd/"):
        if path.startswith(prefix) and path[len(prefix):].isdigit() and path[len(prefix):].isascii():
            return int(path[len(prefix):])
    return None


@dataclass
class Call:
    listener: int                 # the seccomp notify fd
    id: int                       # the notification's cookie
    pid: int                      # host pid of the calling thread
    nr: int                       # syscall number in the caller's ABI
    arch: int                     # AUDIT_ARCH_* of the caller's ABI
    args: tuple[int, ...]         # the six raw arguments
    name: str                     # the syscall's name for that ABI ("mount", "chmod", ...)
    container: Container | None   # the registered container the listener belongs to
    valid: object = None          # () -> bool: SECCOMP_IOCTL_NOTIF_ID_VALID on this id
    detail: dict = field(default_factory=dict)   # decoded arguments, for the audit line

    def read(self, addr: int, size: int) -> bytes:
        """Bytes of the caller's memory (EFAULT like the kernel when unreadable); fewer than
        size when the range runs into an unmapped page. One process_vm_readv, no open: what
        is read from a pid that was meanwhile reused is caught by valid() before acting."""
        if addr == 0:
            raise OSError(errno.EFAULT, "NULL pointer")
        try:
            return process_vm_readv(self.pid, addr, size)
        except OSError as e:
            raise OSError(errno.EFAULT if e.errno != errno.ESRCH else errno.ESRCH, "bad address") from None

    def read_str(self, addr: int, limit: int = 4096) -> str:
        """A NUL-terminated string of the caller (ENAMETOOLONG past limit, as the kernel)."""
        out = b""
        while len(out) < limit:
            # up to the end of the page: a string ending just before an unmapped page is fine
            at = addr + len(out)
            chunk = self.read(at, min(4096 - at % 4096, limit - len(out)))
            if not chunk:
                raise OSError(errno.EFAULT, "bad address")
            end = chunk.find(b"\0")
            if end >= 0:
                return (out + chunk[:end]).decode("utf-8", "surrogateescape")
            out += chunk
        raise OSError(errno.ENAMETOOLONG, "path too long")

    def read_strs(self, *specs: tuple[int, int]) -> list[str | None]:
        """Several (addr, limit) strings at once, None for a NULL addr.

        process_vm_readv costs about 5 us per remote range whatever its size (it checks
        ptrace access and pins pages for each), and a call's strings usually sit close
        together (.rodata, the stack): one read of the span that covers every string's first
        page-bounded chunk serves them all. A string not finished in its chunk, or a span that
        runs into a hole, is read again alone by read_str, which raises the kernel's errno."""
        lo, hi = 1 << 64, 0
        for a, lim in specs:
            if a:
                lo = min(lo, a)
                hi = max(hi, a + min(4096 - a % 4096, lim))
        data = b""
        if 0 < hi - lo <= SPAN:
            try:
                data = process_vm_readv(self.pid, lo, hi - lo)
            except OSError:
                pass
        out: list[str | None] = []
        for addr, limit in specs:
            if not addr:
                out.append(None)
                continue
            at = addr - lo
            end = data.find(b"\0", at, at + min(4096 - addr % 4096, limit)) if at < len(data) else -1
            out.append(data[at:end].decode("utf-8", "surrogateescape") if end >= 0 else self.read_str(addr, limit))
        return out


@dataclass
class Verdict:
    """CONTINUE: the kernel runs the syscall itself, with its own checks on the caller.
    ERROR: the syscall fails with errno. VALUE: it returns value (the handler acted).
    DEFER: see defer(). ANSWERED: the handler answered the kernel itself (ADDFD with SEND)."""
    kind: str                     # "continue" | "error" | "value" | "defer" | "answered"
    errno: int = 0
    value: int = 0
    reason: str = ""              # why, in a few words, for the audit log and `isobox events`
    audit: bool = True            # False for routine continues (not logged)
    work: object = None           # "defer": () -> Verdict, run on the pool (it forks or waits)


def proceed(reason: str = "") -> Verdict:
    return Verdict("continue", reason=reason, audit=False)


def refuse(err: int, reason: str) -> Verdict:
    return Verdict("error", errno=err, reason=reason)


def done(value: int, reason: str) -> Verdict:
    return Verdict("value", value=value, reason=reason)


def defer(work) -> Verdict:
    """The decision needs slow work (helpers, mounts): the loop runs work() on its pool and
    answers with the Verdict it returns, while other calls keep being served."""
    return Verdict("defer", work=work)
