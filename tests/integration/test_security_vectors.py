"""Known container escapes, tried from a privileged isobox container: each must fail.

These are the classic ways out of a privileged container (CVE-2022-0492's release_agent,
core_pattern and modprobe helpers, uevent_helper, sysrq, "shocker"'s open_by_handle_at,
raising the container's own cgroup limits, block devices, kernel modules). Most are stopped
by the user namespace (container root holds no capability in the host's), some by isoboxd's
/proc/sys or the masks; the test shows each attempt fails and the host value is unchanged."""
from __future__ import annotations

import os

import pytest

from integration.test_isolation import privileged
from probes import rootfs_with

HOST_FILES = ("/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe", "/sys/kernel/uevent_helper")


@pytest.fixture(scope="module")
def vec_rootfs(tmp_path_factory) -> str:
    return rootfs_with(tmp_path_factory, "shocker")


def _host(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        return f"<{e.strerror}>"


SCRIPT = r"""
t() { n=$1; shift; if "$@" >/dev/null 2>&1; then echo "$n|ok"; else echo "$n|refused"; fi; }
t core_pattern sh -c 'echo "|/tmp/x" > /proc/sys/kernel/core_pattern'
t modprobe sh -c 'echo /tmp/x > /proc/sys/kernel/modprobe'
t uevent_helper sh -c 'echo /tmp/x > /sys/kernel/uevent_helper'
t sysrq sh -c 'echo h > /proc/sysrq-trigger'
mkdir -p /tmp/cg
t release_agent sh -c 'mount -t cgroup -o none,name=isoboxesc cgroup /tmp/cg && echo /tmp/x > /tmp/cg/release_agent'
t release_agent_existing sh -c 'mount -t cgroup -o memory cgroup /tmp/cg && echo /tmp/x > /tmp/cg/release_agent'
t release_agent_nested unshare -U -r -C -m sh -c 'mkdir -p /tmp/cg2 && mount -t cgroup -o memory cgroup /tmp/cg2 && echo /tmp/x > /tmp/cg2/release_agent'
t raise_memory_limit sh -c 'echo -1 > /sys/fs/cgroup/memory/memory.limit_in_bytes'
t raise_pids_limit sh -c 'echo max > /sys/fs/cgroup/pids/pids.max'
t mknod_block mknod /tmp/sda b 8 0
t mount_block sh -c 'mount -t ext4 /dev/vda /mnt'
t insmod sh -c 'echo x > /tmp/m.ko; insmod /tmp/m.ko'
t kexec_load sh -c 'echo 1 > /proc/sys/kernel/kexec_load_disabled'
t hostname_of_host sh -c 'cat /proc/sys/kernel/hostname >/dev/null && echo evil > /proc/sys/kernel/hostname && [ "$(hostname)" = evil ]'
echo "shocker|$(/shocker)"
"""


def test_classic_escapes_fail_in_a_privileged_container(isoboxd, runtime, vec_rootfs):
    before = {p: _host(p) for p in HOST_FILES}
    host_name = os.uname().nodename
    r = runtime.run(runtime.bundle(vec_rootfs, ["sh", "-c", SCRIPT], edit=privileged), timeout=120)
    res = dict(line.split("|", 1) for line in r.stdout.splitlines() if "|" in line)
    must_fail = ("core_pattern", "modprobe", "uevent_helper", "sysrq", "release_agent", "release_agent_existing",
                 "release_agent_nested",
                 "raise_memory_limit", "raise_pids_limit", "mknod_block", "mount_block", "insmod")
    for name in must_fail:
        assert res.get(name) == "refused", (name, r.stdout, r.stderr)
    assert res.get("shocker", "").startswith("rc=errno"), r.stdout
    # the container's own hostname is its own (uts namespace); the host's is unchanged
    assert os.uname().nodename == host_name
    for p, v in before.items():
        assert _host(p) == v, p
