"""Each procfiles render() on fake v1/v2 cgroup trees, checked against computed values."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from isobox.daemon.fs.cgview import host_file
from isobox.daemon.fs.context import Container, RenderCtx, boottime
from isobox.daemon.fs.loadavg import EXP_1, FIXED_1, LoadTracker, calc_load
from isobox.daemon.fs.procfiles import (cpu_online, cpuinfo, diskstats, loadavg, meminfo, stat, swaps,
                                        uptime)

from unit.test_daemon_cgview import MiB, V1_UNLIMITED, v1_tree, v2_tree, write

TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def ctx_for(view, init_pid: int = 0, created: float = 0.0, loads=None) -> RenderCtx:
    c = Container(key="k", id="c1", uid_base=100000, gid_base=100000, cgroups=dict(view.dirs),
                  init_pid=init_pid, created=created)
    return RenderCtx(container=c, view=view, loads=loads)


def lines(b: bytes) -> dict[str, str]:
    return {ln.partition(":")[0]: ln for ln in b.decode().splitlines()}


# -- meminfo ---------------------------------------------------------------------------------

def test_meminfo_v1_256mib(tmp_path):
    v = v1_tree(tmp_path)
    write(tmp_path / "memory/a", {"memory.limit_in_bytes": str(256 * MiB)})
    write(tmp_path / "memory/a/b", {
        "memory.limit_in_bytes": V1_UNLIMITED, "memory.usage_in_bytes": str(56 * MiB),
        "memory.stat": f"total_cache {20 * MiB}\ntotal_rss {30 * MiB}\ntotal_shmem {MiB}\n"
                       f"total_active_file {8 * MiB}\ntotal_inactive_file {4 * MiB}\n"
                       f"total_active_anon {25 * MiB}\ntotal_inactive_anon {6 * MiB}\ntotal_mapped_file {2 * MiB}\n"})
    out = meminfo.render(ctx_for(v))
    m = lines(out)
    assert m["MemTotal"] == "MemTotal:         262144 kB"
    assert m["MemFree"] == "MemFree:          204800 kB"      # 256 - 56 MiB
    assert m["MemAvailable"] == "MemAvailable:     217088 kB"  # free + active_file + inactive_file
    assert m["Cached"] == "Cached:            20480 kB"
    assert m["Buffers"] == "Buffers:               0 kB"
    assert m["Active"] == "Active:            33792 kB"        # 25 + 8 MiB
    assert m["Inactive(anon)"] == "Inactive(anon):     6144 kB"
    assert m["AnonPages"] == "AnonPages:         30720 kB"
    assert m["Shmem"] == "Shmem:              1024 kB"
    host = host_file("/proc/meminfo").splitlines()
    assert len(out.decode().splitlines()) == len(host)
    vmalloc = next(ln for ln in host if ln.startswith("VmallocTotal:"))
    assert m["VmallocTotal"] == vmalloc  # not computed: passes through
    assert "SwapTotal" in m  # host line kept when swap is not accounted


def test_meminfo_v2_slab_and_swap(tmp_path):
    v = v2_tree(tmp_path)
    write(tmp_path / "a/b", {"memory.max": f"{128 * MiB}\n", "memory.current": f"{28 * MiB}\n",
                             "memory.swap.max": "0\n", "memory.swap.current": "0\n",
                             "memory.stat": f"anon {10 * MiB}\nfile {12 * MiB}\nslab {4 * MiB}\n"
                                            f"slab_reclaimable {3 * MiB}\nslab_unreclaimable {MiB}\n"
                                            f"active_file {2 * MiB}\ninactive_file {MiB}\n"})
    m = lines(meminfo.render(ctx_for(v)))
    assert m["MemTotal"] == "MemTotal:         131072 kB"
    assert m["MemAvailable"] == "MemAvailable:     108544 kB"  # 100 MiB free + 3 file + 3 slab_reclaimable
    assert m["SReclaimable"] == "SReclaimable:       3072 kB"
    assert m["AnonPages"] == "AnonPages:         10240 kB"
    assert m["SwapTotal"] == "SwapTotal:             0 kB"
    assert m["SwapFree"] == "SwapFree:              0 kB"


def test_meminfo_line_format_for_wide_values():
    assert meminfo.line("VmallocTotal", 34359738367) == "VmallocTotal:   34359738367 kB"


# -- cpuinfo, stat, online -------------------------------------------------------------------

def two_cpu_host() -> bool:
    return "cpu1 " in host_file("/proc/stat")


@pytest.fixture
def cpuset1(tmp_path):
    if not two_cpu_host():
        pytest.skip("needs a host with CPU 1")
    v = v1_tree(tmp_path)
    write(tmp_path / "cpuset", {"cpuset.cpus": "0-1\n"})
    write(tmp_path / "cpuset/a/b", {"cpuset.cpus": "1\n"})
    write(tmp_path / "cpuacct/a/b", {"cpuacct.usage_all": f"cpu user system\n0 {5 * TICK_NS} 0\n"
                                                          f"1 {300 * TICK_NS} {100 * TICK_NS}\n",
                                     "cpuacct.usage": f"{405 * TICK_NS}\n"})
    return v


def test_cpuinfo_keeps_only_allowed_blocks_with_real_numbers(cpuset1):
    out = cpuinfo.render(ctx_for(cpuset1)).decode()
    procs = [ln for ln in out.splitlines() if ln.startswith("processor")]
    assert procs == ["processor\t: 1"]
    assert out.endswith("\n\n")


def test_cpuinfo_filter_pure():
    text = "processor\t: 0\nx\t: a\n\nprocessor\t: 1\nx\t: b\n\nprocessor\t: 2\nx\t: c\n\n"
    assert cpuinfo.filter_cpuinfo(text, [0, 2]) == "processor\t: 0\nx\t: a\n\nprocessor\t: 2\nx\t: c\n\n"


def test_stat_cpuset1(cpuset1):
    out = stat.render(ctx_for(cpuset1)).decode().splitlines()
    names = [ln.split()[0] for ln in out]
    assert "cpu1" in names and "cpu0" not in names
    assert out[0].startswith("cpu  ")
    cpu1 = next(ln for ln in out if ln.startswith("cpu1 ")).split()
    assert cpu1[1:3] == ["300", "0"] and cpu1[3] == "100"
    assert out[0].split()[1:4] == cpu1[1:4]  # the aggregate is the sum of the one CPU
    for key in ("intr", "ctxt", "btime", "processes", "procs_running"):
        assert key in names


def test_stat_rows_idle_formula(cpuset1):
    host = "cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\ncpu1 1000 10 500 7000 20 5 5 0 0 0\nctxt 1\n"
    rows = stat.cpu_rows(cpuset1, host)
    # idle = host idle + (host busy 1540 - cgroup busy 400)
    assert rows == {1: [300, 0, 100, 7000 + 1540 - 400, 0, 0, 0, 0, 0, 0]}


def test_stat_v2_spreads_usage(tmp_path):
    if not two_cpu_host():
        pytest.skip("needs a host with CPU 1")
    v = v2_tree(tmp_path)
    write(tmp_path / "a/b", {"cpuset.cpus.effective": "0-1\n",
                             "cpu.stat": f"usage_usec 4000000\nuser_usec {3 * 10**6 + 10**4}\nsystem_usec 1000000\n"})
    host = "cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 1000 0 1000 5000 0 0 0 0 0 0\ncpu1 1000 0 1000 5000 0 0 0 0 0 0\n"
    rows = stat.cpu_rows(v, host)
    user = (3 * 10**9 + 10**7) // TICK_NS
    assert rows[0][0] + rows[1][0] == user and abs(rows[0][0] - rows[1][0]) <= 1
    assert rows[0][2] == rows[1][2] == 10**9 // TICK_NS // 2


def test_cpu_online(cpuset1, tmp_path):
    assert cpu_online.render(ctx_for(cpuset1)) == b"1\n"
    write(tmp_path / "cpuset/a/b", {"cpuset.cpus": "0-1\n"})
    write(tmp_path / "cpu/a/b", {"cpu.cfs_quota_us": "150000\n", "cpu.cfs_period_us": "100000\n"})
    assert cpu_online.render(ctx_for(cpuset1)) == b"0-1\n"
    assert len([ln for ln in cpuinfo.render(ctx_for(cpuset1)).decode().splitlines()
                if ln.startswith("processor")]) == 2
    write(tmp_path / "cpu/a/b", {"cpu.cfs_quota_us": "100000\n"})
    assert cpu_online.render(ctx_for(cpuset1)) == b"0\n"


# -- uptime ----------------------------------------------------------------------------------

def test_uptime_from_a_real_init(tmp_path):
    v = v1_tree(tmp_path)
    write(tmp_path / "cpuacct/a/b", {"cpuacct.usage": "500000000\n"})  # 0.5 s busy
    child = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(1.2)
        up, idle = (float(x) for x in uptime.render(ctx_for(v, init_pid=child.pid)).split())
        assert 1.0 <= up < 5.0
        assert idle == pytest.approx(max(0.0, up - 0.5), abs=0.011)
        assert uptime.render(ctx_for(v, init_pid=child.pid)).decode().count(".") == 2
    finally:
        child.kill()
        child.wait()
    # init gone: fall back to the registration time
    up, _ = (float(x) for x in uptime.render(ctx_for(v, init_pid=child.pid, created=boottime() - 100)).split())
    assert 99.9 <= up < 105


# -- swaps -----------------------------------------------------------------------------------

def test_swaps_header_only_without_swap(tmp_path):
    v = v2_tree(tmp_path)
    assert swaps.render(ctx_for(v)) == swaps.HEADER.encode()  # not accounted
    write(tmp_path / "a/b", {"memory.swap.max": "0\n", "memory.swap.current": "0\n"})
    assert swaps.render(ctx_for(v)) == swaps.HEADER.encode()  # no swap allowed


def test_swaps_line_format():
    assert swaps.swap_line(131072, 1024) == "none" + " " * 36 + "virtual\t131072\t\t1024\t\t0\n"
    assert swaps.swap_line(20_000_000, 0) == "none" + " " * 36 + "virtual\t20000000\t0\t\t0\n"


# -- diskstats -------------------------------------------------------------------------------

def some_block_device() -> tuple[int, int, str]:
    for ent in sorted(os.listdir("/sys/dev/block")):
        with open(f"/sys/dev/block/{ent}/uevent") as f:
            name = next((ln.strip()[8:] for ln in f if ln.startswith("DEVNAME=")), None)
        if name:
            maj, mnr = ent.split(":")
            return int(maj), int(mnr), name
    pytest.skip("no block devices")


def test_diskstats_v1(tmp_path):
    maj, mnr, name = some_block_device()
    v = v1_tree(tmp_path)
    write(tmp_path / "blkio/a/b", {
        "blkio.throttle.io_serviced_recursive": f"{maj}:{mnr} Read 3\n{maj}:{mnr} Write 4\n"
                                                f"{maj}:{mnr} Total 7\n1:2 Read 0\nTotal 7\n",
        "blkio.throttle.io_service_bytes_recursive": f"{maj}:{mnr} Read 4096\n{maj}:{mnr} Write 8192\nTotal 1\n"})
    out = diskstats.render(ctx_for(v)).decode()
    assert out == f"{maj:4d} {mnr:7d} {name} 3 0 8 0 4 0 16 0 0 0 0 0 0 0 0 0 0\n"  # zero-stat 1:2 omitted


def test_diskstats_v2(tmp_path):
    maj, mnr, name = some_block_device()
    v = v2_tree(tmp_path)
    write(tmp_path / "a/b", {"io.stat": f"{maj}:{mnr} rbytes=1024 wbytes=0 rios=2 wios=0 dbytes=512 dios=1\n"})
    assert diskstats.render(ctx_for(v)).decode().split()[3:] == \
        ["2", "0", "2", "0", "0", "0", "0", "0", "0", "0", "0", "1", "0", "1", "0", "0", "0"]


# -- loadavg ---------------------------------------------------------------------------------

def test_calc_load_matches_the_kernel():
    assert calc_load(0, EXP_1, FIXED_1) == 164           # 0.08 after one 5 s tick with one runner
    assert calc_load(FIXED_1, EXP_1, FIXED_1) == FIXED_1  # steady state stays at 1.00
    assert calc_load(FIXED_1, EXP_1, 0) == 1884


def test_loadavg_counts_and_decays(tmp_path):
    v = v1_tree(tmp_path)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        for _ in range(100):  # wait until it is really asleep
            with open(f"/proc/{sleeper.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "S":
                    break
            time.sleep(0.01)
        me = os.getpid()  # reading our own /proc stat, we are running (R)
        write(tmp_path / "pids/a/b", {"tasks": f"{me}\n{sleeper.pid}\n"})
        t = LoadTracker()
        last = max(me, sleeper.pid)
        assert loadavg.render(ctx_for(v, loads=t)) == f"0.00 0.00 0.00 1/2 {last}\n".encode()
        assert t.keys() == [v.key]
        t.sample()
        assert t.render(v.key, v) == f"0.08 0.02 0.01 1/2 {last}\n".encode()
        t.untrack(v.key)
        assert t.keys() == []
        t.track(v.key, v)
        t.untrack_below(os.path.dirname(v.key))  # the container's dir above the reader's
        assert t.keys() == []
    finally:
        sleeper.kill()
        sleeper.wait()
