"""The spec rewrite: every isobox decision, made before any kernel object exists."""
import copy
import os

import pytest

from isobox.errors import IsoboxError
from isobox.linux import syscalls as k
from isobox.runc.spec_template import template
from isobox.spec.rewrite import DEFAULT_MASKED, rewrite


def no_owner(*_):
    return None


@pytest.fixture
def bundle(tmp_path):
    (tmp_path / "rootfs").mkdir()
    return str(tmp_path)


def spec(**edits):
    s = template(["true"])
    s["linux"].update(edits)
    return s


def test_all_namespaces_new_and_user_added(bundle):
    s = spec()
    s["linux"]["namespaces"] = [n for n in s["linux"]["namespaces"] if n["type"] not in ("user", "cgroup")]
    p = rewrite("c", bundle, s, no_owner)
    for flag in (k.CLONE_NEWUSER, k.CLONE_NEWPID, k.CLONE_NEWNET, k.CLONE_NEWIPC, k.CLONE_NEWUTS,
                 k.CLONE_NEWCGROUP, k.CLONE_NEWNS):
        assert p.new_namespaces & flag
    assert p.join_namespaces == {} and p.uid_base == 0 and not p.explicit_mapping


@pytest.mark.parametrize("ns", ["pid", "network", "ipc", "uts", "mount"])
def test_absent_namespace_means_host_and_is_refused(bundle, ns):
    s = spec()
    s["linux"]["namespaces"] = [n for n in s["linux"]["namespaces"] if n["type"] != ns]
    with pytest.raises(IsoboxError, match=f"does not share the host's {ns} namespace"):
        rewrite("c", bundle, s, no_owner)


def test_host_namespace_path_refused(bundle):
    s = spec()
    for n in s["linux"]["namespaces"]:
        if n["type"] == "network":
            n["path"] = "/proc/self/ns/net"   # the runtime's own = the host's
    with pytest.raises(IsoboxError, match="does not join the host's network namespace"):
        rewrite("c", bundle, s, no_owner)


def test_joining_an_isobox_container_joins_its_userns_and_range(bundle):
    import subprocess
    other = subprocess.Popen(["unshare", "-n", "sleep", "30"])
    try:
        import time
        for _ in range(500):     # up to 5 s on a loaded machine
            if os.stat(f"/proc/{other.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino:
                break
            time.sleep(0.01)
        s = spec()
        for n in s["linux"]["namespaces"]:
            if n["type"] == "network":
                n["path"] = f"/proc/{other.pid}/ns/net"
        p = rewrite("c", bundle, s, lambda t, d, i: ("first", 4242, 3000000, 3000000, 65536))
        assert p.join_user == "/proc/4242/ns/user" and p.shares_userns_of == "first"
        assert p.uid_base == 3000000 and not p.new_namespaces & k.CLONE_NEWUSER
        assert p.join_namespaces == {"network": f"/proc/{other.pid}/ns/net"}
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("maps,msg", [
    ([{"containerID": 0, "hostID": 200000, "size": 65536}] * 2, "exactly one"),
    ([{"containerID": 1, "hostID": 200000, "size": 65536}], "start at container ID 0"),
    ([{"containerID": 0, "hostID": 200000, "size": 1000}], "at least 65536"),
    ([{"containerID": 0, "hostID": 0, "size": 65536}], "host ID 0"),
])
def test_mapping_rules(bundle, maps, msg):
    s = spec(uidMappings=maps, gidMappings=copy.deepcopy(maps))
    with pytest.raises(IsoboxError, match=msg):
        rewrite("c", bundle, s, no_owner)


def test_mapping_uid_gid_must_match(bundle):
    s = spec(uidMappings=[{"containerID": 0, "hostID": 200000, "size": 65536}],
             gidMappings=[{"containerID": 0, "hostID": 300000, "size": 65536}])
    with pytest.raises(IsoboxError, match="same host start"):
        rewrite("c", bundle, s, no_owner)


def test_explicit_mapping_accepted(bundle):
    m = [{"containerID": 0, "hostID": 3000000000, "size": 65536}]
    p = rewrite("c", bundle, spec(uidMappings=m, gidMappings=copy.deepcopy(m)), no_owner)
    assert p.explicit_mapping and p.uid_base == p.gid_base == 3000000000


def test_privileged_spec_still_gets_masks_and_only_safe_devices(bundle):
    s = spec(maskedPaths=[], readonlyPaths=[], devices=[
        {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0},
        {"path": "/dev/mem", "type": "c", "major": 1, "minor": 1},
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
    ])
    p = rewrite("c", bundle, s, no_owner)
    assert set(DEFAULT_MASKED) <= set(p.masked_paths)
    paths = {d.path for d in p.devices}
    assert "/dev/sda" not in paths and "/dev/mem" not in paths
    assert {"/dev/null", "/dev/zero", "/dev/tty"} <= paths
    assert any("/dev/mem" in n for n in p.notes)


def test_cgroup_mount_is_replaced_by_isoboxs_own(bundle):
    p = rewrite("c", bundle, spec(), no_owner)
    cg = [m for m in p.mounts if m.destination == "/sys/fs/cgroup"]
    assert cg and cg[0].type == "isobox-cgroup"


@pytest.mark.parametrize("key,ok", [("net.ipv4.ip_forward", True), ("kernel.shmmax", True),
                                    ("fs.mqueue.msg_max", True), ("vm.swappiness", False),
                                    ("kernel.pid_max", False)])
def test_only_namespaced_sysctls(bundle, key, ok):
    s = spec(sysctl={key: "1"})
    if ok:
        assert rewrite("c", bundle, s, no_owner).sysctl == {key: "1"}
    else:
        with pytest.raises(IsoboxError, match="not namespaced"):
            rewrite("c", bundle, s, no_owner)


def test_systemd_cgroups_path_refused(bundle):
    with pytest.raises(IsoboxError, match="cgroupfs"):
        rewrite("c", bundle, spec(cgroupsPath="system.slice:docker:abc"), no_owner)


def test_default_cgroups_path(bundle):
    assert rewrite("abc", bundle, spec(), no_owner).cgroups_path == "/isobox/abc"
