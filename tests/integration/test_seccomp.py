"""Seccomp in real containers: the spec's profile compiled with libseccomp and loaded just
before execve, isobox's trap (SCMP_ACT_NOTIFY) with its listener fd handed to a supervisor,
the OCI listenerPath, and bad profiles refused at create with nothing left behind."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import threading

import pytest

from conftest import RUNC, ids_held, leftovers

DATA = os.path.join(os.path.dirname(__file__), "..", "data")
NR_MOUNT, NR_MKDIR = 165, 83

# <linux/seccomp.h>: _IOWR('!', 0, struct seccomp_notif) and _IOWR('!', 1, struct seccomp_notif_resp)
NOTIF = struct.Struct("=QIIiIQ6Q")            # id, pid, flags, nr, arch, ip, args
RESP = struct.Struct("=QqiI")                 # id, val, error, flags
IOCTL_RECV = 0xC0000000 | (NOTIF.size << 16) | (ord("!") << 8) | 0
IOCTL_SEND = 0xC0000000 | (RESP.size << 16) | (ord("!") << 8) | 1


def docker_like() -> dict:
    with open(os.path.join(DATA, "docker-like-default.json")) as f:
        return json.load(f)


def with_seccomp(prof: dict, **process):
    def edit(spec):
        spec["linux"]["seccomp"] = prof
        spec["process"].update(process)
    return edit


def run(runtime, rootfs, script: str, prof: dict, env=None, **process):
    b = runtime.bundle(rootfs, ["sh", "-c", script], edit=with_seccomp(prof, **process))
    cid = runtime.new_id()
    r = runtime("run", "--bundle", b, cid, env=env)
    return r, cid


class Supervisor(threading.Thread):
    """Accepts one connection, takes the listener fd (SCM_RIGHTS) and the JSON, then answers
    every notification with `answer` (an errno) through the raw ioctls."""

    def __init__(self, path: str, answer: int = errno.EPERM):
        super().__init__(daemon=True)
        self.path, self.answer = path, answer
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(4)
        self.msg: dict | None = None
        self.seen: list[tuple[int, int, int]] = []   # (nr, arch, pid)
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.srv.settimeout(60)
            conn, _ = self.srv.accept()
            with conn:
                data, fds, _, _ = socket.recv_fds(conn, 65536, 4)
            self.msg = json.loads(data)
            assert len(fds) == 1, fds
            fd = fds[0]
            while not self.stop.is_set():
                r, _, _ = select.select([fd], [], [], 0.1)
                if not r:
                    continue
                buf = bytearray(NOTIF.size)
                try:
                    fcntl.ioctl(fd, IOCTL_RECV, buf, True)
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.EINTR):
                        continue
                    break              # the filter's last user is gone
                nid, pid, _, nr, arch, *_ = NOTIF.unpack(buf)
                self.seen.append((nr, arch, pid))
                try:
                    fcntl.ioctl(fd, IOCTL_SEND, bytearray(RESP.pack(nid, 0, -self.answer, 0)), True)
                except OSError:
                    pass
            os.close(fd)
        except BaseException as e:  # noqa: BLE001
            self.error = e
        finally:
            self.srv.close()

    def finish(self) -> None:
        self.stop.set()
        self.join(10)


def test_errno_rule_denies_mkdir_only(runtime, busybox_rootfs):
    prof = {"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}
    r, _ = run(runtime, busybox_rootfs, "mkdir /tmp/x; echo rc=$?; echo hi > /tmp/y && cat /tmp/y; ls /", prof)
    assert r.returncode == 0, r.stderr
    assert "Operation not permitted" in r.stdout + r.stderr
    assert "rc=1" in r.stdout and "hi" in r.stdout and "proc" in r.stdout


def test_errno_ret_is_honoured(runtime, busybox_rootfs):
    prof = {"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSPC}]}
    r, _ = run(runtime, busybox_rootfs, "mkdir /tmp/x", prof)
    assert r.returncode == 1
    assert "No space left on device" in r.stdout + r.stderr


def test_default_errno_ret(runtime, busybox_rootfs):
    prof = docker_like()
    prof["defaultErrnoRet"] = errno.EROFS
    prof["syscalls"][0]["names"].remove("mkdir")
    r, _ = run(runtime, busybox_rootfs, "mkdir /tmp/x; echo rc=$?", prof)
    assert "Read-only file system" in r.stdout + r.stderr and "rc=1" in r.stdout


def test_allow_list_default_errno(runtime, busybox_rootfs):
    r, _ = run(runtime, busybox_rootfs, "echo ok; mount -t tmpfs none /mnt; echo rc=$?; unshare -U true; echo u=$?",
               docker_like())
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout and "rc=255" in r.stdout or "rc=1" in r.stdout
    assert "u=1" in r.stdout


def test_allow_list_too_small_fails(runtime, busybox_rootfs):
    prof = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["execve"], "action": "SCMP_ACT_ALLOW"}]}
    r, _ = run(runtime, busybox_rootfs, "echo ok", prof)
    assert r.returncode != 0 and "ok" not in r.stdout


def test_argument_filter(runtime, busybox_rootfs):
    """personality: only the query (0xffffffff) and PER_LINUX pass; linux32 (PER_LINUX32) is refused."""
    prof = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES,
         "args": [{"index": 0, "value": 0xFFFFFFFF, "op": "SCMP_CMP_NE"},
                  {"index": 0, "value": 0, "op": "SCMP_CMP_NE"}]}]}
    # two conditions on one argument are alternatives in runc; so NE+NE matches everything:
    # instead express "deny 8 only" with a masked compare
    prof["syscalls"][0]["args"] = [{"index": 0, "value": 0xFF, "valueTwo": 8, "op": "SCMP_CMP_MASKED_EQ"}]
    r, _ = run(runtime, busybox_rootfs, "linux32 uname -m; echo rc=$?; uname -m", prof)
    out = r.stdout + r.stderr
    assert "Permission denied" in out and "rc=1" in r.stdout
    assert "x86_64" in r.stdout


def test_kill_process_gives_sigsys(runtime, busybox_rootfs):
    prof = {"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_KILL_PROCESS"}]}
    b = runtime.bundle(busybox_rootfs, ["mkdir", "/tmp/x"], edit=with_seccomp(prof))
    r = runtime.run(b)
    assert r.returncode == 128 + 31, (r.returncode, r.stderr)


def test_non_root_user_without_nnp(runtime, busybox_rootfs):
    """No no_new_privs and no CAP_SYS_ADMIN after the switch: the filter is loaded before the
    credentials change (as runc), so the profile also covers setresuid/capset."""
    prof = docker_like()
    prof["syscalls"][0]["names"] = [n for n in prof["syscalls"][0]["names"] if n not in ("mkdir", "mkdirat")]
    r, _ = run(runtime, busybox_rootfs, "id -u; mkdir /tmp/z; echo rc=$?", prof,
               user={"uid": 1000, "gid": 1000}, noNewPrivileges=False)
    assert r.returncode == 0, r.stderr
    assert "1000" in r.stdout and "rc=1" in r.stdout and "Operation not permitted" in r.stderr


def test_x86_abis_are_in_the_filter(runtime, busybox_rootfs):
    r, _ = run(runtime, busybox_rootfs, "echo ok", docker_like())
    assert r.returncode == 0 and "ok" in r.stdout


@pytest.mark.parametrize("bad, words", [
    ({"defaultAction": "SCMP_ACT_MAYBE"}, "unknown action 'SCMP_ACT_MAYBE'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_VAX"]}, "unknown architecture"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_KILL",
                                                       "args": [{"index": 7, "op": "SCMP_CMP_EQ"}]}]}, "index"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_KILL",
                                                       "errnoRet": 5}]}, "errnoRet is only valid"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_BOGUS"]}, "unsupported flag"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO",
                                                       "args": [{"index": 0, "op": "SCMP_CMP_SIMILAR"}]}]},
     "unknown op"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]},
     "listenerPath"),
])
def test_bad_profile_fails_create_and_leaves_nothing(runtime, busybox_rootfs, bad, words):
    b = runtime.bundle(busybox_rootfs, ["true"], edit=with_seccomp(bad))
    cid = runtime.new_id()
    r = runtime("create", "--bundle", b, cid, stdin=subprocess.DEVNULL, timeout=30)
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and words in lines[0] and "seccomp" in lines[0], r.stderr
    assert leftovers(cid) == [] and ids_held(runtime.root) == []
    assert not os.path.exists(os.path.join(runtime.root, cid))


def test_trap_hands_listener_to_supervisor(runtime, busybox_rootfs, tmp_path):
    path = str(tmp_path / "trap.sock")
    sup = Supervisor(path, errno.EPERM)
    sup.start()
    try:
        # the engine's profile refuses mount with ERRNO; the trap must still see it
        r, cid = run(runtime, busybox_rootfs, "mount -t tmpfs none /mnt; echo rc=$?; mkdir /tmp/q && echo made",
                     docker_like(), env={**os.environ, "ISOBOX_SECCOMP_TRAP_SOCKET": path})
    finally:
        sup.finish()
    assert sup.error is None, sup.error
    assert r.returncode == 0, r.stderr
    assert "permission denied" in r.stderr and "rc=1" in r.stdout and "made" in r.stdout   # busybox's EPERM text
    assert sup.msg["type"] == "isobox-seccomp" and sup.msg["id"] == cid and sup.msg["pid"] > 1
    assert sup.msg["nsPid"] == 1 and "mount" in sup.msg["trapped"]
    assert [nr for nr, _, _ in sup.seen] == [NR_MOUNT]


def test_trap_without_engine_profile(runtime, busybox_rootfs, tmp_path):
    path = str(tmp_path / "trap.sock")
    sup = Supervisor(path, errno.EROFS)        # an answer the kernel would not give by itself
    sup.start()
    try:
        b = runtime.bundle(busybox_rootfs, ["sh", "-c", "mount -t tmpfs none /mnt; echo rc=$?"])
        r = runtime("run", "--bundle", b, runtime.new_id(), env={**os.environ, "ISOBOX_SECCOMP_TRAP_SOCKET": path})
    finally:
        sup.finish()
    assert "Read-only file system" in r.stdout + r.stderr, (r.stdout, r.stderr)
    assert sup.seen and {nr for nr, _, _ in sup.seen} == {NR_MOUNT}     # busybox retries read-only on EROFS


def test_listener_path_per_oci(runtime, busybox_rootfs, tmp_path):
    path = str(tmp_path / "oci.sock")
    sup = Supervisor(path, errno.ENOSPC)
    sup.start()
    prof = {"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": path, "listenerMetadata": "hello",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_NOTIFY"}]}
    try:
        # runc's semantics, with isobox's trap turned off (a task can have one listener only)
        r, cid = run(runtime, busybox_rootfs, "mkdir /tmp/x; echo rc=$?", prof,
                     env={**os.environ, "ISOBOX_SECCOMP_TRAP_SOCKET": "off"})
    finally:
        sup.finish()
    assert sup.error is None, sup.error
    assert "No space left on device" in r.stdout + r.stderr
    m = sup.msg
    assert sorted(m) == ["fds", "metadata", "ociVersion", "pid", "state"]
    assert m["fds"] == ["seccompFd"] and m["metadata"] == "hello"
    assert m["state"]["id"] == cid and m["state"]["pid"] == m["pid"] > 1
    assert {nr for nr, _, _ in sup.seen} <= {NR_MKDIR, 258}


@pytest.mark.parametrize("trap", ["named", "default"])
def test_listener_path_with_trap_is_refused(runtime, busybox_rootfs, tmp_path, trap):
    prof = {"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": str(tmp_path / "x.sock"),
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}
    b = runtime.bundle(busybox_rootfs, ["true"], edit=with_seccomp(prof))
    cid = runtime.new_id()
    env = {k: v for k, v in os.environ.items() if k != "ISOBOX_SECCOMP_TRAP_SOCKET"}
    if trap == "named":
        env["ISOBOX_SECCOMP_TRAP_SOCKET"] = str(tmp_path / "t")
    r = runtime("create", "--bundle", b, cid, env=env)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "only one seccomp listener" in lines[0], r.stderr
    assert leftovers(cid) == [] and ids_held(runtime.root) == []


def test_each_exec_hands_over_its_own_listener(runtime, busybox_rootfs, tmp_path):
    """The container's init and an exec'd process each get a listener fd of their own (a task
    has one listener); the exec'd one arrives the same way, with its own message."""
    init_sock, exec_sock = str(tmp_path / "init.sock"), str(tmp_path / "exec.sock")
    first, second = Supervisor(init_sock, errno.EPERM), Supervisor(exec_sock, errno.EROFS)
    first.start()
    second.start()
    try:
        b = runtime.bundle(busybox_rootfs, ["sleep", "300"])
        cid = runtime.new_id()
        with open(tmp_path / "o", "w") as o:
            r = subprocess.run([*RUNC, "--root", runtime.root, "run", "-d", "--bundle", b, cid], stdout=o, stderr=o,
                               stdin=subprocess.DEVNULL, timeout=60,
                               env={**os.environ, "ISOBOX_SECCOMP_TRAP_SOCKET": init_sock})
        assert r.returncode == 0
        r = runtime("exec", cid, "sh", "-c", "mount -t tmpfs none /mnt; echo rc=$?",
                    env={**os.environ, "ISOBOX_SECCOMP_TRAP_SOCKET": exec_sock})
    finally:
        first.finish()
        second.finish()
    assert "Read-only file system" in r.stdout + r.stderr        # answered by the exec's own supervisor
    assert first.msg["id"] == second.msg["id"] == cid
    assert second.msg["nsPid"] > 1 and first.msg["nsPid"] == 1
    assert {nr for nr, _, _ in second.seen} == {NR_MOUNT} and not first.seen
