"""A privileged container's cgroup: limits on the host, a namespaced view inside, a
delegated sub-tree the container may build on but not raise limits through, and nothing
left behind after delete.

Containers are started with `create` + `start` and their stdout written to a file, so the
host can inspect the cgroup while the container is still running; the `runtime` fixture
deletes them even when a test fails.
"""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from conftest import RUNC, leftovers
from isobox.cgroups.layout import CgroupError, detect
from isobox.linux.capabilities import NAMES

MiB = 1 << 20
LIMIT = 256 * MiB
RESOURCES = {"memory": {"limit": LIMIT}, "cpu": {"quota": 50000, "period": 100000, "cpus": "1"},
             "pids": {"limit": 64}}


def _layout_or_reason():
    if os.geteuid() != 0:
        return None, "needs root"
    try:
        layout = detect()
    except CgroupError as e:
        return None, str(e)
    for c in ("memory", "cpu", "cpuset", "pids"):
        h = layout.hierarchy(c)
        if h is None or h.version != 1:
            return None, f"no v1 {c} hierarchy on this host"
    if len(os.sched_getaffinity(0)) < 2 or 1 not in os.sched_getaffinity(0):
        return None, "needs CPU 1"
    return layout, ""


LAYOUT, _WHY = _layout_or_reason()
pytestmark = pytest.mark.skipif(LAYOUT is None, reason=_WHY)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _host(controller: str, cg_path: str, *rest: str) -> str:
    h = LAYOUT.hierarchy(controller)
    return os.path.join(h.mountpoint, cg_path.lstrip("/"), *rest)


def _privileged(cg_path: str, resources: dict = RESOURCES):
    def edit(spec: dict) -> None:
        spec["process"]["capabilities"] = {k: list(NAMES) for k in
                                           ("bounding", "effective", "permitted", "inheritable", "ambient")}
        spec["process"]["noNewPrivileges"] = False
        spec["linux"]["cgroupsPath"] = cg_path
        spec["linux"]["resources"].update(resources)
    return edit


def _wait_for(path: str, marker: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = open(path).read() if os.path.exists(path) else ""
        if marker in text:
            return text
        if "ABORT" in text:
            break
        time.sleep(0.05)
    err = open(path + ".err").read() if os.path.exists(path + ".err") else ""
    raise AssertionError(f"{marker!r} not seen (timeout {timeout}s); output so far:\n{text}\nstderr:\n{err}")


def _start(runtime, busybox_rootfs, script: str) -> tuple[str, str, str]:
    """create + start a privileged container running script; (id, cgroup path, out file)."""
    cid = runtime.new_id()
    cg_path = f"/isobox/{cid}"
    bundle = runtime.bundle(busybox_rootfs, ["sh", "-c", script], edit=_privileged(cg_path))
    out = os.path.join(runtime.tmp, f"{cid}.out")
    err = out + ".err"
    # Files, not pipes: the container inherits create's stdio and keeps it open.
    with open(out, "w") as f, open(err, "w") as e:
        r = subprocess.run([*RUNC, "--root", runtime.root, "create", "--bundle", bundle, cid],
                           stdin=subprocess.DEVNULL, stdout=f, stderr=e, timeout=60)
    assert r.returncode == 0, open(err).read()
    return cid, cg_path, out


def _all_dirs(cg_path: str) -> list[str]:
    """The container's cgroup dir in every hierarchy that still has it, sub-cgroups included."""
    found = []
    for h in LAYOUT.hierarchies:
        top = os.path.join(h.mountpoint, cg_path.lstrip("/"))
        for dirpath, _dirs, _files in os.walk(top):
            found.append(dirpath)
    return found


INSIDE = r"""
echo "CG-BEGIN"; cat /proc/self/cgroup; echo "CG-END"
echo "LS: $(ls /sys/fs/cgroup | tr '\n' ' ')"
echo "FSTYPE-memory: $(awk '$5 == "/sys/fs/cgroup/memory" {for (i = 7; i <= NF; i++) if ($i == "-") print $(i+1)}' /proc/self/mountinfo)"
echo "LIMIT: $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
mkdir /sys/fs/cgroup/memory/sub && echo "MKDIR: ok"
echo $$ > /sys/fs/cgroup/memory/sub/cgroup.procs && echo "JOIN: ok"
echo "SELF-memory: $(grep ':memory:' /proc/self/cgroup)"
if echo 999999999999 > /sys/fs/cgroup/memory/memory.limit_in_bytes; then echo "RAISE: ok"; else echo "RAISE: failed"; fi
echo "LIMIT-AFTER: $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
echo DONE
exec sleep 1000
"""


def _lines(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (l.partition(":") for l in text.splitlines()) if k.isupper() or "-" in k}


def test_limits_view_delegation_and_cleanup(runtime, busybox_rootfs):
    cid, cg, out = _start(runtime, busybox_rootfs, INSIDE)

    # Host side, before start: the limits are in place.
    assert _read(_host("memory", cg, "memory.limit_in_bytes")) == str(LIMIT)
    assert _read(_host("cpu", cg, "cpu.cfs_quota_us")) == "50000"
    assert _read(_host("cpu", cg, "cpu.cfs_period_us")) == "100000"
    assert _read(_host("cpuset", cg, "cpuset.cpus")) == "1"
    assert _read(_host("pids", cg, "pids.max")) == "64"
    # Delegated: the dir and cgroup.procs belong to container root, the limit files do not.
    st = runtime("state", cid, check=True)
    assert '"created"' in st.stdout
    mem_dir = _host("memory", cg)
    base = os.stat(mem_dir).st_uid
    assert base >= 1048576
    assert os.stat(os.path.join(mem_dir, "cgroup.procs")).st_uid == base
    assert os.stat(os.path.join(mem_dir, "memory.limit_in_bytes")).st_uid == 0

    runtime("start", cid, check=True)
    text = _wait_for(out, "DONE")
    cgroup_lines = text.split("CG-BEGIN\n", 1)[1].split("CG-END", 1)[0].split()
    assert cgroup_lines, text
    # Every hierarchy, v1 and the unified one, is rooted at the container's cgroup.
    assert all(l.split(":", 2)[2] == "/" for l in cgroup_lines), cgroup_lines
    assert any(":memory:" in l for l in cgroup_lines) and "0::/" in cgroup_lines
    kv = _lines(text)
    mounted = kv["LS"].split()
    for name in ("memory", "pids", "cpu", "cpuset"):
        assert name in mounted, mounted
    assert kv["FSTYPE-memory"] == "cgroup"
    assert kv["LIMIT"] == str(LIMIT)
    assert kv["MKDIR"] == "ok" and kv["JOIN"] == "ok", text
    assert kv["SELF-memory"].endswith(":memory:/sub"), text
    assert kv["RAISE"] == "failed", text
    assert kv["LIMIT-AFTER"] == str(LIMIT)

    # Host side, while running: the sub-cgroup exists below the container's, limit unchanged.
    sub = os.path.join(mem_dir, "sub")
    assert os.path.isdir(sub)
    assert _read(os.path.join(sub, "cgroup.procs")).split(), "the shell moved into sub is not there"
    assert _read(os.path.join(mem_dir, "memory.limit_in_bytes")) == str(LIMIT)

    runtime("delete", "--force", cid, check=True)
    assert _all_dirs(cg) == []
    assert not os.path.exists(sub)
    assert leftovers(cid) == []


KILL_ALL = r"""
for c in pids memory cpu; do mkdir /sys/fs/cgroup/$c/sub || { echo ABORT; exit 1; }; done
sh -c 'for c in pids memory cpu; do echo $$ > /sys/fs/cgroup/$c/sub/cgroup.procs || exit 1; done; exec sleep 1000' &
while ! grep -q . /sys/fs/cgroup/pids/sub/cgroup.procs; do sleep 0.05; done
echo DONE
exec sleep 1000
"""


def test_kill_all_reaches_sub_cgroup(runtime, busybox_rootfs):
    cid, cg, out = _start(runtime, busybox_rootfs, KILL_ALL)
    runtime("start", cid, check=True)
    _wait_for(out, "DONE")
    sub_pids = [int(p) for p in _read(_host("pids", cg, "sub", "cgroup.procs")).split()]
    assert len(sub_pids) == 1
    (victim,) = sub_pids
    with open(f"/proc/{victim}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[0] == b"sleep"
    init = int(_read(_host("pids", cg, "cgroup.procs")).split()[0])
    assert init != victim

    r = runtime("kill", "--all", cid, "KILL")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 10
    # SIGKILL is delivered at once, but each process leaves cgroup.procs only when its exit
    # runs: wait for both cgroups (CI once saw init still listed right after sub emptied)
    while time.monotonic() < deadline and (_read(_host("pids", cg, "sub", "cgroup.procs"))
                                           or _read(_host("pids", cg, "cgroup.procs"))):
        time.sleep(0.05)
    assert _read(_host("pids", cg, "sub", "cgroup.procs")) == ""
    assert _read(_host("pids", cg, "cgroup.procs")) == ""

    runtime("delete", "--force", cid, check=True)
    assert _all_dirs(cg) == []
    assert leftovers(cid) == []


def test_concurrent_runs_share_and_then_remove_the_parent_cgroup(runtime, busybox_rootfs):
    """Deletes remove the empty /isobox parent while other creates need it: creates retry."""
    import subprocess
    from conftest import RUNC
    b = runtime.bundle(busybox_rootfs, ["true"])
    script = ("for i in 1 2 3 4 5; do " + " ".join(RUNC) + f" --root {runtime.root} run --bundle {b} p$$-$i "
              "|| exit 1; done")
    procs = [subprocess.Popen(["sh", "-c", script]) for _ in range(4)]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0, 0, 0]
    leftover = [h for h in os.listdir("/sys/fs/cgroup") if os.path.isdir(f"/sys/fs/cgroup/{h}/isobox")]
    assert leftover == [], "the shared /isobox parent should go with the last container"
