"""The built-in image: a minimal rootfs made from the host's busybox-static.

It is root-owned and read-only to every container: `isobox run` mounts a writable layer of
its own over it for each one (cli/layer.py). Images built before that (marked by a
`.complete` file inside the rootfs, where any container could write) may carry what a
container left, so they are rebuilt once; the mark is now outside the rootfs.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import uuid

from isobox.errors import IsoboxError

IMAGES = "/var/lib/isobox/images"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
MARK = ".built"      # beside rootfs/, never inside it


def builtin_rootfs(name: str = "busybox") -> str:
    if name != "busybox":
        raise IsoboxError(f"unknown image {name!r}: the built-in image is 'busybox'; use --rootfs DIR for others")
    top = os.path.join(IMAGES, name)
    root = os.path.join(top, "rootfs")
    if os.path.exists(os.path.join(top, MARK)):
        return root
    src = next((p for p in BUSYBOX_CANDIDATES if os.path.exists(p)), None)
    if not src:
        raise IsoboxError("busybox-static is not installed: apt-get install busybox-static")
    os.makedirs(top, mode=0o755, exist_ok=True)
    lock = os.open(os.path.join(top, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)      # two first runs at once build it once
        if not os.path.exists(os.path.join(top, MARK)):
            _rebuild(src, top, root)
    finally:
        os.close(lock)
    return root


def _rebuild(busybox: str, top: str, root: str) -> None:
    for name in os.listdir(top):              # what a build that died left
        if name.startswith(("rootfs.new-", "rootfs.old-")):
            shutil.rmtree(os.path.join(top, name), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix="rootfs.new-", dir=top)
    mask = os.umask(0o022)                    # the caller's umask must not make the image writable
    try:
        os.chmod(tmp, 0o755)
        build_busybox_rootfs(busybox, tmp)
        old = os.path.join(top, f"rootfs.old-{uuid.uuid4().hex[:8]}")
        if os.path.lexists(root):
            os.rename(root, old)              # aside, not deleted in place: no half-image at root
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.umask(mask)
    with open(os.path.join(top, MARK + ".tmp"), "w") as f:
        f.write("busybox\n")
    os.rename(os.path.join(top, MARK + ".tmp"), os.path.join(top, MARK))
    shutil.rmtree(old, ignore_errors=True)


def build_busybox_rootfs(busybox: str, root: str) -> None:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "var", "run"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    shutil.copy2(busybox, os.path.join(root, "bin/busybox"))
    names = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for full in names:
        link = os.path.join(root, full)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            os.symlink("/bin/busybox", link)
    with open(os.path.join(root, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    with open(os.path.join(root, "etc/group"), "w") as f:
        f.write("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
