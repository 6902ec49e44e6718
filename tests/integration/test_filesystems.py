"""Filesystems as the container sees them and as they land on the host's disk: the idmapped
rootfs and binds (nothing is chowned), /dev, devpts, mqueue, tmpfs, a read-only root,
symlinked mount destinations, and the overlay rootfs an engine hands over.

Host-side mounts a test needs (the engine's overlay) are made inside an `unshare -m`
subprocess that also runs isobox-runc, so they die with it and nothing reaches the host's
mount namespace."""
from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import uuid

import pytest

from conftest import RUNC, ids_held, leftovers, make_rootfs

PTY_PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
int main(void) {
    int fd = open("/dev/ptmx", O_RDWR | O_NOCTTY), n = 0, unlock = 0;
    char p[64]; struct stat st;
    if (fd < 0 || ioctl(fd, TIOCSPTLCK, &unlock) < 0 || ioctl(fd, TIOCGPTN, &n) < 0) {
        printf("ERR %s\n", strerrorname_np(errno)); return 0;
    }
    snprintf(p, sizeof p, "/dev/pts/%d", n);
    if (stat(p, &st) < 0) { printf("ERR %s\n", strerrorname_np(errno)); return 0; }
    printf("PTS %u %u\n", st.st_uid, st.st_gid);
    return 0;
}
"""


def sh(runtime, rootfs: str, script: str, edit=None):
    return runtime.run(runtime.bundle(rootfs, ["sh", "-c", script], edit=edit))


def owners(root: str) -> dict[str, tuple[int, int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(p)
            out[p] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    return out


def add_mount(spec: dict, **m) -> None:
    spec["mounts"].append(m)


def with_chown(spec: dict) -> None:
    """The template's capabilities plus CAP_CHOWN (root in the default template cannot chown)."""
    for key in ("bounding", "effective", "permitted"):
        spec["process"]["capabilities"][key].append("CAP_CHOWN")


@pytest.fixture
def rootfs(tmp_path) -> str:
    """A private busybox rootfs (tests here write to it)."""
    return make_rootfs(str(tmp_path / "rootfs"))


# ---------------------------------------------------------------- idmapped rootfs


def test_host_root_files_show_as_root(runtime, busybox_rootfs):
    r = sh(runtime, busybox_rootfs, "stat -c '%u:%g %n' / /bin/busybox /etc/passwd /tmp /bin/sh; id -u")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "0"
    for line in lines[:-1]:
        assert line.split()[0] == "0:0", line
    assert os.stat(busybox_rootfs).st_uid == 0


def test_writes_land_with_container_ids_and_nothing_is_chowned(runtime, rootfs):
    before = owners(rootfs)
    script = ("echo hi > /root/by-root && mkdir /root/dir && "
              "touch /tmp/by-1000 && chown 1000:1000 /tmp/by-1000 && "
              "stat -c '%u:%g' /root/by-root /tmp/by-1000")
    r = sh(runtime, rootfs, script, edit=with_chown)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0:0", "1000:1000"]
    st = os.stat(os.path.join(rootfs, "root/by-root"))
    assert (st.st_uid, st.st_gid) == (0, 0)
    st = os.stat(os.path.join(rootfs, "tmp/by-1000"))
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert os.stat(os.path.join(rootfs, "root/dir")).st_uid == 0
    after = owners(rootfs)
    new = {os.path.join(rootfs, p) for p in ("root/by-root", "root/dir", "tmp/by-1000")}
    assert set(after) - set(before) == new
    changed = {p: (before[p], after[p]) for p in before if before[p] != after[p]}
    assert changed == {}


def test_process_uid_1000_writes_land_as_1000(runtime, rootfs):
    def edit(spec):
        spec["process"]["user"] = {"uid": 1000, "gid": 1000}
    r = sh(runtime, rootfs, "touch /tmp/mine && stat -c '%u:%g' /tmp/mine; touch /root/no 2>&1; echo rc=$?",
           edit=edit)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "1000:1000"
    assert lines[-1] != "rc=0" and "Permission denied" in r.stdout
    st = os.stat(os.path.join(rootfs, "tmp/mine"))
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert not os.path.exists(os.path.join(rootfs, "root/no"))


def test_bind_of_host_dirs_keeps_owners(runtime, rootfs, tmp_path):
    rootdir = tmp_path / "owned-by-root"
    userdir = tmp_path / "owned-by-1234"
    rootdir.mkdir()
    userdir.mkdir()
    (userdir / "f").write_text("x")
    os.chown(rootdir, 0, 0)
    os.chown(userdir, 1234, 1234)
    os.chown(userdir / "f", 1234, 1234)
    before = owners(str(tmp_path / "owned-by-1234"))

    def edit(spec):
        add_mount(spec, destination="/data", type="bind", source=str(rootdir), options=["rbind", "rw"])
        add_mount(spec, destination="/u", type="bind", source=str(userdir), options=["bind", "rw"])
    r = sh(runtime, rootfs, "stat -c '%u:%g' /data /u /u/f && echo w > /data/new && "
                                    "stat -c '%u:%g' /data/new", edit=edit)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0:0", "1234:1234", "1234:1234", "0:0"]
    st = os.stat(rootdir / "new")
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert (rootdir / "new").read_text() == "w\n"
    assert owners(str(userdir)) == before
    # the missing targets were created inside the rootfs, as container root (0 on disk), and stay empty
    for d in ("data", "u"):
        st = os.stat(os.path.join(rootfs, d))
        assert (st.st_uid, st.st_gid) == (0, 0) and os.listdir(os.path.join(rootfs, d)) == []


# ---------------------------------------------------------------- /dev, tmpfs, devpts, mqueue


def test_dev_contents_and_devices_work(runtime, busybox_rootfs):
    r = sh(runtime, busybox_rootfs, "ls -a /dev; echo x > /dev/null && echo null-ok; "
                                    "head -c 4 /dev/urandom | wc -c; head -c 3 /dev/zero | wc -c")
    assert r.returncode == 0, r.stderr
    names = set(r.stdout.split())
    for want in ("null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "fd", "stdin",
                 "stdout", "stderr", "mqueue"):
        assert want in names, want
    assert "null-ok" in names
    tail = r.stdout.split()[-2:]
    assert tail == ["4", "3"]


def test_dev_and_spec_tmpfs_are_writable_by_container_root(runtime, rootfs):
    def edit(spec):
        add_mount(spec, destination="/scratch", type="tmpfs", source="tmpfs",
                  options=["nosuid", "nodev", "mode=1777", "size=1m"])
        spec["process"]["capabilities"]["effective"] = []   # owner, not CAP_DAC_OVERRIDE
        spec["process"]["capabilities"]["permitted"] = []
    r = sh(runtime, rootfs, "stat -c '%u:%g' /dev /dev/shm /scratch; touch /dev/made /dev/shm/made "
                                    "/scratch/made && stat -c '%u:%g' /dev/made /scratch/made; "
                                    "awk '$5 == \"/scratch\" {print $9}' /proc/self/mountinfo", edit=edit)
    assert r.returncode == 0, r.stderr
    out = r.stdout.split()
    assert out[:5] == ["0:0", "0:0", "0:0", "0:0", "0:0"]
    assert out[5] == "tmpfs"
    assert os.listdir(os.path.join(rootfs, "scratch")) == []


def test_devpts_group_is_mapped(runtime, tmp_path, rootfs):
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed: cannot build the pty probe")
    src = tmp_path / "pty.c"
    src.write_text(PTY_PROBE_C)
    b = subprocess.run(["gcc", "-static", "-O1", "-o", os.path.join(rootfs, "ptyprobe"), str(src)],
                       capture_output=True, text=True)
    if b.returncode != 0:
        pytest.skip(f"cannot build a static probe: {b.stderr.strip()[:200]}")
    r = sh(runtime, rootfs, "/ptyprobe; stat -c '%u:%g' /dev/pts; "
                            "awk '$5 == \"/dev/pts\" {print $9}' /proc/self/mountinfo")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "PTS 0 5", lines[0]           # the template's gid=5, shifted into the range
    assert lines[-1] == "devpts"


def test_mqueue_is_mounted(runtime, busybox_rootfs):
    r = sh(runtime, busybox_rootfs, "awk '$5 == \"/dev/mqueue\" {print $9, $6}' /proc/self/mountinfo; "
                                    "ls /dev/mqueue && echo ls-ok")
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0].split()
    assert first[0] == "mqueue"
    assert "nosuid" in first[1] and "noexec" in first[1]
    assert "ls-ok" in r.stdout


# ---------------------------------------------------------------- symlinks, readonly root


def test_symlinked_destination_stays_inside_the_rootfs(runtime, rootfs, tmp_path):
    tag = "isobox-escape-" + uuid.uuid4().hex[:8]
    outside = os.path.join("/tmp", tag)
    os.symlink(f"/../../../../tmp/{tag}/deep", os.path.join(rootfs, "evil"))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "marker").write_text("host")
    os.symlink("/../../../.." + str(victim), os.path.join(rootfs, "evil2"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "payload").write_text("p")

    def edit(spec):
        add_mount(spec, destination="/evil", type="tmpfs", source="tmpfs", options=["size=1m"])
        add_mount(spec, destination="/evil2", type="bind", source=str(src), options=["bind", "ro"])
    try:
        r = sh(runtime, rootfs, f"awk '$5 ~ /{tag}/ {{print $5, $9}}' /proc/self/mountinfo; "
                                f"ls /evil2/; cat /proc/self/mountinfo | grep -c victim", edit=edit)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == f"/tmp/{tag}/deep tmpfs"                 # resolved inside the container's /
        assert "payload" in lines
        assert not os.path.lexists(outside), "a directory was created outside the rootfs"
        assert os.path.isdir(os.path.join(rootfs, "tmp", tag, "deep"))
        assert sorted(os.listdir(victim)) == ["marker"]
        with open("/proc/self/mountinfo") as f:
            mi = f.read()
        assert tag not in mi and str(victim) not in mi
    finally:
        if os.path.lexists(outside):
            shutil.rmtree(outside, ignore_errors=True)


def test_readonly_root(runtime, rootfs):
    def edit(spec):
        spec["root"]["readonly"] = True
    r = sh(runtime, rootfs, "touch /x 2>&1; echo rc=$?; touch /dev/ok && echo dev-ok", edit=edit)
    assert r.returncode == 0, r.stderr
    assert "Read-only file system" in r.stdout
    assert "rc=0" not in r.stdout and "dev-ok" in r.stdout
    assert not os.path.exists(os.path.join(rootfs, "x"))
    r = sh(runtime, rootfs, "touch /x && echo ok")          # control: the same rootfs, not readonly
    assert r.stdout.strip() == "ok", r.stderr


# ---------------------------------------------------------------- overlay rootfs from an engine


def _layers(tmp) -> dict[str, str]:
    l1 = make_rootfs(os.path.join(tmp, "l1"))
    for rel, text in (("data/keep", "keep\n"), ("data/gone", "gone\n"), ("opq/a", "a\n"), ("opq/b", "b\n")):
        os.makedirs(os.path.dirname(os.path.join(l1, rel)), exist_ok=True)
        with open(os.path.join(l1, rel), "w") as f:
            f.write(text)
    l2 = os.path.join(tmp, "l2")
    os.makedirs(os.path.join(l2, "opq"))
    os.makedirs(os.path.join(l2, "data"))
    with open(os.path.join(l2, "opq/c"), "w") as f:
        f.write("c\n")
    os.setxattr(os.path.join(l2, "opq"), "trusted.overlay.opaque", b"y")
    os.mknod(os.path.join(l2, "data/gone"), stat.S_IFCHR | 0o600, os.makedev(0, 0))
    upper, work = os.path.join(tmp, "upper"), os.path.join(tmp, "work")
    os.makedirs(upper)
    os.makedirs(work)
    return {"l1": l1, "l2": l2, "upper": upper, "work": work}


def test_overlay_rootfs(runtime, tmp_path):
    lay = _layers(str(tmp_path / "layers"))
    l1_before = owners(lay["l1"])
    with open(os.path.join(lay["l1"], "data/keep")) as f:
        keep_before = f.read()
    script = ("ls /opq; echo --; ls /data; echo --; stat -c '%u:%g' / /bin/busybox /opq/c; "
              "echo new > /data/new && echo more >> /data/keep && mkdir /opq/d && "
              "touch /data/u && chown 1000:1000 /data/u && echo written")
    b = runtime.bundle("rootfs", ["sh", "-c", script], edit=with_chown)
    rootfs = os.path.join(b, "rootfs")
    os.makedirs(rootfs)
    cid = runtime.new_id()
    opts = f"lowerdir={lay['l2']}:{lay['l1']},upperdir={lay['upper']},workdir={lay['work']}"
    inner = (f"mount -t overlay overlay -o {shlex.quote(opts)} {shlex.quote(rootfs)} && "
             f"exec {shlex.join(RUNC)} --root {shlex.quote(runtime.root)} run --bundle {shlex.quote(b)} {cid}")
    # the engine's overlay lives only in this private mount namespace, with the runtime
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", inner],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with open("/proc/self/mountinfo") as f:
        assert rootfs not in f.read()
    opq, data, rest = r.stdout.split("--\n")
    assert opq.split() == ["c"]                            # opaque dir hides layer 1's a and b
    assert data.split() == ["keep"]                        # the whiteout hides gone
    assert rest.split() == ["0:0", "0:0", "0:0", "written"]
    up = lay["upper"]
    for rel in ("data/new", "data/keep", "opq/d"):
        st = os.stat(os.path.join(up, rel))
        assert (st.st_uid, st.st_gid) == (0, 0), rel
    st = os.stat(os.path.join(up, "data/u"))
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    with open(os.path.join(up, "data/keep")) as f:
        assert f.read() == "keep\nmore\n"
    with open(os.path.join(lay["l1"], "data/keep")) as f:
        assert f.read() == keep_before
    assert owners(lay["l1"]) == l1_before
    assert sorted(os.listdir(os.path.join(lay["l2"], "opq"))) == ["c"]
    assert os.listdir(rootfs) == []                        # the overlay is gone with its namespace
    assert leftovers(cid) == [] and leftovers(b) == []
    assert ids_held(runtime.root) == []
