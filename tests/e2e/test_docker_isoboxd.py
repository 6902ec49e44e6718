"""isoboxd through dockerd: what `docker run --runtime=isobox` containers see in /proc and /sys."""
from __future__ import annotations

import os

import pytest

from e2e.test_docker import ex, running


def test_limits_show_in_proc_and_sys(dockerd):
    if os.cpu_count() < 2:
        pytest.skip("--cpuset-cpus 1 needs a second CPU")
    with running(dockerd, "-m", "256m", "--cpuset-cpus", "1") as c:
        assert ex(dockerd, c, "head", "-1", "/proc/meminfo").split() == ["MemTotal:", "262144", "kB"]
        assert ex(dockerd, c, "nproc").strip() == "1"
        assert ex(dockerd, c, "cat", "/sys/devices/system/cpu/online").strip() == "1"
        assert ex(dockerd, c, "grep", "-c", "^processor", "/proc/cpuinfo").strip() == "1"
        assert float(ex(dockerd, c, "cut", "-d", " ", "-f1", "/proc/uptime")) < 60


def test_privileged_sysctl_stays_in_the_container(dockerd):
    with open("/proc/sys/vm/overcommit_memory") as f:
        host = f.read().strip()
    new = "2" if host != "2" else "1"
    with running(dockerd, "--privileged") as c:
        out = ex(dockerd, c, "sh", "-c", f"echo {new} > /proc/sys/vm/overcommit_memory && "
                 "cat /proc/sys/vm/overcommit_memory")
        assert out.strip() == new
        with open("/proc/sys/vm/overcommit_memory") as f:
            assert f.read().strip() == host
