"""/proc/uptime: time since the container's init started; idle = uptime - cgroup busy time."""
from __future__ import annotations

import os

from isobox.daemon.fs.context import Container, RenderCtx, boottime

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def start_time(pid: int) -> float | None:
    """CLOCK_BOOTTIME seconds at which pid started (/proc/<pid>/stat field 22)."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()  # fields from 3 (state) on; comm may hold spaces
    try:
        return int(fields[22 - 3]) / _CLK_TCK
    except (IndexError, ValueError):
        return None


def uptime(container: Container, view) -> tuple[float, float]:
    now = boottime()
    start = start_time(container.init_pid)
    if start is None:
        start = container.created
    up = max(0.0, now - start)
    busy = (view.cpu_busy_ns() or 0) / 1e9
    return up, max(0.0, up - busy)


def render(ctx: RenderCtx) -> bytes:
    up, idle = uptime(ctx.container, ctx.view)
    return f"{up:.2f} {idle:.2f}\n".encode()
