"""Device nodes shipped in an image, through dockerd: `docker run --privileged --runtime=isobox`.

dockerd extracts an imported layer as host root, so a character-device entry of the tar becomes
a live node in the container's rootfs, and --privileged sends the cgroup rule {"allow": true}.
isobox clamps that rule to the policy's [devices] allow list: the image's c 1 11 (kmsg),
c 10 237 (loop-control) and c 5 1 (console) nodes cannot be opened, and a marker written to the
kmsg node never reaches the host's kernel log. The container's own terminal (-t) still works.
"""
from __future__ import annotations

import os
import re
import shutil
import tarfile
import uuid

from e2e.conftest import IMAGE, unique
from e2e.test_docker import RT, remove

NODES = {"kmsg": (1, 11), "loop-control": (10, 237), "console": (5, 1)}


def host_kmsg() -> str:
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    out = []
    try:
        while True:
            try:
                out.append(os.read(fd, 8192).decode(errors="replace"))
            except BlockingIOError:
                return "".join(out)
            except BrokenPipeError:
                continue                    # a record was overwritten while reading
    finally:
        os.close(fd)


def node_image_tar(busybox_tar: str, dest: str) -> str:
    """The busybox rootfs tar plus /evil/<name> character-device entries (mode 0666)."""
    shutil.copy(busybox_tar, dest)
    with tarfile.open(dest, "a") as t:
        d = tarfile.TarInfo("evil")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        t.addfile(d)
        for name, (mj, mn) in NODES.items():
            ti = tarfile.TarInfo(f"evil/{name}")
            ti.type, ti.mode, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 0o666, mj, mn
            t.addfile(ti)
    return dest


def test_privileged_container_cannot_use_device_nodes_of_its_image(dockerd, busybox_tar, tmp_path):
    image = f"isobox-e2e/devnodes:{uuid.uuid4().hex[:8]}"
    marker = f"isobox-e2e-devices-{uuid.uuid4().hex}"
    dockerd("import", node_image_tar(busybox_tar, str(tmp_path / "nodes.tar")), image, check=True)
    name = unique("dev")
    try:
        script = (f"ls -l /evil; echo {marker} > /evil/kmsg; echo kmsg-rc=$?; "
                  "for n in loop-control console; do (: < /evil/$n); echo $n-rc=$?; done; "   # open, never read
                  "cat /sys/fs/cgroup/devices/devices.list")
        r = dockerd("run", "--name", name, "--privileged", RT, image, "sh", "-c", script)
        assert r.returncode == 0, r.stderr
        out = r.stdout + r.stderr
        assert re.search(r"^c.*\s1,\s+11\s.*kmsg$", r.stdout, re.M), out  # the live node dockerd made
        assert marker not in host_kmsg(), f"the container wrote into the host's kernel log:\n{out}"
        assert "kmsg-rc=1" in out and "loop-control-rc=1" in out and "console-rc=1" in out, out
        assert out.count("Operation not permitted") == 3, out
        assert "a *:* rwm" not in r.stdout, out                     # the v1 list is clamped
    finally:
        remove(dockerd, name)
        dockerd("rmi", "-f", image)


def test_privileged_tty_still_works(dockerd):
    name = unique("devtty")
    try:
        r = dockerd("run", "--name", name, "--privileged", "-t", RT, IMAGE, "sh", "-c",
                    "tty; echo hi > /dev/tty && echo tty-ok; cat /dev/null && echo null-ok")
        assert r.returncode == 0, r.stderr
        assert "/dev/pts/0" in r.stdout and "tty-ok" in r.stdout and "null-ok" in r.stdout, r.stdout
    finally:
        remove(dockerd, name)
