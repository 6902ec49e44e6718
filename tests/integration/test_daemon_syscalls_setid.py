"""isoboxd's set-id vetting (daemon/syscalls/setid.py), for real, without containers.

A child unshares a user namespace (0 -> 300000, 65536) and a mount namespace, gets an
idmapped bind of a host directory (host root's files appear as its own root's, as in an
isobox container with -v), mounts a tmpfs, loads isobox's trap (merge_trap) and hands the
listener to this process, which serves it with the real Notifier and handlers. The child then
tries to plant set-uid files; the host directory is checked from here, on the host.

This process plays the runtime too: it registers the container's storage as create would
(mounts/storage.py): one idmapped mount ("own") is the container's own root mount, where
set-id files are fine; the host's root filesystem, which the child still sees as "/", is not."""
from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import json
import os
import pathlib
import select
import shutil
import socket
import stat
import struct
import tempfile
import threading
from collections import Counter

import pytest

from isobox.linux import syscalls as k

BASE, SIZE = 300000, 65536
CAPS_V2 = struct.pack("<IIIII", 0x02000000, 1 << 21, 0, 0, 0)     # cap_sys_admin, permitted


def _send_fd(sock: socket.socket, fd: int) -> None:
    sock.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def _recv_fd(sock: socket.socket) -> int:
    _msg, anc, _f, _a = sock.recvmsg(1, socket.CMSG_SPACE(4))
    return array.array("i", anc[0][2][:4])[0] if anc else -1


def _try(fn) -> object:
    try:
        out = fn()
        return "ok" if out is None else out
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def _libc_open(path: str, flags: int, mode: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.open(os.fsencode(path), ctypes.c_int(flags), ctypes.c_uint(mode))
    if fd < 0:
        raise OSError(ctypes.get_errno(), path)
    return fd


def _io_uring_setup() -> object:
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)
    r = libc.syscall(ctypes.c_long(425), ctypes.c_long(4), params)
    return "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()]


def _scenario(d: dict) -> dict:
    """In the child, after the filter is loaded: every attempt, by name -> result."""
    bind, tmp, rootf, own = d["bind"], d["tmpfs"], d["rootf"], d["own"]
    r: dict[str, object] = {}
    r["chmod_setuid_bind"] = _try(lambda: os.chmod(f"{bind}/f", 0o4755))
    r["chmod_setgid_bind"] = _try(lambda: os.chmod(f"{bind}/f", 0o2755))
    r["chmod_plain_bind"] = _try(lambda: os.chmod(f"{bind}/f", 0o750))
    r["chmod_setuid_tmpfs"] = _try(lambda: os.chmod(f"{tmp}/g", 0o4755))
    r["tmpfs_mode"] = oct(os.stat(f"{tmp}/g").st_mode & 0o7777)
    r["chmod_setuid_rootfs_own"] = _try(lambda: os.chmod(f"{own}/o", 0o4755))
    r["rootfs_mode"] = oct(os.stat(f"{own}/o").st_mode & 0o7777)
    r["chmod_setuid_rootfs_not_owner"] = _try(lambda: os.chmod(f"{own}/hostowned", 0o4755))
    # "/" here is the host's root filesystem, which host users reach: not the container's own
    r["chmod_setuid_host_root"] = _try(lambda: os.chmod(rootf, 0o4755))
    r["chmod_setgid_dir_bind"] = _try(lambda: os.chmod(f"{bind}/dir", 0o2775))
    os.chdir(bind)
    r["chmod_relative_bind"] = _try(lambda: os.chmod("f", 0o6755))
    fd = os.open(f"{bind}/f", os.O_RDONLY)
    r["fchmod_bind"] = _try(lambda: os.fchmod(fd, 0o4755))
    r["proc_self_fd_bind"] = _try(lambda: os.chmod(f"/proc/self/fd/{fd}", 0o4755))
    r["fsetxattr_caps_bind"] = _try(lambda: os.setxattr(fd, "security.capability", CAPS_V2))
    r["setxattr_user_bind"] = _try(lambda: os.setxattr(f"{bind}/f", "user.isobox", b"1"))
    os.close(fd)
    r["open_creat_setuid_bind"] = _try(lambda: os.open(f"{bind}/new", os.O_CREAT | os.O_WRONLY, 0o4755))
    r["creat_existing_bind"] = _try(lambda: os.close(os.open(f"{bind}/f", os.O_CREAT | os.O_WRONLY, 0o4755)))
    for cloexec in (True, False):
        def opened() -> str:
            # libc's open: os.open always adds O_CLOEXEC (PEP 446)
            f = _libc_open(f"{tmp}/new{int(cloexec)}", os.O_CREAT | os.O_WRONLY | (os.O_CLOEXEC if cloexec else 0),
                           0o4755)
            try:
                return f"{oct(os.fstat(f).st_mode & 0o7777)} cloexec={bool(fcntl.fcntl(f, fcntl.F_GETFD) & 1)}"
            finally:
                os.close(f)
        r[f"open_creat_setuid_tmpfs_{cloexec}"] = _try(opened)
    os.symlink(f"{bind}/f", f"{tmp}/ln")
    os.symlink(f"{bind}/new2", f"{tmp}/ln2")
    r["chmod_via_symlink"] = _try(lambda: os.chmod(f"{tmp}/ln", 0o4755))
    r["open_creat_via_symlink"] = _try(lambda: os.open(f"{tmp}/ln2", os.O_CREAT | os.O_WRONLY, 0o4755))
    r["io_uring_setup"] = _io_uring_setup()
    # openat2 always reaches the daemon
    r["openat2_abs_bad_dirfd"] = _try(lambda: os.close(k.openat2(-1, f"{tmp}/g", os.O_PATH | os.O_DIRECTORY)))
    r["openat2_abs"] = _try(lambda: os.close(k.openat2(-1, f"{tmp}/g", os.O_RDONLY)))
    r["openat2_in_root"] = _try(lambda: os.close(k.openat2(os.open(tmp, os.O_PATH), "/g", os.O_RDONLY, 0,
                                                           k.RESOLVE_IN_ROOT)))
    os.chroot(bind)                         # the caller's root is now the host directory
    r["chroot_chmod"] = _try(lambda: os.chmod("/f", 0o4755))
    return r


def _child(d: dict, sock: socket.socket, go_r: int, out_w: int, compiled) -> None:
    try:
        k.unshare(k.CLONE_NEWUSER)
        sock.send(b"u")
        os.read(go_r, 1)                    # maps written
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        k.unshare(k.CLONE_NEWNS)
        k.mount(None, "/", None, k.MS_REC | k.MS_PRIVATE)
        for where in ("bind", "own"):
            mfd = _recv_fd(sock)
            k.move_mount(mfd, "", k.AT_FDCWD, d[where], k.MOVE_MOUNT_F_EMPTY_PATH)
        k.mount("tmpfs", d["tmpfs"], "tmpfs", 0, "mode=755")
        with open(f"{d['tmpfs']}/g", "w"):
            pass
        _send_fd(sock, compiled.load())
        res = _scenario(d)
        os.write(out_w, json.dumps(res).encode())
    except BaseException as e:  # noqa: BLE001
        os.write(out_w, json.dumps({"child_error": repr(e)}).encode())
    os._exit(0)


def _serve(listener: int, counts: Counter, verdicts: list, stop: threading.Event, container) -> None:
    from isobox.daemon.syscalls import notify, registry
    handlers = registry.load()
    n = notify.Notifier(handlers, lambda c, v: verdicts.append((c.name, c.detail, v)), lambda key: None)
    p = select.poll()
    p.register(listener, select.POLLIN)
    while not stop.is_set():
        for _fd, ev in p.poll(100):
            if ev & select.POLLIN:
                raw = notify.recv(listener)
                if raw is not None:
                    call = notify.make_call(listener, raw, container)
                    counts[call.name] += 1
                    n.handle(call)
            elif ev & (select.POLLHUP | select.POLLERR):
                return


@pytest.fixture(scope="module")
def run():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from isobox.seccomp.compile import compile_profile
    from isobox.seccomp.profile import merge_trap
    # not below pytest's basetemp: /tmp/pytest-of-root is 0700, and the child is not host root
    base = pathlib.Path(tempfile.mkdtemp(prefix="isobox-setid-", dir="/tmp"))
    os.chmod(base, 0o755)
    plant = base / "plant"
    for p in ("plant", "plant/dir", "bind", "tmpfs", "ownsrc", "own"):
        (base / p).mkdir()
        os.chmod(base / p, 0o755)
    (plant / "f").write_bytes(b"#!/bin/sh\n")
    os.chmod(plant / "f", 0o755)
    rootf, hostowned = base / "rootf", base / "hostowned"
    rootf.write_bytes(b"")
    hostowned.write_bytes(b"")
    os.chown(rootf, BASE, BASE)             # the child's root owns it, on the host's root filesystem
    (base / "ownsrc" / "o").write_bytes(b"")
    os.chown(base / "ownsrc" / "o", 0, 0)   # container root's, through the idmapped mount
    (base / "ownsrc" / "hostowned").write_bytes(b"")
    os.chown(base / "ownsrc" / "hostowned", SIZE + 1, SIZE + 1)   # mapped to nobody inside
    d = {"bind": str(base / "bind"), "tmpfs": str(base / "tmpfs"), "rootf": str(rootf), "hostowned": str(hostowned),
         "own": str(base / "own")}
    compiled = compile_profile(merge_trap(None))
    ps, cs = socket.socketpair()
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        ps.close()
        _child(d, cs, go_r, out_w, compiled)
    cs.close()
    os.close(out_w)
    assert ps.recv(1) == b"u"
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 {BASE} {SIZE}\n")
    os.write(go_w, b"g")
    userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
    own_mount = 0
    for src in (plant, base / "ownsrc"):
        mfd = k.open_tree(k.AT_FDCWD, str(src), k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC)
        k.mount_setattr(mfd, "", k.AT_EMPTY_PATH, attr_set=k.MOUNT_ATTR_IDMAP, userns_fd=userns)
        own_mount = k.statx_mount(mfd, unique=True)[0]
        _send_fd(ps, mfd)
        os.close(mfd)
    os.close(userns)
    from isobox.daemon.fs.context import Container
    container = Container(key="t", id="t", uid_base=BASE, gid_base=BASE, cgroups={}, init_pid=pid,
                          storage={"private_mounts": [own_mount], "host_devs": [os.stat(plant).st_dev]})
    listener = _recv_fd(ps)
    if listener < 0:
        pytest.fail(f"child failed: {os.read(out_r, 65536).decode()}")
    counts: Counter = Counter()
    verdicts: list = []
    stop = threading.Event()
    t = threading.Thread(target=_serve, args=(listener, counts, verdicts, stop, container), daemon=True)
    t.start()
    out = b""
    while True:
        chunk = os.read(out_r, 65536)
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    stop.set()
    t.join(5)
    os.close(listener)
    res = json.loads(out)
    assert "child_error" not in res, res
    yield res, counts, verdicts, plant
    shutil.rmtree(base, ignore_errors=True)


def test_setuid_on_host_bind_refused(run):
    res, _counts, verdicts, plant = run
    assert res["chmod_setuid_bind"] == "EPERM"
    assert res["chmod_setgid_bind"] == "EPERM"
    assert res["chmod_relative_bind"] == "EPERM"
    assert res["fchmod_bind"] == "EPERM"
    assert res["proc_self_fd_bind"] == "EPERM"
    assert res["chroot_chmod"] == "EPERM"
    assert res["chmod_via_symlink"] == "EPERM"
    assert not os.stat(plant / "f").st_mode & (stat.S_ISUID | stat.S_ISGID)
    reasons = [v.reason for name, _d, v in verdicts if name == "chmod" and v.kind == "error"]
    assert any("set-uid bit on" in r and "host directory" in r for r in reasons), reasons
    assert res["chmod_setuid_host_root"] == "EPERM"              # the host's "/" is not the container's


def test_plain_chmod_never_reaches_the_daemon(run):
    res, counts, verdicts, plant = run
    assert res["chmod_plain_bind"] == "ok"
    modes = [d.get("mode") for name, d, _v in verdicts if name in ("chmod", "fchmod", "fchmodat", "fchmodat2")]
    assert "0o750" not in modes
    # every chmod notification carried a set-id mode
    assert all(int(m, 8) & 0o6000 for m in modes), modes
    assert stat.S_IMODE(os.stat(plant / "f").st_mode) & 0o777 == 0o750


def test_setuid_allowed_on_tmpfs_and_rootfs(run):
    res, *_ = run
    assert res["chmod_setuid_tmpfs"] == "ok" and res["tmpfs_mode"] == "0o4755"
    assert res["chmod_setuid_rootfs_own"] == "ok" and res["rootfs_mode"] == "0o4755"


def test_performed_with_the_callers_credentials(run):
    res, *_ = run
    # the kernel's answer for an owner outside the mount's idmapping (not isobox's EPERM)
    assert res["chmod_setuid_rootfs_not_owner"] == "EOVERFLOW"
    assert res["chmod_setgid_dir_bind"] == "ok"                  # a set-gid directory plants nothing


def test_open_creating_setuid(run):
    res, _c, _v, plant = run
    assert res["open_creat_setuid_bind"] == "EPERM"
    assert not (plant / "new").exists()
    assert res["creat_existing_bind"] == "ok"                    # exists: the mode does not apply
    assert res["open_creat_via_symlink"] == "EPERM"
    assert not (plant / "new2").exists()
    assert res["open_creat_setuid_tmpfs_True"] == "0o4755 cloexec=True"
    assert res["open_creat_setuid_tmpfs_False"] == "0o4755 cloexec=False"


def test_xattrs(run):
    res, _c, _v, plant = run
    assert res["fsetxattr_caps_bind"] == "EPERM"
    assert "security.capability" not in os.listxattr(plant / "f")
    assert res["setxattr_user_bind"] == "ok"
    assert os.getxattr(plant / "f", "user.isobox") == b"1"


def test_io_uring_refused(run):
    res, _c, verdicts, _p = run
    assert res["io_uring_setup"] == "EPERM"
    assert any(name == "io_uring_setup" and "io_uring" in v.reason for name, _d, v in verdicts)


def test_openat2_is_enosys(run):
    """open_how lives in memory: isoboxd answers ENOSYS (callers fall back to openat)."""
    res, counts, *_ = run
    assert res["openat2_abs_bad_dirfd"] == res["openat2_abs"] == res["openat2_in_root"] == "ENOSYS"
    assert counts["openat2"] >= 3
