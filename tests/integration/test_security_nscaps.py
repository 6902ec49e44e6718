"""linux/nscaps.py: capabilities are judged in the user namespace that owns the object, as the
kernel's cap_capable does, never from CapEff alone (the review's finding 1: the root of a
user namespace nested in an unprivileged container has a full CapEff)."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from isobox.linux import nscaps
from isobox.linux.nscaps import CAP_SYS_ADMIN


def _started(argv: list[str]) -> subprocess.Popen:
    p = subprocess.Popen(argv)
    for _ in range(500):        # until the child runs sleep: its namespaces and maps are in place
        try:
            with open(f"/proc/{p.pid}/comm") as f:
                if f.read().strip() == "sleep":
                    return p
        except OSError:
            pass
        time.sleep(0.01)
    p.kill()
    p.wait()
    raise AssertionError("the namespaced child did not start")


@pytest.fixture
def nested():
    """A process that is root (full CapEff) in a user namespace of its own, with a mount ns."""
    p = _started(["unshare", "-U", "-r", "-m", "sleep", "30"])
    yield p.pid
    p.kill()
    p.wait()


@pytest.fixture
def doubly_nested():
    """root of a user namespace nested in another one (as `unshare -U -r` inside a container)."""
    p = _started(["unshare", "-U", "-r", "unshare", "-U", "-r", "-m", "sleep", "30"])
    # the pid Popen knows is the outer unshare, which execs the inner one: same process
    yield p.pid
    p.kill()
    p.wait()


def test_own_namespace_uses_capeff(nested):
    assert nscaps.capable_over(nested, "mnt", CAP_SYS_ADMIN)        # it owns its mount namespace


def test_full_capeff_does_not_reach_an_ancestors_objects(nested):
    # its pid and net namespaces are the host's: owned by the initial user namespace
    assert not nscaps.capable_over(nested, "pid", CAP_SYS_ADMIN)
    assert not nscaps.capable_over(nested, "net", CAP_SYS_ADMIN)
    fd = os.open("/proc/self/ns/user", os.O_RDONLY)
    try:
        assert not nscaps.capable_in(nested, fd, CAP_SYS_ADMIN)
    finally:
        os.close(fd)


def test_creator_holds_every_capability_in_descendants(nested, doubly_nested):
    fd = os.open(f"/proc/{nested}/ns/user", os.O_RDONLY)
    try:
        assert nscaps.capable_in(os.getpid(), fd, CAP_SYS_ADMIN)     # host root created it
    finally:
        os.close(fd)
    fd = os.open(f"/proc/{doubly_nested}/ns/user", os.O_RDONLY)
    try:
        assert nscaps.capable_in(os.getpid(), fd, CAP_SYS_ADMIN)
        assert not nscaps.capable_in(nested, fd, CAP_SYS_ADMIN)      # an unrelated branch
    finally:
        os.close(fd)


def test_an_unprivileged_creator_is_not_capable_above_its_namespace():
    """A host user (no capabilities) that made a user namespace holds caps in it only."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(4242, 4242, 4242)
            os.setresuid(4242, 4242, 4242)
            p = subprocess.Popen(["unshare", "-U", "sleep", "30"])
            os.write(w, str(p.pid).encode())
            p.wait()
        finally:
            os._exit(0)
    os.close(w)
    child = int(os.read(r, 64) or b"0")
    os.close(r)
    try:
        time.sleep(0.2)
        fd = os.open(f"/proc/{child}/ns/user", os.O_RDONLY)
        try:
            assert nscaps.capable_in(os.getpid(), fd, CAP_SYS_ADMIN)        # root: ancestor's creator rule
            host = os.open("/proc/self/ns/user", os.O_RDONLY)
            try:
                assert not nscaps.capable_in(child, host, CAP_SYS_ADMIN)
            finally:
                os.close(host)
        finally:
            os.close(fd)
    finally:
        os.kill(child, 9)
        os.waitpid(pid, 0)
