"""The built-in image: a minimal rootfs made from the host's busybox-static."""
from __future__ import annotations

import os
import shutil
import subprocess

from isobox.errors import IsoboxError

IMAGES = "/var/lib/isobox/images"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


def builtin_rootfs(name: str = "busybox") -> str:
    if name != "busybox":
        raise IsoboxError(f"unknown image {name!r}: the built-in image is 'busybox'; use --rootfs DIR for others")
    root = os.path.join(IMAGES, name, "rootfs")
    if os.path.exists(os.path.join(root, ".complete")):
        return root
    src = next((p for p in BUSYBOX_CANDIDATES if os.path.exists(p)), None)
    if not src:
        raise IsoboxError("busybox-static is not installed: apt-get install busybox-static")
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build_busybox_rootfs(src, tmp)
    shutil.rmtree(root, ignore_errors=True)
    os.rename(tmp, root)
    open(os.path.join(root, ".complete"), "w").close()
    return root


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
