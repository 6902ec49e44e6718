"""The /proc/sys backend against real user, net, uts, ipc and pid namespaces."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from isobox.daemon.fs import sysctl as S
from isobox.daemon.fs import sysctl_table as T
from isobox.daemon.fs.context import Container
from isobox.linux import syscalls as sc

BASE = 300000
NS = sc.CLONE_NEWUSER | sc.CLONE_NEWNET | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS | sc.CLONE_NEWPID

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def host(rel: str) -> str:
    with open(f"/proc/sys/{rel}") as f:
        return f.read()


@contextmanager
def reader(uid: int = 0, inner_netns: bool = False) -> Iterator[int]:
    """A process in fresh user/net/ipc/uts/pid namespaces, uid `uid` inside (host BASE+uid).

    Yields the host pid of the reader: pid 1 of the new pid namespace, or with inner_netns
    its child that did `unshare -n` once more."""
    go_r, go_w = os.pipe()
    up_r, up_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(go_w)
            os.close(up_r)
            sc.unshare(NS)
            os.write(up_w, b"u")
            os.read(go_r, 1)
            os.setresgid(uid, uid, uid)
            os.setgroups([])
            os.setresuid(0, 0, 0)          # become the namespace's root first, so that moving
            os.setresuid(uid, uid, uid)    # on to a non-zero uid drops every capability
            pid1 = os.fork()
            if pid1 == 0:
                target = os.getpid()
                if inner_netns and os.fork() == 0:
                    sc.unshare(sc.CLONE_NEWNET)
                    os.write(up_w, b"r")
                    signal.pause()
                if not inner_netns:
                    os.write(up_w, b"r")
                signal.pause()
            os.write(up_w, b"P" + pid1.to_bytes(4, "little"))   # one atomic write: never split by the "r"
            signal.pause()
        finally:
            os._exit(0)
    os.close(go_r)
    os.close(up_w)
    pids = [child]
    try:
        assert os.read(up_r, 1) == b"u"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{child}/{name}", "w") as f:
                f.write(f"0 {BASE} 65536")
        os.write(go_w, b"g")
        got = b""
        while len(got) < 6:
            got += os.read(up_r, 6 - len(got))
        # "r" (the reader is ready) and "P"+pid arrive in either order; a pid's bytes may
        # themselves contain "r", so the position of the "P" record decides
        pid1 = int.from_bytes(got[1:5] if got[:1] == b"P" else got[2:6], "little")
        pids.append(pid1)
        target = pid1
        if inner_netns:
            kids = open(f"/proc/{pid1}/task/{pid1}/children").read().split()
            target = int(kids[0])
            pids.append(target)
        yield target
    finally:
        for p in reversed(pids):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.waitpid(child, 0)
        os.close(go_w)
        os.close(up_r)


def ctr() -> Container:
    return Container(key="k", id="c", uid_base=BASE, gid_base=BASE, cgroups={})


def flip(v: bytes) -> bytes:
    return b"0" if v.strip() == b"1" else b"1"


def test_root_writes_only_its_netns() -> None:
    c = ctr()
    before = host("net/ipv4/ip_forward")
    with reader() as a, reader() as b:
        start_b = S.read(c, b, "net/ipv4/ip_forward")
        want = flip(S.read(c, a, "net/ipv4/ip_forward"))
        S.check_open_write(c, a, "net/ipv4/ip_forward")
        assert S.write(c, a, BASE, BASE, "net/ipv4/ip_forward", want, False) == 1
        assert S.read(c, a, "net/ipv4/ip_forward") == want + b"\n"
        assert S.read(c, b, "net/ipv4/ip_forward") == start_b
    assert host("net/ipv4/ip_forward") == before


def test_inner_unshare_net_changes_only_that_netns() -> None:
    c = ctr()
    before = host("net/core/somaxconn")
    with reader(inner_netns=True) as inner:
        outer = int(open(f"/proc/{inner}/status").read().split("PPid:")[1].split()[0])
        outer_val = S.read(c, outer, "net/core/somaxconn")
        assert S.write(c, inner, BASE, BASE, "net/core/somaxconn", b"77", False) == 2
        assert S.read(c, inner, "net/core/somaxconn") == b"77\n"
        assert S.read(c, outer, "net/core/somaxconn") == outer_val
    assert host("net/core/somaxconn") == before


def test_unprivileged_user_cannot_write_netns_sysctl() -> None:
    c = ctr()
    before = host("net/ipv4/ip_forward")
    with reader(uid=1000) as r:
        val = S.read(c, r, "net/ipv4/ip_forward")
        for call in (lambda: S.check_open_write(c, r, "net/ipv4/ip_forward"),
                     lambda: S.write(c, r, BASE + 1000, BASE + 1000, "net/ipv4/ip_forward", flip(val), False)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno in (errno.EACCES, errno.EPERM)
        assert S.read(c, r, "net/ipv4/ip_forward") == val
        with pytest.raises(OSError) as e:
            S.write(c, r, BASE + 1000, BASE + 1000, "kernel/hostname", b"evil", False)
        assert e.value.errno == errno.EPERM
    assert host("net/ipv4/ip_forward") == before


def test_garbage_to_namespaced_gets_kernel_errno() -> None:
    c = ctr()
    with reader() as r:
        for data in (b"abc", b"1" * 5000, b"-5", b"99999999999999999999999"):
            with pytest.raises(OSError) as e:
                S.write(c, r, BASE, BASE, "net/core/somaxconn", data, False)
            assert e.value.errno == errno.EINVAL


def test_uts_ipc_user_pid_are_the_readers() -> None:
    c = ctr()
    before = {r: host(r) for r in ("kernel/hostname", "kernel/shmmni", "user/max_user_namespaces", "kernel/pid_max")}
    with reader() as r:
        assert S.write(c, r, BASE, BASE, "kernel/hostname", b"inner-host\n", False) == 11
        assert S.read(c, r, "kernel/hostname") == b"inner-host\n"
        assert S.write(c, r, BASE, BASE, "kernel/shmmni", b"123", False) == 3
        assert S.read(c, r, "kernel/shmmni") == b"123\n"
        assert S.write(c, r, BASE, BASE, "user/max_user_namespaces", b"7", False) == 1
        assert S.read(c, r, "user/max_user_namespaces") == b"7\n"
        if T.PID_NS_PID_MAX:
            assert S.write(c, r, BASE, BASE, "kernel/pid_max", b"5000", False) == 4
            assert S.read(c, r, "kernel/pid_max") == b"5000\n"
    assert socket.gethostname() + "\n" == before["kernel/hostname"]
    assert {r: host(r) for r in before} == before


def test_stat_and_listdir_in_reader_netns() -> None:
    c = ctr()
    with reader() as r:
        names = dict(S.listdir(c, r, "net/core"))
        assert "somaxconn" in names and "default_qdisc" not in names   # init_net only
        assert S.stat(c, r, "net/core/default_qdisc") is None
        assert S.stat(c, os.getpid(), "net/core/default_qdisc").owner == "container"
        if os.path.exists("/proc/sys/net/netfilter/nf_conntrack_max"):
            assert S.stat(c, r, "net/netfilter/nf_conntrack_max").mode == 0o644   # emulated, writable


def test_emulated_value_is_per_container_seen_from_netns() -> None:
    # nf_conntrack_max is the emulated sysctl under net/; without nf_conntrack loaded the same
    # path (an emulated value, read by a reader in its own netns) is taken by any other
    rel = "net/netfilter/nf_conntrack_max"
    if not os.path.exists(f"/proc/sys/{rel}"):
        rel = "vm/overcommit_memory"
    a, b = ctr(), Container(key="k2", id="c2", uid_base=BASE + 65536, gid_base=BASE + 65536, cgroups={})
    before = host(rel)
    val = b"1000" if rel.startswith("net/") else str((int(before) + 1) % 3).encode()
    with reader() as r:
        assert S.write(a, r, BASE, BASE, rel, val, False) == len(val)
        assert S.read(a, r, rel) == val + b"\n"
        assert S.read(b, r, rel) == before.encode()
    assert host(rel) == before


def _in_scratch(fn: Callable[[], object]) -> object:
    """fn() in a forked child with its own net and ipc namespaces (the host's values stay
    untouched); its JSON-able result comes back over a pipe, an exception fails the test."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:                            # the child never leaves this block but by os._exit
            try:
                os.close(rfd)
                sc.unshare(sc.CLONE_NEWNET | sc.CLONE_NEWIPC)
                data = json.dumps({"ok": fn()}).encode()
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                data = json.dumps({"error": repr(e)}).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view):]
        finally:
            os._exit(0)
    os.close(wfd)
    got = b""
    while chunk := os.read(rfd, 65536):
        got += chunk
    os.close(rfd)
    os.waitpid(pid, 0)
    res = json.loads(got or b'{"error": "the helper died without a word"}')
    if "error" in res:
        pytest.fail(f"scratch helper: {res['error']}")
    return res["ok"]


def _read_vec(rel: str) -> list[int]:
    with open(f"/proc/sys/{rel}") as f:
        return T.parse_value(f.read())


def _kernel_write(rel: str, data: bytes) -> int:
    """The kernel's answer: bytes consumed, or -errno."""
    fd = os.open(f"/proc/sys/{rel}", os.O_WRONLY)
    try:
        return os.write(fd, data)
    except OSError as e:
        return -e.errno
    finally:
        os.close(fd)


def _kernel_spec(rel: str, kind: str) -> T.Spec:
    """The Spec of rel's handler on the running kernel (call it in a scratch namespace): the vector
    length from a read, and per element the smallest and largest value accepted, by bisection
    around the current value (a minmax handler accepts one interval)."""
    cur = _read_vec(rel)
    lo_t, hi_t = T.Spec(kind).bounds()

    def ok(k: int, v: int) -> bool:
        vec = list(cur)
        vec[k] = v
        accepted = _kernel_write(rel, T.format_value(vec).encode()) > 0
        _kernel_write(rel, T.format_value(cur).encode())
        return accepted

    def edge(k: int, good: int, bad: int) -> int:
        """The accepted value nearest bad, knowing good is accepted."""
        if ok(k, bad):
            return bad
        while abs(bad - good) > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if ok(k, mid) else (good, mid)
        return good

    per = []
    for k in range(len(cur)):
        assert ok(k, cur[k]), f"{rel}: the kernel refuses its own value {cur}"
        per.append((edge(k, cur[k], lo_t), edge(k, cur[k], hi_t)))
    # a Spec has one range for every element, as proc_do*vec_minmax has
    assert len(set(per)) == 1, f"{rel}: per-element bounds {per} do not fit one Spec"
    lo, hi = per[0]
    return T.Spec(kind, count=len(cur), lo=None if lo == lo_t else lo, hi=None if hi == hi_t else hi)


def _differential(rel: str, kind: str, inputs: list[bytes]) -> tuple[T.Spec, list[str]]:
    """In a private net+ipc namespace (host untouched): derive rel's Spec from the kernel, then
    compare the kernel with parse_write under that Spec."""
    def run() -> dict[str, object]:
        spec = _kernel_spec(rel, kind)
        lo, hi = spec.bounds()
        edges = [str(v).encode() for v in (lo - 1, lo, hi, hi + 1)]
        bad = []
        for data in inputs + edges:
            cur = _read_vec(rel)
            try:
                new, used, err = T.parse_write(spec, data, cur)
                mine = (err.errno if err else used, new)
            except OSError as e:
                mine = (e.errno, cur)
            ret = _kernel_write(rel, data)
            theirs = (-ret if ret < 0 else ret, _read_vec(rel))
            if mine != theirs:
                bad.append(f"{data[:30]!r}: mine {mine} kernel {theirs}")
        return {"spec": [spec.count, spec.lo, spec.hi], "bad": bad[:20]}

    res = _in_scratch(run)
    count, lo, hi = res["spec"]
    return T.Spec(kind, count=count, lo=lo, hi=hi), res["bad"]


def _inputs(seed: str) -> list[bytes]:
    rng = random.Random(seed)
    pieces = [b"0", b"1", b"7", b"-", b"x", b"0x1f", b"010", b"09", b" ", b"\t", b"\n", b"\0", b"a",
              b"2147483647", b"2147483648", b"-2147483648", b"18446744073709551615", b"+", b"\xa0", b"\r"]
    out = [b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 6))) for _ in range(400)]
    out += [b"5" + b" " * 5000, b"1" * 5000, b"3" + b"\n" * 4093 + b"9", b""]
    return out


@pytest.mark.parametrize("rel,kind,count", [
    ("net/unix/max_dgram_qlen", "int", 1),     # proc_dointvec
    ("kernel/shmmax", "ulong", 1),             # proc_doulongvec_minmax
    ("net/ipv4/tcp_rmem", "int", 3),           # vector, proc_dointvec_minmax (lo 1 mainline, 4096 on some)
])
def test_parser_matches_kernel_differential(rel: str, kind: str, count: int) -> None:
    spec, bad = _differential(rel, kind, _inputs(rel))
    assert spec.count == count
    assert bad == [], f"with bounds derived from this kernel {spec.bounds()}"


TCP_RMEM_INPUTS = [b"8", b"010", b" 8", b"\xa0010", b"0", b"-1", b"1 2 3", b"4095", b"4096",
                   b"4096 131072 33554432", b"5000 1", b"4097 4097 4097", b"abc", b""]


def test_namespaced_write_is_the_running_kernels_answer() -> None:
    """tcp_rmem's bounds differ between kernels: isobox holds no table for it, the write runs in
    the reader's netns, so a container gets exactly what this kernel answers in a fresh netns."""
    rel = "net/ipv4/tcp_rmem"

    def kernel() -> list[list[object]]:
        start, out = _read_vec(rel), []
        for data in TCP_RMEM_INPUTS:
            out.append([_kernel_write(rel, data), _read_vec(rel)])
            _kernel_write(rel, T.format_value(start).encode())
        return out

    want = _in_scratch(kernel)
    c = ctr()
    got = []
    with reader() as r:
        start = S.read(c, r, rel)
        for data in TCP_RMEM_INPUTS:
            try:
                ret = S.write(c, r, BASE, BASE, rel, data, False)
            except OSError as e:
                ret = -e.errno
            got.append([ret, T.parse_value(S.read(c, r, rel).decode())])
            S.write(c, r, BASE, BASE, rel, start, False)
    assert got == want
    assert any(ret == -errno.EINVAL for ret, _ in got)    # the kernel's own refusals came through
