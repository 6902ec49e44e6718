"""isoboxd's mount handlers end to end: real isobox containers whose trapped mount, umount2
and fsopen calls are answered by the real handlers (isobox.daemon.syscalls), over the real
seccomp listener, with the real isoboxd FUSE nodes underneath. Nothing is mocked.

The listener goes to a Notifier (the same class isoboxd runs) that this test owns, through
ISOBOX_SECCOMP_TRAP_SOCKET: a running isoboxd server loads its handlers once, at start, so
the test does not depend on when it was (re)started."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading

import pytest

from integration.test_isolation import privileged

from isobox.daemon import client
from isobox.daemon.fs.context import Container
from isobox.daemon.syscalls import registry
from isobox.daemon.syscalls.notify import Notifier

MIB = 1024 * 1024


class MountSupervisor(threading.Thread):
    """Accepts listener fds on a socket and serves them with isoboxd's handlers."""

    def __init__(self, path: str):
        super().__init__(daemon=True)
        self.path = path
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(16)
        self.verdicts: list[tuple[str, dict, str, str]] = []    # (syscall, detail, kind, reason)
        self.notifier = Notifier(registry.load(), self._audit, lambda key: None, slow=frozenset(registry.SLOW))
        threading.Thread(target=self.notifier.serve, daemon=True).start()
        self.stopped = False

    def _audit(self, call, v) -> None:
        self.verdicts.append((call.name, dict(call.detail), v.kind, v.reason))

    def run(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            with conn:
                data, fds, _, _ = socket.recv_fds(conn, 65536, 4)
            if not fds:
                continue
            msg = json.loads(data)
            self.notifier.add(fds[0], msg["key"] or msg["id"],
                              Container(key=msg["key"], id=msg["id"], uid_base=0, gid_base=0, cgroups={}))

    def stop(self) -> None:
        self.stopped = True
        with contextlib.suppress(OSError):
            self.srv.shutdown(socket.SHUT_RDWR)
        self.srv.close()


@pytest.fixture
def sup(tmp_path, monkeypatch):
    client.ensure_running()          # the FUSE nodes the new mounts carry are isoboxd's
    s = MountSupervisor(str(tmp_path / "trap.sock"))
    s.start()
    monkeypatch.setenv("ISOBOX_SECCOMP_TRAP_SOCKET", s.path)
    yield s
    s.stop()


def limited_privileged(spec: dict) -> None:
    privileged(spec)
    spec["linux"]["resources"] = {"memory": {"limit": 256 * MIB}}


def limited(spec: dict) -> None:
    spec["linux"]["resources"] = {"memory": {"limit": 256 * MIB}}


def run_sh(runtime, rootfs: str, script: str, edit=limited_privileged) -> subprocess.CompletedProcess:
    r = runtime.run(runtime.bundle(rootfs, ["sh", "-c", script], edit=edit), timeout=60)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r


def kv(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


# ------------------------------------------------------------------ new proc and sysfs

def test_proc_mount_carries_emulation_and_masks(sup, runtime, busybox_rootfs):
    r = run_sh(runtime, busybox_rootfs, (
        "mkdir -p /mnt/p /tmp/x && touch /tmp/x/f\n"
        "mount -t proc proc /mnt/p; echo rc=$?\n"
        "echo mem=$(head -1 /mnt/p/meminfo | tr -s ' ')\n"
        "echo uptime=$(cut -d' ' -f1 /mnt/p/uptime)\n"
        "echo kcore=$(grep -c ' /mnt/p/kcore \\| /mnt/p/keys ' /proc/self/mountinfo)\n"
        "echo acpi=$(ls /mnt/p/acpi | wc -l)\n"
        "echo sysfuse=$(grep ' /mnt/p/sys ' /proc/self/mountinfo | grep -c fuse.isoboxd)\n"
        "echo robus=$(grep ' /mnt/p/bus ' /proc/self/mountinfo | cut -d' ' -f6 | cut -d, -f1)\n"
        # the nodes are locked like the container's own: moving one away is the kernel's EINVAL
        "mount --move /mnt/p/meminfo /tmp/x/f 2>/dev/null; echo move=$?\n"
        "umount /mnt/p; echo umount=$?\n"
        "echo left=$(grep -c ' /mnt/p' /proc/self/mountinfo)\n"))
    got = kv(r.stdout)
    assert got["rc"] == "0", r.stderr
    assert got["mem"] == "MemTotal: 262144 kB"
    assert 0 <= float(got["uptime"]) < 30
    assert int(got["kcore"]) >= 1 and got["acpi"] == "0"
    assert got["sysfuse"] == "1" and got["robus"] == "ro"
    assert got["move"] != "0"
    assert got["umount"] == "0" and got["left"] == "0"
    assert ("mount", "value") in [(s, k) for s, _, k, _ in sup.verdicts]


def test_proc_mount_options(sup, runtime, busybox_rootfs):
    r = run_sh(runtime, busybox_rootfs, (
        "mkdir -p /mnt/p; mount -t proc -o ro,nosuid,hidepid=2 proc /mnt/p; echo rc=$?\n"
        "echo opts=$(grep ' /mnt/p ' /proc/self/mountinfo | cut -d' ' -f6)\n"
        "echo super=$(grep ' /mnt/p ' /proc/self/mountinfo | sed 's/.* - //')\n"
        "echo romem=$(grep ' /mnt/p/meminfo ' /proc/self/mountinfo | cut -d' ' -f6 | cut -d, -f1)\n"))
    got = kv(r.stdout)
    assert got["rc"] == "0", r.stderr
    assert got["opts"].startswith("ro,nosuid")
    assert "hidepid=invisible" in got["super"] or "hidepid=2" in got["super"]
    assert got["romem"] == "ro"


def test_unshare_mount_proc_nested(sup, runtime, busybox_rootfs):
    inner = "head -1 /proc/meminfo; ps -o pid,comm | wc -l"
    r = run_sh(runtime, busybox_rootfs,
               f"unshare -pfm --mount-proc sh -c '{inner}'; echo rc1=$?\n"
               f"unshare -Urpfm sh -c \"unshare -Urpfm --mount-proc sh -c '{inner}'\"; echo rc3=$?\n")
    got = kv(r.stdout)
    assert got["rc1"] == "0" and got["rc3"] == "0", r.stderr
    assert r.stdout.count("MemTotal:         262144 kB") == 2
    counts = [int(l) for l in r.stdout.splitlines() if l.strip().isdigit()]
    assert len(counts) == 2 and all(c <= 5 for c in counts), r.stdout   # only the new pid namespace's


def test_sysfs_mount(sup, runtime, busybox_rootfs):
    r = run_sh(runtime, busybox_rootfs, (
        "mkdir -p /mnt/s; mount -t sysfs sysfs /mnt/s; echo rc=$?\n"
        "echo cpu=$(grep ' /mnt/s/devices/system/cpu ' /proc/self/mountinfo | grep -c fuse.isoboxd)\n"
        "echo online=$(cat /mnt/s/devices/system/cpu/online)\n"
        "echo own=$(cat /sys/devices/system/cpu/online)\n"
        "echo firmware=$(ls /mnt/s/firmware | wc -l)\n"
        "echo net=$(ls /mnt/s/class/net | tr '\\n' ' ')\n"
        "umount /mnt/s; echo umount=$?\n"))
    got = kv(r.stdout)
    assert got["rc"] == "0" and got["cpu"] == "1" and got["firmware"] == "0", (r.stdout, r.stderr)
    assert got["online"] == got["own"]               # isoboxd's cpu view, as in the container's /sys
    assert got["net"].split() == ["lo"]              # the container's own net namespace
    assert got["umount"] == "0"


# ------------------------------------------------------------------ refusals

def test_host_filesystem_refused(sup, runtime, busybox_rootfs):
    r = run_sh(runtime, busybox_rootfs, "mount -t ext4 /dev/null /mnt; echo rc=$?")
    assert kv(r.stdout)["rc"] != "0"
    hits = [v for v in sup.verdicts if v[0] == "mount" and v[1].get("fstype") == "ext4"]
    assert hits and hits[0][2] == "error" and "ext4" in hits[0][3]
    assert hits[0][1]["source"] == "/dev/null" and hits[0][1]["target"] == "/mnt"


def test_umount_proc_and_nodes(sup, runtime, busybox_rootfs):
    r = run_sh(runtime, busybox_rootfs, (
        "umount /proc 2>&1; echo proc=$?\n"
        "umount /sys 2>&1; echo sys=$?\n"
        "umount /proc/meminfo 2>&1; echo meminfo=$?\n"
        "umount /proc/keys 2>&1; echo keys=$?\n"))
    assert "proc=1" in r.stdout and "meminfo=1" in r.stdout, r.stdout
    assert "can't unmount /proc: Device or resource busy" in r.stdout
    assert "can't unmount /sys: Device or resource busy" in r.stdout
    assert "can't unmount /proc/meminfo: Invalid argument" in r.stdout
    assert "can't unmount /proc/keys: Invalid argument" in r.stdout
    errs = {v[1]["target"]: v[3] for v in sup.verdicts if v[0] in ("umount", "umount2") and v[2] == "error"}
    assert set(errs) >= {"/proc", "/sys", "/proc/meminfo", "/proc/keys"}


def test_fsopen_proc_is_enosys(sup, runtime, busybox_rootfs):
    """fsopen itself is tested through its audit line (busybox has no fsopen caller): the
    handler is reached from a real trapped call by a tiny static probe when gcc exists."""
    import shutil
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed: the fsopen probe cannot be built")
    probe = os.path.join(runtime.tmp, "fsprobe.c")
    with open(probe, "w") as f:
        f.write('#include <stdio.h>\n#include <errno.h>\n#include <unistd.h>\n#include <sys/syscall.h>\n'
                'int main(int c, char **v) { int fd = syscall(430, v[1], 1);'
                ' printf("%s=%d\\n", v[1], fd < 0 ? errno : 0); return 0; }\n')
    root = os.path.join(runtime.tmp, "rootfs")
    from conftest import make_rootfs
    make_rootfs(root)
    subprocess.run(["gcc", "-static", "-O1", "-o", os.path.join(root, "fsprobe"), probe], check=True)
    r = run_sh(runtime, root, "/fsprobe proc; /fsprobe sysfs; /fsprobe tmpfs")
    got = kv(r.stdout)
    assert got == {"proc": str(38), "sysfs": str(38), "tmpfs": "0"}   # ENOSYS: callers fall back to mount(2)


def test_unprivileged_container_still_refused(sup, runtime, busybox_rootfs):
    r = run_sh(runtime, busybox_rootfs, (
        "mkdir -p /tmp/p; mount -t proc proc /tmp/p; echo proc=$?\n"
        "mount -t sysfs sysfs /tmp/p; echo sysfs=$?\n"
        "mount -t tmpfs tmpfs /tmp/p; echo tmpfs=$?\n"
        "umount /proc; echo umount=$?\n"), edit=limited)
    got = kv(r.stdout)
    assert got == {"proc": "1", "sysfs": "1", "tmpfs": "1", "umount": "1"}, (r.stdout, r.stderr)
    assert r.stderr.count("permission denied") >= 3 or r.stderr.count("Operation not permitted") >= 1
    assert "Device or resource busy" not in r.stderr


def test_through_running_isoboxd(runtime, busybox_rootfs):
    """The same path through the real isoboxd (its holder, server and audit log), when the
    running server has loaded these handlers (a server started before they existed has not)."""
    client.ensure_running()
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "mkdir -p /mnt/p; mount -t proc proc /mnt/p; echo rc=$?;"
                                        " head -1 /mnt/p/meminfo"], edit=limited_privileged)
    cid = runtime.new_id()
    r = runtime("run", "--bundle", b, cid, timeout=60)
    from isobox.daemon import paths
    with open(paths.AUDIT_LOG) as f:
        lines = [json.loads(l) for l in f if cid in l]
    if not any(l["syscall"] == "mount" for l in lines):
        pytest.skip("the running isoboxd server predates the mount handlers (restart isoboxd to load them)")
    assert "rc=0" in r.stdout and "MemTotal:         262144 kB" in r.stdout, (r.stdout, r.stderr)
    assert any(l["syscall"] == "mount" and l["decision"] == "performed" for l in lines)


def test_new_proc_mount_gets_the_specs_own_masks(runtime, busybox_rootfs):
    """Masks an engine adds to the spec (maskedPaths, readonlyPaths under /proc) are carried
    into a proc the container mounts itself, as isobox's defaults are; a path through a
    symlink or with ".." is ignored rather than followed out of the new tree."""
    client.ensure_running()

    def edit(spec: dict) -> None:
        limited_privileged(spec)
        spec["linux"]["maskedPaths"] = ["/proc/cmdline", "/proc/self/environ", "/proc/../etc/hostname"]
        spec["linux"]["readonlyPaths"] = ["/proc/sysvipc"]

    b = runtime.bundle(busybox_rootfs, ["sh", "-c",
                                        "echo own=$(wc -c < /proc/cmdline); mkdir -p /mnt/p; mount -t proc proc /mnt/p;"
                                        " echo rc=$?; echo new=$(wc -c < /mnt/p/cmdline);"
                                        " echo ro=$(grep ' /mnt/p/sysvipc ' /proc/self/mountinfo | cut -d' ' -f6);"
                                        " echo env=$(grep -c ' /mnt/p/self/environ \\| /mnt/p/[0-9]*/environ '"
                                        " /proc/self/mountinfo)"], edit=edit)
    cid = runtime.new_id()
    r = runtime("run", "--bundle", b, cid, timeout=60)
    got = kv(r.stdout)
    assert got.get("rc") == "0", (r.stdout, r.stderr)
    with open("/proc/cmdline") as f:
        assert len(f.read()) > 0                     # the host's is not empty: masking shows
    assert got["own"] == "0" and got["new"] == "0", r.stdout
    assert got["ro"].split(",")[0] == "ro", r.stdout
    assert got["env"] == "0", r.stdout
