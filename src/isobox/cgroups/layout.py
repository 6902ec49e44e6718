"""Which cgroup hierarchies this host has mounted (v1, v2 or hybrid).

parse_mountinfo() is a pure function on /proc/self/mountinfo text so it can be
tested against any host's layout; detect() reads the live host once per process.
"""
from __future__ import annotations

import os

from isobox.plain import Frozen

__all__ = ["CgroupError", "Hierarchy", "Layout", "parse_mountinfo", "parse_cgroup_file", "detect"]


class CgroupError(Exception):
    """A cgroup problem, worded as one clear line for the user."""


class Hierarchy(Frozen):
    """(Not a dataclass: see isobox.plain.)"""
    mountpoint: str                # host path, e.g. /sys/fs/cgroup/memory
    root: str                      # mountinfo "root" field ("/" unless a sub-tree is bind-mounted)
    controllers: tuple[str, ...]   # v1: ("cpu", "cpuacct") / ("name=systemd",); v2: from cgroup.controllers
    version: int                   # 1 or 2
    options: str                   # super options, e.g. "rw,memory" or "rw,name=systemd"
    _FIELDS = __slots__ = ("mountpoint", "root", "controllers", "version", "options")

    def __init__(self, mountpoint: str, root: str, controllers: tuple[str, ...], version: int, options: str):
        self._set(mountpoint=mountpoint, root=root, controllers=controllers, version=version, options=options)


class Layout(Frozen):
    mode: str                      # "v1" | "v2" | "hybrid"
    hierarchies: tuple[Hierarchy, ...]
    _FIELDS = __slots__ = ("mode", "hierarchies")

    def __init__(self, mode: str, hierarchies: tuple[Hierarchy, ...]):
        self._set(mode=mode, hierarchies=hierarchies)

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
    # mountinfo escapes space, tab, newline and backslash as \ooo octal (what
    # re.sub(r"\\([0-7]{3})", ...) did, without importing re on every runtime call).
    if "\\" not in field:
        return field
    out, i, n = [], 0, len(field)
    while i < n:
        c, digits = field[i], field[i + 1:i + 4]
        if c == "\\" and len(digits) == 3 and all(d in "01234567" for d in digits):
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            out.append(c)
            i += 1
    return "".join(out)


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


def process_dir(h: Hierarchy, cgroups: dict[str, str]) -> str | None:
    """Host path, in hierarchy h, of the cgroup a parse_cgroup_file() map places a process in;
    None when it shows none there or lies outside the hierarchy's bind-mounted subtree."""
    if h.version == 1 and not h.controllers:
        return None
    p = cgroups.get("" if h.version == 2 else h.controllers[0])
    if p is None:
        return None
    p = p.removesuffix(" (deleted)")
    if h.root != "/":  # a bind-mounted subtree: paths are shown from the hierarchy root
        if not (p == h.root or p.startswith(h.root.rstrip("/") + "/")):
            return None
        p = p[len(h.root):] or "/"
    return os.path.normpath(h.mountpoint + "/" + p.lstrip("/"))


_detected: list[Layout] = []   # detect()'s cache (functools.lru_cache costs ~4 ms of imports)


def detect() -> Layout:
    """The live host's layout, with v2 controllers read from cgroup.controllers (read once per
    process; detect.cache_clear() forgets it)."""
    if _detected:
        return _detected[0]
    with open("/proc/self/mountinfo") as f:
        layout = parse_mountinfo(f.read())
    hs = []
    for h in layout.hierarchies:
        if h.version == 2:
            try:
                with open(h.mountpoint + "/cgroup.controllers") as f:
                    h = Hierarchy(h.mountpoint, h.root, tuple(f.read().split()), h.version, h.options)
            except OSError:
                pass
        hs.append(h)
    _detected.append(Layout(layout.mode, tuple(hs)))
    return _detected[0]


detect.cache_clear = _detected.clear  # type: ignore[attr-defined]  # as with lru_cache
