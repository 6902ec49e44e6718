"""cgroups/primer.py: the no-op migrations that keep the kernel's cgroup lock warm during a
warm create must leave the process where it is, and end when stopped. (What it saves is
measured by bench/engine, not here.)"""
from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, os, time
from isobox.cgroups import primer
from isobox.cgroups.layout import detect
before = open("/proc/self/cgroup").read()
p = primer.start(detect())
time.sleep(0.1)                        # ~25 rounds of writes
tasks_running = len(os.listdir("/proc/self/task"))
p.stop()
time.sleep(0.05)
print(json.dumps({"procs": p.procs, "same": open("/proc/self/cgroup").read() == before,
                  "tasks_running": tasks_running, "tasks_after": len(os.listdir("/proc/self/task"))}))
"""


def test_primer_moves_nothing_and_stops():
    # in a child: the primer is a thread, and the pytest process must stay free of them
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["procs"].startswith("/sys/fs/cgroup/") and out["procs"].endswith("/cgroup.procs")
    assert out["same"]
    assert out["tasks_running"] == 2 and out["tasks_after"] == 1


def test_own_procs_file_is_this_process_cgroup():
    from isobox.cgroups.layout import detect, parse_cgroup_file
    from isobox.cgroups.primer import own_procs_file
    path = own_procs_file(detect())
    with open(path) as f:
        assert str(__import__("os").getpid()) in f.read().split()
    assert parse_cgroup_file(open("/proc/self/cgroup").read())
