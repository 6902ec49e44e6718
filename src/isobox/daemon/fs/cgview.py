"""Read-only view of one cgroup (v1, v2 or hybrid) for the emulated /proc files.

A CgroupView knows, per controller, the host directory of the cgroup and the
mountpoint of its hierarchy (where ancestor walks stop). Every method reads the
v2 file name first and then the v1 one, so one class serves all layouts.
Values are plain ints in bytes / nanoseconds; rendering is done in procfiles/.

Public API
  CgroupView(dirs, mounts)
    .dir(ctrl)              host dir for a controller (falls back to the "" dir)
    .key                    a stable identity of the cgroup (for caches, LoadTracker)
    .memory_limit()         bytes: min over cgroup+ancestors, capped at host MemTotal
    .memory_usage()         bytes
    .memory_stat()          raw memory.stat as {name: int} (v1 has total_* keys)
    .memory_counters()      memory.stat normalised to v2 names (anon, file, active_file, ...)
    .swap_accounted()       whether the kernel accounts swap for the cgroup
    .swap_max()             the cgroup's swap allowance in bytes (v1: memsw - mem), None = unlimited
    .swap_limit()           swap_max() capped at host SwapTotal; None when not accounted
    .swap_usage()           bytes of swap in use or None
    .cpu_quota()            quota/period as a float (min over ancestors) or None
    .cpus()                 allowed CPU numbers (real numbers), cpuset then quota-trimmed
    .cpu_usage_percpu()     {cpu: (user_ns, system_ns)} (v1 only) or None
    .cpu_usage()            (user_ns, system_ns) total or None
    .cpu_busy_ns()          total CPU time in ns or None
    .io_stats()             {(major, minor): {rios, wios, dios, rbytes, wbytes, dbytes,
                             rmerged, wmerged, rticks, wticks, ticks}} (ticks in ms)
    .procs() / .threads()   pids / tids in the whole subtree
  view_for_dirs(dirs, layout=None) -> CgroupView   mounts taken from the host Layout
  reader_view(pid, top) -> CgroupView | None        the reader's own cgroup when it is below top
  reader_view_from(cgroup_text, top, layout)        the pure part of reader_view (testable)
  host_file(path) -> str                            a host /proc file, cached for 100 ms
  parse_cpu_list(text) / format_cpu_list(cpus)      kernel "0-3,5" lists
"""
from __future__ import annotations

import math
import os
import threading
import time

from isobox.cgroups.layout import Layout, detect, parse_cgroup_file, process_dir

# v1 reports "unlimited" as a page-rounded LLONG_MAX; anything this big is no limit.
_HUGE = 1 << 60
_HOST_TTL = 0.1  # seconds a host /proc file is reused (the brief allows <= 100 ms)
_host_cache: dict[str, tuple[float, str]] = {}
_host_lock = threading.Lock()


def host_file(path: str) -> str:
    """Text of a host file such as /proc/meminfo, re-read at most every 100 ms."""
    now = time.monotonic()
    hit = _host_cache.get(path)
    if hit is not None and now - hit[0] < _HOST_TTL:
        return hit[1]
    with open(path) as f:
        text = f.read()
    with _host_lock:
        _host_cache[path] = (now, text)
    return text


def host_meminfo_kb() -> dict[str, int]:
    """Host /proc/meminfo as {name: value} (kB for kB lines)."""
    out: dict[str, int] = {}
    for line in host_file("/proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0])
    return out


def parse_cpu_list(text: str) -> list[int]:
    """Kernel list format ("0-3,5,7-8") -> sorted CPU numbers; "" -> []."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return sorted(cpus)


def format_cpu_list(cpus: list[int]) -> str:
    """Sorted CPU numbers -> kernel list format ("0-1", "1", "0,2-3")."""
    out: list[str] = []
    cpus = sorted(set(cpus))
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # absent file (other cgroup version) or the cgroup just vanished
        return None


def _read_first(d: str, names: tuple[str, ...]) -> str | None:
    for n in names:
        text = _read(os.path.join(d, n))
        if text is not None:
            return text
    return None


def _to_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _limit(text: str | None) -> int | None:
    """A limit file's value; None = absent or unlimited ("max" or a huge v1 number)."""
    if text is None or text.strip() in ("", "max"):
        return None
    v = _to_int(text)
    if v is None or v < 0 or v >= _HUGE:
        return None
    return v


def _kv(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


def _host_cpus() -> list[int]:
    text = _read("/sys/devices/system/cpu/online")
    return parse_cpu_list(text) if text else list(range(os.cpu_count() or 1))


class CgroupView:
    """One cgroup as seen through each controller's hierarchy."""

    def __init__(self, dirs: dict[str, str], mounts: dict[str, str]):
        self.dirs = {k: os.path.normpath(v) for k, v in dirs.items()}
        self.mounts = {k: os.path.normpath(v) for k, v in mounts.items()}

    def __repr__(self) -> str:
        return f"CgroupView({self.dirs!r})"

    # -- plumbing -----------------------------------------------------------------------------

    def dir(self, ctrl: str) -> str | None:
        """Host dir for a controller; a missing controller falls back to the v2 ("") dir."""
        return self.dirs.get(ctrl) or self.dirs.get("")

    def _ctrl_key(self, ctrl: str) -> str:
        return ctrl if ctrl in self.dirs else ""

    @property
    def key(self) -> str:
        """The dir that identifies this cgroup (tasks controller first) for caches/trackers."""
        for c in ("pids", "cpuacct", "cpu", "memory", ""):
            if c in self.dirs:
                return self.dirs[c]
        return next(iter(self.dirs.values()), "")

    def _chain(self, ctrl: str) -> list[str]:
        """The cgroup dir then its ancestors up to and including the hierarchy's mountpoint."""
        d = self.dir(ctrl)
        if d is None:
            return []
        mount = self.mounts.get(self._ctrl_key(ctrl))
        out = [d]
        if mount is None or not (d + "/").startswith(mount.rstrip("/") + "/"):
            return out  # unknown hierarchy: never walk into unrelated directories
        while d != mount and len(d) > len(mount):
            d = os.path.dirname(d)
            out.append(d)
        return out

    def _min_limit(self, ctrl: str, names: tuple[str, ...]) -> int | None:
        vals = [v for d in self._chain(ctrl) if (v := _limit(_read_first(d, names))) is not None]
        return min(vals) if vals else None

    def _file(self, ctrl: str, *names: str) -> str | None:
        d = self.dir(ctrl)
        return None if d is None else _read_first(d, names)

    # -- memory -------------------------------------------------------------------------------

    def memory_limit(self) -> int:
        """Bytes: the smallest memory.max / memory.limit_in_bytes up the tree, capped at host RAM."""
        host = host_meminfo_kb().get("MemTotal", 0) * 1024
        lim = self._min_limit("memory", ("memory.max", "memory.limit_in_bytes"))
        return host if lim is None or (host and lim > host) else lim

    def memory_usage(self) -> int:
        return _to_int(self._file("memory", "memory.current", "memory.usage_in_bytes")) or 0

    def memory_stat(self) -> dict[str, int]:
        """memory.stat as-is; v1 files hold both local and hierarchical (total_*) keys."""
        return _kv(self._file("memory", "memory.stat"))

    def memory_counters(self) -> dict[str, int]:
        """memory.stat in v2 names, hierarchical on v1 too (total_* keys); missing keys are 0."""
        st = self.memory_stat()
        if "anon" in st or "total_cache" not in st:
            return dict(st)
        t = {k[6:]: v for k, v in st.items() if k.startswith("total_")}
        return {
            "anon": t.get("rss", 0), "file": t.get("cache", 0), "shmem": t.get("shmem", 0),
            "file_mapped": t.get("mapped_file", 0), "file_dirty": t.get("dirty", 0),
            "file_writeback": t.get("writeback", 0), "anon_thp": t.get("rss_huge", 0),
            "active_anon": t.get("active_anon", 0), "inactive_anon": t.get("inactive_anon", 0),
            "active_file": t.get("active_file", 0), "inactive_file": t.get("inactive_file", 0),
            "unevictable": t.get("unevictable", 0), "swap": t.get("swap", 0),
        }

    def _swappiness_zero(self) -> bool:
        return _to_int(self._file("memory", "memory.swappiness")) == 0

    def swap_accounted(self) -> bool:
        """True when the kernel accounts swap for this cgroup (v2 memory.swap.*, v1 memsw)."""
        return self._file("memory", "memory.swap.max", "memory.memsw.limit_in_bytes") is not None

    def swap_max(self) -> int | None:
        """The cgroup's own swap allowance in bytes (v1: memsw - mem, min over ancestors);
        None = unlimited or not accounted. Not capped at the host's swap."""
        if self._file("memory", "memory.swap.max") is not None:
            return self._min_limit("memory", ("memory.swap.max",))
        memsw = self._min_limit("memory", ("memory.memsw.limit_in_bytes",))
        if memsw is None:
            return None
        mem = self._min_limit("memory", ("memory.limit_in_bytes",))
        return max(0, memsw - (mem if mem is not None else memsw))

    def swap_limit(self) -> int | None:
        """Bytes of swap the cgroup may use: swap_max() capped at host SwapTotal.

        None when swap is not accounted (no memory.swap.* / memsw files)."""
        if not self.swap_accounted():
            return None
        host = host_meminfo_kb().get("SwapTotal", 0) * 1024
        lim = self.swap_max()
        total = host if lim is None else min(lim, host)
        if self._swappiness_zero():  # the kernel will not swap this cgroup out any further
            total = min(total, self.swap_usage() or 0)
        return total

    def swap_usage(self) -> int | None:
        v2 = _to_int(self._file("memory", "memory.swap.current"))
        if v2 is not None:
            return v2
        memsw = _to_int(self._file("memory", "memory.memsw.usage_in_bytes"))
        if memsw is None:
            return None
        return max(0, memsw - self.memory_usage())

    # -- cpu ----------------------------------------------------------------------------------

    def cpu_quota(self) -> float | None:
        """The tightest quota/period over the cgroup and its ancestors, in CPUs; None = none."""
        best: float | None = None
        for d in self._chain("cpu"):
            q: float | None = None
            text = _read(os.path.join(d, "cpu.max"))
            if text is not None:
                parts = text.split()
                if len(parts) == 2 and parts[0] != "max":
                    q = int(parts[0]) / int(parts[1])
            else:
                quota = _to_int(_read(os.path.join(d, "cpu.cfs_quota_us")))
                period = _to_int(_read(os.path.join(d, "cpu.cfs_period_us")))
                if quota is not None and quota > 0 and period:
                    q = quota / period
            if q is not None and (best is None or q < best):
                best = q
        return best

    def cpuset(self) -> list[int]:
        """cpuset.cpus (v2: cpuset.cpus.effective), from the nearest ancestor that sets one."""
        for d in self._chain("cpuset"):
            text = _read_first(d, ("cpuset.cpus.effective", "cpuset.cpus", "cpus"))
            if text is not None and text.strip():
                return parse_cpu_list(text)
        return _host_cpus()

    def cpus(self) -> list[int]:
        """Allowed CPUs (real numbers): the cpuset, then only the first ceil(quota) of them."""
        cpus = self.cpuset()
        q = self.cpu_quota()
        if q is not None:
            cpus = cpus[:max(1, math.ceil(q))]
        return cpus

    def cpu_usage_percpu(self) -> dict[int, tuple[int, int]] | None:
        """{cpu: (user_ns, system_ns)} from v1 cpuacct; None on v2 (no per-CPU counters)."""
        text = self._file("cpuacct", "cpuacct.usage_all")
        if text is not None:
            out = {}
            for line in text.splitlines()[1:]:
                p = line.split()
                if len(p) == 3:
                    out[int(p[0])] = (int(p[1]), int(p[2]))
            return out
        user = self._file("cpuacct", "cpuacct.usage_percpu_user")
        sys_ = self._file("cpuacct", "cpuacct.usage_percpu_sys")
        if user is not None and sys_ is not None:
            return {i: (int(u), int(s)) for i, (u, s) in enumerate(zip(user.split(), sys_.split()))}
        total = self._file("cpuacct", "cpuacct.usage_percpu")
        if total is not None:  # no user/system split: count it all as user time
            return {i: (int(u), 0) for i, u in enumerate(total.split())}
        return None

    def cpu_usage(self) -> tuple[int, int] | None:
        """Total (user_ns, system_ns) of the subtree."""
        per = self.cpu_usage_percpu()
        if per is not None:
            return sum(u for u, _ in per.values()), sum(s for _, s in per.values())
        st = _kv(self._file("cpuacct", "cpu.stat"))
        if "usage_usec" in st:
            return st.get("user_usec", 0) * 1000, st.get("system_usec", 0) * 1000
        return None

    def cpu_busy_ns(self) -> int | None:
        """Total CPU time in ns (v1 cpuacct.usage, v2 cpu.stat usage_usec)."""
        v1 = _to_int(self._file("cpuacct", "cpuacct.usage"))
        if v1 is not None:
            return v1
        st = _kv(self._file("cpuacct", "cpu.stat"))
        return st["usage_usec"] * 1000 if "usage_usec" in st else None

    # -- block io -----------------------------------------------------------------------------

    def io_stats(self) -> dict[tuple[int, int], dict[str, int]]:
        """Per-device counters; bytes, ios and ms, from io.stat (v2) or blkio *_recursive (v1)."""
        if "blkio" in self.dirs:  # v1 (or hybrid): blkio is authoritative, not the unified io.stat
            return self._blkio_stats()
        text = self._file("io", "io.stat")
        out: dict[tuple[int, int], dict[str, int]] = {}
        for line in (text or "").splitlines():
            parts = line.split()
            if not parts or ":" not in parts[0]:
                continue
            maj, mnr = parts[0].split(":")
            st = {k: int(v) for k, _, v in (p.partition("=") for p in parts[1:]) if v.isdigit()}
            out[(int(maj), int(mnr))] = st
        return out

    def _blkio(self, name: str) -> dict[tuple[int, int], dict[str, int]]:
        # CFQ's blkio.<name> is gone from modern kernels; throttle (always accounted) then bfq.
        text = self._file("blkio", f"blkio.{name}_recursive", f"blkio.throttle.{name}_recursive",
                          f"blkio.bfq.{name}_recursive")
        out: dict[tuple[int, int], dict[str, int]] = {}
        for line in (text or "").splitlines():
            p = line.split()
            if len(p) == 3 and ":" in p[0]:
                maj, mnr = p[0].split(":")
                out.setdefault((int(maj), int(mnr)), {})[p[1]] = int(p[2])
        return out

    def _blkio_stats(self) -> dict[tuple[int, int], dict[str, int]]:
        ios, byts = self._blkio("io_serviced"), self._blkio("io_service_bytes")
        merged, svc, wait = self._blkio("io_merged"), self._blkio("io_service_time"), self._blkio("io_wait_time")
        out: dict[tuple[int, int], dict[str, int]] = {}
        for dev in set(ios) | set(byts):
            g = lambda m, k: m.get(dev, {}).get(k, 0)  # noqa: E731 - tiny local accessor
            out[dev] = {
                "rios": g(ios, "Read"), "wios": g(ios, "Write"), "dios": g(ios, "Discard"),
                "rbytes": g(byts, "Read"), "wbytes": g(byts, "Write"), "dbytes": g(byts, "Discard"),
                "rmerged": g(merged, "Read"), "wmerged": g(merged, "Write"),
                "rticks": (g(svc, "Read") + g(wait, "Read")) // 1_000_000,
                "wticks": (g(svc, "Write") + g(wait, "Write")) // 1_000_000,
                "ticks": g(svc, "Total") // 1_000_000,
            }
        return out

    # -- tasks --------------------------------------------------------------------------------

    def _walk_ids(self, names: tuple[str, ...]) -> list[int]:
        top = None
        for c in ("pids", "cpu", "cpuacct", "memory", ""):
            if c in self.dirs:
                top = self.dirs[c]
                break
        if top is None:
            return []
        ids: set[int] = set()
        stack = [top]
        while stack:
            d = stack.pop()
            text = _read_first(d, names)
            ids.update(int(x) for x in (text or "").split())
            try:
                with os.scandir(d) as it:
                    stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
            except OSError:
                pass  # removed while walking
        return sorted(ids)

    def procs(self) -> list[int]:
        """Process ids in the cgroup and all its descendants."""
        return self._walk_ids(("cgroup.procs",))

    def threads(self) -> list[int]:
        """Thread ids in the cgroup and all its descendants (v1 tasks, v2 cgroup.threads)."""
        return self._walk_ids(("cgroup.threads", "tasks"))


def view_for_dirs(dirs: dict[str, str], layout: Layout | None = None) -> CgroupView:
    """A view whose ancestor walks stop at each hierarchy's host mountpoint."""
    layout = layout or _layout()
    mounts: dict[str, str] = {}
    for ctrl in dirs:
        h = layout.hierarchy(ctrl)
        if h is not None:
            mounts[ctrl] = h.mountpoint
    return CgroupView(dirs, mounts)


_layout_cache: list[Layout] = []


def _layout() -> Layout:
    # detect() is lru_cached already; keep our own handle so tests can see it is read once.
    if not _layout_cache:
        _layout_cache.append(detect())
    return _layout_cache[0]


def _below(d: str, top: str) -> bool:
    return d.startswith(top.rstrip("/") + "/")


def reader_view_from(cgroup_text: str, top: CgroupView, layout: Layout) -> CgroupView | None:
    """reader_view() on the text of /proc/<pid>/cgroup (pure, for tests)."""
    paths = parse_cgroup_file(cgroup_text)

    def host_dir(ctrl: str) -> str | None:
        h = layout.hierarchy(ctrl)
        return process_dir(h, paths) if h is not None else None

    decider = "memory" if "memory" in top.dirs else ""
    if decider not in top.dirs:
        return None
    mine = host_dir(decider)
    if mine is None or not _below(mine, top.dirs[decider]):
        return None  # in the top cgroup itself, or outside the container
    dirs: dict[str, str] = {}
    for ctrl, d in top.dirs.items():
        r = host_dir(ctrl)
        dirs[ctrl] = r if r is not None and (r == d or _below(r, d)) else d
    return CgroupView(dirs, top.mounts)


def reader_view(pid: int, top: CgroupView) -> CgroupView | None:
    """The reader's own (deeper) cgroup view, or None to use the container's view."""
    text = _read(f"/proc/{pid}/cgroup")
    if text is None:
        return None
    return reader_view_from(text, top, _layout())
