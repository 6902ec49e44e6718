"""Debian's tools in `docker run --runtime=isobox --privileged` containers: trixie's
fsopen-based `mount -t proc`, and the distribution's runc starting an inner container.

The images are the debootstrap trees of tests/debian_trees.py, imported once per session.
These containers trap to the isoboxd that is running (the holder's socket), so they show
the handlers it loaded when it started."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

import debian_trees
from e2e.conftest import unique
from e2e.test_docker import remove
from integration.test_nested_debian import INNER, MEMTOTAL


@pytest.fixture(scope="session")
def debian_image(dockerd, tmp_path_factory):
    """suite -> the docker image imported from its cached tree (skips when it cannot be built)."""
    images: dict[str, str | Exception] = {}

    def get(suite: str) -> str:
        if suite not in images:
            try:
                path, _ = debian_trees.tree(suite)
            except debian_trees.Unavailable as e:
                images[suite] = e
            else:
                tar = str(tmp_path_factory.mktemp("debian-tar") / f"{suite}.tar")
                subprocess.run(["tar", "-C", path, "--exclude", "./" + debian_trees.MARKER, "-cf", tar, "."],
                               check=True, capture_output=True)
                name = f"isobox-test/{suite}:latest"
                dockerd("import", tar, name, check=True, timeout=600)
                os.unlink(tar)
                images[suite] = name
        v = images[suite]
        if isinstance(v, Exception):
            pytest.skip(str(v))
        return v
    return get


def run(docker, image: str, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """docker run --runtime=isobox --privileged -m 256m (foreground), then rm -f with leak checks."""
    name = unique("nested")
    try:
        return docker("run", "--name", name, "--runtime=isobox", "--privileged", "-m", "256m", *args,
                      image, "sh", "-c", script, timeout=timeout)
    finally:
        remove(docker, name)


def stale_handlers() -> str:
    """A hint for failures: isoboxd's server imports its handlers once, when it starts."""
    import isobox.daemon.syscalls.mount as handler
    from isobox.daemon import paths
    try:
        with open(paths.SERVER_PID) as f:
            pid = int(f.read())
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(l.split()[1]) for l in f if l.startswith("btime "))
    except (OSError, ValueError, StopIteration):
        return ""
    started = btime + ticks / os.sysconf("SC_CLK_TCK")
    if started < os.stat(handler.__file__).st_mtime:
        return f"the running isoboxd server started before {handler.__file__} changed: it has the old handler"
    return ""


def test_trixie_mount_proc(dockerd, debian_image):
    r = run(dockerd, debian_image("trixie"), "mount --version && mount -t proc proc /mnt && head -1 /mnt/meminfo")
    assert r.returncode == 0, (r.stdout, r.stderr)
    version = re.search(r"util-linux (\d+)\.(\d+)", r.stdout)
    assert version and (int(version[1]), int(version[2])) >= (2, 39), r.stdout   # libmount's fsopen path
    assert r.stdout.splitlines()[-1] == MEMTOTAL


@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_distro_runc_in_docker(suite, dockerd, debian_image, tmp_path):
    shutil.copy2("/bin/busybox", tmp_path / "busybox")
    r = run(dockerd, debian_image(suite), INNER.replace("SPECFLAGS", ""), "-v", f"{tmp_path}:/srv:ro")
    assert r.returncode == 0, (r.stdout, r.stderr)
    got = dict(l.split("=", 1) for l in r.stdout.splitlines() if "=" in l)
    assert got.get("runc") == "0" and "inner-ok" in r.stdout, (r.stdout, r.stderr, stale_handlers())
    assert got["pid"] == "1" and got["mem"] == " ".join(MEMTOTAL.split())
