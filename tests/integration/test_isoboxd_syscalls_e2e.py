"""sysinfo and mknod through the real path: isobox-runc containers hand their seccomp listener
to isoboxd, which answers sysinfo from the container's cgroup and makes the safe devices."""
from __future__ import annotations

import pytest

from integration.test_isolation import privileged

from isobox.daemon import client

MIB = 1024 * 1024


@pytest.fixture
def daemon():
    client.ensure_running()
    yield


def limited(spec: dict) -> None:
    privileged(spec)            # CAP_MKNOD (and the rest) for container root, as docker's default has it
    spec["linux"]["resources"] = {"memory": {"limit": 256 * MIB}}


def sh(runtime, rootfs: str, script: str):
    return runtime.run(runtime.bundle(rootfs, ["sh", "-c", script], edit=limited))


def test_free_shows_the_memory_limit(daemon, runtime, busybox_rootfs):
    r = sh(runtime, busybox_rootfs, "free; grep MemTotal /proc/meminfo")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    end = lines[0].index("total") + len("total")           # fixed-width columns: a huge "used" runs into it
    mem = next(ln for ln in lines if ln.startswith("Mem:"))
    assert mem[4:end].strip() == "262144", r.stdout        # busybox free prints KiB from sysinfo
    assert "262144 kB" in r.stdout                          # the same as /proc/meminfo


def test_free_used_column_is_sane(daemon, runtime, busybox_rootfs):
    r = sh(runtime, busybox_rootfs, "free")
    assert r.returncode == 0, r.stderr
    total, used, free, _shared, cache = (int(x) for x in next(
        ln.split() for ln in r.stdout.splitlines() if ln.startswith("Mem:"))[1:6])
    assert used + free + cache == total and used >= 0, r.stdout


def test_mknod_of_safe_devices_works_and_others_fail(daemon, runtime, busybox_rootfs):
    script = ("mknod /dev/x c 1 3 && echo hi > /dev/x && ls -ln /dev/x && "
              "mknod /zero c 1 5 && head -c 4 /zero | od -An -tx1 && ls -ln /zero && rm /zero && "
              "if mknod /tmp/b b 8 0; then echo BLOCK-MADE; else echo block-refused; fi && "
              "if mknod /tmp/m c 1 1; then echo MEM-MADE; else echo mem-refused; fi")
    r = sh(runtime, busybox_rootfs, script)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    dev_x = next(ln for ln in lines if ln.endswith("/dev/x")).split()
    assert dev_x[0].startswith("c") and dev_x[2:4] == ["0", "0"]      # root:root inside, on /dev's tmpfs
    zero = next(ln for ln in lines if ln.endswith("/zero")).split()
    assert zero[0].startswith("c") and zero[2:4] == ["0", "0"]        # and on the (idmapped) rootfs
    assert "00 00 00 00" in r.stdout
    assert "block-refused" in lines and "mem-refused" in lines
