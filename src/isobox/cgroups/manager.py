"""One container's cgroup, the same path in every mounted hierarchy (v1, v2 or hybrid).

All file-system access goes through the small _mkdir/_rmdir/_write/_read/_chown/_kill
helpers and opens files without O_CREAT, so the v2 logic can be unit-tested on a
plain directory tree that imitates cgroupfs.

What is proven where (this Debian 12 host is hybrid: every controller on v1, only
hugetlb on the cgroup2 mount at /sys/fs/cgroup/unified):
- real host, v1 (tests/integration/test_cgroups_v1.py, test_cgroups_complete.py):
  memory/cpu/cpuset/pids limits, delegation, destroy, blkio throttles on the root disk
  (blkio weights are refused: the scheduler is none, so no blkio.weight file), the
  devices allow-list, the freezer (a looping process stops and resumes), update, stats;
- real host, cgroup2 (unified): hugetlb.<size>.max, the BPF_PROG_TYPE_CGROUP_DEVICE
  program (a process in the cgroup gets EPERM writing /dev/null), cgroup.freeze;
- unit tests only, on a fake cgroupfs tree (tests/unit/test_cgroups_v2.py,
  test_cgroups_resources.py): v2 memory/cpu/cpuset/pids/io files, io.weight and
  io.max, v2 stats parsing, and the rule -> BPF instruction generation (also run
  through a small interpreter).
"""
from __future__ import annotations

import errno
import os
import _signal as signal  # not signal.py: it imports enum (~8 ms per runtime call)
import time
from _collections_abc import Iterable   # collections.abc without collections (~2 ms a call)

from isobox.plain import Frozen, Plain

from . import devices as _dev
from .layout import CgroupError, Hierarchy, Layout

__all__ = ["CgroupError", "ContainerCgroup"]

MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
_MOUNT_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC
DESTROY_TIMEOUT = 5.0
FREEZE_TIMEOUT = 5.0

# Files the container root may write after delegation; limit files stay root-owned
# so it can build its own sub-tree but never raise what the host set.
_DELEGATED_V1 = ("cgroup.procs", "tasks", "cgroup.clone_children", "notify_on_release")
_DELEGATED_V2 = ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads")

# OCI linux.resources fields this module applies; other set fields are refused so no
# limit is silently dropped. useHierarchy/checkBeforeUpdate have no effect on a fresh
# cgroup on current kernels.
_HANDLED = {
    "memory": {"limit", "reservation", "swap", "disableOOMKiller", "swappiness",
               "useHierarchy", "checkBeforeUpdate"},
    "cpu": {"shares", "quota", "period", "cpus", "mems"},
    "pids": {"limit"},
    "blockIO": {"weight", "leafWeight", "weightDevice", "throttleReadBpsDevice",
                "throttleWriteBpsDevice", "throttleReadIOPSDevice", "throttleWriteIOPSDevice"},
    "hugepageLimits": None,  # None: a list, checked by _plan_hugetlb
    "devices": None,         # applied by _apply_devices (v1 allow-list or v2 BPF)
}
_THROTTLES = (("throttleReadBpsDevice", "read_bps_device", "rbps"),
              ("throttleWriteBpsDevice", "write_bps_device", "wbps"),
              ("throttleReadIOPSDevice", "read_iops_device", "riops"),
              ("throttleWriteIOPSDevice", "write_iops_device", "wiops"))
NO_BLKIO_WEIGHTS = ("the I/O scheduler of this host has no weights (no {file}; set a bfq "
                    "scheduler for weights, throttles work without)")


# --- file operations (module level so tests can replace them) -------------------

def _mkdir(path: str) -> None:
    os.mkdir(path, 0o755)


def _rmdir(path: str) -> None:
    os.rmdir(path)


def _chown(path: str, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _write(path: str, value: str) -> None:
    # One write() per value as cgroupfs wants; no O_CREAT so a missing
    # controller file fails with ENOENT instead of silently appearing.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _read_opt(path: str) -> str | None:
    try:
        return _read(path).strip()
    except OSError:
        return None


# --- resources -> file writes ----------------------------------------------------

class _Write(Frozen):
    """(Not a dataclass: see isobox.plain.)"""
    controller: str
    file: str
    value: str
    # (file, value) tried in order when file is absent (e.g. blkio.bfq.weight -> blkio.weight)
    alt: tuple[tuple[str, str], ...]
    missing: str | None          # the error when no candidate file exists
    optional: bool               # skip quietly when no candidate file exists
    _FIELDS = __slots__ = ("controller", "file", "value", "alt", "missing", "optional")

    def __init__(self, controller: str, file: str, value: str, alt: tuple[tuple[str, str], ...] = (),
                 missing: str | None = None, optional: bool = False):
        self._set(controller=controller, file=file, value=value, alt=alt, missing=missing, optional=optional)


def _is_set(v: object) -> bool:
    # Docker and others send zero values / empty sections for "not set".
    if isinstance(v, dict):
        return any(_is_set(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return len(v) > 0
    return v not in (None, 0, False, "")


def _check_supported(res: dict) -> None:
    for section, value in res.items():
        if section not in _HANDLED:
            if _is_set(value):
                raise CgroupError(f"linux.resources.{section} is not supported by isobox")
            continue
        fields = _HANDLED[section]
        if fields is None or not isinstance(value, dict):
            continue
        for k, v in value.items():
            if k not in fields and _is_set(v):
                raise CgroupError(f"linux.resources.{section}.{k} is not supported by isobox")


def _int(section: str, key: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise CgroupError(f"linux.resources.{section}.{key} must be an integer, got {v!r}")
    return v


def _v2_max(v: int) -> str:
    return "max" if v < 0 else str(v)


def _swap_v2(swap: int, limit: int) -> int:
    # OCI swap is memory+swap (the v1 memsw meaning); v2 wants swap alone (runc's rule).
    if limit == -1 and swap == 0:
        return -1
    if swap in (-1, 0):
        return swap
    if limit in (0, -1):
        raise CgroupError("cannot set a swap limit without a memory limit")
    if swap < limit:
        raise CgroupError(f"memory+swap limit {swap} is below the memory limit {limit}")
    return swap - limit


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares -> v2 cpu.weight, the linear mapping runc uses."""
    return max(1, min(10000, 1 + ((shares - 2) * 9999) // 262142))


def plan_writes(res: dict | None, layout: Layout) -> list[_Write]:
    """OCI linux.resources -> ordered file writes, for the hierarchy holding each controller."""
    res = res or {}
    _check_supported(res)
    out: list[_Write] = []

    def v2(controller: str) -> bool:
        h = layout.hierarchy(controller)
        if h is None:
            raise CgroupError(f"cgroup controller '{controller}' is not available on this host")
        return h.version == 2

    cpu = res.get("cpu") or {}
    mem = res.get("memory") or {}
    pids = res.get("pids") or {}

    # cpuset first: a v1 cpuset cgroup is unusable until cpus/mems are set.
    for key in ("cpus", "mems"):
        if cpu.get(key):
            v2("cpuset")
            out.append(_Write("cpuset", f"cpuset.{key}", str(cpu[key])))

    limit = _int("memory", "limit", mem.get("limit") or 0)
    swap = _int("memory", "swap", mem.get("swap") or 0)
    reservation = _int("memory", "reservation", mem.get("reservation") or 0)
    swappiness = mem.get("swappiness")
    oom_off = bool(mem.get("disableOOMKiller"))
    if limit or swap or reservation or oom_off or swappiness not in (None, -1):
        if v2("memory"):
            if limit:
                out.append(_Write("memory", "memory.max", _v2_max(limit)))
            s = _swap_v2(swap, limit)
            if s:
                out.append(_Write("memory", "memory.swap.max", _v2_max(s)))
            if reservation:
                out.append(_Write("memory", "memory.low", _v2_max(reservation)))
            if oom_off:
                raise CgroupError("memory.disableOOMKiller is not supported on cgroup v2")
            if swappiness not in (None, -1):
                raise CgroupError("memory.swappiness is not supported on cgroup v2")
        else:
            if limit:
                out.append(_Write("memory", "memory.limit_in_bytes", str(limit)))
            if swap:
                out.append(_Write("memory", "memory.memsw.limit_in_bytes", str(swap)))
            if reservation:
                out.append(_Write("memory", "memory.soft_limit_in_bytes", str(reservation)))
            if swappiness not in (None, -1):
                out.append(_Write("memory", "memory.swappiness",
                                  str(_int("memory", "swappiness", swappiness))))
            if oom_off:
                out.append(_Write("memory", "memory.oom_control", "1"))

    shares = _int("cpu", "shares", cpu.get("shares") or 0)
    quota = _int("cpu", "quota", cpu.get("quota") or 0)
    period = _int("cpu", "period", cpu.get("period") or 0)
    if shares or quota or period:
        if v2("cpu"):
            if shares:
                out.append(_Write("cpu", "cpu.weight", str(shares_to_weight(shares))))
            if quota or period:
                value = str(quota) if quota > 0 else "max"
                if period:
                    value += f" {period}"
                out.append(_Write("cpu", "cpu.max", value))
        else:
            if shares:
                out.append(_Write("cpu", "cpu.shares", str(shares)))
            if period:  # period before quota, as runc does
                out.append(_Write("cpu", "cpu.cfs_period_us", str(period)))
            if quota:
                out.append(_Write("cpu", "cpu.cfs_quota_us", str(quota)))

    plimit = _int("pids", "limit", pids.get("limit") or 0)
    if plimit:
        v2("pids")
        out.append(_Write("pids", "pids.max", _v2_max(plimit)))
    out += _plan_blkio(res.get("blockIO") or {}, layout)
    out += _plan_hugetlb(res.get("hugepageLimits"), layout)
    return out


def _uint(where: str, v: object, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CgroupError(f"linux.resources.{where} must be an integer from {lo} to {hi}, got {v!r}")
    return v


def _device_entries(blk: dict, key: str) -> list[dict]:
    entries = blk.get(key) or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CgroupError(f"linux.resources.blockIO.{key} must be a list of objects")
    for i, e in enumerate(entries):
        for k in ("major", "minor"):
            _uint(f"blockIO.{key}[{i}].{k}", e.get(k), 0, 0xFFFFFFFF)
    return entries


def blkio_weight_to_io_weight(w: int) -> int:
    """v1 blkio weight (10..1000) -> v2 io.weight (1..10000), runc's mapping."""
    return 1 + (w - 10) * 9999 // 990


def _blk_v2(layout: Layout) -> bool:
    h = layout.hierarchy("blkio")
    if h is not None and h.version == 1:
        return False
    h = layout.hierarchy("io")
    if h is None:
        raise CgroupError("cgroup controller 'blkio' (v2: 'io') is not available on this host")
    return True


def _plan_blkio(blk: dict, layout: Layout) -> list[_Write]:
    if not isinstance(blk, dict):
        raise CgroupError("linux.resources.blockIO must be an object")
    if not _is_set(blk):
        return []
    is_v2 = _blk_v2(layout)
    ctl = "io" if is_v2 else "blkio"
    out: list[_Write] = []
    weight = blk.get("weight") or 0
    leaf = blk.get("leafWeight") or 0
    if weight:
        weight = _uint("blockIO.weight", weight, 10, 1000)
        if is_v2:
            out.append(_Write(ctl, "io.bfq.weight", str(weight),
                              alt=(("io.weight", f"default {blkio_weight_to_io_weight(weight)}"),),
                              missing=NO_BLKIO_WEIGHTS.format(file="io.weight")))
        else:
            out.append(_Write(ctl, "blkio.bfq.weight", str(weight), alt=(("blkio.weight", str(weight)),),
                              missing=NO_BLKIO_WEIGHTS.format(file="blkio.weight")))
    if leaf:
        leaf = _uint("blockIO.leafWeight", leaf, 10, 1000)
        if is_v2:
            raise CgroupError("linux.resources.blockIO.leafWeight is not supported on cgroup v2")
        out.append(_Write(ctl, "blkio.leaf_weight", str(leaf),
                          missing="blockIO.leafWeight is not supported by this kernel "
                                  "(no blkio.leaf_weight: it was CFQ's)"))
    for i, e in enumerate(_device_entries(blk, "weightDevice")):
        dev = f"{e['major']}:{e['minor']}"
        w = e.get("weight") or 0
        lw = e.get("leafWeight") or 0
        if w:
            w = _uint(f"blockIO.weightDevice[{i}].weight", w, 10, 1000)
            if is_v2:
                out.append(_Write(ctl, "io.bfq.weight", f"{dev} {w}",
                                  alt=(("io.weight", f"{dev} {blkio_weight_to_io_weight(w)}"),),
                                  missing=NO_BLKIO_WEIGHTS.format(file="io.weight")))
            else:
                out.append(_Write(ctl, "blkio.bfq.weight_device", f"{dev} {w}",
                                  alt=(("blkio.weight_device", f"{dev} {w}"),),
                                  missing=NO_BLKIO_WEIGHTS.format(file="blkio.weight_device")))
        if lw:
            _uint(f"blockIO.weightDevice[{i}].leafWeight", lw, 10, 1000)
            if is_v2:
                raise CgroupError("linux.resources.blockIO.weightDevice leafWeight is not supported on cgroup v2")
            out.append(_Write(ctl, "blkio.leaf_weight_device", f"{dev} {lw}",
                              missing="blockIO leafWeight is not supported by this kernel "
                                      "(no blkio.leaf_weight_device: it was CFQ's)"))
    for key, v1file, v2key in _THROTTLES:
        for i, e in enumerate(_device_entries(blk, key)):
            rate = _uint(f"blockIO.{key}[{i}].rate", e.get("rate", 0))
            dev = f"{e['major']}:{e['minor']}"
            if is_v2:  # 0 = no limit, as writing 0 does on v1
                out.append(_Write(ctl, "io.max", f"{dev} {v2key}={rate or 'max'}"))
            else:
                out.append(_Write(ctl, f"blkio.throttle.{v1file}", f"{dev} {rate}"))
    return out


class _LazyPattern:
    """A regular expression compiled on first use: only the rare spec with hugepageLimits
    pays for importing re (~12 ms), not every runtime call."""

    def __init__(self, pattern: str):
        self._pattern = pattern
        self._compiled = None

    def __getattr__(self, name: str):
        if self._compiled is None:
            import re
            self._compiled = re.compile(self._pattern)
        return getattr(self._compiled, name)


_PAGE_SIZE = _LazyPattern(r"^([1-9][0-9]*)([KMG])B$")


def hugepage_sizes() -> list[str]:
    """The host's huge page sizes in the kernel's cgroup file spelling ("2MB", "1GB")."""
    try:
        names = os.listdir("/sys/kernel/mm/hugepages")
    except OSError:
        return []
    out = []
    for n in names:
        import re
        m = re.fullmatch(r"hugepages-(\d+)kB", n)
        if m:
            kb = int(m.group(1))
            out.append(f"{kb >> 20}GB" if kb % (1 << 20) == 0 else
                       f"{kb >> 10}MB" if kb % (1 << 10) == 0 else f"{kb}KB")
    return sorted(out, key=_page_bytes)


def _page_bytes(size: str) -> int:
    m = _PAGE_SIZE.match(size)
    return int(m.group(1)) << {"K": 10, "M": 20, "G": 30}[m.group(2)] if m else 0


def _plan_hugetlb(limits: object, layout: Layout) -> list[_Write]:
    if not limits:
        return []
    if not isinstance(limits, list) or not all(isinstance(x, dict) for x in limits):
        raise CgroupError("linux.resources.hugepageLimits must be a list of {pageSize, limit}")
    h = layout.hierarchy("hugetlb")
    if h is None:
        raise CgroupError("cgroup controller 'hugetlb' is not available on this host")
    sizes = hugepage_sizes()
    out = []
    for i, e in enumerate(limits):
        size = e.get("pageSize")
        if not isinstance(size, str) or not _PAGE_SIZE.match(size):
            raise CgroupError(f"linux.resources.hugepageLimits[{i}].pageSize must look like "
                              f"\"2MB\" or \"1GB\", got {size!r}")
        if size not in sizes:
            raise CgroupError(f"huge page size {size} is not supported by this host "
                              f"(supported: {', '.join(sizes) or 'none'})")
        limit = _uint(f"hugepageLimits[{i}].limit", e.get("limit", 0))
        if h.version == 2:
            out.append(_Write("hugetlb", f"hugetlb.{size}.max", str(limit)))
            out.append(_Write("hugetlb", f"hugetlb.{size}.rsvd.max", str(limit), optional=True))
        else:
            out.append(_Write("hugetlb", f"hugetlb.{size}.limit_in_bytes", str(limit)))
            out.append(_Write("hugetlb", f"hugetlb.{size}.rsvd.limit_in_bytes", str(limit), optional=True))
    return out


def _plan_devices(res: dict | None) -> list[_dev.Rule] | None:
    """The device rules to apply (with isobox's defaults), None when the section is absent."""
    if not res or res.get("devices") is None:
        return None
    return _dev.with_defaults(_dev.parse_rules(res.get("devices")))


# --- the container cgroup --------------------------------------------------------

def _normalize(path: str) -> str:
    if not isinstance(path, str) or not path.strip("/"):
        raise CgroupError(f"invalid cgroup path {path!r}: must name a cgroup below the root")
    if not path.startswith("/") and path.count(":") == 2:
        raise CgroupError(f"cgroup path {path!r} is in systemd-driver form (slice:prefix:name); "
                          "isobox uses the cgroupfs driver, pass an absolute path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise CgroupError(f"invalid cgroup path {path!r}: '..' is not allowed")
    return "/" + "/".join(parts)


def _procs_in_tree(top: str) -> set[int]:
    found: set[int] = set()
    for root, _dirs, _files in os.walk(top):
        text = _read_opt(os.path.join(root, "cgroup.procs"))
        if text:
            found.update(int(p) for p in text.split())
    return found


class ContainerCgroup(Plain):
    """(Not a dataclass: see isobox.plain.)"""
    layout: Layout
    # Absolute within every hierarchy ("/isobox/<id>"). A relative path is taken as
    # relative to the hierarchy root "/" (not to the caller's own cgroup as runc does).
    path: str
    _FIELDS = ("layout", "path")

    def __init__(self, layout: Layout, path: str):
        self.layout = layout
        self.path = _normalize(path)

    # -- paths --
    def _host_dir(self, h: Hierarchy) -> str:
        # Like runc, an absolute path is joined to the mountpoint as is.
        return os.path.join(h.mountpoint, self.path.lstrip("/"))

    def dir(self, controller: str) -> str | None:
        h = self.layout.hierarchy(controller)
        return self._host_dir(h) if h else None

    def exists(self) -> bool:
        return any(os.path.isdir(self._host_dir(h)) for h in self.layout.hierarchies)

    # -- create --
    def create(self, resources: dict | None = None, owner: tuple[int, int] | None = None,
               devices: Iterable[_dev.Key] = _dev.ALWAYS_ALLOWED) -> None:
        """Make the cgroup in every hierarchy and apply resources; device access always
        starts from deny-all plus isobox's harmless character devices, and never goes
        beyond `devices` (a container's: devices.allowed(policy), whatever its spec says)."""
        writes = plan_writes(resources, self.layout)  # refuse before touching anything
        rules = _dev.with_defaults(_dev.parse_rules((resources or {}).get("devices")))
        needed = {w.controller for w in writes}
        created: list[str] = []
        try:
            for h in self.layout.hierarchies:
                self._make(h, needed, created)
            self._apply(writes)
            self._apply_devices(rules, devices, fresh=True)
            if owner is not None:
                self._delegate(owner)
        except BaseException:
            for d in reversed(created):  # deepest first; leave nothing half-made
                try:
                    _rmdir(d)
                except OSError:
                    pass
            raise

    def _make(self, h: Hierarchy, needed: set[str], created: list[str]) -> None:
        # A concurrent delete may remove an empty shared parent (/isobox) between our
        # mkdirs; start again from the top when that happens.
        for _ in range(5):
            try:
                return self._make_once(h, needed, created)
            except FileNotFoundError:
                continue
        raise CgroupError(f"cannot create cgroup {self.path}: its parent keeps disappearing")

    def _make_once(self, h: Hierarchy, needed: set[str], created: list[str]) -> None:
        cpuset = h.version == 1 and "cpuset" in h.controllers
        cur = h.mountpoint
        parts = self.path.strip("/").split("/")
        for i, part in enumerate(parts):
            parent, cur = cur, os.path.join(cur, part)
            if h.version == 2:
                self._enable_controllers(parent, needed)
            if not os.path.isdir(cur):
                try:
                    _mkdir(cur)
                    created.append(cur)
                except FileExistsError:
                    pass  # raced with another creator: fine
                except FileNotFoundError:
                    raise
                except OSError as e:
                    raise CgroupError(f"cannot create cgroup {cur}: {e.strerror}") from None
            if cpuset:
                # every level, not only the ones made here: a parent another create has just
                # made may not have its cpus/mems yet (its child would copy them empty)
                _fill_cpuset(parent, cur)
        if cpuset:
            # Sub-cgroups the container makes then inherit cpus/mems instead of starting
            # empty (and refusing tasks). Best effort: older kernels may lack the file.
            try:
                _write(os.path.join(cur, "cgroup.clone_children"), "1")
            except OSError:
                pass

    def _enable_controllers(self, parent: str, needed: set[str]) -> None:
        # Pure v2: enable everything the parent offers (as runc), so limits and the
        # container's own delegated sub-tree work. Hybrid: the v2 tree belongs to
        # systemd, so only what a requested limit needs.
        avail = (_read_opt(os.path.join(parent, "cgroup.controllers")) or "").split()
        enabled = (_read_opt(os.path.join(parent, "cgroup.subtree_control")) or "").split()
        want = avail if self.layout.mode == "v2" else [c for c in avail if c in needed]
        todo = [c for c in want if c not in enabled]
        if not todo:
            return
        sc = os.path.join(parent, "cgroup.subtree_control")
        try:
            _write(sc, " ".join("+" + c for c in todo))
        except OSError:
            for c in todo:  # as far as possible: one refused controller must not block the rest
                try:
                    _write(sc, "+" + c)
                except OSError:
                    pass

    def _apply(self, writes: list[_Write]) -> None:
        writes = list(writes)
        names = [w.file for w in writes]
        if "memory.memsw.limit_in_bytes" in names and "memory.limit_in_bytes" in names:
            # v1 demands memsw >= limit at every moment: raise memsw first when growing.
            sw = writes[names.index("memory.memsw.limit_in_bytes")]
            cur = _read_opt(os.path.join(self.dir("memory") or "", sw.file))
            if int(sw.value) == -1 or (cur is not None and int(sw.value) > int(cur)):
                writes.remove(sw)
                writes.insert(names.index("memory.limit_in_bytes"), sw)
        for w in writes:
            h = self.layout.hierarchy(w.controller)
            assert h is not None  # plan_writes checked
            d = self._host_dir(h)
            file, value = w.file, w.value
            if w.alt or w.missing or w.optional:
                found = [(f, v) for f, v in ((w.file, w.value),) + w.alt if _exists(os.path.join(d, f))]
                if not found:
                    if w.optional:
                        continue
                    if w.missing:
                        raise CgroupError(f"cannot set {w.file}: {w.missing}")
                else:
                    file, value = found[0]
            target = os.path.join(d, file)
            w = _Write(w.controller, file, value)
            try:
                _write(target, w.value)
            except FileNotFoundError:
                if h.version == 2:
                    raise CgroupError(f"cgroup controller '{w.controller}' is not enabled for "
                                      f"{self._host_dir(h)} (cannot set {w.file})") from None
                raise CgroupError(f"cannot set {w.file}: not supported by this kernel") from None
            except OSError as e:
                raise CgroupError(f"cannot set {w.file}={w.value}: {e.strerror}") from None

    # -- devices --
    def _device_target(self) -> tuple[str, str] | None:
        """("v1", dir) for a v1 devices hierarchy, ("bpf", dir) for cgroup v2, None if neither."""
        h = self.layout.hierarchy("devices")
        if h is not None and h.version == 1:
            return "v1", self._host_dir(h)
        if self.layout.unified is not None:
            return "bpf", self._host_dir(self.layout.unified)
        return None

    def _apply_devices(self, rules: list[_dev.Rule], allow: Iterable[_dev.Key], fresh: bool) -> None:
        target = self._device_target()
        if target is None:
            # No devices cgroup at all (a v1 host without that hierarchy): the /dev binds
            # (harmless character devices only) and the user namespace still hold.
            return
        rules = _dev.clamp(rules, allow)    # one clamp, before either backend
        kind, d = target
        if kind == "bpf":
            _attach_device_filter(d, _dev.bpf_program(rules))
            return
        current = None
        if not fresh:
            text = _read_opt(os.path.join(d, "devices.list"))
            current = _dev.Emulator.from_v1_list(text) if text is not None else None
        for file, line in _dev.v1_writes(rules, current):
            try:
                _write(os.path.join(d, file), line)
            except OSError as e:
                hint = ""
                if e.errno == errno.EINVAL and line == "a" and any(
                        os.path.isdir(os.path.join(d, x)) for x in os.listdir(d)):
                    hint = " (the kernel refuses 'a' on a cgroup with sub-cgroups)"
                raise CgroupError(f"cannot write '{line}' to {file} of {d}: {e.strerror}{hint}") from None

    def device_rules(self) -> list[_dev.Rule] | None:
        """The v1 allow-list as the kernel reports it (devices.list); None on v2/unknown."""
        target = self._device_target()
        if target is None or target[0] != "v1":
            return None
        text = _read_opt(os.path.join(target[1], "devices.list"))
        return None if text is None else _dev.Emulator.from_v1_list(text).rules()

    # -- update --
    def update(self, resources: dict, devices: Iterable[_dev.Key] = _dev.ALWAYS_ALLOWED) -> None:
        """Apply a new linux.resources object to the existing cgroup (runc update).

        Only set fields are written; "devices", when present, replaces the whole rule set
        (again on top of deny-all and isobox's harmless devices, clamped to `devices` as on
        create). Validation is the one create uses, and happens before anything is written.
        """
        if not isinstance(resources, dict):
            raise CgroupError("resources must be a JSON object")
        writes = plan_writes(resources, self.layout)
        rules = _plan_devices(resources)
        if not self.exists():
            raise CgroupError(f"cgroup {self.path} does not exist")
        needed = {w.controller for w in writes}
        for h in self.layout.hierarchies:
            if h.version == 2 and needed:
                cur = h.mountpoint
                for part in self.path.strip("/").split("/"):
                    self._enable_controllers(cur, needed)
                    cur = os.path.join(cur, part)
        self._apply(writes)
        if rules is not None:
            self._apply_devices(rules, devices, fresh=False)

    # -- freezer --
    def _freezer(self) -> tuple[int, str]:
        h = self.layout.hierarchy("freezer")
        if h is not None and h.version == 1:
            return 1, self._host_dir(h)
        if self.layout.unified is not None:
            return 2, self._host_dir(self.layout.unified)
        raise CgroupError("no freezer on this host: neither a v1 freezer hierarchy nor cgroup v2")

    def freeze(self, timeout: float = FREEZE_TIMEOUT) -> None:
        """Freeze every process of the container; returns once the kernel says frozen.
        On timeout the cgroup is thawed again and CgroupError raised."""
        version, d = self._freezer()
        deadline = time.monotonic() + timeout
        state_file = os.path.join(d, "freezer.state" if version == 1 else "cgroup.freeze")
        try:
            _write(state_file, "FROZEN" if version == 1 else "1")
            delay = 0.001
            while not self.frozen():
                if time.monotonic() > deadline:
                    self.thaw()
                    raise CgroupError(f"cannot freeze cgroup {self.path}: not frozen after {timeout:g}s")
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
                if version == 1:  # as runc: a FREEZING cgroup may need the write again
                    _write(state_file, "FROZEN")
        except FileNotFoundError:
            raise CgroupError(f"cannot freeze cgroup {self.path}: {state_file} does not exist") from None
        except OSError as e:
            raise CgroupError(f"cannot freeze cgroup {self.path}: {e.strerror}") from None

    def freezer_file(self) -> str:
        """The file whose content tells "frozen" cheaply (v1 freezer.state is FROZEN, v2
        cgroup.events has "frozen 1"): `state` reads it without importing this module."""
        version, d = self._freezer()
        return os.path.join(d, "freezer.state" if version == 1 else "cgroup.events")

    def thaw(self) -> None:
        version, d = self._freezer()
        f = os.path.join(d, "freezer.state" if version == 1 else "cgroup.freeze")
        try:
            _write(f, "THAWED" if version == 1 else "0")
        except OSError as e:
            raise CgroupError(f"cannot thaw cgroup {self.path}: {e.strerror}") from None

    def frozen(self) -> bool:
        """True once every process is frozen (v1 FROZEN, v2 cgroup.events "frozen 1")."""
        version, d = self._freezer()
        if version == 1:
            return _read_opt(os.path.join(d, "freezer.state")) == "FROZEN"
        events = _kv(_read_opt(os.path.join(d, "cgroup.events")))
        return events.get("frozen") == 1

    def _delegate(self, owner: tuple[int, int]) -> None:
        uid, gid = owner
        for h in self.layout.hierarchies:
            d = self._host_dir(h)
            names = _DELEGATED_V2 if h.version == 2 else _DELEGATED_V1
            for p in [d] + [os.path.join(d, n) for n in names]:
                try:
                    _chown(p, uid, gid)
                except FileNotFoundError:
                    if p == d:
                        raise CgroupError(f"cannot delegate {d}: it does not exist") from None
                except OSError as e:
                    raise CgroupError(f"cannot delegate {p} to {uid}:{gid}: {e.strerror}") from None

    # -- processes --
    def add(self, pid: int) -> None:
        for h in self.layout.hierarchies:
            d = self._host_dir(h)
            try:
                _write(os.path.join(d, "cgroup.procs"), str(pid))
            except OSError as e:
                raise CgroupError(f"cannot add pid {pid} to {d}: {e.strerror}") from None

    def pids(self) -> list[int]:
        hs = list(self.layout.hierarchies)
        # pids/memory first: nothing normally moves processes in those behind our back.
        hs.sort(key=lambda h: 0 if "pids" in h.controllers else 1 if "memory" in h.controllers else 2)
        for h in hs:
            found = _procs_in_tree(self._host_dir(h))
            if found:
                return sorted(found)
        return []

    # -- destroy --
    def destroy(self, timeout: float = DESTROY_TIMEOUT) -> None:
        dirs = [(h, self._host_dir(h)) for h in self.layout.hierarchies]
        dirs = [(h, d) for h, d in dirs if os.path.isdir(d)]
        if not dirs:
            return
        every = dirs
        # the usual case, a stopped container without sub-cgroups: each directory simply goes
        # (rmdir refuses one that still has tasks or children), without reading any tree
        dirs = [(h, d) for h, d in dirs if not _rmdir_now(d)]
        if not dirs:
            for h, d in every:
                _remove_empty_parents(d, h.mountpoint)
            return
        deadline = time.monotonic() + timeout
        for h, d in dirs:
            if h.version == 2 and os.path.exists(os.path.join(d, "cgroup.kill")):
                try:
                    _write(os.path.join(d, "cgroup.kill"), "1")  # atomic, race-free vs fork
                except OSError:
                    pass
        while True:
            left: set[int] = set()
            for _h, d in dirs:
                left |= _procs_in_tree(d)
            if not left:
                break
            for pid in left:
                _kill(pid)
            for h, d in dirs:
                if "freezer" in h.controllers:
                    _thaw(d)  # a v1-frozen task cannot act on SIGKILL
            if time.monotonic() > deadline:
                shown = " ".join(map(str, sorted(left)[:10]))
                raise CgroupError(f"cannot destroy cgroup {self.path}: processes still running "
                                  f"after {timeout:g}s: {shown}")
            time.sleep(0.02)
        busy: list[str] = []
        for _h, d in dirs:
            for root, _subdirs, _files in os.walk(d, topdown=False):
                if not _rmdir_retry(root, deadline):
                    busy.append(root)
        if busy:
            raise CgroupError(f"cannot remove cgroup {busy[0]}"
                              + (f" (+{len(busy) - 1} more)" if len(busy) > 1 else ""))
        for _h, d in every:
            _remove_empty_parents(d, _h.mountpoint)

    # -- mounts inside the container --
    def inside_mounts(self) -> list[tuple[str, str, str, int, str]]:
        """(source, target relative to the container root, fstype, MS_* flags, data).

        Meant to be mounted from inside the container's cgroup namespace, so each
        hierarchy's root there is the container cgroup. The caller adds uid=/gid=
        to the tmpfs data.
        """
        if self.layout.mode == "v2":
            return [("cgroup2", "sys/fs/cgroup", "cgroup2", _MOUNT_FLAGS, "")]
        out = [("tmpfs", "sys/fs/cgroup", "tmpfs", _MOUNT_FLAGS, "mode=755")]
        for h in self.layout.hierarchies:
            if h.version == 1:
                out.append(("cgroup", "sys/fs/cgroup/" + _name(h), "cgroup", _MOUNT_FLAGS,
                            ",".join(h.controllers)))
            else:
                out.append(("cgroup2", "sys/fs/cgroup/" + _name(h), "cgroup2", _MOUNT_FLAGS, ""))
        return out

    def inside_symlinks(self) -> list[tuple[str, str]]:
        """(target, linkpath): e.g. ("cpu,cpuacct", "sys/fs/cgroup/cpu") as docker does."""
        if self.layout.mode == "v2":
            return []
        names = {_name(h) for h in self.layout.hierarchies}
        out = []
        for h in self.layout.hierarchies:
            if h.version != 1 or len(h.controllers) < 2:
                continue
            for c in h.controllers:
                link = c.removeprefix("name=")
                if link not in names:
                    out.append((_name(h), "sys/fs/cgroup/" + link))
                    names.add(link)
        return out

    # -- stats --
    def stats(self) -> dict:
        """runc's types.Stats as JSON (keys cpu, memory, pids, blkio, hugetlb), for
        `events --stats`; Go's omitempty is honoured so the output matches runc's."""
        return {"cpu": self._cpu_stats(), "memory": self._memory_stats(), "pids": self._pids_stats(),
                "blkio": self._blkio_stats(), "hugetlb": self._hugetlb_stats()}

    def _file(self, controller: str, name: str) -> str | None:
        h = self.layout.hierarchy(controller)
        return _read_opt(os.path.join(self._host_dir(h), name)) if h else None

    def _cpu_stats(self) -> dict:
        usage: dict = {"total": 0, "percpu": [], "percpu_kernel": [], "percpu_user": [],
                       "kernel": 0, "user": 0}
        thr = {"periods": 0, "throttledPeriods": 0, "throttledTime": 0}
        acct = self.layout.hierarchy("cpuacct")
        cpu = self.layout.hierarchy("cpu")
        if acct is not None and acct.version == 1:
            usage["total"] = _u64(self._file("cpuacct", "cpuacct.usage"))
            usage["percpu"] = _u64_list(self._file("cpuacct", "cpuacct.usage_percpu"))
            usage["percpu_kernel"] = _u64_list(self._file("cpuacct", "cpuacct.usage_percpu_sys"))
            usage["percpu_user"] = _u64_list(self._file("cpuacct", "cpuacct.usage_percpu_user"))
            st = _kv(self._file("cpuacct", "cpuacct.stat"))  # USER_HZ ticks
            hz = os.sysconf("SC_CLK_TCK")
            usage["user"] = st.get("user", 0) * 1_000_000_000 // hz
            usage["kernel"] = st.get("system", 0) * 1_000_000_000 // hz
        if cpu is not None and cpu.version == 1:
            st = _kv(self._file("cpu", "cpu.stat"))
            thr = {"periods": st.get("nr_periods", 0), "throttledPeriods": st.get("nr_throttled", 0),
                   "throttledTime": st.get("throttled_time", 0)}
        elif cpu is not None:
            st = _kv(self._file("cpu", "cpu.stat"))
            usage["total"] = st.get("usage_usec", 0) * 1000
            usage["user"] = st.get("user_usec", 0) * 1000
            usage["kernel"] = st.get("system_usec", 0) * 1000
            thr = {"periods": st.get("nr_periods", 0), "throttledPeriods": st.get("nr_throttled", 0),
                   "throttledTime": st.get("throttled_usec", 0) * 1000}
        return {"usage": _omit(usage, keep=("kernel", "user")), "throttling": _omit(thr)}

    def _memory_stats(self) -> dict:
        h = self.layout.hierarchy("memory")
        out: dict = {"cache": 0, "usage": _mem_entry(), "swap": _mem_entry(), "kernel": _mem_entry(),
                     "kernelTCP": _mem_entry(), "raw": {}}
        if h is None:
            return _omit(out, keep=("usage", "swap", "kernel", "kernelTCP"))
        raw = _kv(self._file("memory", "memory.stat"))
        out["raw"] = raw
        if h.version == 1:
            for key, prefix in (("usage", "memory."), ("swap", "memory.memsw."), ("kernel", "memory.kmem."),
                                ("kernelTCP", "memory.kmem.tcp.")):
                out[key] = _mem_entry(self._file("memory", prefix + "usage_in_bytes"),
                                      self._file("memory", prefix + "max_usage_in_bytes"),
                                      self._file("memory", prefix + "limit_in_bytes"),
                                      self._file("memory", prefix + "failcnt"))
            out["cache"] = raw.get("cache", 0)
        else:
            usage = _u64(self._file("memory", "memory.current"))
            limit = _max_u64(self._file("memory", "memory.max"))
            failcnt = _kv(self._file("memory", "memory.events")).get("max", 0)
            out["usage"] = {"limit": limit, "usage": usage,
                            "max": _u64(self._file("memory", "memory.peak")), "failcnt": failcnt}
            swap_cur = self._file("memory", "memory.swap.current")
            if swap_cur is not None:  # runc reports memory+swap, the v1 memsw meaning
                sl = _max_u64(self._file("memory", "memory.swap.max"))
                out["swap"] = {"limit": (1 << 64) - 1 if (1 << 64) - 1 in (sl, limit) else sl + limit,
                               "usage": _u64(swap_cur) + usage, "max": 0, "failcnt": 0}
            out["cache"] = raw.get("file", 0)
        for k in ("usage", "swap", "kernel", "kernelTCP"):
            out[k] = _omit(out[k], keep=("limit", "failcnt"))
        return _omit(out, keep=("usage", "swap", "kernel", "kernelTCP"))

    def _pids_stats(self) -> dict:
        cur = self._file("pids", "pids.current")
        lim = self._file("pids", "pids.max")
        return _omit({"current": _u64(cur), "limit": 0 if lim == "max" else _u64(lim)})

    def _blkio_stats(self) -> dict:
        v1 = self.layout.hierarchy("blkio")
        out: dict = {}
        if v1 is not None and v1.version == 1:
            for key, name in (("ioServiceBytesRecursive", "io_service_bytes_recursive"),
                              ("ioServicedRecursive", "io_serviced_recursive")):
                # CFQ's files, then BFQ's, then the throttle layer's (always there): the
                # first that has data, as runc.
                for prefix in ("blkio.", "blkio.bfq.", "blkio.throttle."):
                    entries = _blkio_entries(self._file("blkio", prefix + name))
                    if entries:
                        out[key] = entries
                        break
            return out
        io = self.layout.hierarchy("io")
        if io is None:
            return out
        ops = {"rbytes": ("ioServiceBytesRecursive", "Read"), "wbytes": ("ioServiceBytesRecursive", "Write"),
               "dbytes": ("ioServiceBytesRecursive", "Discard"), "rios": ("ioServicedRecursive", "Read"),
               "wios": ("ioServicedRecursive", "Write"), "dios": ("ioServicedRecursive", "Discard")}
        for line in (self._file("io", "io.stat") or "").splitlines():
            dev, *fields = line.split()
            mj, _, mn = dev.partition(":")
            for f in fields:
                k, _, v = f.partition("=")
                if k in ops and v.isdigit() and mj.isdigit() and mn.isdigit():
                    key, op = ops[k]
                    out.setdefault(key, []).append(_omit({"major": int(mj), "minor": int(mn),
                                                          "op": op, "value": int(v)}))
        return out

    def _hugetlb_stats(self) -> dict:
        h = self.layout.hierarchy("hugetlb")
        out: dict = {}
        if h is None:
            return out
        for size in hugepage_sizes():
            if h.version == 1:
                usage = self._file("hugetlb", f"hugetlb.{size}.usage_in_bytes")
                if usage is None:
                    continue
                entry = {"usage": _u64(usage),
                         "max": _u64(self._file("hugetlb", f"hugetlb.{size}.max_usage_in_bytes")),
                         "failcnt": _u64(self._file("hugetlb", f"hugetlb.{size}.failcnt"))}
            else:
                usage = self._file("hugetlb", f"hugetlb.{size}.current")
                if usage is None:
                    continue
                entry = {"usage": _u64(usage), "max": 0,
                         "failcnt": _kv(self._file("hugetlb", f"hugetlb.{size}.events")).get("max", 0)}
            out[size] = _omit(entry, keep=("failcnt",))
        return out

    def summary(self) -> dict:
        """memory_usage/memory_limit (bytes), pids_current/pids_limit, cpu_usage_ns; None = unknown/unlimited."""
        out: dict = {"memory_usage": None, "memory_limit": None, "pids_current": None,
                     "pids_limit": None, "cpu_usage_ns": None}
        mem = self.layout.hierarchy("memory")
        if mem:
            d = self._host_dir(mem)
            v1 = mem.version == 1
            out["memory_usage"] = _num(_read_opt(os.path.join(d, "memory.usage_in_bytes" if v1 else "memory.current")))
            out["memory_limit"] = _num(_read_opt(os.path.join(d, "memory.limit_in_bytes" if v1 else "memory.max")))
        pid_h = self.layout.hierarchy("pids")
        if pid_h:
            d = self._host_dir(pid_h)
            out["pids_current"] = _num(_read_opt(os.path.join(d, "pids.current")))
            out["pids_limit"] = _num(_read_opt(os.path.join(d, "pids.max")))
        acct = self.layout.hierarchy("cpuacct")
        if acct and acct.version == 1:
            out["cpu_usage_ns"] = _num(_read_opt(os.path.join(self._host_dir(acct), "cpuacct.usage")))
        else:
            cpu = self.layout.hierarchy("cpu")
            if cpu and cpu.version == 2:
                for line in (_read_opt(os.path.join(self._host_dir(cpu), "cpu.stat")) or "").splitlines():
                    k, _, v = line.partition(" ")
                    if k == "usage_usec" and v.isdigit():
                        out["cpu_usage_ns"] = int(v) * 1000
        return out


def _attach_device_filter(cgroup_dir: str, insns: list) -> None:
    """Module level so unit tests on a fake tree can replace it."""
    _dev.attach_bpf(cgroup_dir, insns)


def _name(h: Hierarchy) -> str:
    """Directory name under /sys/fs/cgroup: the host's own name when it has one."""
    parent, base = os.path.split(h.mountpoint.rstrip("/"))
    if parent == "/sys/fs/cgroup" and base:
        return base
    if h.version == 2:
        return "unified"
    return ",".join(c.removeprefix("name=") for c in h.controllers)


def _num(text: str | None) -> int | None:
    # v2 "max" and v1's huge "unlimited" value both mean no limit.
    if text is None or not text.isdigit():
        return None
    n = int(text)
    return None if n >= 1 << 62 else n


def _u64(text: str | None) -> int:
    return int(text) if text is not None and text.strip().isdigit() else 0


def _max_u64(text: str | None) -> int:
    return (1 << 64) - 1 if text == "max" else _u64(text)


def _u64_list(text: str | None) -> list[int]:
    return [int(x) for x in (text or "").split() if x.isdigit()]


def _kv(text: str | None) -> dict[str, int]:
    """"key value" lines (memory.stat, cpu.stat, cgroup.events, *.events) -> {key: int}."""
    out = {}
    for line in (text or "").splitlines():
        k, _, v = line.strip().partition(" ")
        if v.strip().isdigit():
            out[k] = int(v)
    return out


def _omit(d: dict, keep: tuple[str, ...] = ()) -> dict:
    """Go's omitempty: zero numbers and empty lists/maps are left out, unless kept."""
    return {k: v for k, v in d.items() if k in keep or v not in (0, [], {}, "")}


def _mem_entry(usage: str | None = None, max_: str | None = None, limit: str | None = None,
               failcnt: str | None = None) -> dict:
    return {"limit": _u64(limit), "usage": _u64(usage), "max": _u64(max_), "failcnt": _u64(failcnt)}


def _blkio_entries(text: str | None) -> list[dict]:
    out = []
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) != 3 or ":" not in parts[0]:
            continue  # the "Total N" line
        mj, _, mn = parts[0].partition(":")
        if mj.isdigit() and mn.isdigit() and parts[2].isdigit():
            out.append(_omit({"major": int(mj), "minor": int(mn), "op": parts[1], "value": int(parts[2])}))
    return out


def _fill_cpuset(parent: str, child: str) -> None:
    # A new v1 cpuset cgroup starts with empty cpus/mems and then refuses tasks.
    for f in ("cpuset.cpus", "cpuset.mems"):
        c = os.path.join(child, f)
        if _read_opt(c) == "":
            value = _read_opt(os.path.join(parent, f)) or ""
            if not value:
                continue  # nothing to copy; adding a task will report the problem
            try:
                _write(c, value)
            except OSError as e:
                raise CgroupError(f"cannot set {c}={value}: {e.strerror}") from None


def _thaw(top: str) -> None:
    for root, _dirs, _files in os.walk(top):
        st = os.path.join(root, "freezer.state")
        if _read_opt(st) not in (None, "THAWED"):
            try:
                _write(st, "THAWED")
            except OSError:
                pass


def _remove_empty_parents(path: str, mountpoint: str) -> None:
    """Remove parents like /isobox once their last container is gone; a parent still in
    use refuses (EBUSY), which ends the walk. Creators retry if they lose this race."""
    parent = os.path.dirname(path)
    while len(parent) > len(mountpoint.rstrip("/")) and parent.startswith(mountpoint):
        try:
            os.rmdir(parent)
        except OSError:
            return
        parent = os.path.dirname(parent)


def _rmdir_now(path: str) -> bool:
    try:
        _rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _rmdir_retry(path: str, deadline: float) -> bool:
    while True:
        try:
            _rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            # EBUSY can linger briefly after the last task left (css going offline).
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                return False
        time.sleep(0.02)
