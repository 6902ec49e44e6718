"""/proc/diskstats from the cgroup's own block I/O (v1 blkio *_recursive, v2 io.stat).

Only devices with non-zero counters are listed; columns we cannot know (in flight,
time in queue, flushes) are 0."""
from __future__ import annotations

import functools

from isobox.daemon.fs.context import RenderCtx


@functools.lru_cache(maxsize=256)
def _devname_cached(major: int, minor: int) -> str | None:
    try:
        with open(f"/sys/dev/block/{major}:{minor}/uevent") as f:
            for ln in f:
                if ln.startswith("DEVNAME="):
                    return ln.strip().partition("=")[2]
    except OSError:
        pass
    return None


def devname(major: int, minor: int) -> str | None:
    name = _devname_cached(major, minor)
    if name is None:
        _devname_cached.cache_clear()  # a device may be hot-plugged later; do not remember misses
    return name


def row(major: int, minor: int, name: str, st: dict[str, int]) -> str:
    """One line in the kernel's diskstats_show() format (17 counters)."""
    g = st.get
    cols = [g("rios", 0), g("rmerged", 0), g("rbytes", 0) // 512, g("rticks", 0),
            g("wios", 0), g("wmerged", 0), g("wbytes", 0) // 512, g("wticks", 0),
            0, g("ticks", 0), 0,
            g("dios", 0), 0, g("dbytes", 0) // 512, 0,
            0, 0]
    return f"{major:4d} {minor:7d} {name} " + " ".join(map(str, cols))


def render(ctx: RenderCtx) -> bytes:
    out = []
    for (major, minor), st in sorted(ctx.view.io_stats().items()):
        if not any(st.values()):
            continue
        name = devname(major, minor)
        if name is None:
            continue  # the device is gone; a line without a name would break parsers
        out.append(row(major, minor, name, st) + "\n")
    return "".join(out).encode()
