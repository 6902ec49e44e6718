"""cgroup v1 (and hybrid) on the real host, as root.

Every test works below /isobox-test-<random> in each hierarchy and removes it in a
finally, killing only the processes the test started (by pid).
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import signal
import subprocess
import sys
import time

import pytest

from isobox.cgroups.layout import CgroupError, Layout, detect, parse_cgroup_file
from isobox.cgroups.manager import ContainerCgroup

MiB = 1 << 20
RESOURCES = {"memory": {"limit": 256 * MiB}, "cpu": {"quota": 50000, "period": 100000, "cpus": "1"},
             "pids": {"limit": 64}}


def _v1_ready() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        layout = detect()
    except CgroupError as e:
        return str(e)
    for c in ("memory", "cpu", "cpuset", "pids"):
        h = layout.hierarchy(c)
        if h is None or h.version != 1:
            return f"no v1 {c} hierarchy on this host"
    return None


pytestmark = pytest.mark.skipif(_v1_ready() is not None, reason=str(_v1_ready()))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _cpus(spec: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, spec.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


@pytest.fixture
def env():
    """(layout, top, cg, started) - destroys and removes the test tree even on failure."""
    layout = detect()
    top = f"/isobox-test-{secrets.token_hex(4)}"
    cg = ContainerCgroup(layout, top + "/c1")
    started: list[int] = []
    unified = layout.unified
    before = _read(unified.mountpoint + "/cgroup.subtree_control") if unified else None
    try:
        yield layout, top, cg, started
    finally:
        try:
            cg.destroy()
        finally:
            for pid in started:  # only what this test started
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
            for h in layout.hierarchies:
                try:
                    os.rmdir(h.mountpoint + top)
                except FileNotFoundError:
                    pass
    # Hybrid: the host's cgroup2 root must not have been changed by us.
    if unified:
        assert _read(unified.mountpoint + "/cgroup.subtree_control") == before


def _sleeper(started: list[int]) -> subprocess.Popen:
    p = subprocess.Popen(["sleep", "1000"])
    started.append(p.pid)
    return p


def _gone(layout: Layout, top: str) -> None:
    for h in layout.hierarchies:
        assert not os.path.exists(h.mountpoint + top + "/c1"), h.mountpoint


def test_limits_are_in_the_v1_files(env):
    layout, top, cg, _ = env
    root_cpus = _read("/sys/fs/cgroup/cpuset/cpuset.cpus") if layout.hierarchy("cpuset") else ""
    if 1 not in _cpus(root_cpus):
        pytest.skip("needs CPU 1 in the root cpuset")
    cg.create(RESOURCES)
    mem, cpu, cpuset, pids = (cg.dir(c) for c in ("memory", "cpu", "cpuset", "pids"))
    assert _read(f"{mem}/memory.limit_in_bytes") == str(256 * MiB)
    assert _read(f"{cpu}/cpu.cfs_quota_us") == "50000"
    assert _read(f"{cpu}/cpu.cfs_period_us") == "100000"
    assert _read(f"{cpuset}/cpuset.cpus") == "1"
    cpuset_root = layout.hierarchy("cpuset").mountpoint
    assert _read(f"{cpuset}/cpuset.mems") == _read(f"{cpuset_root}/cpuset.mems")
    # the intermediate level got the parent's cpus/mems copied too
    assert _read(f"{cpuset_root}{top}/cpuset.cpus") == root_cpus
    assert _read(f"{pids}/pids.max") == "64"
    for h in layout.hierarchies:
        assert os.path.isdir(h.mountpoint + top + "/c1"), h.mountpoint
    assert cg.summary()["memory_limit"] == 256 * MiB and cg.summary()["pids_limit"] == 64


def test_add_moves_a_real_process(env):
    layout, _top, cg, started = env
    cg.create({"memory": {"limit": 256 * MiB}, "pids": {"limit": 64}})
    p = _sleeper(started)
    cg.add(p.pid)
    groups = parse_cgroup_file(_read(f"/proc/{p.pid}/cgroup"))
    for h in layout.hierarchies:
        key = "" if h.version == 2 else h.controllers[0]
        assert groups[key] == cg.path, key
    assert cg.pids() == [p.pid]
    st = cg.summary()
    # v1 does not move existing charges with the task, so usage may still be 0
    assert st["pids_current"] == 1 and isinstance(st["memory_usage"], int)
    cg.destroy()
    assert p.wait(timeout=5) == -signal.SIGKILL
    _gone(layout, _top)


def _delegated_child(cg: ContainerCgroup, uid: int, go_r: int, rep_w: int) -> None:
    """Runs in the forked child: become the container root's host uid and use the delegation."""
    report: dict = {}
    try:
        os.read(go_r, 1)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        for c in ("memory", "pids", "cpuset"):  # cpuset works thanks to clone_children
            sub = cg.dir(c) + "/sub"
            os.mkdir(sub)
            with open(sub + "/cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
            report[c] = "moved"
        for c, f in (("memory", "memory.limit_in_bytes"), ("pids", "pids.max"), ("cpu", "cpu.cfs_quota_us")):
            try:
                with open(f"{cg.dir(c)}/{f}", "w") as fh:
                    fh.write("max" if c == "pids" else "-1")
                report[f] = "written"
            except OSError as e:
                report[f] = e.errno
    except BaseException as e:  # report anything, never return into pytest
        report["error"] = repr(e)
    finally:
        os.write(rep_w, json.dumps(report).encode())
        os.close(rep_w)
    while True:  # stay alive until destroy() kills us
        time.sleep(1000)


def test_delegated_owner_builds_subtree_but_cannot_raise_limits(env):
    layout, top, cg, started = env
    uid = 1_000_000 + secrets.randbelow(100_000)  # an id no host user has
    cg.create(RESOURCES | {"cpu": {"quota": 50000, "period": 100000}}, owner=(uid, uid))
    go_r, go_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(go_w)
            os.close(rep_r)
            _delegated_child(cg, uid, go_r, rep_w)
        finally:
            os._exit(1)
    started.append(pid)
    os.close(go_r)
    os.close(rep_w)
    cg.add(pid)
    os.write(go_w, b"1")
    report = json.loads(os.read(rep_r, 65536) or b"{}")
    os.close(go_w)
    os.close(rep_r)

    assert "error" not in report, report
    assert report["memory"] == report["pids"] == report["cpuset"] == "moved"
    for f in ("memory.limit_in_bytes", "pids.max", "cpu.cfs_quota_us"):
        assert report[f] in (errno.EACCES, errno.EPERM), (f, report[f])
    assert _read(cg.dir("memory") + "/memory.limit_in_bytes") == str(256 * MiB)
    assert _read(cg.dir("pids") + "/pids.max") == "64"
    groups = parse_cgroup_file(_read(f"/proc/{pid}/cgroup"))
    assert groups["memory"] == groups["pids"] == groups["cpuset"] == cg.path + "/sub"
    sub_cpus = _read(cg.dir("cpuset") + "/sub/cpuset.cpus")
    assert sub_cpus and sub_cpus == _read(cg.dir("cpuset") + "/cpuset.cpus")  # inherited, not empty
    assert groups["cpu"] == cg.path  # untouched hierarchy: still in the container cgroup
    assert os.stat(cg.dir("memory") + "/sub").st_uid == uid
    assert pid in cg.pids()  # recursive

    other = _sleeper(started)  # a second process, directly in the container cgroup
    cg.add(other.pid)
    cg.destroy()
    _, status = os.waitpid(pid, 0)
    started.remove(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert other.wait(timeout=5) == -signal.SIGKILL
    _gone(layout, top)
    assert not cg.exists() and cg.pids() == []
    cg.destroy()  # idempotent


def test_kernel_rejection_is_reported_and_rolled_back(env):
    layout, top, cg, _ = env
    with pytest.raises(CgroupError, match=r"^cannot set cpu.cfs_quota_us=500: Invalid argument$"):
        cg.create({"cpu": {"quota": 500, "period": 100000}})  # below the 1ms minimum
    for h in layout.hierarchies:  # nothing left, not even the parent level we made
        assert not os.path.exists(h.mountpoint + top), h.mountpoint
    if os.path.exists(layout.hierarchy("memory").mountpoint + "/memory.memsw.limit_in_bytes"):
        with pytest.raises(CgroupError, match=r"^cannot set memory.memsw.limit_in_bytes=\d+: Invalid argument$"):
            cg.create({"memory": {"limit": 256 * MiB, "swap": 128 * MiB}})  # memory+swap < memory
        assert not cg.exists()


def test_unavailable_controller_is_named(env):
    layout, top, _cg, _ = env
    no_pids = Layout(layout.mode, tuple(h for h in layout.hierarchies if "pids" not in h.controllers))
    cg = ContainerCgroup(no_pids, top + "/c1")
    with pytest.raises(CgroupError, match="'pids'"):
        cg.create({"pids": {"limit": 10}})
    assert not cg.exists()


def test_destroy_absent_is_quiet(env):
    _layout, _top, cg, _ = env
    assert not cg.exists()
    cg.destroy()


def test_destroy_wins_against_a_forking_process(env):
    layout, top, cg, started = env
    cg.create({"pids": {"limit": 64}})
    # Started outside, then moved in: it keeps forking sleepers until the pids limit.
    forker = ("import os, sys, time\n"
              "sys.stdin.readline()\n"
              "while True:\n"
              "    try:\n"
              "        if os.fork() == 0:\n"
              "            time.sleep(100)\n"
              "            os._exit(0)\n"
              "    except OSError:\n"  # EAGAIN at the pids limit: keep trying
              "        time.sleep(0.001)\n")
    p = subprocess.Popen([sys.executable, "-c", forker], stdin=subprocess.PIPE)
    started.append(p.pid)
    cg.add(p.pid)
    p.stdin.write(b"go\n")
    p.stdin.flush()
    deadline = time.monotonic() + 5
    while len(cg.pids()) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(cg.pids()) >= 10
    cg.destroy()
    assert p.wait(timeout=5) == -signal.SIGKILL
    _gone(layout, top)
