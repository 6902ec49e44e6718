"""isoboxd's membership check (server.member): is a caller a process of the container whose
cgroup it names? It decides who may claim a container's seccomp listener."""
from __future__ import annotations

from isobox.cgroups.layout import parse_cgroup_file, parse_mountinfo
from isobox.daemon.fs.membership import member

from test_cgroups_layout import HOST_HYBRID, PURE_V2

HYBRID = parse_mountinfo(HOST_HYBRID)
V2 = parse_mountinfo(PURE_V2)
TOPS_V1 = {"memory": "/sys/fs/cgroup/memory/isobox/c1", "pids": "/sys/fs/cgroup/pids/isobox/c1"}
TOPS_V2 = {"": "/sys/fs/cgroup/isobox/c1"}


def cg(memory: str, pids: str | None = None) -> dict[str, str]:
    return parse_cgroup_file(f"5:memory:{memory}\n9:pids:{pids or memory}\n0::/\n")


def test_v1_the_container_cgroup_and_below_are_members():
    assert member(HYBRID, cg("/isobox/c1"), TOPS_V1)
    assert member(HYBRID, cg("/isobox/c1/init.scope/sub"), TOPS_V1)


def test_v1_a_sibling_with_a_common_prefix_or_the_parent_is_not():
    assert not member(HYBRID, cg("/isobox/c10"), TOPS_V1)
    assert not member(HYBRID, cg("/isobox"), TOPS_V1)
    assert not member(HYBRID, cg("/"), TOPS_V1)


def test_memory_decides_over_pids():
    assert not member(HYBRID, cg("/elsewhere", "/isobox/c1"), TOPS_V1)
    assert member(HYBRID, cg("/isobox/c1", "/elsewhere"), TOPS_V1)


def test_a_deleted_cgroup_never_matches():
    # a process left in a removed cgroup of an older container with the same id
    assert not member(HYBRID, cg("/isobox/c1 (deleted)"), TOPS_V1)


def test_v2_uses_the_unified_entry():
    assert member(V2, parse_cgroup_file("0::/isobox/c1/inner\n"), TOPS_V2)
    assert not member(V2, parse_cgroup_file("0::/isobox/c2\n"), TOPS_V2)
    assert not member(V2, parse_cgroup_file("0::/isobox/c1 (deleted)\n"), TOPS_V2)


def test_no_cgroup_known_or_no_entry_is_not_a_member():
    assert not member(HYBRID, cg("/isobox/c1"), {})
    assert not member(HYBRID, parse_cgroup_file("0::/\n"), TOPS_V1)
