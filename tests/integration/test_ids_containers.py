"""Host ID ranges of real containers: exclusive under concurrency, shared when a user
namespace is joined, reclaimed by gc after a crash, and explicit spec mappings honored.

Containers are made with `create` (their init waits at the start barrier inside its user
namespace), stdio to files so nothing waits on a pipe the init keeps open. The `runtime`
fixture deletes every container even when a test fails.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import RUNC, ids_held, leftovers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

EXPLICIT_BASE = 3000000000  # outside the isobox pool (1048576 + 268435456)


def _cmd(runtime, *args: str) -> list[str]:
    return [*RUNC, "--root", runtime.root, *args]


def _popen_create(runtime, bundle: str, cid: str) -> tuple[subprocess.Popen, str]:
    err = os.path.join(runtime.tmp, f"{cid}.err")
    with open(os.path.join(runtime.tmp, f"{cid}.out"), "w") as o, open(err, "w") as e:
        p = subprocess.Popen(_cmd(runtime, "create", "--bundle", bundle, cid),
                             stdin=subprocess.DEVNULL, stdout=o, stderr=e)
    return p, err


def _create(runtime, bundle: str) -> str:
    cid = runtime.new_id()
    p, err = _popen_create(runtime, bundle, cid)
    assert p.wait(timeout=60) == 0, open(err).read()
    return cid


def _pid(runtime, cid: str) -> int:
    st = json.loads(runtime("state", cid, check=True).stdout)
    assert st["pid"] > 0, st
    return st["pid"]


def _uid_map(pid: int) -> list[int]:
    with open(f"/proc/{pid}/uid_map") as f:
        lines = f.read().split("\n")
    rows = [list(map(int, l.split())) for l in lines if l.strip()]
    assert len(rows) == 1, rows
    return rows[0]


def _gid_map(pid: int) -> list[int]:
    with open(f"/proc/{pid}/gid_map") as f:
        return [int(x) for x in f.read().split()]


def _sleeper(runtime, rootfs: str, edit=None) -> str:
    return runtime.bundle(rootfs, ["sleep", "1000"], edit=edit)


def test_concurrent_creates_get_disjoint_ranges(runtime, busybox_rootfs):
    cids = [runtime.new_id(), runtime.new_id()]
    bundles = [_sleeper(runtime, busybox_rootfs) for _ in cids]
    started = [_popen_create(runtime, b, c) for b, c in zip(bundles, cids)]  # both at once
    for p, err in started:
        assert p.wait(timeout=60) == 0, open(err).read()
    maps = [_uid_map(_pid(runtime, c)) for c in cids]
    for inside, base, size in maps:
        assert inside == 0 and size == 65536 and base >= 1048576
    (_, a, n), (_, b, m) = maps
    assert a + n <= b or b + m <= a, f"overlapping ranges {maps}"
    held = dict((h.container_id, base) for h, base in ids_held(runtime.root))
    assert held == {cids[0]: a, cids[1]: b}

    for c in cids:
        runtime("delete", "--force", c, check=True)
    assert ids_held(runtime.root) == []
    for c in cids:
        assert leftovers(c) == []


def test_joining_network_namespace_shares_user_namespace_and_range(runtime, busybox_rootfs):
    first = _create(runtime, _sleeper(runtime, busybox_rootfs))
    pid1 = _pid(runtime, first)

    def join_net(spec: dict) -> None:
        for ns in spec["linux"]["namespaces"]:
            if ns["type"] == "network":
                ns["path"] = f"/proc/{pid1}/ns/net"
        assert {"type": "user"} in spec["linux"]["namespaces"]  # no path given for user

    second = _create(runtime, _sleeper(runtime, busybox_rootfs, edit=join_net))
    pid2 = _pid(runtime, second)
    for ns in ("user", "net"):
        assert os.stat(f"/proc/{pid1}/ns/{ns}").st_ino == os.stat(f"/proc/{pid2}/ns/{ns}").st_ino, ns
    assert os.stat(f"/proc/{pid1}/ns/pid").st_ino != os.stat(f"/proc/{pid2}/ns/pid").st_ino
    assert _uid_map(pid1) == _uid_map(pid2)
    base = _uid_map(pid1)[1]
    held = sorted((h.container_id, b) for h, b in ids_held(runtime.root))
    assert held == sorted([(first, base), (second, base)])

    runtime("delete", "--force", first, check=True)
    assert [(h.container_id, b) for h, b in ids_held(runtime.root)] == [(second, base)]
    assert _uid_map(pid2) == [0, base, 65536]  # the second lives on in the shared namespace

    runtime("delete", "--force", second, check=True)
    assert ids_held(runtime.root) == []
    assert leftovers(first) == [] and leftovers(second) == []


def _into(ns_paths: dict):
    """A spec edit: join the namespaces at these paths, by OCI type."""
    def edit(spec: dict) -> None:
        for ns in spec["linux"]["namespaces"]:
            if ns["type"] in ns_paths:
                ns["path"] = ns_paths[ns["type"]]
    return edit


def test_namespaces_of_several_containers_of_one_user_namespace_can_be_joined(runtime, busybox_rootfs):
    """A pod's containers share one user namespace, so joining the net of one and the IPC of
    another is joining one owner; containers of two user namespaces are refused."""
    a = _create(runtime, _sleeper(runtime, busybox_rootfs))
    pa = _pid(runtime, a)
    b = _create(runtime, _sleeper(runtime, busybox_rootfs, edit=_into({"network": f"/proc/{pa}/ns/net"})))
    pb = _pid(runtime, b)                           # b: a's net and user namespace, its own IPC
    c = _create(runtime, _sleeper(runtime, busybox_rootfs,
                                  edit=_into({"network": f"/proc/{pa}/ns/net", "ipc": f"/proc/{pb}/ns/ipc"})))
    pc = _pid(runtime, c)
    assert os.readlink(f"/proc/{pc}/ns/user") == os.readlink(f"/proc/{pa}/ns/user")
    assert os.readlink(f"/proc/{pc}/ns/ipc") == os.readlink(f"/proc/{pb}/ns/ipc")
    other = _create(runtime, _sleeper(runtime, busybox_rootfs))      # a user namespace of its own
    refused = runtime.new_id()
    p, err = _popen_create(runtime, _sleeper(runtime, busybox_rootfs, edit=_into(
        {"network": f"/proc/{pa}/ns/net", "ipc": f"/proc/{_pid(runtime, other)}/ns/ipc"})), refused)
    assert p.wait(timeout=60) != 0
    assert "cannot be joined" in open(err).read() and leftovers(refused) == []
    for cid in (c, b, a, other):
        runtime("delete", "--force", cid, check=True)
    assert ids_held(runtime.root) == []


@pytest.fixture
def host_netns():
    """A network namespace made in the host's user namespace, as CNI makes a pod's."""
    name = "isobox-t" + os.urandom(4).hex()
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    yield f"/run/netns/{name}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_a_host_owned_netns_is_joined_before_the_shared_user_namespace(runtime, busybox_rootfs, host_netns):
    """The Kubernetes pod shape: the sandbox joins the engine's netns; the pod's container
    joins that netns and the sandbox's IPC namespace, and so its user namespace. After
    setns(user) the host-owned netns would be EPERM, so it is joined first; exec likewise.
    The sandbox may set net.* sysctls there, the containers joining it may not."""
    def with_sysctl(edit):
        def both(spec: dict) -> None:
            edit(spec)
            spec["linux"]["sysctl"] = {"net.ipv4.ip_unprivileged_port_start": "123"}
        return both

    # the pod's net.* sysctls go on the sandbox, into the engine's netns (no other container's)
    sandbox = _create(runtime, _sleeper(runtime, busybox_rootfs, edit=with_sysctl(_into({"network": host_netns}))))
    pid1 = _pid(runtime, sandbox)
    r = subprocess.run(["nsenter", f"--net={host_netns}", "cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "123", r.stderr
    joined = {"network": host_netns, "ipc": f"/proc/{pid1}/ns/ipc"}
    # ...but not by a container joining namespaces another isobox container lives in
    refused = runtime.new_id()
    p, err = _popen_create(runtime, _sleeper(runtime, busybox_rootfs, edit=with_sysctl(_into(joined))), refused)
    assert p.wait(timeout=60) != 0
    assert "sysctl net.ipv4.ip_unprivileged_port_start is not namespaced to this container" in open(err).read()
    assert leftovers(refused) == [] and not os.path.exists(os.path.join(runtime.root, refused))
    app = _create(runtime, _sleeper(runtime, busybox_rootfs, edit=_into(joined)))
    pid2 = _pid(runtime, app)
    netns = os.stat(host_netns).st_ino
    for pid in (pid1, pid2):
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == netns
    for ns in ("user", "ipc"):
        assert os.stat(f"/proc/{pid1}/ns/{ns}").st_ino == os.stat(f"/proc/{pid2}/ns/{ns}").st_ino, ns
    assert _uid_map(pid1) == _uid_map(pid2) and _uid_map(pid1)[1] >= 1048576
    runtime("start", app, check=True)
    r = runtime("exec", app, "sh", "-c", "readlink /proc/self/ns/net; cat /proc/self/uid_map")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == f"net:[{netns}]" and r.stdout.split()[2] == str(_uid_map(pid1)[1])
    for c in (app, sandbox):
        runtime("delete", "--force", c, check=True)
    assert ids_held(runtime.root) == []
    assert leftovers(sandbox) == [] and leftovers(app) == []


def test_gc_reclaims_range_of_crashed_container(runtime, busybox_rootfs):
    from isobox.cgroups.layout import detect
    from isobox.cgroups.manager import ContainerCgroup
    from isobox.ids.allocator import Allocator

    cid = _create(runtime, _sleeper(runtime, busybox_rootfs))
    pid = _pid(runtime, cid)
    base = _uid_map(pid)[1]
    assert [(h.container_id, b) for h, b in ids_held(runtime.root)] == [(cid, base)]

    # The simulated crash: init killed, state dir gone, nothing else told.
    os.kill(pid, signal.SIGKILL)
    # Wait until the host's pid 1 has reaped it: gc counts a zombie whose starttime
    # still matches as a live init (isobox.ids.procinfo does not look at the state).
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, f"init {pid} was not reaped"
        time.sleep(0.01)
    shutil.rmtree(os.path.join(runtime.root, cid))
    ContainerCgroup(detect(), f"/isobox/{cid}").destroy()
    assert [(h.container_id, b) for h, b in ids_held(runtime.root)] == [(cid, base)]  # nobody released it

    removed = Allocator().gc()
    assert cid in [h.container_id for h in removed]
    assert ids_held(runtime.root) == []
    assert leftovers(cid) == []


def test_explicit_spec_mapping_is_honored_and_released(runtime, busybox_rootfs):
    def mapping(spec: dict) -> None:
        m = [{"containerID": 0, "hostID": EXPLICIT_BASE, "size": 65536}]
        spec["linux"]["uidMappings"] = m
        spec["linux"]["gidMappings"] = [dict(x) for x in m]

    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "cat /proc/self/uid_map; id -u; touch /tmp/x && stat -c %u /tmp/x"],
                       edit=mapping)
    cid = runtime.new_id()
    p, err = _popen_create(runtime, b, cid)
    assert p.wait(timeout=60) == 0, open(err).read()
    pid = _pid(runtime, cid)
    assert _uid_map(pid) == [0, EXPLICIT_BASE, 65536]
    assert _gid_map(pid) == [0, EXPLICIT_BASE, 65536]
    assert [(h.container_id, b) for h, b in ids_held(runtime.root)] == [(cid, EXPLICIT_BASE)]

    runtime("start", cid, check=True)
    deadline = time.monotonic() + 20
    while json.loads(runtime("state", cid, check=True).stdout)["status"] != "stopped":
        assert time.monotonic() < deadline, "container did not finish"
        time.sleep(0.05)
    out = open(os.path.join(runtime.tmp, f"{cid}.out")).read().split("\n")
    assert out[0].split() == ["0", str(EXPLICIT_BASE), "65536"], out
    assert out[1] == "0", out

    runtime("delete", cid, check=True)
    assert ids_held(runtime.root) == []
    assert leftovers(cid) == []
