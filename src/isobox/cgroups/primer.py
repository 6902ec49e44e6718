"""Keeps the kernel's cgroup migration lock on its fast path while a create heads for the
moment it moves its init into the container's cgroups.

Every write to a cgroup.procs file takes the global cgroup_threadgroup_rwsem for writing.
When no migration happened for about 10 ms, taking it first waits for an RCU grace period
(rcu_sync_enter): measured on this VM, 5-8 ms for such a first write against 0.05-0.2 ms for
writes that follow within ~10 ms of the last one (a loop writing "0", i.e. "the writer
itself", into the process's own cgroup.procs with sleeps of 0-200 ms in between). runc pays
that wait on every create too; here a thread starts it at the beginning of create, next to the
ID allocation and the cgroup set-up, and keeps the lock warm with a no-op move of its own
process every few ms until the init has been moved. `_thread`, not threading: it is built in.
"""
from __future__ import annotations

import _thread
import os
import time

INTERVAL = 0.004          # well inside the ~10 ms after which the next write waits again
LIMIT = 2.0               # seconds: a create slower than that pays the wait itself


class Primer:
    def __init__(self, procs: str):
        self.stopped = False
        self.procs = procs

    def run(self) -> None:
        deadline = time.monotonic() + LIMIT
        try:
            fd = os.open(self.procs, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            while not self.stopped and time.monotonic() < deadline:
                os.write(fd, b"0")          # moves this process into the cgroup it is in: a no-op
                time.sleep(INTERVAL)
        except OSError:
            pass
        finally:
            os.close(fd)

    def stop(self) -> None:
        self.stopped = True


def own_procs_file(layout) -> str | None:
    """cgroup.procs of this process's own cgroup in the first hierarchy that shows it."""
    from isobox.cgroups.layout import parse_cgroup_file, process_dir
    try:
        with open("/proc/self/cgroup") as f:
            mine = parse_cgroup_file(f.read())
    except OSError:
        return None
    for h in layout.hierarchies:
        d = process_dir(h, mine)
        if d is not None and os.path.exists(os.path.join(d, "cgroup.procs")):
            return os.path.join(d, "cgroup.procs")
    return None


def start(layout) -> Primer | None:
    procs = own_procs_file(layout)
    if procs is None:
        return None
    p = Primer(procs)
    _thread.start_new_thread(p.run, ())
    return p
