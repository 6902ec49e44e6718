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


def test_privileged_cannot_plant_a_setuid_root_file_in_a_host_bind(dockerd, tmp_path):
    """-v HOSTDIR:/data keeps host owners: a set-uid file there would be host root's. isoboxd
    refuses the set-id chmod on host binds, and the audit log says why."""
    import stat
    import subprocess
    host = tmp_path / "plant"
    host.mkdir()
    with running(dockerd, "--privileged", "-v", f"{host}:/data") as c:
        r = dockerd("exec", c, "sh", "-c", "cp /bin/busybox /data/bb && chmod 4755 /data/bb")
        assert r.returncode != 0 and "not permitted" in r.stderr.lower(), (r.stdout, r.stderr)
        st = os.stat(host / "bb")
        assert st.st_uid == 0 and not st.st_mode & (stat.S_ISUID | stat.S_ISGID)
        # inside the container's own rootfs the same chmod works (it harms no host user)
        ex(dockerd, c, "sh", "-c", "cp /bin/busybox /bb && chmod 4755 /bb && test -u /bb")
        cid = dockerd("inspect", "-f", "{{.Id}}", c).stdout.strip()
        ev = subprocess.run(["isobox", "events", cid], capture_output=True, text=True, timeout=30)
        assert "chmod" in ev.stdout and "refused" in ev.stdout and "/data/bb" in ev.stdout, ev.stdout
