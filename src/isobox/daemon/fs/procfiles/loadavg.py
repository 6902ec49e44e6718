"""/proc/loadavg of the reader's cgroup, from the daemon's shared LoadTracker (ctx.loads)."""
from __future__ import annotations

from isobox.daemon.fs.context import RenderCtx
from isobox.daemon.fs.loadavg import LoadTracker

_fallback = LoadTracker()  # only when a caller renders without the daemon's tracker (tests, tools)


def render(ctx: RenderCtx) -> bytes:
    tracker = ctx.loads if isinstance(ctx.loads, LoadTracker) else _fallback
    return tracker.render(ctx.view.key, ctx.view)
