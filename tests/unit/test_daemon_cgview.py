"""CgroupView on fake v1 and v2 cgroup trees under tmp_path, and reader_view_from on fake layouts."""
from __future__ import annotations

import os

import pytest

from isobox.cgroups.layout import parse_mountinfo
from isobox.daemon.fs import cgview
from isobox.daemon.fs.cgview import (CgroupView, format_cpu_list, host_meminfo_kb, parse_cpu_list, reader_view,
                                     reader_view_from, view_for_dirs)

MiB = 1 << 20
V1_UNLIMITED = "9223372036854771712"
V1_CTRLS = ("memory", "cpu", "cpuacct", "cpuset", "blkio", "pids")


def write(d, files: dict[str, str]) -> None:
    os.makedirs(d, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)


def v1_tree(root, rel: str = "a/b") -> CgroupView:
    """Empty per-controller v1 hierarchies under root; a view of <ctrl>/<rel>."""
    for c in V1_CTRLS:
        os.makedirs(os.path.join(root, c, rel), exist_ok=True)
    return CgroupView({c: os.path.join(root, c, rel) for c in V1_CTRLS},
                      {c: os.path.join(root, c) for c in V1_CTRLS})


def v2_tree(root, rel: str = "a/b") -> CgroupView:
    """One unified hierarchy at root (every controller maps to the same dir)."""
    d = os.path.join(root, rel)
    os.makedirs(d, exist_ok=True)
    for p in (root, os.path.join(root, "a"), d):
        write(p, {"cgroup.controllers": "cpuset cpu io memory pids\n"})
    keys = ("memory", "cpu", "cpuacct", "cpuset", "io", "pids", "")
    return CgroupView({k: d for k in keys}, {k: str(root) for k in keys})


def host_mem() -> int:
    return host_meminfo_kb()["MemTotal"] * 1024


# -- cpu lists -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,cpus", [("0-1\n", [0, 1]), ("1", [1]), ("0,2-4,7", [0, 2, 3, 4, 7]), ("\n", [])])
def test_cpu_list_round_trip(text, cpus):
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus
    assert format_cpu_list([0, 2, 3, 4, 7]) == "0,2-4,7"


# -- memory ----------------------------------------------------------------------------------

def test_v1_memory_limit_is_min_over_ancestors(tmp_path):
    v = v1_tree(tmp_path)
    m = tmp_path / "memory"
    write(m, {"memory.limit_in_bytes": V1_UNLIMITED})
    write(m / "a", {"memory.limit_in_bytes": str(256 * MiB)})
    write(m / "a/b", {"memory.limit_in_bytes": str(512 * MiB), "memory.usage_in_bytes": str(10 * MiB)})
    assert v.memory_limit() == 256 * MiB
    assert v.memory_usage() == 10 * MiB
    write(m / "a/b", {"memory.limit_in_bytes": str(64 * MiB)})
    assert v.memory_limit() == 64 * MiB


def test_v1_unlimited_or_oversized_limit_is_host_memtotal(tmp_path):
    v = v1_tree(tmp_path)
    write(tmp_path / "memory/a/b", {"memory.limit_in_bytes": V1_UNLIMITED})
    assert v.memory_limit() == host_mem()
    write(tmp_path / "memory/a/b", {"memory.limit_in_bytes": str(host_mem() * 4)})
    assert v.memory_limit() == host_mem()


def test_walk_stops_at_the_mountpoint(tmp_path):
    # A limit above the hierarchy's mountpoint belongs to something else and is ignored.
    write(tmp_path, {"memory.limit_in_bytes": str(MiB)})
    v = v1_tree(tmp_path / "h")
    assert v.memory_limit() == host_mem()


def test_v2_memory_limit_max_and_ancestor(tmp_path):
    v = v2_tree(tmp_path)
    write(tmp_path / "a", {"memory.max": f"{256 * MiB}\n"})
    write(tmp_path / "a/b", {"memory.max": "max\n", "memory.current": f"{3 * MiB}\n"})
    assert v.memory_limit() == 256 * MiB
    assert v.memory_usage() == 3 * MiB


def test_v1_memory_counters_use_hierarchical_keys(tmp_path):
    v = v1_tree(tmp_path)
    write(tmp_path / "memory/a/b", {"memory.stat": "cache 1\nrss 2\ntotal_cache 4096\ntotal_rss 8192\n"
                                                   "total_shmem 1024\ntotal_active_file 2048\n"
                                                   "total_mapped_file 512\ntotal_rss_huge 0\n"})
    st = v.memory_stat()
    assert st["cache"] == 1 and st["total_cache"] == 4096
    c = v.memory_counters()
    assert (c["file"], c["anon"], c["shmem"], c["active_file"], c["file_mapped"]) == (4096, 8192, 1024, 2048, 512)


def test_v1_swap_is_memsw_minus_mem(tmp_path):
    v = v1_tree(tmp_path)
    write(tmp_path / "memory/a", {"memory.limit_in_bytes": str(256 * MiB),
                                  "memory.memsw.limit_in_bytes": str(384 * MiB)})
    write(tmp_path / "memory/a/b", {"memory.limit_in_bytes": V1_UNLIMITED, "memory.memsw.limit_in_bytes": V1_UNLIMITED,
                                    "memory.usage_in_bytes": str(100 * MiB),
                                    "memory.memsw.usage_in_bytes": str(110 * MiB)})
    assert v.swap_accounted()
    assert v.swap_max() == 128 * MiB
    assert v.swap_usage() == 10 * MiB
    host_swap = host_meminfo_kb()["SwapTotal"] * 1024
    assert v.swap_limit() == min(128 * MiB, host_swap)


def test_v2_swap_and_unaccounted(tmp_path):
    v = v2_tree(tmp_path)
    assert not v.swap_accounted() and v.swap_limit() is None and v.swap_usage() is None
    write(tmp_path / "a/b", {"memory.swap.max": f"{32 * MiB}\n", "memory.swap.current": f"{MiB}\n"})
    write(tmp_path / "a", {"memory.swap.max": f"{16 * MiB}\n"})
    assert v.swap_max() == 16 * MiB and v.swap_usage() == MiB


# -- cpu -------------------------------------------------------------------------------------

def test_v1_cpuset_and_quota(tmp_path):
    v = v1_tree(tmp_path)
    write(tmp_path / "cpuset", {"cpuset.cpus": "0-1\n"})
    write(tmp_path / "cpuset/a/b", {"cpuset.cpus": "1\n"})
    assert v.cpus() == [1]
    write(tmp_path / "cpuset/a/b", {"cpuset.cpus": "\n"})  # empty: walk up to the nearest set one
    assert v.cpus() == [0, 1]
    write(tmp_path / "cpu/a/b", {"cpu.cfs_quota_us": "150000\n", "cpu.cfs_period_us": "100000\n"})
    assert v.cpu_quota() == 1.5 and v.cpus() == [0, 1]
    write(tmp_path / "cpu/a", {"cpu.cfs_quota_us": "50000\n", "cpu.cfs_period_us": "100000\n"})
    assert v.cpu_quota() == 0.5 and v.cpus() == [0]
    write(tmp_path / "cpu/a", {"cpu.cfs_quota_us": "-1\n"})
    assert v.cpus() == [0, 1]


def test_v2_cpuset_effective_and_cpu_max(tmp_path):
    v = v2_tree(tmp_path)
    write(tmp_path / "a/b", {"cpuset.cpus": "", "cpuset.cpus.effective": "2-5\n", "cpu.max": "max 100000\n"})
    assert v.cpu_quota() is None and v.cpus() == [2, 3, 4, 5]
    write(tmp_path / "a", {"cpu.max": "250000 100000\n"})
    assert v.cpus() == [2, 3, 4]


def test_v1_cpu_usage(tmp_path):
    v = v1_tree(tmp_path)
    d = tmp_path / "cpuacct/a/b"
    write(d, {"cpuacct.usage_all": "cpu user system\n0 100 10\n1 200 20\n", "cpuacct.usage": "330\n"})
    assert v.cpu_usage_percpu() == {0: (100, 10), 1: (200, 20)}
    assert v.cpu_usage() == (300, 30) and v.cpu_busy_ns() == 330
    os.unlink(d / "cpuacct.usage_all")
    write(d, {"cpuacct.usage_percpu_user": "5 6 \n", "cpuacct.usage_percpu_sys": "1 2 \n"})
    assert v.cpu_usage_percpu() == {0: (5, 1), 1: (6, 2)}


def test_v2_cpu_usage(tmp_path):
    v = v2_tree(tmp_path)
    write(tmp_path / "a/b", {"cpu.stat": "usage_usec 3000\nuser_usec 2000\nsystem_usec 1000\nnr_periods 0\n"})
    assert v.cpu_usage_percpu() is None
    assert v.cpu_usage() == (2_000_000, 1_000_000) and v.cpu_busy_ns() == 3_000_000


# -- io and tasks ----------------------------------------------------------------------------

def test_v1_blkio_throttle_recursive(tmp_path):
    v = v1_tree(tmp_path)
    write(tmp_path / "blkio/a/b", {
        "blkio.throttle.io_serviced_recursive": "8:0 Read 3\n8:0 Write 4\n8:0 Discard 0\n8:0 Total 7\nTotal 7\n",
        "blkio.throttle.io_service_bytes_recursive": "8:0 Read 4096\n8:0 Write 8192\nTotal 12288\n"})
    st = v.io_stats()[(8, 0)]
    assert (st["rios"], st["wios"], st["rbytes"], st["wbytes"], st["rticks"]) == (3, 4, 4096, 8192, 0)


def test_v2_io_stat(tmp_path):
    v = v2_tree(tmp_path)
    write(tmp_path / "a/b", {"io.stat": "254:0 rbytes=512 wbytes=1024 rios=1 wios=2 dbytes=0 dios=0\n"})
    assert v.io_stats() == {(254, 0): {"rbytes": 512, "wbytes": 1024, "rios": 1, "wios": 2, "dbytes": 0, "dios": 0}}


def test_threads_and_procs_walk_the_subtree(tmp_path):
    v = v1_tree(tmp_path, "a")
    write(tmp_path / "pids/a", {"tasks": "10\n11\n", "cgroup.procs": "10\n"})
    write(tmp_path / "pids/a/x", {"tasks": "20\n", "cgroup.procs": "20\n"})
    write(tmp_path / "pids/a/x/y", {"tasks": "30\n31\n", "cgroup.procs": "30\n"})
    write(tmp_path / "pids", {"tasks": "1\n"})  # above the view: not counted
    assert v.threads() == [10, 11, 20, 30, 31]
    assert v.procs() == [10, 20, 30]


# -- reader views ----------------------------------------------------------------------------

def hybrid_layout(root):
    lines = [f"{30 + i} 1 0:{30 + i} / {root}/{c} rw - cgroup cgroup rw,{c}" for i, c in enumerate(V1_CTRLS)]
    lines.append(f"50 1 0:50 / {root}/unified rw - cgroup2 cgroup2 rw")
    return parse_mountinfo("\n".join(lines) + "\n")


def test_reader_below_top_gets_its_own_dirs(tmp_path):
    layout = hybrid_layout(tmp_path)
    top = view_for_dirs({"memory": f"{tmp_path}/memory/ctr", "cpuset": f"{tmp_path}/cpuset/ctr",
                         "cpu": f"{tmp_path}/cpu/ctr", "": f"{tmp_path}/unified/ctr"}, layout)
    assert top.mounts["memory"] == f"{tmp_path}/memory" and top.mounts[""] == f"{tmp_path}/unified"
    text = "9:memory:/ctr/inner\n3:cpuset:/ctr/inner/deeper\n2:cpu:/elsewhere\n0::/ctr/inner\n"
    v = reader_view_from(text, top, layout)
    assert v is not None
    assert v.dirs["memory"] == f"{tmp_path}/memory/ctr/inner"
    assert v.dirs["cpuset"] == f"{tmp_path}/cpuset/ctr/inner/deeper"
    assert v.dirs["cpu"] == f"{tmp_path}/cpu/ctr"  # outside top for cpu: keeps the container's
    assert v.dirs[""] == f"{tmp_path}/unified/ctr/inner"
    assert v.mounts == top.mounts


def test_reader_in_top_or_outside_gets_none(tmp_path):
    layout = hybrid_layout(tmp_path)
    top = view_for_dirs({"memory": f"{tmp_path}/memory/ctr"}, layout)
    assert reader_view_from("9:memory:/ctr\n", top, layout) is None
    assert reader_view_from("9:memory:/other/ctr/x\n", top, layout) is None
    assert reader_view_from("9:memory:/ctr2/x\n", top, layout) is None  # a sibling sharing a prefix


def test_reader_view_pure_v2(tmp_path):
    layout = parse_mountinfo(f"30 21 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n")
    d = f"{tmp_path}/ctr"
    top = view_for_dirs({k: d for k in ("memory", "cpu", "cpuset", "io", "")}, layout)
    v = reader_view_from("0::/ctr/sub\n", top, layout)
    assert v is not None and set(v.dirs.values()) == {f"{d}/sub"}
    assert reader_view_from("0::/ctr\n", top, layout) is None


def test_reader_view_of_this_process_outside_a_fake_top(tmp_path):
    # The live path: /proc/self/cgroup with the host layout; we are not below tmp_path.
    top = CgroupView({"memory": str(tmp_path / "x")}, {"memory": str(tmp_path)})
    assert reader_view(os.getpid(), top) is None
    assert reader_view(2 ** 22 + 12345, top) is None  # no such pid
    assert cgview._layout() is cgview._layout()
