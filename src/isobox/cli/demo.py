"""`isobox demo`: a privileged container, and what it believes next to what the host sees."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

from isobox.cli import bundle, image, layer

# Runs inside; each line is key=value. The mount attacks are the ones a container escape
# would start with; the kernel refuses them because the initial mounts are locked.
_INSIDE = r'''
try() { r=$("$@" 2>&1) && echo ok || echo "${r##*: }"; }
echo "user=$(id -u):$(id -g) ($(id -un))"
echo "pid=$$"
echo "caps=$(grep CapEff /proc/self/status | cut -f2)"
echo "map=$(cat /proc/self/uid_map | tr -s ' ' | sed 's/^ //')"
echo "rootowner=$(stat -c %u:%g /bin/busybox)"
hostname isobox-demo && echo "hostname=$(hostname)"
mkdir -p /mnt/p
echo "mem=$(head -1 /proc/meminfo | tr -s ' ' | cut -d' ' -f2-)"
echo "free=$(free | awk '/^Mem:/{print $2}') kB"
echo "cpus=$(grep -c ^processor /proc/cpuinfo)"
echo "uptime=$(cut -d' ' -f1 /proc/uptime) s"
echo "newproc=$(mount -t proc proc /mnt/p 2>/dev/null && echo "works, its meminfo: $(head -1 /mnt/p/meminfo | tr -s ' ' | cut -d' ' -f2-)" || echo refused)"
echo "umount=$(try umount /proc)"
echo "umountl=$(try umount -l /sys)"
echo "remount=$(try mount -o remount,suid /dev)"
mkdir -p /mnt/m; echo "move=$(try mount --move /proc /mnt/m)"
echo "tmpfs=$(try mount -t tmpfs none /mnt/m)"
echo "ready"
read x
'''


_ERRNO = {"Invalid argument": "refused: EINVAL", "permission denied (are you root?)": "refused: EPERM",
          "Operation not permitted": "refused: EPERM", "Device or resource busy": "refused: EBUSY",
          "ok": "succeeded"}


def _status(pid: int, key: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].split()[0]
    return "?"


def _host_kb(key: str) -> str:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.split()[1]
    return "?"


def _host_uptime() -> str:
    with open("/proc/uptime") as f:
        return f.read().split()[0]


def demo() -> int:
    cid = "demo-" + uuid.uuid4().hex[:8]
    # its own writable layer over the image, like `isobox run` (the script below mkdirs in /mnt)
    with layer.writable_layer(cid, image.builtin_rootfs()) as rootfs:
        return _demo(cid, rootfs)


def _demo(cid: str, rootfs: str) -> int:
    spec = bundle.make_spec(["sh", "-c", _INSIDE], rootfs, privileged=True, memory="256m", cpus="1")
    path = bundle.write_bundle(cid, spec)
    runc = [sys.executable, "-I", "-m", "isobox.runc.main"]
    try:
        proc = subprocess.Popen([*runc, "run", "--bundle", path, cid], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        inside: dict[str, str] = {}
        assert proc.stdout and proc.stdin
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line == "ready":
                break
            key, _, val = line.partition("=")
            inside[key] = _ERRNO.get(val, val)
        st = subprocess.run([*runc, "state", cid], capture_output=True, text=True)
        import json
        state = json.loads(st.stdout) if st.returncode == 0 else {}
        pid = state.get("pid", 0)
        host = {}
        if pid:
            host["user"] = _status(pid, "Uid")
            with open(f"/proc/{pid}/uid_map") as f:
                host["map"] = " ".join(f.read().split())
        with open(os.path.join("/run/isobox", cid, "state.json")) as f:
            method = json.load(f).get("rootfs_method", "?")
        rows = [
            ("user", f"root: {inside.get('user')}", f"uid {host.get('user')}: an unprivileged host user"),
            ("ID range", f"map {inside.get('map')}", "exclusive 65536 host IDs from the isobox pool"),
            ("capabilities", f"all: CapEff {inside.get('caps')}", "none over the host (they hold only in "
                                                                  "its own user namespace)"),
            ("pid", inside.get("pid", "?"), f"{pid}"),
            ("hostname", inside.get("hostname", "?"), f"{socket.gethostname()} (unchanged)"),
            ("image files", f"owned by {inside.get('rootowner')}", f"owned by 0:0 on disk, nothing chowned "
                                                                   f"({method})"),
            ("/proc/meminfo", inside.get("mem", "?"), f"{_host_kb('MemTotal')} kB (isoboxd shows the limit)"),
            ("free (sysinfo)", inside.get("free", "?"), "answered by isoboxd from the cgroup"),
            ("CPUs (cpuinfo)", inside.get("cpus", "?"), f"{os.cpu_count()}"),
            ("uptime", inside.get("uptime", "?"), f"{_host_uptime()} s (the host's)"),
            ("mount -t proc", inside.get("newproc", "?"), "performed by isoboxd, with its nodes and masks"),
            ("umount /proc", inside.get("umount", "?"), "the initial mounts are locked; isoboxd says EBUSY"),
            ("umount -l /sys", inside.get("umountl", "?"), "locked"),
            ("remount /dev suid", inside.get("remount", "?"), "its nosuid flag is locked too (MNT_LOCK_NOSUID)"),
            ("mount --move /proc", inside.get("move", "?"), "locked"),
            ("mount a new tmpfs", inside.get("tmpfs", "?"), "allowed: mounts it makes itself are its own"),
        ]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        print(f"isobox demo: a --privileged container ({cid}), 256 MiB, 1 CPU\n")
        print(f"{'':{w0}}  {'what the container believes':{w1}}  what the host sees")
        for r in rows:
            print(f"{r[0]:{w0}}  {r[1]:{w1}}  {r[2]}")
        proc.stdin.write("done\n")
        proc.stdin.close()
        proc.wait(timeout=30)
        return 0 if inside.get("umount", "").startswith("refused") else 1
    finally:
        # the container goes before its layer does, whatever ended the demo
        subprocess.run([*runc, "delete", "--force", cid], capture_output=True)
        bundle.remove_bundle(path)
