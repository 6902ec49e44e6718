"""The /proc/sys backend: classification, the kernel's number parser, per-container values."""
from __future__ import annotations

import errno
import os
import random

import pytest

from isobox.daemon.fs import sysctl as S
from isobox.daemon.fs import sysctl_table as T
from isobox.daemon.fs.context import Container

ME = os.getpid()


def ctr(base: int = 100000) -> Container:
    # this process plays the container's init: capabilities are judged in its user namespace
    return Container(key=f"k{base}", id=f"c{base}", uid_base=base, gid_base=base, cgroups={}, init_pid=ME)


def host(rel: str) -> str:
    with open(f"/proc/sys/{rel}") as f:
        return f.read()


def writable_emulated() -> list[str]:
    return [r for r, s in T.EMULATED.items() if not s.readonly and os.path.exists(f"/proc/sys/{r}")]


def seeded(rel: str) -> Container:
    """A container holding a value of rel even when this host's kernel lacks the file (no
    CONFIG_MAGIC_SYSRQ, no Yama): the daemon never offers such a file, but its parser and store
    are the same code as for any other sysctl, so they are exercised here all the same."""
    c = ctr()
    if not os.path.exists(f"/proc/sys/{rel}"):
        spec = T.EMULATED[rel]
        lo, hi = spec.bounds()
        c.sysctl[rel] = T.format_value([min(max(0, lo), hi)] * spec.count)
    return c


def max_push_state() -> list[tuple[str, int, int, int]]:
    """(rel, host value, lo, hi) of every max-push sysctl this host has, as the host is now
    (fs.file-max may already be at its ceiling, 2**63-1, on some machines)."""
    out = []
    for rel, spec in T.EMULATED.items():
        if spec.push == "max" and os.path.exists(f"/proc/sys/{rel}"):
            out.append((rel, int(host(rel)), *spec.bounds()))
    return out


def below_ceiling() -> tuple[str, int, int, int]:
    """A max-push sysctl whose host value can still grow; skip only when none can."""
    for rel, now, lo, hi in max_push_state():
        if now < hi:
            return rel, now, lo, hi
    pytest.skip("every max-push sysctl of this host is at its ceiling: no larger value exists to push")


@pytest.mark.parametrize("rel,kind", [
    ("fs/file-max", "emulated"), ("kernel/printk", "emulated"), ("net/netfilter/nf_conntrack_max", "emulated"),
    ("net/ipv4/ip_forward", "namespaced"), ("net/core/somaxconn", "namespaced"),
    ("net/unix/max_dgram_qlen", "namespaced"), ("kernel/hostname", "namespaced"),
    ("kernel/shmmax", "namespaced"), ("fs/mqueue/msg_max", "namespaced"), ("user/max_user_namespaces", "namespaced"),
    ("vm/swappiness", "host"), ("kernel/modprobe", "host"), ("fs/inotify/max_user_watches", "host"), ("", "host"),
])
def test_classification(rel: str, kind: str) -> None:
    assert S.classify(rel) == kind


def test_pid_max_follows_the_kernel() -> None:
    if T.PID_NS_PID_MAX:
        assert T.namespace_of("kernel/pid_max") == "pid"
    else:
        assert S.classify("kernel/pid_max") == "emulated"


def test_stat_owner_and_modes() -> None:
    c = ctr()
    assert S.stat(c, ME, "") == S.Entry("dir", 0o555, "container")
    assert S.stat(c, ME, "vm/swappiness").owner == "host"
    assert S.stat(c, ME, "net/ipv4/ip_forward").owner == "container"
    assert S.stat(c, ME, "fs/protected_hardlinks") == S.Entry("file", 0o600, "container")
    assert S.stat(c, ME, "kernel/cap_last_cap") == S.Entry("file", 0o444, "container")
    for bad in ("nope", "../etc/passwd", "net/../vm", "/vm/swappiness", "vm//swappiness", "a\0b"):
        assert S.stat(c, ME, bad) is None


def test_listdir_merges_and_hides_absent_emulated() -> None:
    c = ctr()
    names = dict(S.listdir(c, ME, "kernel"))
    assert names["printk"] == "file" and names["yama" if "yama" in names else "random"] == "dir"
    if not os.path.exists("/proc/sys/kernel/sysrq"):
        assert "sysrq" not in names       # emulated only when the host kernel has it
    assert ("ipv4", "dir") in S.listdir(c, ME, "net")


def test_host_global_refused_at_open() -> None:
    c = ctr()
    with pytest.raises(OSError) as e:
        S.check_open_write(c, ME, "vm/swappiness")
    assert e.value.errno == errno.EACCES
    with pytest.raises(OSError) as e:
        S.write(c, ME, 100000, 100000, "vm/swappiness", b"10", False)
    assert e.value.errno == errno.EACCES
    with pytest.raises(OSError) as e:
        S.check_open_write(c, ME, "kernel/random/uuid")
    assert e.value.errno == errno.EACCES


def test_read_only_emulated_and_uuid() -> None:
    c = ctr()
    assert S.read(c, ME, "kernel/cap_last_cap") == host("kernel/cap_last_cap").encode()
    a, b = S.read(c, ME, "kernel/random/uuid"), S.read(c, ME, "kernel/random/uuid")
    assert a != b and len(a) == 37
    with pytest.raises(OSError) as e:
        S.write(c, ME, c.uid_base, c.gid_base, "kernel/ngroups_max", b"1", False)
    assert e.value.errno == errno.EACCES


def test_per_container_values_are_isolated_and_host_untouched() -> None:
    a, b = ctr(100000), ctr(200000)
    before = {r: host(r) for r in writable_emulated()}
    assert S.read(a, ME, "vm/overcommit_memory") == host("vm/overcommit_memory").encode()
    assert S.write(a, ME, a.uid_base, a.gid_base, "vm/overcommit_memory", b"2\n", False) == 2
    assert S.write(a, ME, a.uid_base, a.gid_base, "fs/file-max", b"12345", False) == 5
    assert S.read(a, ME, "vm/overcommit_memory") == b"2\n"
    assert S.read(a, ME, "fs/file-max") == b"12345\n"
    assert S.read(b, ME, "vm/overcommit_memory") == host("vm/overcommit_memory").encode()
    assert a.sysctl["vm/overcommit_memory"] == "2" and b.sysctl["vm/overcommit_memory"] != "2"
    assert {r: host(r) for r in before} == before


def test_vector_write_keeps_untouched_values() -> None:
    c = ctr()
    rest = host("kernel/printk").split()[2:]
    assert S.write(c, ME, c.uid_base, c.gid_base, "kernel/printk", b"3 2", False) == 3
    assert S.read(c, ME, "kernel/printk").split() == [b"3", b"2", *[x.encode() for x in rest]]


def test_only_container_root_writes_emulated() -> None:
    c = ctr()
    with pytest.raises(OSError) as e:
        S.write(c, ME, c.uid_base + 1000, c.gid_base, "vm/overcommit_memory", b"1", False)
    assert e.value.errno == errno.EACCES


def test_max_push_off_keeps_host() -> None:
    c = ctr()
    rel, now, _, hi = below_ceiling()
    before = host(rel)
    bigger = min(now + 1000, hi)
    S.write(c, ME, c.uid_base, c.gid_base, rel, str(bigger).encode(), allow_push=False)
    assert host(rel) == before and S.read(c, ME, rel) == f"{bigger}\n".encode()


def test_max_push_on_raises_host_then_restores() -> None:
    """The one test that raises a host value: it puts back the exact previous value."""
    c = ctr()
    rel, now, lo, _ = below_ceiling()
    before = host(rel)
    lower = max(lo, now - 1000)
    try:
        S.write(c, ME, c.uid_base, c.gid_base, rel, str(now + 1).encode(), allow_push=True)
        assert int(host(rel)) == now + 1
        S.write(c, ME, c.uid_base, c.gid_base, rel, str(lower).encode(), allow_push=True)  # lower: never pushed
        assert int(host(rel)) == now + 1 and S.read(c, ME, rel) == f"{lower}\n".encode()
    finally:
        with open(f"/proc/sys/{rel}", "w") as f:
            f.write(before)
    assert host(rel) == before


@pytest.mark.parametrize("rel", [r for r, s in T.EMULATED.items() if s.push == "max"])
def test_max_push_never_lowers_host(rel: str) -> None:
    """Below the host's value (possible even at the ceiling): the container keeps its own value."""
    if not os.path.exists(f"/proc/sys/{rel}"):
        pytest.skip(f"this kernel has no {rel} (nf_conntrack not loaded): nothing on the host to push to")
    c = ctr()
    before = host(rel)
    lo, _ = T.EMULATED[rel].bounds()
    lower = max(lo, int(before) - 1)
    try:
        S.write(c, ME, c.uid_base, c.gid_base, rel, str(lower).encode(), allow_push=True)
        assert S.read(c, ME, rel) == f"{lower}\n".encode()
    finally:
        if host(rel) != before:     # only if the push went wrong
            with open(f"/proc/sys/{rel}", "w") as f:
                f.write(before)
    assert host(rel) == before


@pytest.mark.parametrize("rel,data", [
    ("fs/protected_hardlinks", b"2"), ("fs/protected_symlinks", b"-1"), ("vm/overcommit_memory", b"3"),
    ("kernel/kptr_restrict", b"3"), ("kernel/dmesg_restrict", b"2"), ("fs/nr_open", b"63"),
    ("fs/nr_open", b"2147483647"), ("fs/file-max", b"-1"), ("fs/file-max", b"9223372036854775808"),
    ("net/netfilter/nf_conntrack_max", b"-5"), ("kernel/panic", b"2147483648"), ("vm/mmap_min_addr", b"-0"),
])
def test_out_of_range_is_einval(rel: str, data: bytes) -> None:
    c = seeded(rel)
    start = c.sysctl.get(rel)
    with pytest.raises(OSError) as e:
        S.write(c, ME, c.uid_base, c.gid_base, rel, data, False)
    assert e.value.errno == errno.EINVAL
    assert c.sysctl[rel] == (start or T.format_value(T.parse_value(host(rel))))


def _raw_write(rel: str, data: bytes) -> int:
    fd = os.open(f"/proc/sys/{rel}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        return os.write(fd, data)
    except OSError as e:
        return -e.errno
    finally:
        os.close(fd)


BOUNDED = [r for r, s in T.EMULATED.items() if not s.readonly and (s.lo is not None or s.hi is not None)]


@pytest.mark.parametrize("rel", BOUNDED)
def test_table_edges_are_refused_by_this_kernel(rel: str) -> None:
    """The table's bounds come from the kernel source; the running kernel can still be asked, on
    the host itself, whether it refuses the values just outside them: a refused write changes
    nothing. (Whether it accepts the edges themselves cannot be asked without changing the host.)
    Should this kernel accept one, the table is too strict: the value is put back at once."""
    if not os.path.exists(f"/proc/sys/{rel}"):
        pytest.skip(f"this kernel has no {rel}: nothing to compare the table with")
    spec = T.EMULATED[rel]
    lo, hi = spec.bounds()
    before = host(rel)
    if spec.sticky_max and int(before) == hi:
        pytest.skip(f"{rel} is at its one-way maximum: the kernel refuses every write")
    accepted = []
    try:
        for v in (lo - 1, hi + 1):
            got = _raw_write(rel, str(v).encode())
            if got >= 0:
                accepted.append(v)
            else:
                assert got == -errno.EINVAL, (rel, v, got)
    finally:
        if host(rel) != before:
            with open(f"/proc/sys/{rel}", "w") as f:
                f.write(before)
    assert accepted == [], f"this kernel accepts {accepted} for {rel}; the table says {lo}..{hi}"
    assert host(rel) == before


# Expected results measured on kernel 6.18 against net/unix/max_dgram_qlen (proc_dointvec)
KERNEL_INT = [
    (b"100", 3, [100]), (b"  101  \n", 8, [101]), (b"102abc", -22, None), (b"103 104", 4, [103]),
    (b"0x20", 4, [32]), (b"010", 3, [8]), (b"+5", -22, None), (b"-1", 2, [-1]), (b"", 0, [7]),
    (b"\n", -22, None), (b"abc", -22, None), (b"1" * 30, -22, None), (b"2147483647", 10, [2147483647]),
    (b"2147483648", -22, None), (b"-2147483648", 11, [-2147483648]), (b"-2147483649", -22, None),
    (b"9" * 21, -22, None), (b"5\x00junk", -22, None), (b"6" + b" " * 5000, 5001, [6]),
    (b"7" * 5000, -22, None), (b"8\n9", 2, [8]), (b"4096" + b"\n" * 4092 + b"12", 4098, [4096]),
    (b"\t77\t", 4, [77]), (b"1 2 3 4 5", 2, [1]), (b"-0", 2, [0]), (b"- 1", -22, None),
]


@pytest.mark.parametrize("data,ret,val", KERNEL_INT)
def test_parser_matches_kernel_int(data: bytes, ret: int, val: list[int] | None) -> None:
    spec = T.Spec("int")
    if ret < 0:
        with pytest.raises(OSError) as e:
            T.parse_write(spec, data, [7])
        assert e.value.errno == -ret
    else:
        new, used, err = T.parse_write(spec, data, [7])
        assert (new, used, err) == (val, ret, None)


def test_huge_and_page_sized_writes() -> None:
    c = ctr()
    for data in (b"1" * (T.PAGE_SIZE * 3), b"x" * 100000, b" " * (T.PAGE_SIZE + 10)):
        with pytest.raises(OSError) as e:
            S.write(c, ME, c.uid_base, c.gid_base, "kernel/panic", data, False)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        S.write(c, ME, c.uid_base, c.gid_base, "kernel/panic", b"1" + b" " * T.KMALLOC_MAX_SIZE, False)
    assert e.value.errno == errno.ENOMEM
    assert S.write(c, ME, c.uid_base, c.gid_base, "kernel/panic", b"5", False, offset=10) == 1  # swallowed


def _garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    if kind == 1:
        return rng.choice([b"a", b"-", b"x", b"0x", b"\0", b"+"]) * rng.randrange(1, 20000)
    if kind == 2:
        return str(-rng.randrange(1, 1 << 70)).encode()
    if kind == 3:
        return str(rng.randrange(1 << 64, 1 << 200)).encode()
    if kind == 4:
        return rng.choice([b"1e5", b"1.5", b"0x", b"--1", b"1-", b"nan", b"\xff1", b"1,2"])
    return str(rng.randrange(-(1 << 66), 1 << 66)).encode() + bytes([rng.randrange(256)])


@pytest.mark.parametrize("rel", sorted(r for r, s in T.EMULATED.items() if s.readonly))
def test_read_only_emulated_refuse_every_write(rel: str) -> None:
    """0444 emulated files: the write path refuses before any parsing, as the kernel's open does."""
    c = ctr()
    with pytest.raises(OSError) as e:
        S.check_open_write(c, ME, rel)
    assert e.value.errno == errno.EACCES
    for data in (b"1", b"", b"garbage"):
        with pytest.raises(OSError) as e:
            S.write(c, ME, c.uid_base, c.gid_base, rel, data, False)
        assert e.value.errno == errno.EACCES
    assert rel not in c.sysctl          # nothing stored per container
    got = S.read(c, ME, rel)
    assert got == host(rel).encode() or (T.EMULATED[rel].fresh and len(got) == 37)


@pytest.mark.parametrize("rel", sorted(r for r, s in T.EMULATED.items() if not s.readonly))
def test_fuzz_emulated(rel: str) -> None:
    spec = T.EMULATED[rel]
    c = seeded(rel)
    lo, hi = spec.bounds()
    rng = random.Random(rel)
    for _ in range(300):
        data = _garbage(rng)
        try:
            n = S.write(c, os.getpid(), c.uid_base, c.gid_base, rel, data, False)
        except OSError as e:
            assert e.errno in (errno.EINVAL, errno.EPERM), (data[:40], e)
            continue
        assert 0 <= n <= len(data)
        for v in T.parse_value(c.sysctl[rel]):  # whatever was accepted is within the handler's range
            assert lo <= v <= hi
