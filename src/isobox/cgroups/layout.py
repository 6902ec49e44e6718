"""Which cgroup hierarchies this host has mounted (v1, v2 or hybrid).

parse_mountinfo() is a pure function on /proc/self/mountinfo text so it can be
tested against any host's layout; detect() reads the live host once per process.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

__all__ = ["CgroupError", "Hierarchy", "Layout", "parse_mountinfo", "parse_cgroup_file", "detect"]


class CgroupError(Exception):
    """A cgroup problem, worded as one clear line for the user."""


@dataclass(frozen=True)
class Hierarchy:
    mountpoint: str                # host path, e.g. /sys/fs/cgroup/memory
    root: str                      # mountinfo "root" field ("/" unless a sub-tree is bind-mounted)
    controllers: tuple[str, ...]   # v1: ("cpu", "cpuacct") / ("name=systemd",); v2: from cgroup.controllers
    version: int                   # 1 or 2
    options: str                   # super options, e.g. "rw,memory" or "rw,name=systemd"


@dataclass(frozen=True)
class Layout:
    mode: str                      # "v1" | "v2" | "hybrid"
    hierarchies: tuple[Hierarchy, ...]

    @property
    def unified(self) -> Hierarchy | None:
        return next((h for h in self.hierarchies if h.version == 2), None)

    def hierarchy(self, controller: str) -> Hierarchy | None:
        """The hierarchy holding a controller; "" means the v2 (unified) one."""
        if controller == "":
            return self.unified
        for h in self.hierarchies:
            if h.version == 1 and controller in h.controllers:
                return h
        u = self.unified
        # On pure v2 every controller lives in the one hierarchy; an empty
        # controller list only means parse_mountinfo() could not read it.
        if u is not None and (controller in u.controllers or (self.mode == "v2" and not u.controllers)):
            return u
        return None


# Mount options of a v1 cgroup mount that are not controller names.
_V1_NON_CONTROLLER = {"rw", "ro", "noprefix", "xattr", "clone_children", "cpuset_v2_mode",
                      "favordynmods", "nofavordynmods", "none", "all"}


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _v1_controllers(super_opts: str) -> tuple[str, ...]:
    out = []
    for opt in super_opts.split(","):
        if opt.startswith("name="):
            out.append(opt)
        elif opt and "=" not in opt and opt not in _V1_NON_CONTROLLER:
            out.append(opt)
    return tuple(out)


def parse_mountinfo(text: str) -> Layout:
    """Cgroup hierarchies in mountinfo text; v2 controllers are left empty (not in mountinfo).

    A hierarchy mounted several times (bind mounts) is listed once: the mount
    below /sys/fs/cgroup wins, then the one with the shortest root.
    """
    best: dict[str, tuple[tuple[int, int], Hierarchy]] = {}
    order: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 4:
            continue
        fstype, super_opts = fields[sep + 1], fields[sep + 3]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        dev, root, mountpoint = fields[2], _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup":
            h = Hierarchy(mountpoint, root, _v1_controllers(super_opts), 1, super_opts)
        else:
            h = Hierarchy(mountpoint, root, (), 2, super_opts)
        rank = (0 if mountpoint.startswith("/sys/fs/cgroup") else 1, len(root))
        if dev not in best:
            order.append(dev)
            best[dev] = (rank, h)
        elif rank < best[dev][0]:
            best[dev] = (rank, h)
    hierarchies = tuple(best[d][1] for d in order)
    versions = {h.version for h in hierarchies}
    if not versions:
        raise CgroupError("no cgroup filesystem is mounted (see /proc/self/mountinfo)")
    mode = "hybrid" if versions == {1, 2} else f"v{versions.pop()}"
    return Layout(mode, hierarchies)


def parse_cgroup_file(text: str) -> dict[str, str]:
    """/proc/PID/cgroup -> {controller: path}; v2 is key "", named v1 is "name=systemd"."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


@functools.lru_cache(maxsize=1)
def detect() -> Layout:
    """The live host's layout, with v2 controllers read from cgroup.controllers."""
    with open("/proc/self/mountinfo") as f:
        layout = parse_mountinfo(f.read())
    hs = []
    for h in layout.hierarchies:
        if h.version == 2:
            try:
                with open(h.mountpoint + "/cgroup.controllers") as f:
                    h = replace(h, controllers=tuple(f.read().split()))
            except OSError:
                pass
        hs.append(h)
    return Layout(layout.mode, tuple(hs))
