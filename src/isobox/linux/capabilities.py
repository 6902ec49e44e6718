"""Capability names and numbers (linux/capability.h)."""
from __future__ import annotations

NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
NUMBERS = {name: i for i, name in enumerate(NAMES)}


def last_cap() -> int:
    """The highest capability this kernel knows; names beyond it are ignored like runc does."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return len(NAMES) - 1


def canonical(name: str) -> str:
    """"sys_admin", "CAP_SYS_ADMIN" and "cap_sys_admin" all name CAP_SYS_ADMIN."""
    up = name.upper()
    return up if up.startswith("CAP_") else "CAP_" + up


def to_mask(names: list[str] | None) -> int:
    """Turn a spec's capability list into a mask; unknown names raise ValueError."""
    mask = 0
    top = last_cap()
    for name in names or ():
        n = NUMBERS.get(canonical(name))
        if n is None:
            raise ValueError(f"unknown capability {name!r}")
        if n <= top:
            mask |= 1 << n
    return mask
