"""The sysinfo and mknod handlers on real seccomp notifications, without containers.

A forked child loads a filter that sends the syscalls under test to a listener, hands the
listener to the test over a socket (SCM_RIGHTS), makes the syscall and reports what it saw
through a pipe; the test answers with Notifier.handle, exactly as isoboxd's loop does."""
from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import uuid

import pytest

from isobox.daemon.fs.cgview import view_for_dirs
from isobox.daemon.fs.context import Container, boottime
from isobox.daemon.fs.loadavg import FIXED_1, LoadTracker
from isobox.daemon.fs.procfiles import meminfo
from isobox.daemon.syscalls import mknod as M
from isobox.daemon.syscalls import notify
from isobox.daemon.syscalls import sysinfo as S
from isobox.daemon.syscalls.notify import Notifier
from isobox.linux import syscalls as sc

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

LIMIT = 268435456
HANDLERS = {"sysinfo": S.handle, "mknod": M.handle, "mknodat": M.handle}


def _child(sock: socket.socket, w: int, names, arches, cgroup, prepare, body) -> None:
    try:
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        if prepare:
            prepare()
        import pyseccomp as sec
        filt = sec.SyscallFilter(sec.ALLOW)
        for a in arches:
            filt.add_arch(a)
        for n in names:
            filt.add_rule(sec.NOTIFY, n)
        filt.load()
        fd = sec._libseccomp.seccomp_notify_fd(filt._filter)
        socket.send_fds(sock, [b"L"], [fd])
        os.write(w, body(w) or b"")
        os._exit(0)
    except BaseException as e:  # noqa: BLE001 - report anything to the test
        os.write(w, b"!" + repr(e).encode())
        os._exit(1)


def trapped(names, body, container=None, arches=(), cgroup=None, prepare=None):
    """(verdict, child's report, exit status). body(w) runs in the child after the filter.
    Without a container, the child plays a container's init (what mknod's capability check
    is judged against: the user namespace it is in once prepared)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        ours.close()
        os.close(r)
        _child(theirs, w, names, arches, cgroup, prepare, body)
    theirs.close()
    os.close(w)
    listener = -1
    try:
        ours.settimeout(10)
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise AssertionError(f"child sent no listener: {os.read(r, 4096)!r}")
        listener = fds[0]
        assert select.select([listener], [], [], 10)[0], "no notification within 10 s"
        raw = notify.recv(listener)
        if container is None:
            container = Container(key="t", id="t", uid_base=0, gid_base=0, cgroups={}, created=boottime(),
                                  init_pid=pid)
        call = notify.make_call(listener, raw, container)
        v = Notifier(HANDLERS, lambda c, v: None, lambda k: None).handle(call)
        out = b""
        while select.select([r], [], [], 10)[0]:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert not out.startswith(b"!"), out
        return v, out, os.waitstatus_to_exitcode(status)
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if listener >= 0:
            os.close(listener)
        os.close(r)
        ours.close()


# -- sysinfo ----------------------------------------------------------------------------------

@pytest.fixture
def memcg():
    d = f"/sys/fs/cgroup/memory/isobox-test-{uuid.uuid4().hex[:8]}"
    if not os.path.isdir("/sys/fs/cgroup/memory"):
        pytest.skip("no cgroup v1 memory hierarchy")
    os.mkdir(d)
    try:
        with open(os.path.join(d, "memory.limit_in_bytes"), "w") as f:
            f.write(str(LIMIT))
        yield d
    finally:
        os.rmdir(d)


def _container(cg: str) -> Container:
    # init_pid 0: uptime counts from `created`, 100 s ago
    return Container(key="t", id="t", uid_base=0, gid_base=0, cgroups={"memory": cg}, created=boottime() - 100)


def _libc_sysinfo(_w: int) -> bytes:
    buf = ctypes.create_string_buffer(S.NATIVE.size)
    rc = ctypes.CDLL(None, use_errno=True).sysinfo(buf)
    return struct.pack("<ii", rc, ctypes.get_errno()) + buf.raw


def test_sysinfo_answers_from_the_cgroup(memcg, monkeypatch):
    c = _container(memcg)
    view = view_for_dirs(c.cgroups)
    tracker = LoadTracker()
    tracker.track(view.key, view)
    tracker._entries[view.key].loads = [FIXED_1 * 3 // 2, FIXED_1 // 4, 0]
    monkeypatch.setattr(S, "LOADS", tracker)
    v, out, code = trapped(["sysinfo"], _libc_sysinfo, c, cgroup=memcg)
    assert (v.kind, v.audit, code) == ("value", False, 0)
    rc, err = struct.unpack_from("<ii", out)
    assert rc == 0, os.strerror(err)
    f = S.NATIVE.unpack(out[8:])
    uptime, loads, (total, free, shared, buffers, tswap, fswap), procs, mem_unit = \
        f[0], f[1:4], f[4:10], f[10], f[-1]
    assert (total, mem_unit) == (LIMIT, 1)
    assert 0 < free <= total and buffers == 0 and shared >= 0
    assert 100 <= uptime <= 105
    assert loads == (98304, 16384, 0)                       # 1.5 and 0.25 in 16.16
    assert procs == 1                                       # the child, alone in its cgroup
    mi = meminfo.values(view)                               # what /proc/meminfo shows for it
    assert total == mi["MemTotal"] * 1024
    if "SwapTotal" in mi:
        assert (tswap, fswap) == (mi["SwapTotal"] * 1024, mi["SwapFree"] * 1024)


SI32 = r"""
static int sys3(int nr, int a, int b, int c) { int r; __asm__ volatile ("int $0x80" : "=a"(r)
    : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory"); return r; }
void _start(void) { static unsigned char buf[64]; int r = sys3(116, (int)buf, 0, 0);
    if (r == 0) sys3(4, 1, (int)buf, 64); sys3(1, r == 0 ? 0 : -r, 0, 0); for (;;); }
"""


@pytest.fixture(scope="module")
def si32(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("si32")
    (d / "si32.c").write_text(SI32)
    exe = str(d / "si32")
    r = subprocess.run(["gcc", "-m32", "-static", "-nostdlib", "-ffreestanding", "-fno-pic", "-no-pie", "-O1",
                        "-o", exe, str(d / "si32.c")], capture_output=True)
    if r.returncode != 0 or subprocess.run([exe], capture_output=True).returncode != 0:
        pytest.skip("no i386 toolchain or IA-32 emulation")
    return exe


def test_sysinfo_i386_gets_the_compat_struct(memcg, si32):
    import pyseccomp as sec

    def body(w: int) -> None:
        os.dup2(w, 1)
        os.execv(si32, [si32])
    v, out, code = trapped(["sysinfo"], body, _container(memcg), arches=[sec.Arch.X86], cgroup=memcg)
    assert (v.kind, code) == ("value", 0), (v, out)
    assert len(out) == 64
    f = S.COMPAT.unpack(out)
    assert (f[4], f[-1]) == (LIMIT, 1)                      # totalram, mem_unit: 256 MiB fits 32 bits
    assert 100 <= f[0] <= 105


def test_sysinfo_bad_pointer_is_efault(memcg):
    def body(_w: int) -> bytes:
        rc = ctypes.CDLL(None, use_errno=True).sysinfo(ctypes.c_void_p(0x1000))
        return struct.pack("<ii", rc, ctypes.get_errno())
    v, out, _ = trapped(["sysinfo"], body, _container(memcg), cgroup=memcg)
    assert v.errno == errno.EFAULT and struct.unpack("<ii", out) == (-1, errno.EFAULT)


# -- mknod ------------------------------------------------------------------------------------

def _mknod_body(path: str, mode: int, dev: tuple[int, int], dir_fd: int | None = None):
    def body(_w: int) -> bytes:
        try:
            os.mknod(path, mode, os.makedev(*dev), dir_fd=dir_fd)
            return b"0"
        except OSError as e:
            return str(e.errno).encode()
    return body


def _io(path: str, name: str) -> None:
    """Write to and read from the node, checking the device's behaviour."""
    if name in ("tty", "console", "ptmx"):
        return          # opening them has side effects (controlling tty, pty pairs); stat only
    with open(path, "r+b", buffering=0) as f:
        if name == "full":
            with pytest.raises(OSError) as e:
                f.write(b"hi")
            assert e.value.errno == errno.ENOSPC
        else:
            assert f.write(b"hi") == 2
        data = f.read(16)
        if name == "null":
            assert data == b""
        elif name in ("zero", "full"):
            assert data == b"\0" * 16
        else:
            assert len(data) == 16


@pytest.mark.parametrize("dev,name", sorted(M.SAFE.items()))
def test_safe_devices_are_made_and_work(tmp_path, dev, name):
    path = str(tmp_path / name)
    v, out, _ = trapped(["mknod", "mknodat"], _mknod_body(path, stat.S_IFCHR | 0o666, dev))
    assert out == b"0", (v, out)
    assert v.kind == "value" and v.audit
    st = os.lstat(path)
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == dev
    assert (st.st_uid, st.st_gid) == (0, 0)
    _io(path, name)


def test_existing_name_is_eexist(tmp_path):
    path = str(tmp_path / "null")
    open(path, "w").close()
    v, out, _ = trapped(["mknod", "mknodat"], _mknod_body(path, stat.S_IFCHR | 0o666, (1, 3)))
    assert out == str(errno.EEXIST).encode() and stat.S_ISREG(os.lstat(path).st_mode)


@pytest.mark.parametrize("mode,dev", [(stat.S_IFBLK | 0o660, (8, 0)), (stat.S_IFCHR | 0o600, (1, 1)),
                                      (stat.S_IFCHR | 0o600, (4, 1))])
def test_other_devices_are_eperm(tmp_path, mode, dev):
    path = str(tmp_path / "dev")
    v, out, _ = trapped(["mknod", "mknodat"], _mknod_body(path, mode, dev))
    assert out == str(errno.EPERM).encode()
    assert v.kind == "error" and "not allowed in a container" in v.reason
    assert not os.path.lexists(path)


def test_fifo_continues_into_the_kernel(tmp_path):
    path = str(tmp_path / "fifo")
    v, out, _ = trapped(["mknod", "mknodat"], _mknod_body(path, stat.S_IFIFO | 0o644, (0, 0)))
    assert out == b"0" and v.kind == "continue" and stat.S_ISFIFO(os.lstat(path).st_mode)


def test_umask_relative_path_and_dirfd(tmp_path):
    (tmp_path / "sub").mkdir()

    def body(_w: int) -> bytes:
        os.umask(0o027)
        os.chdir(tmp_path / "sub")
        os.mknod("../zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
        return b"0"
    v, out, _ = trapped(["mknod", "mknodat"], body)
    assert out == b"0", v
    assert stat.S_IMODE(os.lstat(tmp_path / "zero").st_mode) == 0o640
    fd = os.open(tmp_path / "sub", os.O_RDONLY | os.O_DIRECTORY)
    try:
        v, out, _ = trapped(["mknod", "mknodat"], _mknod_body("urandom", stat.S_IFCHR | 0o644, (1, 9), dir_fd=fd))
    finally:
        os.close(fd)
    assert out == b"0", v
    assert stat.S_ISCHR(os.lstat(tmp_path / "sub" / "urandom").st_mode)


def test_paths_resolve_in_the_callers_root(tmp_path):
    """A chrooted caller's absolute symlink points inside its root, never at the host's."""
    root = tmp_path / "root"
    (root / "realdev").mkdir(parents=True)
    os.symlink("/realdev", root / "dev")

    def body(_w: int) -> bytes:
        os.chroot(root)
        os.chdir("/")
        os.mknod("/dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        return b"0"
    v, out, _ = trapped(["mknod", "mknodat"], body)
    assert out == b"0", v
    assert stat.S_ISCHR(os.lstat(root / "realdev" / "null").st_mode)
    assert not os.path.exists("/realdev")


def test_owner_is_the_callers_fsuid(tmp_path):
    os.chmod(tmp_path, 0o777)

    def body(_w: int) -> bytes:
        sc.prctl(sc.PR_SET_KEEPCAPS, 1)
        os.setresgid(1000, 1000, 1000)
        os.setresuid(1000, 1000, 1000)
        _e, prm, _i = sc.capget()
        sc.capset(prm, prm, 0)
        os.mknod(str(tmp_path / "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
        return b"0"
    v, out, _ = trapped(["mknod", "mknodat"], body)
    assert out == b"0", v
    st = os.lstat(tmp_path / "null")
    assert (st.st_uid, st.st_gid) == (1000, 1000)


def test_caller_without_cap_mknod_is_eperm(tmp_path):
    os.chmod(tmp_path, 0o777)

    def body(_w: int) -> bytes:
        os.setresgid(1000, 1000, 1000)
        os.setresuid(1000, 1000, 1000)                      # drops every capability
        try:
            os.mknod(str(tmp_path / "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
            return b"0"
        except OSError as e:
            return str(e.errno).encode()
    v, out, _ = trapped(["mknod", "mknodat"], body)
    assert out == str(errno.EPERM).encode() and "CAP_MKNOD" in v.reason
    assert not os.path.lexists(tmp_path / "null")


@pytest.fixture
def nodev_tmpfs(tmp_path):
    d = tmp_path / "nodev"
    d.mkdir()
    sc.mount("tmpfs", str(d), "tmpfs", sc.MS_NODEV)
    try:
        yield d
    finally:
        sc.umount2(str(d), sc.MNT_DETACH)


def test_nodev_mount_is_eperm(nodev_tmpfs):
    v, out, _ = trapped(["mknod", "mknodat"], _mknod_body(str(nodev_tmpfs / "null"), stat.S_IFCHR | 0o666, (1, 3)))
    assert out == str(errno.EPERM).encode() and "cannot be used there" in v.reason
    assert not os.path.lexists(nodev_tmpfs / "null")


@pytest.mark.parametrize("name,dev", [("null", (1, 3)), ("ptmx", (5, 2))])
def test_tmpfs_the_caller_mounted_in_its_userns_is_eperm(tmp_path, name, dev):
    """A superblock owned by a user namespace is SB_I_NODEV: a node there could not be opened."""
    d = tmp_path / "mine"
    d.mkdir()

    def prepare() -> None:
        sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS)
        for f, text in (("uid_map", "0 0 1"), ("setgroups", "deny"), ("gid_map", "0 0 1")):
            with open(f"/proc/self/{f}", "w") as fh:
                fh.write(text)
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
        sc.mount("tmpfs", str(d), "tmpfs", 0)

    def body(_w: int) -> bytes:
        try:
            os.mknod(str(d / name), stat.S_IFCHR | 0o666, os.makedev(*dev))
            return b"0"
        except OSError as e:
            return str(e.errno).encode() + b" " + ",".join(os.listdir(d)).encode()
    v, out, _ = trapped(["mknod", "mknodat"], body, prepare=prepare)
    assert out == str(errno.EPERM).encode() + b" ", (v, out)     # refused, and nothing left behind
    assert "cannot be used there" in v.reason


def test_regular_file_continues_and_setid_goes_to_the_setid_module(tmp_path):
    path = str(tmp_path / "plain")
    v, out, _ = trapped(["mknod", "mknodat"], _mknod_body(path, stat.S_IFREG | 0o644, (0, 0)))
    assert out == b"0" and v.kind == "continue" and stat.S_ISREG(os.lstat(path).st_mode)
    path = str(tmp_path / "suid")
    v, out, _ = trapped(["mknod", "mknodat"], _mknod_body(path, stat.S_IFREG | 0o4755, (0, 0)))
    assert "isoboxd error" not in v.reason, v           # answered by the set-id module, not a crash
