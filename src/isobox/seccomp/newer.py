"""A second, hand-written filter for syscalls newer than the system's libseccomp.

libseccomp 2.5.4 (Debian 12) cannot name setxattrat (Linux 6.13), which sets extended
attributes, security.capability included, so neither the engine's profile nor isobox's trap
can refuse or trap it by name. This classic BPF program answers ENOSYS for it on the x86
ABIs (callers fall back to setxattr, which is trapped). Filters stack: the kernel applies
the most restrictive verdict of all, so this one only ever narrows the main filter."""
from __future__ import annotations

import struct

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_BIT = 0x40000000
NEWER = (463,)                            # setxattrat (same number on x86_64, i386 and x32 | X32_BIT)
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
ENOSYS = 38
LD_ABS_W, JEQ_K, RET_K = 0x20, 0x15, 0x06


def program() -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) instructions."""
    nrs = [n for x in NEWER for n in (x, x | X32_BIT)]
    prog = [(LD_ABS_W, 0, 0, 4),                         # seccomp_data.arch
            (JEQ_K, 2, 0, AUDIT_ARCH_X86_64),
            (JEQ_K, 1, 0, AUDIT_ARCH_I386),
            (RET_K, 0, 0, SECCOMP_RET_ALLOW),
            (LD_ABS_W, 0, 0, 0)]                         # seccomp_data.nr
    for i, nr in enumerate(nrs):
        prog.append((JEQ_K, len(nrs) - i, 0, nr))        # to the ENOSYS return
    prog += [(RET_K, 0, 0, SECCOMP_RET_ALLOW), (RET_K, 0, 0, SECCOMP_RET_ERRNO | ENOSYS)]
    return prog


def load() -> None:
    """Installs the guard on the calling thread (same conditions as any seccomp filter:
    no_new_privs, or CAP_SYS_ADMIN in the caller's user namespace)."""
    from isobox.linux.syscalls import seccomp_set_mode_filter
    raw = b"".join(struct.pack("<HBBI", code, jt, jf, k) for code, jt, jf, k in program())
    seccomp_set_mode_filter(raw)
