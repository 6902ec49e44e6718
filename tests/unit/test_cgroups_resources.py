"""blkio/io, hugetlb, device rules (v1 writes and the v2 BPF program), freezer, update
and runc-shaped stats: pure logic and the v2 files on a fake cgroupfs tree (see
test_cgroups_v2.FakeKernel). The real-host counterparts are in
tests/integration/test_cgroups_complete.py."""
from __future__ import annotations

import os
import struct

import pytest

from isobox.cgroups import devices as dev
from isobox.cgroups import manager
from isobox.cgroups.layout import CgroupError, Hierarchy, Layout
from isobox.cgroups.manager import ContainerCgroup, blkio_weight_to_io_weight, plan_writes
from isobox.linux import bpf

from test_cgroups_v2 import CONTROLLER_FILES, FakeKernel, _get, _put

MiB = 1 << 20
OFFERED = ("cpuset", "cpu", "io", "memory", "pids", "hugetlb")


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    monkeypatch.setitem(CONTROLLER_FILES, "io", {"io.max": "", "io.weight": "default 100", "io.stat": ""})
    monkeypatch.setitem(CONTROLLER_FILES, "hugetlb", {"hugetlb.2MB.max": "max", "hugetlb.2MB.current": "0",
                                                      "hugetlb.2MB.events": "max 0\n"})
    monkeypatch.setattr(manager, "hugepage_sizes", lambda: ["2MB", "1GB"])

    def make(**kw) -> FakeKernel:
        k = FakeKernel(str(tmp_path / "cgroup"), offered=kw.pop("offered", OFFERED), **kw)
        monkeypatch.setattr(manager, "_mkdir", k.mkdir)
        monkeypatch.setattr(manager, "_write", k.write)
        monkeypatch.setattr(manager, "_rmdir", k.rmdir)
        monkeypatch.setattr(manager, "_kill", k.kill)
        monkeypatch.setattr(manager, "_attach_device_filter", lambda d, insns: k.bpf.append((d, insns)))
        return k
    return make


V1 = Layout("v1", tuple(Hierarchy(f"/sys/fs/cgroup/{c}", "/", (c,), 1, f"rw,{c}")
                        for c in ("memory", "cpu", "pids", "blkio", "hugetlb", "devices", "freezer")))


# --- plan: blkio / hugetlb ------------------------------------------------------------

def test_v1_blkio_plan():
    w = plan_writes({"blockIO": {"weight": 300, "weightDevice": [{"major": 8, "minor": 0, "weight": 200}],
                                 "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1000}],
                                 "throttleWriteIOPSDevice": [{"major": 8, "minor": 16, "rate": 0}]}}, V1)
    assert [(x.file, x.value) for x in w] == [
        ("blkio.bfq.weight", "300"), ("blkio.bfq.weight_device", "8:0 200"),
        ("blkio.throttle.read_bps_device", "8:0 1000"), ("blkio.throttle.write_iops_device", "8:16 0")]
    assert w[0].alt == (("blkio.weight", "300"),) and "no weights" in w[0].missing


@pytest.mark.parametrize("blk,msg", [
    ({"weight": 5000}, r"blockIO.weight must be an integer from 10 to 1000"),
    ({"throttleReadBpsDevice": [{"major": 8, "rate": 1}]}, r"throttleReadBpsDevice\[0\].minor must be"),
    ({"throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": -1}]}, r"rate must be an integer"),
    ({"weightDevice": {"major": 8}}, "must be a list of objects"),
])
def test_blkio_validation(blk, msg):
    with pytest.raises(CgroupError, match=msg):
        plan_writes({"blockIO": blk}, V1)


@pytest.mark.parametrize("w,io", [(10, 1), (1000, 10000), (500, 4950)])
def test_blkio_weight_to_io_weight(w, io):
    assert blkio_weight_to_io_weight(w) == io


def test_v1_hugetlb_plan(monkeypatch):
    monkeypatch.setattr(manager, "hugepage_sizes", lambda: ["2MB", "1GB"])
    w = plan_writes({"hugepageLimits": [{"pageSize": "1GB", "limit": 1 << 30}]}, V1)
    assert [(x.file, x.value, x.optional) for x in w] == [
        ("hugetlb.1GB.limit_in_bytes", str(1 << 30), False),
        ("hugetlb.1GB.rsvd.limit_in_bytes", str(1 << 30), True)]
    for bad, msg in (("2M", "must look like"), ("64KB", "64KB is not supported by this host \\(supported: 2MB, 1GB\\)")):
        with pytest.raises(CgroupError, match=msg):
            plan_writes({"hugepageLimits": [{"pageSize": bad, "limit": 1}]}, V1)


def test_hugepage_sizes_names():
    sizes = manager.hugepage_sizes()
    assert all(manager._PAGE_SIZE.match(s) for s in sizes)


# --- v2 files on the fake tree -----------------------------------------------------------

def test_v2_io_and_hugetlb_files(kernel):
    k = kernel()
    cg = ContainerCgroup(k.layout, "/isobox/c1")
    cg.create({"blockIO": {"weight": 500, "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 4096}],
                           "throttleWriteIOPSDevice": [{"major": 8, "minor": 0, "rate": 0}]},
               "hugepageLimits": [{"pageSize": "2MB", "limit": 4 * MiB}]})
    d = cg.dir("")
    assert _get(f"{d}/io.weight") == "default 4950"  # no io.bfq.weight: the converted io.weight
    assert _get(f"{d}/io.max") == "8:0 wiops=max"   # last write (the fake keeps one value)
    assert _get(f"{d}/hugetlb.2MB.max") == str(4 * MiB)
    assert not os.path.exists(f"{d}/hugetlb.2MB.rsvd.max")  # optional: skipped quietly
    assert len(k.bpf) == 1 and k.bpf[0][0] == d


def test_v2_io_prefers_bfq_weight(kernel, monkeypatch):
    monkeypatch.setitem(CONTROLLER_FILES, "io", {"io.max": "", "io.bfq.weight": "default 100"})
    k = kernel()
    cg = ContainerCgroup(k.layout, "/c1")
    cg.create({"blockIO": {"weight": 500}})
    assert _get(cg.dir("") + "/io.bfq.weight") == "500"


def test_v2_io_weight_missing_is_named(kernel, monkeypatch):
    monkeypatch.setitem(CONTROLLER_FILES, "io", {"io.max": ""})
    k = kernel()
    cg = ContainerCgroup(k.layout, "/isobox/c1")
    with pytest.raises(CgroupError, match=r"^cannot set io.bfq.weight: the I/O scheduler of this host has "
                                          r"no weights \(no io.weight;"):
        cg.create({"blockIO": {"weight": 500}})
    assert not cg.exists()


def test_update_on_fake_tree(kernel):
    k = kernel()
    cg = ContainerCgroup(k.layout, "/isobox/c1")
    cg.create({"pids": {"limit": 10}, "memory": {"limit": 64 * MiB}})
    cg.update({"pids": {"limit": 20}, "cpu": {"quota": 30000, "period": 100000},
               "devices": [{"allow": True, "type": "c", "major": 4, "minor": -1, "access": "rw"}]},
              dev.allowed([("c", 4, -1)]))     # the allow list must name c 4:* for it to pass
    d = cg.dir("")
    assert _get(f"{d}/pids.max") == "20" and _get(f"{d}/cpu.max") == "30000 100000"
    assert _get(f"{d}/memory.max") == str(64 * MiB)  # untouched
    assert len(k.bpf) == 2
    prog = k.bpf[1][1]
    assert dev.bpf_simulate(prog, "c", 4, 7, "r") and not dev.bpf_simulate(prog, "c", 4, 7, "m")
    cg.update({"pids": {"limit": 30}})
    assert len(k.bpf) == 2  # devices absent: rules left alone
    with pytest.raises(CgroupError, match="memory.swappiness is not supported on cgroup v2"):
        cg.update({"pids": {"limit": 40}, "memory": {"swappiness": 10}})
    assert _get(f"{d}/pids.max") == "30"
    with pytest.raises(CgroupError, match="must be a JSON object"):
        cg.update([])


def test_v2_freezer_on_fake_tree(kernel, monkeypatch):
    k = kernel()
    cg = ContainerCgroup(k.layout, "/c1")
    cg.create(None)
    d = cg.dir("")
    _put(f"{d}/cgroup.freeze", "0")
    _put(f"{d}/cgroup.events", "populated 1\nfrozen 0\n")
    real = k.write

    def write(path, value):  # the kernel reports frozen once every task stopped
        real(path, value)
        if path.endswith("cgroup.freeze"):
            _put(f"{d}/cgroup.events", f"populated 1\nfrozen {value}\n")
    monkeypatch.setattr(manager, "_write", write)
    assert not cg.frozen()
    cg.freeze()
    assert cg.frozen() and _get(f"{d}/cgroup.freeze") == "1"
    cg.thaw()
    assert not cg.frozen() and _get(f"{d}/cgroup.freeze") == "0"


def test_freeze_timeout_thaws_again(kernel):
    k = kernel()
    cg = ContainerCgroup(k.layout, "/c1")
    cg.create(None)
    d = cg.dir("")
    _put(f"{d}/cgroup.freeze", "0")
    _put(f"{d}/cgroup.events", "populated 1\nfrozen 0\n")  # never reaches frozen
    with pytest.raises(CgroupError, match=r"^cannot freeze cgroup /c1: not frozen after 0.1s$"):
        cg.freeze(timeout=0.1)
    assert _get(f"{d}/cgroup.freeze") == "0"


def test_v2_stats_shape(kernel):
    k = kernel()
    cg = ContainerCgroup(k.layout, "/c1")
    cg.create({"pids": {"limit": 9}, "memory": {"limit": 64 * MiB}})
    d = cg.dir("")
    _put(f"{d}/cpu.stat", "usage_usec 7\nuser_usec 5\nsystem_usec 2\nnr_periods 4\nnr_throttled 1\n"
                          "throttled_usec 3\n")
    _put(f"{d}/memory.stat", "anon 100\nfile 200\n")
    _put(f"{d}/memory.events", "low 0\nhigh 0\nmax 3\noom 0\n")
    _put(f"{d}/memory.swap.current", "10")
    _put(f"{d}/io.stat", "8:0 rbytes=512 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n")
    _put(f"{d}/hugetlb.2MB.current", str(2 * MiB))
    _put(f"{d}/pids.current", "2")
    st = cg.stats()
    assert st == {
        "cpu": {"usage": {"total": 7000, "kernel": 2000, "user": 5000},
                "throttling": {"periods": 4, "throttledPeriods": 1, "throttledTime": 3000}},
        "memory": {"cache": 200, "usage": {"limit": 64 * MiB, "usage": 4096, "failcnt": 3},
                   "swap": {"limit": (1 << 64) - 1, "usage": 4106, "failcnt": 0},
                   "kernel": {"limit": 0, "failcnt": 0}, "kernelTCP": {"limit": 0, "failcnt": 0},
                   "raw": {"anon": 100, "file": 200}},
        "pids": {"current": 2, "limit": 9},
        "blkio": {"ioServiceBytesRecursive": [{"major": 8, "op": "Read", "value": 512},
                                              {"major": 8, "op": "Write"}, {"major": 8, "op": "Discard"}],
                  "ioServicedRecursive": [{"major": 8, "op": "Read", "value": 1},
                                          {"major": 8, "op": "Write"}, {"major": 8, "op": "Discard"}]},
        "hugetlb": {"2MB": {"usage": 2 * MiB, "failcnt": 0}},
    }


def test_v1_blkio_entries_parse():
    text = "8:0 Read 4096\n8:0 Write 0\n8:0 Total 4096\nTotal 4096\n"
    assert manager._blkio_entries(text) == [{"major": 8, "op": "Read", "value": 4096},
                                            {"major": 8, "op": "Write"},
                                            {"major": 8, "op": "Total", "value": 4096}]


# --- device rules -------------------------------------------------------------------------

def R(allow, t="a", mj=-1, mn=-1, acc="rwm"):
    return dev.Rule(allow, t, mj, mn, acc)


def test_parse_rules_and_defaults():
    rules = dev.parse_rules([{"allow": False, "access": "rwm"},
                             {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "wr"},
                             {"allow": True, "type": "b", "major": 8, "access": "r"}])
    assert rules == [R(False), R(True, "c", 1, 3, "rw"), R(True, "b", 8, -1, "r")]
    full = dev.with_defaults(rules)
    assert full[0] == R(False) and full[-1] == R(True, "c", 10, 200)
    assert [r.v1() for r in full[2:5]] == ["c 1:3 rw", "b 8:* r", "c 1:3 rwm"]
    assert R(True, "c", 136, -1).v1() == "c 136:* rwm"


@pytest.mark.parametrize("rules,msg", [
    ("x", "must be a list"), ([{"access": "r"}], r"devices\[0\].allow must be true or false"),
    ([{"allow": True, "type": "u"}], "type must be a, c or b"),
    ([{"allow": True, "type": "c", "major": -2}], "major must be an integer >= -1"),
    ([{"allow": True, "type": "c", "access": "rx"}], "access must be made of r, w and m"),
])
def test_parse_rules_errors(rules, msg):
    with pytest.raises(CgroupError, match=msg):
        dev.parse_rules(rules)


def test_deny_all_spec_still_gets_harmless_devices():
    emu = dev.Emulator.from_rules(dev.with_defaults(dev.parse_rules([{"allow": False, "access": "rwm"}])))
    assert not emu.default_allow
    assert set(emu.exceptions) == {(t, a, b) for t, a, b in dev.ALWAYS_ALLOWED}


def test_emulator_order_and_merging():
    e = dev.Emulator.from_rules([R(False), R(True, "c", 1, 3, "r"), R(True, "c", 1, 3, "w"),
                                 R(False, "c", 1, 3, "r"), R(True, "c", 4, -1, "rwm")])
    assert e.exceptions == {("c", 1, 3): "w", ("c", 4, -1): "rwm"}
    e.apply(R(False, "c", 1, 3, "w"))
    assert ("c", 1, 3) not in e.exceptions
    e.apply(R(True))
    assert e.default_allow and e.exceptions == {}
    e.apply(R(False, "b", 8, 0, "w"))  # deny-list mode: an exception
    assert e.rules() == [R(True), R(False, "b", 8, 0, "w")]


def test_emulator_refuses_punching_holes():
    with pytest.raises(CgroupError, match=r"cannot punch a hole in the wider rule 'c \*:\* rwm'"):
        dev.Emulator.from_rules([R(False), R(True, "c", -1, -1), R(False, "c", 1, 3, "w")])


def test_v1_writes_fresh_and_transition():
    rules = dev.with_defaults([R(True, "b", 8, 0, "r")])
    w = dev.v1_writes(rules)
    assert w[0] == ("devices.deny", "a") and ("devices.allow", "b 8:0 r") in w
    assert all(f == "devices.allow" for f, _ in w[1:])
    cur = dev.Emulator.from_v1_list("c 1:3 rwm\nb 8:0 rw\nc 1:11 r\n")
    tr = dev.v1_writes(dev.with_defaults([R(True, "b", 8, 0, "r"), R(True, "c", 1, 5, "r")]), cur)
    assert tr[:2] == [("devices.deny", "b 8:0 w"), ("devices.deny", "c 1:11 r")]
    assert ("devices.allow", "c 1:5 rwm") in tr and ("devices.allow", "c 1:3 rwm") not in tr
    # allow-all now: exceptions unknown, so the full list from the wildcard
    assert dev.v1_writes(rules, dev.Emulator.from_v1_list("a *:* rwm\n"))[0] == ("devices.deny", "a")
    assert dev.v1_writes([R(True)]) == [("devices.allow", "a")]


def test_bpf_program_instructions():
    prog = dev.bpf_program([R(False), R(True, "c", 1, 3, "r")])
    J, K = bpf.BPF_JMP32 | bpf.BPF_JNE | bpf.BPF_K, bpf.BPF_ALU
    assert prog == [
        bpf.Insn(0x61, 2, 1, 0, 0), bpf.Insn(K | bpf.BPF_AND, 2, 0, 0, 0xFFFF),
        bpf.Insn(0x61, 3, 1, 0, 0), bpf.Insn(K | bpf.BPF_RSH, 3, 0, 0, 16),
        bpf.Insn(0x61, 4, 1, 4, 0), bpf.Insn(0x61, 5, 1, 8, 0),
        bpf.Insn(J, 2, 0, 7, bpf.BPF_DEVCG_DEV_CHAR),              # type != c -> default
        bpf.Insn(0xBC, 1, 3, 0, 0), bpf.Insn(0x54, 1, 0, 0, bpf.BPF_DEVCG_ACC_READ),
        bpf.Insn(bpf.BPF_JMP32 | bpf.BPF_JNE | bpf.BPF_X, 1, 3, 4, 0),  # wants more than r
        bpf.Insn(J, 4, 0, 3, 1), bpf.Insn(J, 5, 0, 2, 3),
        bpf.Insn(0xB4, 0, 0, 0, 1), bpf.Insn(0x95),                   # allow
        bpf.Insn(0xB4, 0, 0, 0, 0), bpf.Insn(0x95),                   # default: deny
    ]
    raw = bpf.encode(prog)
    assert len(raw) == 8 * len(prog)
    assert struct.unpack_from("<BBhi", raw, 6 * 8) == (J, 2, 7, 2)
    assert struct.unpack_from("<BBhi", raw, 9 * 8) == (0x5E, 1 | 3 << 4, 4, 0)


def test_bpf_rwm_and_wildcards_skip_checks():
    prog = dev.bpf_program([R(False), R(True, "c", 136, -1)])
    assert len(prog) == 6 + 1 + 1 + 2 + 2  # type and major only: no access/minor checks


@pytest.mark.parametrize("rules,checks", [
    (dev.with_defaults([]), [("c", 1, 3, "rw", True), ("c", 1, 3, "m", True), ("c", 136, 4, "rw", True),
                             ("c", 1, 11, "r", False), ("b", 8, 0, "r", False), ("c", 10, 200, "rw", True),
                             ("b", 1, 3, "r", False)]),
    ([R(False), R(True, "c", 1, 3, "r"), R(True, "b", 8, -1, "rw")],
     [("c", 1, 3, "r", True), ("c", 1, 3, "w", False), ("c", 1, 3, "rw", False), ("b", 8, 17, "w", True),
      ("b", 8, 17, "m", False), ("b", 9, 0, "r", False)]),
    ([R(True)], [("c", 1, 1, "rwm", True), ("b", 8, 0, "w", True)]),
    ([R(True), R(False, "c", 1, 3, "w"), R(False, "b", -1, -1, "m")],
     [("c", 1, 3, "w", False), ("c", 1, 3, "r", True), ("b", 8, 0, "r", True), ("b", 8, 0, "m", False)]),
    ([R(False), R(True, "c", 4000000000, 1, "r")], [("c", 4000000000, 1, "r", True), ("c", 1, 1, "r", False)]),
])
def test_bpf_program_behaviour(rules, checks):
    prog = dev.bpf_program(rules)
    for t, mj, mn, acc, want in checks:
        assert dev.bpf_simulate(prog, t, mj, mn, acc) is want, (t, mj, mn, acc)
