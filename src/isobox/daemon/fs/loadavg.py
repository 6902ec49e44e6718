"""Per-cgroup load averages, computed like the kernel's (fixed-point EMA every 5 s).

LoadTracker
  .track(key, view)     start sampling a cgroup (idempotent; takes one count right away)
  .untrack(key)         stop (container gone)
  .untrack_below(dir)   stop every key equal to or below a cgroup dir (a container and its
                        readers' sub-cgroups, whose keys are CgroupView.key dirs)
  .sample()             one 5-second tick for every tracked cgroup (the daemon's thread calls it)
  .render(key, view)    b"a b c running/total last_pid\\n"; tracks the cgroup on first use
  .keys()               tracked keys

count_threads(view) -> (running, total, last_tid) and calc_load() are plain functions.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

# include/linux/sched/loadavg.h
FSHIFT = 11
FIXED_1 = 1 << FSHIFT
EXP_1 = 1884   # 1/exp(5s/1min) in fixed point
EXP_5 = 2014   # 1/exp(5s/5min)
EXP_15 = 2037  # 1/exp(5s/15min)


def calc_load(load: int, exp: int, active: int) -> int:
    """kernel calc_load(): one EMA step; active is nr_active << FSHIFT."""
    newload = load * exp + active * (FIXED_1 - exp)
    if active >= load:
        newload += FIXED_1 - 1  # round up while rising, as the kernel does
    return newload // FIXED_1


def _fmt(x: int) -> str:
    x += FIXED_1 // 200  # the kernel rounds to 2 decimals this way (fs/proc/loadavg.c)
    return f"{x >> FSHIFT}.{((x & (FIXED_1 - 1)) * 100) >> FSHIFT:02d}"


def _state(tid: int) -> str | None:
    try:
        with open(f"/proc/{tid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None  # exited between listing and reading
    # comm may contain spaces or ")": the state is the first field after the last ")".
    rest = data[data.rfind(b")") + 2:]
    return chr(rest[0]) if rest else None


def count_threads(view) -> tuple[int, int, int]:
    """(threads in state R or D, all threads, highest tid) in the cgroup subtree."""
    tids = view.threads()
    running = 0
    for tid in tids:
        if _state(tid) in ("R", "D"):
            running += 1
    return running, len(tids), (max(tids) if tids else 0)


@dataclass
class _Entry:
    view: object
    loads: list[int] = field(default_factory=lambda: [0, 0, 0])
    running: int = 0
    total: int = 0
    last_pid: int = 0


class LoadTracker:
    """Load averages of the cgroups the containers have read /proc/loadavg from."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def track(self, key: str, view) -> None:
        with self._lock:
            if key in self._entries:
                self._entries[key].view = view
                return
        counts = count_threads(view)  # outside the lock: /proc reads can be slow
        with self._lock:
            e = self._entries.setdefault(key, _Entry(view))
            e.running, e.total, e.last_pid = counts

    def untrack(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def untrack_below(self, top: str) -> None:
        prefix = top.rstrip("/") + "/"
        with self._lock:
            for k in [k for k in self._entries if k == top or k.startswith(prefix)]:
                del self._entries[k]

    def sample(self) -> None:
        """One tick: count R/D threads per cgroup and fold them into the three averages."""
        with self._lock:
            items = list(self._entries.items())
        for key, e in items:
            running, total, last = count_threads(e.view)
            active = running * FIXED_1
            with self._lock:
                if self._entries.get(key) is not e:
                    continue  # untracked meanwhile
                e.loads = [calc_load(e.loads[0], EXP_1, active), calc_load(e.loads[1], EXP_5, active),
                           calc_load(e.loads[2], EXP_15, active)]
                e.running, e.total, e.last_pid = running, total, last

    def render(self, key: str, view) -> bytes:
        self.track(key, view)
        with self._lock:
            e = self._entries.get(key) or _Entry(view)  # untracked by another thread just now
            a, b, c = (_fmt(x) for x in e.loads)
            return f"{a} {b} {c} {e.running}/{e.total} {e.last_pid}\n".encode()
