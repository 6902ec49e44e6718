"""blkio, hugetlb, devices (v1 allow-list and the cgroup v2 BPF program), freezer,
update and runc-shaped stats on the real host, as root.

Every test works below /isobox-test-<random> in each hierarchy and removes it in a
finally, killing only the processes it started (by pid). This host is hybrid: hugetlb
and the device BPF program are exercised on the cgroup2 mount (/sys/fs/cgroup/unified);
enabling hugetlb there needs "+hugetlb" in the cgroup2 root's subtree_control, which the
hugetlb test restores to what it found.
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

from isobox.cgroups import devices as dev
from isobox.cgroups.layout import CgroupError, Layout, detect
from isobox.cgroups.manager import ContainerCgroup, hugepage_sizes
from isobox.linux import bpf

MiB = 1 << 20


def _ready() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        layout = detect()
    except CgroupError as e:
        return str(e)
    for c in ("memory", "cpu", "pids", "blkio", "devices", "freezer"):
        h = layout.hierarchy(c)
        if h is None or h.version != 1:
            return f"no v1 {c} hierarchy on this host"
    return None


pytestmark = pytest.mark.skipif(_ready() is not None, reason=str(_ready()))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _root_disk() -> tuple[int, int]:
    """major:minor of the whole disk holding / (throttles apply to disks, not partitions)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == "/":
                mm = fields[2]
    part = f"/sys/dev/block/{mm}/partition"
    if os.path.exists(part):
        mm = _read(os.path.realpath(f"/sys/dev/block/{mm}") + "/../dev")
    if not os.path.exists(f"/sys/dev/block/{mm}"):
        pytest.skip(f"/ is not on a block device ({mm})")
    a, b = mm.split(":")
    return int(a), int(b)


class Env:
    def __init__(self):
        self.layout = detect()
        self.top = f"/isobox-test-{secrets.token_hex(4)}"
        self.cgs: list[ContainerCgroup] = []
        self.started: list[int] = []

    def cg(self, name: str = "c1", layout: Layout | None = None) -> ContainerCgroup:
        c = ContainerCgroup(layout or self.layout, f"{self.top}/{name}")
        self.cgs.append(c)
        return c

    def spawn(self, code: str, *args: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        self.started.append(p.pid)
        return p

    def cleanup(self):
        try:
            for c in self.cgs:
                try:
                    c.destroy()
                except CgroupError:
                    pass
        finally:
            for pid in self.started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
            for h in self.layout.hierarchies:
                for root, _dirs, _files in os.walk(h.mountpoint + self.top, topdown=False):
                    try:
                        os.rmdir(root)
                    except OSError:
                        pass


@pytest.fixture
def env():
    e = Env()
    unified = e.layout.unified
    before = _read(unified.mountpoint + "/cgroup.subtree_control") if unified else None
    try:
        yield e
    finally:
        e.cleanup()
    if unified:
        assert _read(unified.mountpoint + "/cgroup.subtree_control") == before
    for h in e.layout.hierarchies:
        assert not os.path.exists(h.mountpoint + e.top), h.mountpoint


# A child that tries device opens when told to, and reports {path+mode: "ok" | errno}.
OPENER = r"""
import json, os, sys
procs = sys.argv[1]
sys.stdin.readline()
if procs != "-":
    with open(procs, "w") as f:   # move ourselves into the (v2) test cgroup
        f.write(str(os.getpid()))
while True:
    line = sys.stdin.readline()
    if not line:
        break
    out = {}
    for spec in json.loads(line):
        path, mode = spec.rsplit(":", 1)
        try:
            fd = os.open(path, os.O_WRONLY if mode == "w" else os.O_RDONLY)
            os.close(fd)
            out[spec] = "ok"
        except OSError as e:
            out[spec] = e.errno
    print(json.dumps(out), flush=True)
"""


def _opener(env: Env, procs: str = "-") -> subprocess.Popen:
    p = env.spawn(OPENER, procs)
    return p


def _try(p: subprocess.Popen, *specs: str) -> dict:
    p.stdin.write(json.dumps(list(specs)) + "\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())


# --- blkio ------------------------------------------------------------------------

def test_blkio_throttles_on_the_root_disk(env):
    major, minor = _root_disk()
    cg = env.cg()
    d = f"{major}:{minor}"
    cg.create({"blockIO": {"throttleReadBpsDevice": [{"major": major, "minor": minor, "rate": 4 * MiB}],
                           "throttleWriteBpsDevice": [{"major": major, "minor": minor, "rate": 2 * MiB}],
                           "throttleReadIOPSDevice": [{"major": major, "minor": minor, "rate": 300}],
                           "throttleWriteIOPSDevice": [{"major": major, "minor": minor, "rate": 200}]}})
    b = cg.dir("blkio")
    assert _read(f"{b}/blkio.throttle.read_bps_device") == f"{d} {4 * MiB}"
    assert _read(f"{b}/blkio.throttle.write_bps_device") == f"{d} {2 * MiB}"
    assert _read(f"{b}/blkio.throttle.read_iops_device") == f"{d} 300"
    assert _read(f"{b}/blkio.throttle.write_iops_device") == f"{d} 200"
    cg.update({"blockIO": {"throttleReadBpsDevice": [{"major": major, "minor": minor, "rate": 8 * MiB}]}})
    assert _read(f"{b}/blkio.throttle.read_bps_device") == f"{d} {8 * MiB}"
    cg.update({"blockIO": {"throttleReadBpsDevice": [{"major": major, "minor": minor, "rate": 0}]}})
    assert _read(f"{b}/blkio.throttle.read_bps_device") == ""  # 0 removes the limit


def test_blkio_weight(env):
    """blkio.weight exists only with CFQ (gone); BFQ's blkio.bfq.weight appears in
    non-root cgroups when bfq is built in, as runc uses it. Without either, an error."""
    cg = env.cg()
    probe = env.cg("probe")
    probe.create(None)
    has_bfq = os.path.exists(probe.dir("blkio") + "/blkio.bfq.weight")
    has_cfq = os.path.exists(probe.dir("blkio") + "/blkio.weight")
    if has_bfq or has_cfq:
        cg.create({"blockIO": {"weight": 500}})
        f = "/blkio.bfq.weight" if has_bfq else "/blkio.weight"
        assert _read(cg.dir("blkio") + f).split()[-1] == "500"
    else:
        with pytest.raises(CgroupError, match=r"^cannot set blkio.bfq.weight: the I/O scheduler of this "
                                              r"host has no weights \(no blkio.weight;"):
            cg.create({"blockIO": {"weight": 500}})
        assert not cg.exists()
    with pytest.raises(CgroupError, match="leafWeight is not supported by this kernel"):
        env.cg("leaf").create({"blockIO": {"leafWeight": 500}})


def test_blkio_bad_device_is_one_line(env):
    cg = env.cg()
    with pytest.raises(CgroupError) as ei:  # a major:minor that is no disk
        cg.create({"blockIO": {"throttleReadBpsDevice": [{"major": 1, "minor": 3, "rate": 1}]}})
    assert str(ei.value).startswith("cannot set blkio.throttle.read_bps_device=1:3 1: ")
    assert "\n" not in str(ei.value)
    assert not cg.exists()


# --- hugetlb on cgroup2 -------------------------------------------------------------

def test_hugetlb_limit_on_the_unified_hierarchy(env):
    h = env.layout.hierarchy("hugetlb")
    if h is None or "2MB" not in hugepage_sizes():
        pytest.skip("no hugetlb controller or no 2MB pages")
    sc = h.mountpoint + "/cgroup.subtree_control"
    before = _read(sc).split()
    cg = env.cg()
    try:
        cg.create({"hugepageLimits": [{"pageSize": "2MB", "limit": 8 * MiB}]})
        d = cg.dir("hugetlb")
        if h.version == 2:
            assert d.startswith(h.mountpoint + "/") and "hugetlb" in _read(sc).split()
            assert _read(f"{d}/hugetlb.2MB.max") == str(8 * MiB)
            if os.path.exists(f"{d}/hugetlb.2MB.rsvd.max"):
                assert _read(f"{d}/hugetlb.2MB.rsvd.max") == str(8 * MiB)
        else:
            assert _read(f"{d}/hugetlb.2MB.limit_in_bytes") == str(8 * MiB)
        cg.update({"hugepageLimits": [{"pageSize": "2MB", "limit": 4 * MiB}]})
        assert _read(f"{d}/hugetlb.2MB.{'max' if h.version == 2 else 'limit_in_bytes'}") == str(4 * MiB)
        st = cg.stats()["hugetlb"]
        assert st["2MB"] == {"failcnt": 0}  # nothing used: usage/max omitted as in runc
        with pytest.raises(CgroupError, match=r"huge page size 3MB is not supported by this host"):
            cg.update({"hugepageLimits": [{"pageSize": "3MB", "limit": 1}]})
    finally:
        cg.destroy()
        if "hugetlb" not in before and h.version == 2:
            with open(sc, "w") as f:  # give the host's cgroup2 root back what it had
                f.write("-hugetlb")


# --- devices: v1 allow-list ------------------------------------------------------------

def test_v1_device_allow_list_is_enforced(env):
    cg = env.cg()
    major, minor = _root_disk()
    # the disk and kmsg must be in the allow list too, or the clamp takes them away
    allow = (*dev.ALWAYS_ALLOWED, ("b", major, minor), ("c", 1, 11))
    cg.create({"devices": [{"allow": False, "access": "rwm"},
                           {"allow": True, "type": "b", "major": major, "minor": minor, "access": "r"}]},
              devices=allow)
    lines = _read(cg.dir("devices") + "/devices.list").splitlines()
    assert f"b {major}:{minor} r" in lines
    for always in ("c 1:3 rwm", "c 1:5 rwm", "c 1:9 rwm", "c 5:2 rwm", "c 136:* rwm", "c 10:200 rwm"):
        assert always in lines
    assert "a *:* rwm" not in lines
    p = _opener(env)
    cg.add(p.pid)
    p.stdin.write("go\n")
    r = _try(p, "/dev/null:w", "/dev/zero:r", "/dev/kmsg:r", f"/dev/block/{major}:{minor}:r", f"/dev/block/{major}:{minor}:w")
    assert r["/dev/null:w"] == "ok" and r["/dev/zero:r"] == "ok"
    assert r["/dev/kmsg:r"] == errno.EPERM  # c 1:11 is not in the list
    if os.path.exists(f"/dev/block/{major}:{minor}"):
        assert r[f"/dev/block/{major}:{minor}:r"] == "ok"
        assert r[f"/dev/block/{major}:{minor}:w"] == errno.EPERM  # allowed "r" only
    # update: allow kmsg reads, with a sub-cgroup present (the kernel refuses "a" then,
    # so only the difference is written)
    os.mkdir(cg.dir("devices") + "/sub")
    cg.update({"devices": [{"allow": True, "type": "c", "major": 1, "minor": 11, "access": "r"}]}, allow)
    lines = _read(cg.dir("devices") + "/devices.list").splitlines()
    assert "c 1:11 r" in lines and f"b {major}:{minor} r" not in lines
    assert _try(p, "/dev/kmsg:r")["/dev/kmsg:r"] == "ok"
    rules = cg.device_rules()
    assert rules[0] == dev.Rule(False, "a", -1, -1, "rwm")


def test_v1_privileged_allow_all_is_clamped(env):
    cg = env.cg()
    cg.create({"devices": [{"allow": True, "access": "rwm"}]})
    lines = _read(cg.dir("devices") + "/devices.list").splitlines()
    assert sorted(lines) == sorted(dev.Rule(True, *k, "rwm").v1() for k in dev.ALWAYS_ALLOWED)


# --- devices: cgroup v2 BPF program on the unified hierarchy ------------------------------

def _unified_layout(env: Env) -> Layout:
    u = env.layout.unified
    if u is None:
        pytest.skip("no cgroup2 mount")
    # Only the cgroup2 hierarchy, as "hybrid" so no controller is enabled in the host's root.
    return Layout("hybrid", (u,))


def test_bpf_device_program_denies_writes(env):
    layout = _unified_layout(env)
    cg = env.cg("bpf", layout)
    cg.create(None)  # default program: deny all + harmless devices
    d = cg.dir("")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert len(bpf.prog_query(fd, bpf.BPF_CGROUP_DEVICE)) == 1
    finally:
        os.close(fd)
    p = _opener(env, d + "/cgroup.procs")
    p.stdin.write("go\n")
    r = _try(p, "/dev/null:w", "/dev/null:r", "/dev/full:w", "/dev/kmsg:r")
    assert r == {"/dev/null:w": "ok", "/dev/null:r": "ok", "/dev/full:w": "ok", "/dev/kmsg:r": errno.EPERM}

    # A hand-made rule set: reads of null and full allowed, writes not.
    rules = [dev.Rule(False, "a", -1, -1, "rwm"), dev.Rule(True, "c", 1, 3, "r"),
             dev.Rule(True, "c", 1, 7, "rm")]
    dev.attach_bpf(d, dev.bpf_program(rules))
    r = _try(p, "/dev/null:w", "/dev/null:r", "/dev/full:w", "/dev/full:r", "/dev/zero:r")
    assert r == {"/dev/null:w": errno.EPERM, "/dev/null:r": "ok", "/dev/full:w": errno.EPERM,
                 "/dev/full:r": "ok", "/dev/zero:r": errno.EPERM}

    # Allow-all replaces it (attach new, detach old: still exactly one program), clamped to
    # the allow list (the default: isobox's harmless devices, no kmsg).
    cg.update({"devices": [{"allow": True, "access": "rwm"}]})
    r = _try(p, "/dev/null:w", "/dev/full:w", "/dev/kmsg:r")
    assert r == {"/dev/null:w": "ok", "/dev/full:w": "ok", "/dev/kmsg:r": errno.EPERM}
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert len(bpf.prog_query(fd, bpf.BPF_CGROUP_DEVICE)) == 1
    finally:
        os.close(fd)


# --- freezer ---------------------------------------------------------------------------

LOOPER = r"""
import os, sys, time
path = sys.argv[1]
sys.stdin.readline()
n = 0
while True:
    n += 1
    with open(path + ".tmp", "w") as f:     # rename: a reader never sees a half-written file
        f.write(str(n))
    os.rename(path + ".tmp", path)
    time.sleep(0.005)
"""


def _counter(path: str) -> int:
    deadline = time.monotonic() + 10      # the looper may start slowly on a loaded machine
    while time.monotonic() < deadline:
        try:
            return int(_read(path))
        except (ValueError, FileNotFoundError):
            time.sleep(0.01)
    raise AssertionError("counter never written")


def _freeze_cycle(env: Env, cg: ContainerCgroup, tmp_path, state_check) -> None:
    counter = str(tmp_path / "counter")
    p = env.spawn(LOOPER, counter)
    cg.add(p.pid)
    p.stdin.write("go\n")
    p.stdin.flush()
    first = _counter(counter)
    deadline = time.monotonic() + 5
    while _counter(counter) == first and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not cg.frozen()
    cg.freeze()
    assert cg.frozen()
    state_check(True)
    a = _counter(counter)
    time.sleep(0.3)
    assert _counter(counter) == a, "a frozen process made progress"
    cg.thaw()
    deadline = time.monotonic() + 5
    while _counter(counter) == a and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _counter(counter) > a, "the process did not resume after thaw"
    assert not cg.frozen()
    state_check(False)
    cg.freeze()  # destroy must still kill a frozen container
    cg.destroy()
    assert p.wait(timeout=5) == -signal.SIGKILL


def test_v1_freezer_stops_and_resumes(env, tmp_path):
    cg = env.cg()
    cg.create(None)
    f = cg.dir("freezer") + "/freezer.state"
    _freeze_cycle(env, cg, tmp_path, lambda frozen: (_read(f) == ("FROZEN" if frozen else "THAWED")) or
                  pytest.fail(_read(f)))


def test_v2_freezer_on_the_unified_hierarchy(env, tmp_path):
    cg = env.cg("frz", _unified_layout(env))
    cg.create(None)
    ev = cg.dir("") + "/cgroup.events"
    _freeze_cycle(env, cg, tmp_path, lambda frozen: (f"frozen {int(frozen)}" in _read(ev).splitlines())
                  or pytest.fail(_read(ev)))


# --- update and stats ---------------------------------------------------------------

def test_update_memory_cpu_pids(env):
    cg = env.cg()
    cg.create({"memory": {"limit": 256 * MiB}, "pids": {"limit": 64}})
    cg.update({"memory": {"limit": 128 * MiB}, "cpu": {"shares": 512, "quota": 20000, "period": 100000},
               "pids": {"limit": 32}})
    assert _read(cg.dir("memory") + "/memory.limit_in_bytes") == str(128 * MiB)
    assert _read(cg.dir("cpu") + "/cpu.shares") == "512"
    assert _read(cg.dir("cpu") + "/cpu.cfs_quota_us") == "20000"
    assert _read(cg.dir("pids") + "/pids.max") == "32"
    with pytest.raises(CgroupError, match=r"^cannot set cpu.cfs_quota_us=500: Invalid argument$"):
        cg.update({"cpu": {"quota": 500}})
    with pytest.raises(CgroupError, match="must be an integer"):
        cg.update({"pids": {"limit": "9"}, "memory": {"limit": 64 * MiB}})
    assert _read(cg.dir("memory") + "/memory.limit_in_bytes") == str(128 * MiB)  # nothing written
    with pytest.raises(CgroupError, match="does not exist"):
        env.cg("absent").update({"pids": {"limit": 3}})


BUSY = r"""
import sys
sys.stdin.readline()
x = bytearray(8 << 20)
for i in range(0, len(x), 4096):
    x[i] = 1
n = 0
while n < 3_000_000:
    n += 1
print("done", flush=True)
sys.stdin.readline()
"""


def test_stats_like_runc(env):
    cg = env.cg()
    cg.create({"memory": {"limit": 256 * MiB}, "pids": {"limit": 64}})
    p = env.spawn(BUSY)
    cg.add(p.pid)
    p.stdin.write("go\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "done"
    st = cg.stats()
    assert set(st) == {"cpu", "memory", "pids", "blkio", "hugetlb"}
    json.dumps(st)
    u = st["cpu"]["usage"]
    assert u["total"] > 0 and len(u["percpu"]) == os.cpu_count() and "kernel" in u and "user" in u
    assert u["user"] + u["kernel"] > 0
    assert isinstance(st["cpu"]["throttling"], dict)
    m = st["memory"]
    assert m["usage"]["limit"] == 256 * MiB and m["usage"]["usage"] >= 8 << 20
    assert m["usage"]["failcnt"] == 0 and isinstance(m["raw"], dict) and "rss" in m["raw"]
    assert st["pids"] == {"current": 1, "limit": 64}
    assert isinstance(st["blkio"], dict) and isinstance(st["hugetlb"], dict)
    for entries in st["blkio"].values():
        assert all({"major", "minor", "op", "value"} >= set(e) for e in entries)
