"""Static C probes for attack tests: tests/probes/<name>.c, built once per source version.

A probe runs inside a container (busybox rootfs, no libc there), so it is linked statically.
build(name) compiles with gcc into a cache keyed by the source's hash and returns the path;
install(rootfs, name) copies it to /<name> in a rootfs. A missing gcc skips the test."""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = "/var/tmp/isobox-test-probes"


def build(name: str) -> str:
    src = os.path.join(HERE, f"{name}.c")
    h = hashlib.sha256()
    for part in [src] + sorted(glob.glob(os.path.join(HERE, "*.h"))):    # its local headers too
        with open(part, "rb") as f:
            h.update(f.read())
    digest = h.hexdigest()[:16]
    out = os.path.join(CACHE, f"{name}-{digest}")
    if os.path.exists(out):
        return out
    if not shutil.which("gcc"):
        pytest.skip(f"gcc is not installed: cannot build the {name} probe")
    os.makedirs(CACHE, mode=0o700, exist_ok=True)
    tmp = f"{out}.{os.getpid()}"
    r = subprocess.run(["gcc", "-static", "-O1", "-Wall", "-o", tmp, src], capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"building probe {name} failed:\n{r.stderr}")
    os.rename(tmp, out)
    return out


def install(rootfs: str, name: str, dest: str | None = None) -> str:
    """Copies the probe into rootfs at /<dest or name>; returns its path inside the container."""
    inside = "/" + (dest or name)
    shutil.copy2(build(name), rootfs + inside)
    os.chmod(rootfs + inside, 0o755)
    return inside


def rootfs_with(tmp_path_factory, *names: str) -> str:
    """A private busybox rootfs (below pytest's root-only base) with these probes at /<name>."""
    from conftest import make_rootfs
    root = make_rootfs(str(tmp_path_factory.mktemp("-".join(names) or "rootfs") / "rootfs"))
    for name in names:
        install(root, name)
    return root
