"""Process identity helpers: (pid, starttime) identifies a process across pid reuse."""
from __future__ import annotations


def _stat_after_comm(pid: int) -> list[bytes] | None:
    """Fields 3... of /proc/PID/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and ')', so split after the last ')'.
    return data[data.rfind(b")") + 2:].split()


def proc_starttime(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), None if no such process or if it
    has exited (a zombie or dead task is no longer the container's init)."""
    rest = _stat_after_comm(pid)
    if rest is None or rest[:1] in ([b"Z"], [b"X"]):
        return None
    try:
        return int(rest[22 - 3])  # rest[0] is field 3
    except (IndexError, ValueError):
        return None


def proc_ppid(pid: int) -> int | None:
    """Field 4 of /proc/PID/stat (the parent's pid), None if there is no such process."""
    rest = _stat_after_comm(pid)
    try:
        return int(rest[4 - 3]) if rest is not None else None
    except (IndexError, ValueError):
        return None


def host_pid() -> int:
    """Our pid in the procfs mounted at /proc: the host's pid while /proc is still the host's
    (the container init and exec'd processes ask before they enter the container's mount
    namespace). 0 if /proc cannot tell."""
    import os
    try:
        return int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return 0
