"""Shared fixtures: busybox bundles, an isobox-runc runner, and leak checks.

Every container a test creates is deleted in the fixture's finalizer even when the test
fails, and each test's state root is its own temporary directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

RUNC = [sys.executable, "-I", "-m", "isobox.runc.main"]
BUSYBOX = "/bin/busybox"


def make_rootfs(path: str) -> str:
    from isobox.cli.image import build_busybox_rootfs
    build_busybox_rootfs(BUSYBOX, path)
    return path


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory) -> str:
    return make_rootfs(str(tmp_path_factory.mktemp("img") / "rootfs"))


class Runtime:
    """Runs isobox-runc with a private --root and remembers containers to delete."""

    def __init__(self, root: str, tmp: str):
        self.root = root
        self.tmp = tmp
        self.ids: list[str] = []

    def __call__(self, *args: str, check: bool = False, input: str | None = None, timeout: float = 60,
                 **kw) -> subprocess.CompletedProcess:
        r = subprocess.run([*RUNC, "--root", self.root, *args], capture_output=True, text=True, input=input,
                           timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"isobox-runc {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r

    def bundle(self, rootfs: str, args: list[str], name: str | None = None, edit=None) -> str:
        """A bundle dir whose config.json is `isobox-runc spec` with args and rootfs set."""
        d = os.path.join(self.tmp, name or "b-" + uuid.uuid4().hex[:8])
        os.makedirs(d)
        from isobox.runc.spec_template import template
        spec = template(args)
        spec["root"] = {"path": rootfs, "readonly": False}
        if edit:
            edit(spec)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(spec, f)
        return d

    def new_id(self) -> str:
        cid = "t" + uuid.uuid4().hex[:10]
        self.ids.append(cid)
        return cid

    def run(self, bundle: str, *flags: str, input: str | None = None, timeout: float = 60):
        cid = self.new_id()
        return self("run", "--bundle", bundle, *flags, cid, input=input, timeout=timeout)

    def cleanup(self) -> None:
        for cid in self.ids:
            self("delete", "--force", cid)


@pytest.fixture
def runtime(tmp_path) -> Runtime:
    rt = Runtime(str(tmp_path / "state"), str(tmp_path))
    yield rt
    rt.cleanup()


def leftovers(tag: str) -> list[str]:
    """Mounts, cgroups and state mentioning tag (a container id or bundle path)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        out += [l for l in f if tag in l]
    for top in os.listdir("/sys/fs/cgroup"):
        base = os.path.join("/sys/fs/cgroup", top)
        for dirpath, dirnames, _ in os.walk(base):
            out += [os.path.join(dirpath, d) for d in dirnames if tag in d]
            if dirpath.count("/") > 6:
                dirnames[:] = []
    return out


def ids_held(root: str) -> list:
    from isobox.ids.allocator import Allocator
    return [(h, b) for h, b in Allocator().holders() if h.root == os.path.abspath(root)]


@pytest.fixture
def isoboxd():
    """The host's isoboxd, running with its trap and warm-worker sockets bound."""
    import time
    from isobox.daemon import client, paths
    client.ensure_running()
    deadline = time.monotonic() + 10
    while not all(os.path.exists(p) for p in (paths.TRAP_SOCKET, paths.WARM_SOCKET)):
        assert time.monotonic() < deadline, "isoboxd did not bind its sockets"
        time.sleep(0.05)
    yield


@pytest.fixture
def reachable():
    """A host directory every host user may enter (pytest's own tmp is root's only): where an
    attack must not leave anything a host user could use."""
    import shutil
    import tempfile
    base = tempfile.mkdtemp(prefix="isobox-sec-", dir="/var/tmp")
    os.chmod(base, 0o755)
    yield base
    subprocess.run(["umount", "-R", "-l", base], capture_output=True)   # a bind a failed child left
    shutil.rmtree(base, ignore_errors=True)
