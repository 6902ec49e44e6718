"""`isobox run` and `isobox demo`: the user's command on the built-in image."""
import os
import subprocess
import sys

import pytest

ISOBOX = [sys.executable, "-I", "-m", "isobox.cli.main"]


def isobox(*args, timeout=60):
    return subprocess.run([*ISOBOX, *args], capture_output=True, text=True, timeout=timeout)


def bundles_left():
    try:
        return os.listdir("/run/isobox-bundles")
    except FileNotFoundError:
        return []


def test_run_default_image_and_exit_code():
    before = bundles_left()
    r = isobox("run", "sh", "-c", "cat /proc/self/uid_map; exit 3")
    assert r.returncode == 3, r.stderr
    assert r.stdout.split()[0] == "0" and int(r.stdout.split()[1]) >= 1048576
    assert bundles_left() == before


def test_run_limits_and_privileged():
    r = isobox("run", "--privileged", "--memory", "64m", "--cpus", "0.5", "sh", "-c",
               "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us; "
               "grep CapEff /proc/self/status")
    assert r.returncode == 0, r.stderr
    mem, quota, caps = r.stdout.splitlines()
    assert mem == str(64 * 1024 * 1024) and quota == "50000"
    assert caps.split()[1] == "000001ffffffffff"


def test_run_unprivileged_has_fewer_caps():
    r = isobox("run", "grep", "CapEff", "/proc/self/status")
    assert r.returncode == 0 and r.stdout.split()[1] != "000001ffffffffff"


def test_run_rootfs_dir(busybox_rootfs):
    r = isobox("run", "--rootfs", busybox_rootfs, "echo", "hello")
    assert r.returncode == 0 and r.stdout == "hello\n"


@pytest.mark.parametrize("args,msg", [
    (["run", "--memory", "lots", "true"], "invalid size"),
    (["run", "--cpus", "-1", "true"], "invalid --cpus"),
    (["run", "--rootfs", "/nonexistent", "true"], "not a directory"),
    (["run", "--bogus"], "unknown flag"),
    (["frobnicate"], "unknown command"),
])
def test_bad_input_is_one_line(args, msg):
    before = bundles_left()
    r = isobox(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr
    assert bundles_left() == before


def test_demo_shows_both_views():
    r = isobox("demo", timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "what the container believes" in out and "what the host sees" in out
    assert "000001ffffffffff" in out and "refused: EINVAL" in out and "refused: EPERM" in out


def test_doctor_reports_each_need_and_what_was_proven_where():
    r = isobox("doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    for need in ("user namespaces", "idmapped mounts", "seccomp user-notify", "FUSE", "cgroups", "ID pool", "policy"):
        assert need in r.stdout
    assert "proven" in r.stdout and "unit-tested against a cgroup tree" in r.stdout
