"""Debian root filesystems built with debootstrap, cached under /var/cache/isobox-test/<suite>.

A tree is built in a temporary directory next to the cache entry and renamed into place
only once debootstrap succeeded, so a cache entry that exists is complete (its marker file
records the package set; a different set rebuilds it). Used by the nested-runtime tests
(tests/integration/test_nested_debian.py, tests/e2e/test_docker_nested.py) and Docker in Docker
(tests/e2e/test_docker_in_docker.py, whose tree with docker.io is cached under a name of its own)."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time

CACHE = os.environ.get("ISOBOX_TEST_CACHE", "/var/cache/isobox-test")
MIRROR = os.environ.get("ISOBOX_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# minbase already has util-linux and mount (priority required); runc is all the tests add
# (its own dependency, libseccomp2, comes with it).
INCLUDE = ("runc", "mount")
MARKER = ".isobox-test-tree"


class Unavailable(Exception):
    """debootstrap could not build the tree (no mirror, no debootstrap): the tests skip."""


def ensure_debootstrap() -> str:
    path = shutil.which("debootstrap")
    if path:
        return path
    r = subprocess.run(["apt-get", "install", "-y", "debootstrap"], capture_output=True, text=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=600)
    path = shutil.which("debootstrap")
    if not path:
        raise Unavailable("apt-get install debootstrap failed: " + last_line(r.stdout + r.stderr))
    return path


def last_line(text: str) -> str:
    lines = [l for l in text.splitlines() if l.strip()]
    return lines[-1] if lines else "(no output)"


def complete(path: str, include=INCLUDE) -> bool:
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f).get("include") == list(include)
    except (OSError, ValueError):
        return False


def tree(suite: str, include=INCLUDE, timeout: float = 1800, name: str | None = None) -> tuple[str, float]:
    """The cached tree for suite, and how long building it took (0.0 when reused).

    name: the cache entry (default: the suite's name). A tree with other packages gets a name
    of its own ("bookworm-docker", say), so it never rebuilds the suite's default tree that
    other tests share."""
    name = name or suite
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad cache name {name!r}")
    os.makedirs(CACHE, exist_ok=True)
    dest = os.path.join(CACHE, name)
    with open(os.path.join(CACHE, f".{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)           # two pytest sessions never build the same tree
        if complete(dest, include):
            return dest, 0.0
        debootstrap = ensure_debootstrap()
        work = tempfile.mkdtemp(prefix=f".{name}-", dir=CACHE)
        start = time.monotonic()
        try:
            r = subprocess.run([debootstrap, "--variant=minbase", "--include=" + ",".join(include),
                                suite, work, MIRROR],
                               capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if r.returncode != 0:
                raise Unavailable(f"debootstrap {suite} failed ({r.returncode}): "
                                  + last_line(r.stdout + r.stderr))
            took = time.monotonic() - start
            # apt's downloaded .debs are not part of the image
            shutil.rmtree(os.path.join(work, "var/cache/apt/archives"), ignore_errors=True)
            os.makedirs(os.path.join(work, "var/cache/apt/archives/partial"), exist_ok=True)
            os.chmod(work, 0o755)                 # mkdtemp made it 0700
            with open(os.path.join(work, MARKER), "w") as f:
                json.dump({"suite": suite, "include": list(include), "mirror": MIRROR,
                           "seconds": round(took, 1), "built": time.time()}, f)
            if os.path.lexists(dest):
                shutil.rmtree(dest)
            os.rename(work, dest)
            return dest, took
        except subprocess.TimeoutExpired:
            raise Unavailable(f"debootstrap {suite} took longer than {timeout:.0f}s") from None
        finally:
            if os.path.exists(work):
                unmount_under(work)              # a failed debootstrap may leave proc/sys mounted
                shutil.rmtree(work, ignore_errors=True)


def unmount_under(path: str) -> None:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [l.split()[4] for l in f]
    for p in sorted((p for p in points if p == path or p.startswith(path + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", p], capture_output=True)
