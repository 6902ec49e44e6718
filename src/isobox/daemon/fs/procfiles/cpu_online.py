"""/sys/devices/system/cpu/online: the allowed CPUs in kernel list format ("0-1", "1")."""
from __future__ import annotations

from isobox.daemon.fs.cgview import format_cpu_list
from isobox.daemon.fs.context import RenderCtx


def render(ctx: RenderCtx) -> bytes:
    return (format_cpu_list(ctx.view.cpus()) + "\n").encode()
