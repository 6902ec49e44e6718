"""What a handler gets (Call) and returns (Verdict).

TOCTOU: arguments are read from the caller's memory (/proc/<pid>/mem) while the caller is
stopped in the syscall; a handler that acts with more privilege than the caller must call
call.valid() after reading and before acting, so that a caller that died (and a pid that
was reused) cannot be confused with it. Paths are resolved in the caller's root and cwd
(/proc/<pid>/root, /proc/<pid>/cwd), never in the daemon's."""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from isobox.daemon.fs.context import Container


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
        """Bytes of the caller's memory (EFAULT like the kernel when unreadable)."""
        if addr == 0:
            raise OSError(errno.EFAULT, "NULL pointer")
        fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, size, addr)
        finally:
            os.close(fd)

    def read_str(self, addr: int, limit: int = 4096) -> str:
        """A NUL-terminated string of the caller (ENAMETOOLONG past limit, as the kernel)."""
        out = b""
        while len(out) < limit:
            try:
                chunk = self.read(addr + len(out), min(256, limit - len(out)))
            except OSError as e:
                if out or e.errno != errno.EIO:
                    raise OSError(errno.EFAULT, "bad address") from None
                raise OSError(errno.EFAULT, "bad address") from None
            if not chunk:
                raise OSError(errno.EFAULT, "bad address")
            end = chunk.find(b"\0")
            if end >= 0:
                return (out + chunk[:end]).decode("utf-8", "surrogateescape")
            out += chunk
        raise OSError(errno.ENAMETOOLONG, "path too long")


@dataclass
class Verdict:
    """CONTINUE: the kernel runs the syscall itself, with its own checks on the caller.
    ERROR: the syscall fails with errno. VALUE: it returns value (the handler acted)."""
    kind: str                     # "continue" | "error" | "value"
    errno: int = 0
    value: int = 0
    reason: str = ""              # why, in a few words, for the audit log and `isobox events`
    audit: bool = True            # False for routine continues (not logged)


def proceed(reason: str = "") -> Verdict:
    return Verdict("continue", reason=reason, audit=False)


def refuse(err: int, reason: str) -> Verdict:
    return Verdict("error", errno=err, reason=reason)


def done(value: int, reason: str) -> Verdict:
    return Verdict("value", value=value, reason=reason)
