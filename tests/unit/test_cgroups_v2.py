"""cgroup v2 logic against a fake cgroupfs built in tmp_path.

FakeKernel imitates what the kernel does on mkdir (interface files appear, limit files
only for controllers the parent enabled in cgroup.subtree_control), on writes to
cgroup.subtree_control (+/- tokens, only offered controllers), on rmdir (interface
files go with the directory) and on SIGKILL (the pid leaves cgroup.procs).
"""
from __future__ import annotations

import errno
import os

import pytest

from isobox.cgroups import manager
from isobox.cgroups.layout import CgroupError, Hierarchy, Layout
from isobox.cgroups.manager import ContainerCgroup, shares_to_weight

OFFERED = ("cpuset", "cpu", "io", "memory", "pids")
CONTROLLER_FILES = {
    "memory": {"memory.max": "max", "memory.low": "0", "memory.swap.max": "max", "memory.current": "4096"},
    "cpu": {"cpu.max": "max 100000", "cpu.weight": "100", "cpu.stat": "usage_usec 7\nuser_usec 5\n"},
    "cpuset": {"cpuset.cpus": "", "cpuset.mems": ""},
    "pids": {"pids.max": "max", "pids.current": "0"},
    "io": {"io.max": ""},
}
CORE_FILES = ("cgroup.procs", "cgroup.threads", "cgroup.subtree_control", "cgroup.type")
MiB = 1 << 20


def _put(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _get(path: str) -> str:
    with open(path) as f:
        return f.read()


class FakeKernel:
    def __init__(self, root: str, offered=OFFERED, refuse=(), reject=None):
        self.root, self.refuse, self.reject = root, set(refuse), reject or {}
        self.killed: list[int] = []
        self.bpf: list = []  # (cgroup dir, instructions) of device programs "attached"
        self.real_write = manager._write
        os.makedirs(root, exist_ok=True)
        for f in CORE_FILES:
            _put(os.path.join(root, f), "")
        _put(os.path.join(root, "cgroup.controllers"), " ".join(offered))
        self.layout = Layout("v2", (Hierarchy(root, "/", tuple(offered), 2, "rw,nsdelegate"),))

    def mkdir(self, path: str) -> None:
        os.mkdir(path, 0o755)
        enabled = _get(os.path.join(os.path.dirname(path), "cgroup.subtree_control")).split()
        for f in CORE_FILES:
            _put(os.path.join(path, f), "")
        _put(os.path.join(path, "cgroup.controllers"), " ".join(enabled))
        for c in enabled:
            for f, v in CONTROLLER_FILES[c].items():
                _put(os.path.join(path, f), v)

    def write(self, path: str, value: str) -> None:
        name, d = os.path.basename(path), os.path.dirname(path)
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if name == "cgroup.subtree_control":
            avail = _get(os.path.join(d, "cgroup.controllers")).split()
            cur = set(_get(path).split())
            for tok in value.split():
                c = tok[1:]
                if c not in avail or c in self.refuse:  # all-or-nothing like the kernel
                    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
                (cur.add if tok[0] == "+" else cur.discard)(c)
            value = " ".join(c for c in avail if c in cur)
        elif name in self.reject and self.reject[name](value):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        self.real_write(path, value)

    def rmdir(self, path: str) -> None:
        entries = os.listdir(path)
        if any(os.path.isdir(os.path.join(path, e)) for e in entries):
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), path)
        if _get(os.path.join(path, "cgroup.procs")).split():
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        for e in entries:
            os.unlink(os.path.join(path, e))
        os.rmdir(path)

    def kill(self, pid: int) -> None:
        self.killed.append(pid)
        for root, _dirs, files in os.walk(self.root):
            if "cgroup.procs" in files:
                p = os.path.join(root, "cgroup.procs")
                left = [x for x in _get(p).split() if x != str(pid)]
                _put(p, "".join(x + "\n" for x in left))


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    def make(**kw) -> FakeKernel:
        k = FakeKernel(str(tmp_path / "cgroup"), **kw)
        monkeypatch.setattr(manager, "_mkdir", k.mkdir)
        monkeypatch.setattr(manager, "_write", k.write)
        monkeypatch.setattr(manager, "_rmdir", k.rmdir)
        monkeypatch.setattr(manager, "_kill", k.kill)
        monkeypatch.setattr(manager, "_attach_device_filter",
                            lambda d, insns: k.bpf.append((d, insns)))
        return k
    return make


RESOURCES = {
    "memory": {"limit": 256 * MiB, "swap": 512 * MiB, "reservation": 128 * MiB},
    "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "1", "mems": "0"},
    "pids": {"limit": 64},
    "blockIO": {},  # empty sections, as docker sends them, are fine
    "devices": [{"allow": False, "access": "rwm"}],
}


def test_create_writes_v2_limits(kernel):
    k = kernel()
    cg = ContainerCgroup(k.layout, "/isobox/c1")
    cg.create(RESOURCES)
    d = os.path.join(k.root, "isobox", "c1")
    assert cg.dir("memory") == cg.dir("") == d and cg.exists()
    assert _get(f"{d}/memory.max") == str(256 * MiB)
    assert _get(f"{d}/memory.swap.max") == str(256 * MiB)  # OCI swap is memory+swap
    assert _get(f"{d}/memory.low") == str(128 * MiB)
    assert _get(f"{d}/cpu.max") == "50000 100000"
    assert _get(f"{d}/cpu.weight") == "39"
    assert _get(f"{d}/cpuset.cpus") == "1" and _get(f"{d}/cpuset.mems") == "0"
    assert _get(f"{d}/pids.max") == "64"


def test_subtree_control_propagates_every_level(kernel):
    k = kernel()
    ContainerCgroup(k.layout, "/a/b/c").create({"pids": {"limit": 5}})
    for level in ("", "a", "a/b"):
        assert _get(os.path.join(k.root, level, "cgroup.subtree_control")).split() == list(OFFERED)
    # The container's own subtree_control is left to the container (no internal processes rule).
    assert _get(os.path.join(k.root, "a/b/c/cgroup.subtree_control")) == ""


def test_subtree_control_as_far_as_possible(kernel):
    k = kernel(refuse={"io"})  # e.g. a controller the kernel refuses here
    ContainerCgroup(k.layout, "/isobox/c1").create({"memory": {"limit": 64 * MiB}})
    assert _get(os.path.join(k.root, "cgroup.subtree_control")).split() == ["cpuset", "cpu", "memory", "pids"]
    assert _get(os.path.join(k.root, "isobox/c1/memory.max")) == str(64 * MiB)


def test_hybrid_only_enables_what_limits_need(kernel):
    k = kernel()
    h = k.layout.hierarchies[0]
    cg = ContainerCgroup(Layout("hybrid", (h,)), "/isobox/c1")
    cg.create({"pids": {"limit": 10}})
    assert _get(os.path.join(k.root, "cgroup.subtree_control")) == "pids"


def test_unavailable_controller_names_it_and_leaves_nothing(kernel):
    k = kernel(offered=("cpu", "pids"))
    cg = ContainerCgroup(k.layout, "/isobox/c1")
    with pytest.raises(CgroupError, match="'memory'"):
        cg.create({"memory": {"limit": 64 * MiB}})
    assert not os.path.exists(os.path.join(k.root, "isobox"))


def test_controller_not_delegated_by_parent(kernel):
    k = kernel()
    # A parent that exists but may not enable memory for its children (not delegated to us).
    k.mkdir(os.path.join(k.root, "isobox"))
    _put(os.path.join(k.root, "isobox", "cgroup.controllers"), "cpu pids")
    cg = ContainerCgroup(k.layout, "/isobox/c1")
    with pytest.raises(CgroupError, match="'memory' is not enabled"):
        cg.create({"memory": {"limit": 64 * MiB}})
    assert not os.path.exists(os.path.join(k.root, "isobox", "c1"))
    assert os.path.isdir(os.path.join(k.root, "isobox"))  # pre-existing parent is kept


def test_kernel_rejected_value_rolls_back(kernel):
    k = kernel(reject={"memory.max": lambda v: int(v) < 4096})
    cg = ContainerCgroup(k.layout, "/isobox/c1")
    with pytest.raises(CgroupError, match=r"^cannot set memory.max=1: Invalid argument$"):
        cg.create({"memory": {"limit": 1}})
    assert not os.path.exists(os.path.join(k.root, "isobox"))
    assert not cg.exists()


@pytest.mark.parametrize("shares,weight", [(2, 1), (1024, 39), (512, 20), (262144, 10000)])
def test_shares_to_weight(shares, weight):
    assert shares_to_weight(shares) == weight


def test_unlimited_values(kernel):
    k = kernel()
    cg = ContainerCgroup(k.layout, "/c")
    cg.create({"memory": {"limit": -1, "swap": -1}, "cpu": {"quota": -1, "period": 100000},
               "pids": {"limit": -1}})
    d = cg.dir("")
    assert _get(f"{d}/memory.max") == "max" and _get(f"{d}/memory.swap.max") == "max"
    assert _get(f"{d}/cpu.max") == "max 100000" and _get(f"{d}/pids.max") == "max"


@pytest.mark.parametrize("res,msg", [
    ({"blockIO": {"weight": 5}}, "blockIO.weight must be an integer from 10 to 1000"),
    ({"blockIO": {"leafWeight": 500}}, "leafWeight is not supported on cgroup v2"),
    ({"hugepageLimits": [{"pageSize": "2MB", "limit": 1}]}, "'hugetlb' is not available"),
    ({"rdma": {"x": {"hcaHandles": 1}}}, "rdma is not supported"),
    ({"memory": {"kernel": 1}}, "memory.kernel is not supported"),
    ({"memory": {"disableOOMKiller": True}}, "disableOOMKiller is not supported on cgroup v2"),
    ({"memory": {"swap": 100}}, "without a memory limit"),
    ({"memory": {"limit": 200, "swap": 100}}, "below the memory limit"),
    ({"pids": {"limit": "10"}}, "must be an integer"),
])
def test_refused_resources_touch_nothing(kernel, res, msg):
    k = kernel()
    with pytest.raises(CgroupError, match=msg):
        ContainerCgroup(k.layout, "/isobox/c1").create(res)
    assert not os.path.exists(os.path.join(k.root, "isobox"))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_delegation_chowns_only_delegation_files(kernel):
    k = kernel()
    cg = ContainerCgroup(k.layout, "/isobox/c1")
    cg.create({"memory": {"limit": 64 * MiB}, "pids": {"limit": 9}}, owner=(100000, 100001))
    d = cg.dir("")
    for p in (d, f"{d}/cgroup.procs", f"{d}/cgroup.subtree_control", f"{d}/cgroup.threads"):
        st = os.stat(p)
        assert (st.st_uid, st.st_gid) == (100000, 100001), p
    for p in (f"{d}/memory.max", f"{d}/pids.max", f"{d}/cpu.max", f"{d}/cgroup.controllers",
              os.path.dirname(d), os.path.join(os.path.dirname(d), "cgroup.procs")):
        assert os.stat(p).st_uid == 0, p


def test_add_pids_recursive_and_destroy(kernel):
    k = kernel()
    cg = ContainerCgroup(k.layout, "/isobox/c1")
    cg.create(None)
    cg.add(111)
    d = cg.dir("")
    assert _get(f"{d}/cgroup.procs") == "111"
    k.mkdir(f"{d}/sub")  # made by the container itself
    k.mkdir(f"{d}/sub/deeper")
    _put(f"{d}/sub/deeper/cgroup.procs", "222\n333\n")
    assert cg.pids() == [111, 222, 333]
    cg.destroy()
    assert sorted(k.killed) == [111, 222, 333]
    assert not cg.exists() and not os.path.exists(d)
    assert os.path.isdir(os.path.join(k.root, "isobox"))  # shared parent stays
    cg.destroy()  # idempotent
    assert cg.pids() == []


def test_destroy_prefers_cgroup_kill(kernel):
    k = kernel()
    cg = ContainerCgroup(k.layout, "/c1")
    cg.create(None)
    d = cg.dir("")
    _put(f"{d}/cgroup.kill", "")
    _put(f"{d}/cgroup.procs", "4242\n")     # a process left: an empty cgroup is simply removed
    written = []
    real = manager._write

    def spy(path, value):
        written.append((os.path.basename(path), value))
        real(path, value)
    manager._write = spy
    try:
        cg.destroy()
    finally:
        manager._write = real
    assert written[0] == ("cgroup.kill", "1")
    assert not cg.exists()


def test_destroy_gives_up_with_error(kernel, monkeypatch):
    k = kernel()
    cg = ContainerCgroup(k.layout, "/c1")
    cg.create(None)
    _put(os.path.join(cg.dir(""), "cgroup.procs"), "4242\n")
    monkeypatch.setattr(manager, "_kill", lambda pid: None)  # an unkillable process
    with pytest.raises(CgroupError, match="still running after 0.2s: 4242"):
        cg.destroy(timeout=0.2)
    assert cg.exists()


def test_stats(kernel):
    k = kernel()
    cg = ContainerCgroup(k.layout, "/c1")
    cg.create({"pids": {"limit": 9}})
    st = cg.summary()
    assert st == {"memory_usage": 4096, "memory_limit": None, "pids_current": 0,
                  "pids_limit": 9, "cpu_usage_ns": 7000}


@pytest.mark.parametrize("bad", ["", "/", "//", "/a/../b", "..", "a/./../b", "system.slice:docker:abc"])
def test_bad_paths(bad):
    with pytest.raises(CgroupError):
        ContainerCgroup(Layout("v2", ()), bad)


def test_relative_path_is_below_root():
    assert ContainerCgroup(Layout("v2", ()), "isobox//x/./y").path == "/isobox/x/y"
