"""What a container cannot undo or see: locked initial mounts (even with every capability),
its own pid/uts/net namespaces, capabilities, credentials and namespaced sysctls.

The expected errno of each attack is the one recorded in ../shared/reference/locked-mounts.md:
umount of a locked mount gives EINVAL, clearing a locked ro/nosuid/nodev/noexec flag gives
EPERM. Exact errnos come from a tiny static probe (one syscall, prints OK or the errno name)
compiled into a private copy of the busybox rootfs; busybox's own messages are checked too.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest

from conftest import make_rootfs

# mount(2) flags (uapi/linux/mount.h)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC = 32, 4096, 8192, 16384
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
MNT_DETACH = 2
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOEXEC = 0x1, 0x8

PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/mount.h>
static int report(int rc) {
    if (rc < 0) printf("ERR %s\n", strerrorname_np(errno)); else printf("OK\n");
    return 0;
}
int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *op = argv[1];
    if (!strcmp(op, "umount") && argc >= 4)
        return report(umount2(argv[2], (int)strtoul(argv[3], 0, 0)));
    if (!strcmp(op, "mount") && argc >= 6)
        return report(mount(argv[2][0] ? argv[2] : NULL, argv[3], argv[4][0] ? argv[4] : NULL,
                            strtoul(argv[5], 0, 0), argc > 6 ? argv[6] : NULL));
    if (!strcmp(op, "setattr") && argc >= 5) {
        struct mount_attr a = {0};
        a.attr_set = strtoull(argv[3], 0, 0);
        a.attr_clr = strtoull(argv[4], 0, 0);
        return report((int)syscall(SYS_mount_setattr, AT_FDCWD, argv[2], 0, &a, sizeof a));
    }
    if (!strcmp(op, "openw") && argc >= 3)
        return report(open(argv[2], O_WRONLY));
    return 2;
}
"""


def privileged(spec: dict) -> None:
    """What `docker run --privileged` hands over: every capability, no masks, rw sysfs."""
    from isobox.linux.capabilities import NAMES
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    caps = list(NAMES[:last + 1])
    for key in ("bounding", "effective", "permitted"):
        spec["process"]["capabilities"][key] = list(caps)
    spec["linux"]["maskedPaths"] = []
    spec["linux"]["readonlyPaths"] = []
    for m in spec["mounts"]:
        if m["type"] == "sysfs":
            m["options"] = [o for o in m["options"] if o != "ro"]


def full_cap_mask() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return (1 << (int(f.read()) + 1)) - 1


@pytest.fixture(scope="module")
def probe_rootfs(tmp_path_factory) -> str:
    """A private busybox rootfs with /probe and an empty /mnt (the shared one stays untouched)."""
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed: the exact-errno probe cannot be built")
    d = tmp_path_factory.mktemp("probe")
    src = d / "probe.c"
    src.write_text(PROBE_C)
    root = make_rootfs(str(d / "rootfs"))
    r = subprocess.run(["gcc", "-static", "-O1", "-o", os.path.join(root, "probe"), str(src)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot build a static probe: {r.stderr.strip()[:200]}")
    os.makedirs(os.path.join(root, "mnt"), exist_ok=True)
    return root


def sh(runtime, rootfs: str, script: str, edit=None, priv: bool = True):
    def _edit(spec):
        if priv:
            privileged(spec)
        if edit:
            edit(spec)
    r = runtime.run(runtime.bundle(rootfs, ["sh", "-c", script], edit=_edit))
    return r


def results(out: str) -> dict[str, str]:
    """Lines `name|result` -> {name: result}."""
    res = {}
    for line in out.splitlines():
        if "|" in line:
            name, _, val = line.partition("|")
            res[name] = val.strip()
    return res


# t NAME CMD...: runs CMD, prints NAME|rc=N <its stderr/stdout on one line>
T_FUNC = 't() { n=$1; shift; o=$("$@" 2>&1); rc=$?; echo "$n|rc=$rc $(echo $o)"; }\n'


# ---------------------------------------------------------------- locked mounts


def test_umount_of_initial_mounts_is_einval(runtime, probe_rootfs):
    targets = ["/proc", "/sys", "/dev/null", "/proc/keys", "/proc/timer_list", "/dev"]
    lines = [T_FUNC]
    for i, t in enumerate(targets):
        lines += [f"t bb{i} umount {t}", f"t bbl{i} umount -l {t}",
                  f"echo p{i}'|'$(/probe umount {t} 0)", f"echo pl{i}'|'$(/probe umount {t} {MNT_DETACH})"]
    lines.append(f"echo root'|'$(/probe umount / {MNT_DETACH})")
    lines.append("grep -c . /proc/self/mountinfo | sed 's/^/count|/'")
    r = sh(runtime, probe_rootfs, "\n".join(lines))
    assert r.returncode == 0, r.stderr
    res = results(r.stdout)
    for i, t in enumerate(targets):
        # the container's own /proc and /sys: isoboxd answers EBUSY (as Sysbox); the rest is the kernel's EINVAL
        words, name = ("Device or resource busy", "EBUSY") if t in ("/proc", "/sys") else ("Invalid argument", "EINVAL")
        for key in (f"bb{i}", f"bbl{i}"):
            assert res[key].startswith("rc=1") and words in res[key], (t, res[key])
        assert res[f"p{i}"] == f"ERR {name}", (t, res[f"p{i}"])
        assert res[f"pl{i}"] == f"ERR {name}", (t, res[f"pl{i}"])
    assert res["root"] == "ERR EINVAL"


def test_still_mounted_after_umount_attempts(runtime, probe_rootfs):
    r = sh(runtime, probe_rootfs, "umount -l /proc/keys 2>/dev/null; umount -l /proc 2>/dev/null; "
                                  "cat /proc/keys | wc -c; cat /proc/self/mountinfo")
    assert r.returncode == 0, r.stderr
    count, _, mi = r.stdout.partition("\n")
    assert count.strip() == "0"                     # still /dev/null over the host's keys
    assert " /proc/keys " in mi and " /proc " in mi


def test_clearing_locked_flags_is_eperm(runtime, probe_rootfs):
    ro_bind = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME
    lines = [T_FUNC,
             # /proc/bus: one of isobox's own read-only paths (ro,nosuid,nodev,noexec)
             "t bb_rw mount -o remount,rw /proc/bus",
             "t bb_bindrw mount -o remount,bind,rw /proc/bus",
             f"echo p_rw'|'$(/probe mount '' /proc/bus '' {ro_bind})",
             f"echo p_rw_ctl'|'$(/probe mount '' /proc/bus '' {ro_bind | MS_RDONLY})",
             f"echo p_sb_rw'|'$(/probe mount '' /proc/bus '' {MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC})",
             # /dev: tmpfs rw,nosuid (strictatime) in the template
             "t bb_suid mount -o remount,suid /dev",
             f"echo p_suid'|'$(/probe mount '' /dev '' {MS_REMOUNT | MS_BIND | MS_STRICTATIME})",
             f"echo p_suid_ctl'|'$(/probe mount '' /dev '' {MS_REMOUNT | MS_BIND | MS_STRICTATIME | MS_NOSUID})",
             # /dev is not noexec in the template; /dev/shm (nosuid,nodev,noexec) and /dev/pts are
             "t bb_exec mount -o remount,exec /dev/shm",
             f"echo p_exec'|'$(/probe mount '' /dev/shm '' {MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | MS_RELATIME})",
             f"echo p_exec_ctl'|'$(/probe mount '' /dev/shm '' {ro_bind & ~MS_RDONLY})",
             f"echo p_exec_pts'|'$(/probe mount '' /dev/pts '' {MS_REMOUNT | MS_BIND | MS_NOSUID | MS_RELATIME})",
             "t bb_dev mount -o remount,dev /dev/shm",
             "grep -E ' /(proc/bus|dev|dev/shm) ' /proc/self/mountinfo | sed 's/^/mi|/'"]
    r = sh(runtime, probe_rootfs, "\n".join(lines))
    assert r.returncode == 0, r.stderr
    res = results(r.stdout)
    for key in ("bb_rw", "bb_bindrw", "bb_suid", "bb_exec", "bb_dev"):
        assert res[key].startswith("rc=") and not res[key].startswith("rc=0"), (key, res[key])
        assert "permission denied" in res[key], (key, res[key])     # busybox's EPERM/EACCES text
    for key in ("p_rw", "p_sb_rw", "p_suid", "p_exec", "p_exec_pts"):
        assert res[key] == "ERR EPERM", (key, res[key])
    # the controls keep every locked flag and succeed: the EPERMs are about the flag cleared
    for key in ("p_rw_ctl", "p_suid_ctl", "p_exec_ctl"):
        assert res[key] == "OK", (key, res[key])
    mi = [l for l in r.stdout.splitlines() if l.startswith("mi|")]
    bus = next(l for l in mi if " /proc/bus " in l)
    assert " ro," in bus


def test_mount_setattr_cannot_clear_locked_flags(runtime, probe_rootfs):
    lines = [f"echo ro'|'$(/probe setattr /proc/bus 0 {MOUNT_ATTR_RDONLY})",
             f"echo noexec'|'$(/probe setattr /dev/shm 0 {MOUNT_ATTR_NOEXEC})",
             f"echo ctl'|'$(/probe setattr /dev/shm {MOUNT_ATTR_NOEXEC} 0)"]
    r = sh(runtime, probe_rootfs, "\n".join(lines))
    assert r.returncode == 0, r.stderr
    res = results(r.stdout)
    assert res["ro"] == "ERR EPERM"
    assert res["noexec"] == "ERR EPERM"
    assert res["ctl"] == "OK"


def test_bind_copy_of_readonly_mount_stays_readonly(runtime, probe_rootfs):
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME
    script = (T_FUNC +
              "t bind mount --bind /proc/bus /mnt\n"
              "t bbrw mount -o remount,bind,rw /mnt\n"
              f"echo prw'|'$(/probe mount '' /mnt '' {flags})\n"
              "grep ' /mnt ' /proc/self/mountinfo | sed 's/^/mi|/'\n"
              "t umnt umount /mnt\n")
    r = sh(runtime, probe_rootfs, script)
    assert r.returncode == 0, r.stderr
    res = results(r.stdout)
    assert res["bind"].startswith("rc=0"), res["bind"]
    assert not res["bbrw"].startswith("rc=0") and "permission denied" in res["bbrw"]
    assert res["prw"] == "ERR EPERM"
    assert " ro," in res["mi"]
    assert res["umnt"].startswith("rc=0"), res["umnt"]   # the copy is the container's own


def test_move_of_initial_mount_fails(runtime, probe_rootfs):
    script = (T_FUNC + "t bb mount --move /proc /mnt\n"
              f"echo p'|'$(/probe mount /proc /mnt '' {MS_MOVE})\n"
              "awk '$5 == \"/proc\"' /proc/self/mountinfo | grep -c . | sed 's/^/proc|/'\n"
              "grep -c ' /mnt ' /proc/self/mountinfo | sed 's/^/mnt|/'\n")
    r = sh(runtime, probe_rootfs, script)
    assert r.returncode == 0, r.stderr
    res = results(r.stdout)
    assert not res["bb"].startswith("rc=0"), res["bb"]
    assert res["p"] == "ERR EINVAL"
    assert res["proc"] == "1" and res["mnt"] == "0"


def test_container_can_mount_and_unmount_its_own_tmpfs(runtime, probe_rootfs):
    script = (T_FUNC + "t mnt mount -t tmpfs -o size=1m tmpfs /mnt\n"
              "t write touch /mnt/f\n"
              "grep -c ' /mnt ' /proc/self/mountinfo | sed 's/^/during|/'\n"
              "t umnt umount /mnt\n"
              "grep -c ' /mnt ' /proc/self/mountinfo | sed 's/^/after|/'\n"
              "t over mount -t tmpfs tmpfs /proc/bus\n"
              "t overu umount /proc/bus\n")
    r = sh(runtime, probe_rootfs, script)
    assert r.returncode == 0, r.stderr
    res = results(r.stdout)
    for key in ("mnt", "write", "umnt", "over", "overu"):
        assert res[key].startswith("rc=0"), (key, res[key])
    assert res["during"] == "1" and res["after"] == "0"


# ---------------------------------------------------------------- processes


def test_shell_is_pid_1_and_sees_only_container_processes(runtime, busybox_rootfs):
    script = ("echo $$; for p in /proc/[0-9]*; do echo \"$p $(cat $p/comm 2>/dev/null) "
              "$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\"; done; ps -o pid,args")
    r = sh(runtime, busybox_rootfs, script)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "1"
    procs = [l for l in lines[1:] if l.startswith("/proc/")]
    pids = sorted(int(l.split()[0].split("/")[2]) for l in procs)
    assert pids[0] == 1 and len(pids) < 10, procs
    text = r.stdout.lower()
    assert "python" not in text and "isobox" not in text, r.stdout


def test_privileged_capabilities_are_full(runtime, busybox_rootfs):
    r = sh(runtime, busybox_rootfs, "grep Cap /proc/self/status")
    assert r.returncode == 0, r.stderr
    caps = {l.split(":")[0]: int(l.split()[1], 16) for l in r.stdout.splitlines()}
    full = full_cap_mask()
    assert caps["CapEff"] == full and caps["CapPrm"] == full
    if full == 0x1ffffffffff:                      # cap_last_cap 40, as on the project VM
        assert r.stdout.split("CapEff:")[1].split()[0] == "000001ffffffffff"
    assert caps["CapBnd"] == full
    assert caps["CapBnd"] >> 24 & 1                 # CAP_SYS_RESOURCE, even if the host's set lacks it
    assert caps["CapAmb"] == 0


def test_default_template_capabilities(runtime, busybox_rootfs):
    from isobox.linux.capabilities import NUMBERS
    want = sum(1 << NUMBERS[c] for c in ("CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"))
    r = sh(runtime, busybox_rootfs, "grep Cap /proc/self/status", priv=False)
    assert r.returncode == 0, r.stderr
    caps = {l.split(":")[0]: int(l.split()[1], 16) for l in r.stdout.splitlines()}
    assert caps["CapEff"] == want and caps["CapPrm"] == want and caps["CapBnd"] == want
    assert caps["CapInh"] == 0 and caps["CapAmb"] == 0


def test_hostname_is_the_containers(runtime, busybox_rootfs):
    before = socket.gethostname()
    r = sh(runtime, busybox_rootfs, "hostname; hostname x-isobox-test && hostname")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["isobox", "x-isobox-test"]
    assert socket.gethostname() == before
    with open("/proc/sys/kernel/hostname") as f:
        assert f.read().strip() == before


def test_network_namespace_is_the_containers(runtime, busybox_rootfs):
    r = sh(runtime, busybox_rootfs, "ip link set lo up && ip -o link show lo; ip -o link | wc -l")
    assert r.returncode == 0, r.stderr
    first, count = r.stdout.splitlines()[0], r.stdout.splitlines()[-1]
    assert "UP" in first.split(">")[0]
    assert int(count) < 5                             # not the host's interfaces
    host = subprocess.run(["unshare", "-n", "ip", "link", "add", "d0", "type", "dummy"], capture_output=True)
    if host.returncode != 0:
        pytest.skip("this kernel has no dummy link type (ip link add d0 type dummy fails on the host too)")
    r = sh(runtime, busybox_rootfs, "ip link add d0 type dummy && ip -o link show d0")
    assert r.returncode == 0 and "d0" in r.stdout, r.stderr
    assert not os.path.exists("/sys/class/net/d0")


def test_proc_1_exe_cannot_be_opened_for_writing(runtime, probe_rootfs):
    r = sh(runtime, probe_rootfs, "readlink /proc/1/exe; /probe openw /proc/1/exe; "
                                  "(echo x > /proc/1/exe) 2>&1; echo rc=$?")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "/bin/busybox"
    assert lines[1].startswith("ERR ")
    assert lines[-1] != "rc=0"
    with open(os.path.join(probe_rootfs, "bin/busybox"), "rb") as f:
        head = f.read(4)
    assert head == b"\x7fELF"


def _start_detached(runtime, bundle: str) -> tuple[str, int]:
    cid = runtime.new_id()
    r = runtime("run", "--detach", "--bundle", bundle, cid, timeout=30)
    assert r.returncode == 0, r.stderr
    st = json.loads(runtime("state", cid, check=True).stdout)
    assert st["status"] == "running"
    return cid, st["pid"]


def test_container_root_is_an_unprivileged_host_user(runtime, busybox_rootfs):
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "exec sleep 60 </dev/null >/dev/null 2>&1"], edit=privileged)
    cid, pid = _start_detached(runtime, b)
    try:
        with open(f"/proc/{pid}/uid_map") as f:
            inside, base, size = map(int, f.read().split())
        with open(f"/proc/{pid}/gid_map") as f:
            gbase = int(f.read().split()[1])
        assert inside == 0 and size >= 65536 and base > 0
        with open(f"/proc/{pid}/status") as f:
            status = dict(l.split(":", 1) for l in f.read().splitlines())
        assert status["Uid"].split() == [str(base)] * 4
        assert status["Gid"].split() == [str(gbase)] * 4
        st = os.stat(f"/proc/{pid}")
        assert st.st_uid == base
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    finally:
        runtime("delete", "--force", cid)


def test_process_user_cwd_env_umask(runtime, busybox_rootfs):
    def edit(spec):
        spec["process"]["user"] = {"uid": 1000, "gid": 1001, "additionalGids": [10, 20], "umask": 0o027}
        spec["process"]["cwd"] = "/tmp"
        spec["process"]["env"].append("ISOBOX_TEST=hello world")
    r = sh(runtime, busybox_rootfs, "id -u; id -g; id -G; pwd; umask; echo \"$ISOBOX_TEST\"; "
                                    "grep -E '^(Uid|Gid|Groups)' /proc/self/status", edit=edit, priv=False)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "1000" and lines[1] == "1001"
    assert sorted(lines[2].split()) == sorted(["1001", "10", "20"])
    assert lines[3] == "/tmp"
    assert lines[4] in ("0027", "027")
    assert lines[5] == "hello world"
    groups = next(l for l in lines if l.startswith("Groups:")).split()[1:]
    assert sorted(groups) == ["10", "20"]


@pytest.mark.parametrize("nnp", [True, False])
def test_no_new_privileges(runtime, busybox_rootfs, nnp):
    def edit(spec):
        spec["process"]["noNewPrivileges"] = nnp
    r = sh(runtime, busybox_rootfs, "grep NoNewPrivs /proc/self/status", edit=edit)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["NoNewPrivs:", "1" if nnp else "0"]


def test_network_sysctl_applies_inside_only(runtime, busybox_rootfs):
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        host_before = f.read().strip()
    want = "0" if host_before == "1" else "1"

    def edit(spec):
        spec["linux"]["sysctl"] = {"net.ipv4.ip_forward": want}
    r = sh(runtime, busybox_rootfs, "cat /proc/sys/net/ipv4/ip_forward", edit=edit)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read().strip() == host_before
