"""isoboxd refuses set-uid files in host directories bound into real containers.

A privileged busybox container (isobox-runc, the real daemon's trap) with a writable bind of a
host directory: copying busybox there and making it set-uid root must fail, and the host file
must stay without S_ISUID; the same inside the container's own root filesystem works."""
from __future__ import annotations

import os
import stat

import pytest

from integration.test_isolation import privileged

from isobox.daemon import client


@pytest.fixture
def daemon():
    client.ensure_running()
    yield


def _with_bind(src: str):
    def edit(spec: dict) -> None:
        privileged(spec)
        spec["mounts"].append({"destination": "/data", "type": "bind", "source": src, "options": ["rbind", "rw"]})
    return edit


def _sh(runtime, rootfs: str, script: str, edit) -> tuple[int, str]:
    r = runtime.run(runtime.bundle(rootfs, ["sh", "-c", script], edit=edit))
    return r.returncode, r.stdout + r.stderr


@pytest.fixture
def plant(tmp_path) -> str:
    d = tmp_path / "plant"
    d.mkdir()
    os.chmod(d, 0o755)
    return str(d)


def test_setuid_copy_in_host_bind_refused(daemon, runtime, busybox_rootfs, plant):
    rc, out = _sh(runtime, busybox_rootfs, "cp /bin/busybox /data/bb && chmod 4755 /data/bb; echo rc=$?",
                  _with_bind(plant))
    assert "rc=0" not in out, out
    assert os.path.exists(os.path.join(plant, "bb")), out
    assert not os.stat(os.path.join(plant, "bb")).st_mode & (stat.S_ISUID | stat.S_ISGID)


def test_install_setuid_in_host_bind_refused(daemon, runtime, busybox_rootfs, plant):
    rc, out = _sh(runtime, busybox_rootfs, "install -m 4755 /bin/busybox /data/bb2; echo rc=$?", _with_bind(plant))
    assert "rc=0" not in out, out
    p = os.path.join(plant, "bb2")
    assert not os.path.exists(p) or not os.stat(p).st_mode & (stat.S_ISUID | stat.S_ISGID)


def test_setuid_in_rootfs_allowed(daemon, runtime, busybox_rootfs, plant):
    rc, out = _sh(runtime, busybox_rootfs,
                  "cp /bin/busybox /bin/busybox-copy && chmod 4755 /bin/busybox-copy && stat -c %a /bin/busybox-copy; rm -f /bin/busybox-copy",
                  _with_bind(plant))
    assert rc == 0 and "4755" in out, out
