"""Is a process one of a container's? By its cgroup, in the hierarchy that decides membership.

Used by the server (whose listener is it) and the filesystem (may this reader see the node)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from isobox.daemon.fs.context import Container

if TYPE_CHECKING:
    from isobox.cgroups.layout import Layout


def in_container(pid: int, c: Container) -> bool:
    """pid sits in the container's cgroup (or below)."""
    from isobox.cgroups.layout import detect, parse_cgroup_file
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            mine = parse_cgroup_file(f.read())
    except OSError:
        return False
    return member(detect(), mine, c.cgroups)


def member(layout: Layout, mine: dict[str, str], tops: dict[str, str]) -> bool:
    """A process whose /proc/PID/cgroup parses to `mine` lies in or below the container's
    cgroup `tops` in the hierarchy that decides membership: memory, else pids, else the v2 one.
    A cgroup shown as deleted never matches: a new container may have made the same path."""
    from isobox.cgroups.layout import process_dir
    ctrl = next((k for k in ("memory", "pids", "") if k in tops), None)
    h = layout.hierarchy(ctrl) if ctrl is not None else None
    if h is None or mine.get(ctrl if h.version == 1 else "", "").endswith(" (deleted)"):
        return False
    host = process_dir(h, mine)
    top = tops[ctrl]
    return host is not None and (host == top or host.startswith(top.rstrip("/") + "/"))
