"""parse_mountinfo / parse_cgroup_file on this host's text and synthetic layouts."""
from __future__ import annotations

import pytest

from isobox.cgroups.layout import CgroupError, Layout, parse_cgroup_file, parse_mountinfo
from isobox.cgroups.manager import ContainerCgroup

# This host (Debian 12 VM, kernel 6.18): v1 controllers + a cgroup2 holding only hugetlb.
HOST_HYBRID = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

# A systemd pure-v2 host (Debian 12 / Fedora default).
PURE_V2 = """\
21 26 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
30 21 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""

# A classic pure-v1 host (CentOS 7 style): co-mounted controllers, xattr, release_agent, no cgroup2.
PURE_V1 = """\
25 18 0:21 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
26 25 0:22 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup rw,xattr,release_agent=/usr/lib/systemd/systemd-cgroups-agent,name=systemd
29 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,cpu,cpuacct
30 25 0:26 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,net_cls,net_prio
31 25 0:27 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
32 25 0:28 / /sys/fs/cgroup/cpuset rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,cpuset,clone_children
33 25 0:29 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,pids
"""

# Ubuntu 20.04-style systemd hybrid, plus a bind mount of the memory hierarchy elsewhere.
HYBRID = """\
25 18 0:21 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
26 25 0:22 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:23 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,xattr,name=systemd
29 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,cpu,cpuacct
31 25 0:27 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
33 25 0:29 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,pids
90 60 0:27 /docker/abc /var/lib/my\\040dir/memory rw,relatime - cgroup cgroup rw,memory
"""


def by_mount(layout: Layout) -> dict:
    return {h.mountpoint: h for h in layout.hierarchies}


def test_this_host_text():
    layout = parse_mountinfo(HOST_HYBRID)
    assert layout.mode == "hybrid"
    hs = by_mount(layout)
    assert list(hs) == [f"/sys/fs/cgroup/{n}" for n in
                        "cpu cpuacct cpuset memory devices freezer blkio pids systemd unified".split()]
    assert hs["/sys/fs/cgroup/memory"].controllers == ("memory",)
    assert hs["/sys/fs/cgroup/memory"].options == "rw,memory"
    assert hs["/sys/fs/cgroup/systemd"].controllers == ("name=systemd",)
    assert hs["/sys/fs/cgroup/systemd"].options == "rw,name=systemd"
    u = hs["/sys/fs/cgroup/unified"]
    assert (u.version, u.controllers, u.root) == (2, (), "/")
    assert layout.hierarchy("memory").mountpoint == "/sys/fs/cgroup/memory"
    assert layout.hierarchy("").mountpoint == "/sys/fs/cgroup/unified"
    assert layout.hierarchy("rdma") is None


def test_live_host_matches_mode():
    with open("/proc/self/mountinfo") as f:
        layout = parse_mountinfo(f.read())
    assert layout.mode in ("v1", "v2", "hybrid")
    assert all(h.version in (1, 2) for h in layout.hierarchies)


def test_pure_v2():
    layout = parse_mountinfo(PURE_V2)
    assert layout.mode == "v2"
    (h,) = layout.hierarchies
    assert (h.mountpoint, h.root, h.version) == ("/sys/fs/cgroup", "/", 2)
    assert h.options == "rw,nsdelegate,memory_recursiveprot"
    # Controllers are not in mountinfo; on pure v2 every controller maps to it anyway.
    assert layout.hierarchy("memory") is h and layout.hierarchy("") is h


def test_pure_v1_comounts_and_named():
    layout = parse_mountinfo(PURE_V1)
    assert layout.mode == "v1"
    hs = by_mount(layout)
    assert hs["/sys/fs/cgroup/cpu,cpuacct"].controllers == ("cpu", "cpuacct")
    assert hs["/sys/fs/cgroup/net_cls,net_prio"].controllers == ("net_cls", "net_prio")
    assert hs["/sys/fs/cgroup/cpuset"].controllers == ("cpuset",)  # clone_children is an option
    sd = hs["/sys/fs/cgroup/systemd"]
    assert sd.controllers == ("name=systemd",)
    assert sd.options.startswith("rw,xattr,release_agent=")
    assert layout.hierarchy("cpuacct") is hs["/sys/fs/cgroup/cpu,cpuacct"]
    assert layout.unified is None and layout.hierarchy("") is None


def test_hybrid_dedupes_bind_mounts_and_unescapes():
    layout = parse_mountinfo(HYBRID)
    assert layout.mode == "hybrid"
    mems = [h for h in layout.hierarchies if "memory" in h.controllers]
    assert len(mems) == 1 and mems[0].mountpoint == "/sys/fs/cgroup/memory"
    # Only the bind mount: it is kept, with its escaped path decoded.
    alone = parse_mountinfo(HYBRID.splitlines()[-1])
    assert alone.hierarchies[0].mountpoint == "/var/lib/my dir/memory"
    assert alone.hierarchies[0].root == "/docker/abc"


def test_no_cgroups_is_an_error():
    with pytest.raises(CgroupError):
        parse_mountinfo("22 27 0:21 / /proc rw,relatime - proc proc rw\n")


def test_parse_cgroup_file():
    text = ("12:cpu,cpuacct:/docker/x\n4:memory:/process_api/6a65\n"
            "1:name=systemd:/init.scope\n0::/user.slice/a:b\n")
    assert parse_cgroup_file(text) == {
        "cpu": "/docker/x", "cpuacct": "/docker/x", "memory": "/process_api/6a65",
        "name=systemd": "/init.scope", "": "/user.slice/a:b"}
    with open("/proc/self/cgroup") as f:
        live = parse_cgroup_file(f.read())
    assert live and all(v.startswith("/") for v in live.values())


def test_inside_mounts_v1_comount_symlinks():
    cg = ContainerCgroup(parse_mountinfo(PURE_V1), "/isobox/x")
    mounts = cg.inside_mounts()
    assert mounts[0][:3] == ("tmpfs", "sys/fs/cgroup", "tmpfs")
    flags = 2 | 4 | 8  # MS_NOSUID | MS_NODEV | MS_NOEXEC
    assert ("cgroup", "sys/fs/cgroup/cpu,cpuacct", "cgroup", flags, "cpu,cpuacct") in mounts
    assert ("cgroup", "sys/fs/cgroup/systemd", "cgroup", flags, "name=systemd") in mounts
    assert not any(m[2] == "cgroup2" for m in mounts)
    assert sorted(cg.inside_symlinks()) == [
        ("cpu,cpuacct", "sys/fs/cgroup/cpu"), ("cpu,cpuacct", "sys/fs/cgroup/cpuacct"),
        ("net_cls,net_prio", "sys/fs/cgroup/net_cls"), ("net_cls,net_prio", "sys/fs/cgroup/net_prio")]


def test_inside_mounts_hybrid_and_v2():
    hy = ContainerCgroup(parse_mountinfo(HOST_HYBRID), "/isobox/x")
    m = hy.inside_mounts()
    assert m[0][1] == "sys/fs/cgroup" and m[0][2] == "tmpfs"
    assert m[-1][:3] == ("cgroup2", "sys/fs/cgroup/unified", "cgroup2")
    assert ("cgroup", "sys/fs/cgroup/memory", "cgroup", 14, "memory") in m
    assert hy.inside_symlinks() == []
    v2 = ContainerCgroup(parse_mountinfo(PURE_V2), "/isobox/x")
    assert v2.inside_mounts() == [("cgroup2", "sys/fs/cgroup", "cgroup2", 14, "")]
    assert v2.inside_symlinks() == []


def test_dir_per_controller():
    cg = ContainerCgroup(parse_mountinfo(PURE_V1), "isobox/x")  # relative = below "/"
    assert cg.path == "/isobox/x"
    assert cg.dir("cpuacct") == "/sys/fs/cgroup/cpu,cpuacct/isobox/x"
    assert cg.dir("name=systemd") == "/sys/fs/cgroup/systemd/isobox/x"
    assert cg.dir("") is None and cg.dir("hugetlb") is None
    v2 = ContainerCgroup(parse_mountinfo(PURE_V2), "/isobox/x")
    assert v2.dir("memory") == v2.dir("") == "/sys/fs/cgroup/isobox/x"
