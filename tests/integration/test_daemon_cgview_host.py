"""CgroupView, reader_view and the renders against REAL v1 memory+cpuset cgroups on this host.

Layout: <memory|cpuset>/isobox-test-<rand> (256 MiB, CPU 1) with a sub-cgroup "inner"
(no limit of its own) holding a `sleep` child. The cgroups are removed and the child is
killed by PID in the fixture finaliser, even when a test fails."""
from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest

from isobox.daemon.fs.cgview import reader_view, view_for_dirs
from isobox.daemon.fs.context import Container, RenderCtx
from isobox.daemon.fs.procfiles import cpu_online, cpuinfo, meminfo, stat

MEM = "/sys/fs/cgroup/memory"
CPUSET = "/sys/fs/cgroup/cpuset"


def _present() -> bool:
    return (os.path.isfile(f"{MEM}/memory.limit_in_bytes") and os.path.isfile(f"{CPUSET}/cpuset.cpus")
            and os.cpu_count() and os.cpu_count() >= 2 and os.geteuid() == 0)


pytestmark = pytest.mark.skipif(not _present(), reason="needs root and v1 memory+cpuset hierarchies, 2 CPUs")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _rmdir_when_empty(path: str) -> None:
    for _ in range(100):  # a killed task leaves the cgroup asynchronously
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
    os.rmdir(path)


@pytest.fixture
def cg():
    name = f"isobox-test-{uuid.uuid4().hex[:8]}"
    top = {"memory": f"{MEM}/{name}", "cpuset": f"{CPUSET}/{name}"}
    inner = {k: f"{v}/inner" for k, v in top.items()}
    made: list[str] = []
    child = None
    try:
        for d in (top["memory"], inner["memory"], top["cpuset"], inner["cpuset"]):
            os.mkdir(d)
            made.append(d)
        _write(f"{top['memory']}/memory.limit_in_bytes", "268435456")
        for d in (top["cpuset"], inner["cpuset"]):  # v1 cpuset needs both before a task can join
            _write(f"{d}/cpuset.cpus", "1")
            _write(f"{d}/cpuset.mems", "0")
        child = subprocess.Popen(["sleep", "60"])
        for d in inner.values():
            _write(f"{d}/cgroup.procs", str(child.pid))
        yield top, inner, child.pid
    finally:
        if child is not None:
            os.kill(child.pid, 9)
            child.wait()
        errors = []
        for d in reversed(made):  # try every dir even if one fails, then report
            try:
                _rmdir_when_empty(d)
            except OSError as e:
                errors.append(e)
        assert not errors, errors


def test_reader_view_resolves_the_readers_own_cgroup(cg):
    top, inner, pid = cg
    root = view_for_dirs({"memory": MEM, "cpuset": CPUSET})
    v = reader_view(pid, root)
    assert v is not None and v.dirs == inner
    assert v.memory_limit() == 268435456  # from the parent: inner has none of its own
    assert v.cpus() == [1]

    container = view_for_dirs(top)
    v2 = reader_view(pid, container)
    assert v2 is not None and v2.dirs == inner and v2.mounts == container.mounts
    assert reader_view(pid, view_for_dirs(inner)) is None        # the reader is in the top itself
    assert reader_view(os.getpid(), container) is None           # outside the container


def test_renders_for_the_real_cgroup(cg):
    top, inner, pid = cg
    v = reader_view(pid, view_for_dirs(top))
    ctx = RenderCtx(Container(key="k", id="t", uid_base=0, gid_base=0, cgroups=top, init_pid=pid), v, reader_pid=pid)
    mem = meminfo.render(ctx).decode().splitlines()
    assert mem[0] == "MemTotal:         262144 kB"
    free_kb = int(mem[1].split()[1])
    assert 0 < free_kb <= 262144
    info = cpuinfo.render(ctx).decode()
    assert [ln for ln in info.splitlines() if ln.startswith("processor")] == ["processor\t: 1"]
    assert cpu_online.render(ctx) == b"1\n"
    names = [ln.split()[0] for ln in stat.render(ctx).decode().splitlines()]
    assert "cpu1" in names and "cpu0" not in names
