"""One container's cgroup, the same path in every mounted hierarchy (v1, v2 or hybrid).

All file-system access goes through the small _mkdir/_rmdir/_write/_read/_chown/_kill
helpers and opens files without O_CREAT, so the v2 logic can be unit-tested on a
plain directory tree that imitates cgroupfs.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

from .layout import CgroupError, Hierarchy, Layout

__all__ = ["CgroupError", "ContainerCgroup"]

MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
_MOUNT_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC
DESTROY_TIMEOUT = 5.0

# Files the container root may write after delegation; limit files stay root-owned
# so it can build its own sub-tree but never raise what the host set.
_DELEGATED_V1 = ("cgroup.procs", "tasks", "cgroup.clone_children", "notify_on_release")
_DELEGATED_V2 = ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads")

# OCI linux.resources fields this module applies; other set fields are refused so no
# limit is silently dropped. "devices" is enforced elsewhere (device policy), and
# useHierarchy/checkBeforeUpdate have no effect on a fresh cgroup on current kernels.
_HANDLED = {
    "memory": {"limit", "reservation", "swap", "disableOOMKiller", "swappiness",
               "useHierarchy", "checkBeforeUpdate"},
    "cpu": {"shares", "quota", "period", "cpus", "mems"},
    "pids": {"limit"},
    "devices": None,  # None: whole section ignored here
}


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


def _read_opt(path: str) -> str | None:
    try:
        return _read(path).strip()
    except OSError:
        return None


# --- resources -> file writes ----------------------------------------------------

@dataclass(frozen=True)
class _Write:
    controller: str
    file: str
    value: str


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
    return out


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


@dataclass
class ContainerCgroup:
    layout: Layout
    # Absolute within every hierarchy ("/isobox/<id>"). A relative path is taken as
    # relative to the hierarchy root "/" (not to the caller's own cgroup as runc does).
    path: str

    def __post_init__(self) -> None:
        self.path = _normalize(self.path)

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
    def create(self, resources: dict | None = None, owner: tuple[int, int] | None = None) -> None:
        writes = plan_writes(resources, self.layout)  # refuse before touching anything
        needed = {w.controller for w in writes}
        created: list[str] = []
        try:
            for h in self.layout.hierarchies:
                self._make(h, needed, created)
            self._apply(writes)
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
            new = False
            if not os.path.isdir(cur):
                try:
                    _mkdir(cur)
                    created.append(cur)
                    new = True
                except FileExistsError:
                    pass  # raced with another creator: fine
                except FileNotFoundError:
                    raise
                except OSError as e:
                    raise CgroupError(f"cannot create cgroup {cur}: {e.strerror}") from None
            if cpuset and (new or i == len(parts) - 1):
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
            target = os.path.join(self._host_dir(h), w.file)
            try:
                _write(target, w.value)
            except FileNotFoundError:
                if h.version == 2:
                    raise CgroupError(f"cgroup controller '{w.controller}' is not enabled for "
                                      f"{self._host_dir(h)} (cannot set {w.file})") from None
                raise CgroupError(f"cannot set {w.file}: not supported by this kernel") from None
            except OSError as e:
                raise CgroupError(f"cannot set {w.file}={w.value}: {e.strerror}") from None

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
        for _h, d in dirs:
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
