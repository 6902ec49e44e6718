"""isoboxd's helpers cannot be reached from a container (the review's finding 1).

For a trapped `mount -t proc`, isoboxd forks a helper that is born in the caller's pid
namespace and joins its user namespace while still host uid 0, with the host's root and
(before this fix) every fd the server holds. Container root, or the root of a user namespace
nested in a non-privileged container, could PTRACE_SEIZE it in that window and inject
syscalls. The probe (tests/probes/ptrace_hunt.c) spins PTRACE_SEIZE on each new pid of its
pid namespace while a child of it loops the trapped call; no attach may ever succeed.
"""
from __future__ import annotations

import os
import re

import pytest

from integration.test_isolation import privileged
from probes import rootfs_with

HUNT_SECONDS = "6"


@pytest.fixture(scope="module")
def hunt_rootfs(tmp_path_factory) -> str:
    return rootfs_with(tmp_path_factory, "ptrace_hunt")


def _hunt(runtime, rootfs: str, args: list[str], priv: bool, env: list[str] = ()) -> tuple[int, int, str]:
    """(attached, triggers, output) of one ptrace_hunt run in a fresh container."""
    def edit(spec: dict) -> None:
        if priv:
            privileged(spec)
        spec["process"]["env"] += list(env)
    r = runtime.run(runtime.bundle(rootfs, ["/ptrace_hunt", HUNT_SECONDS, *args], edit=edit), timeout=120)
    out = r.stdout + r.stderr
    m = re.search(r"attached=(\d+) tried=(\d+) triggers=(-?\d+)", out)
    assert r.returncode == 0 and m, out
    return int(m.group(1)), int(m.group(3)), out


def test_privileged_root_cannot_trace_the_proc_mount_helper(isoboxd, runtime, hunt_rootfs):
    attached, triggers, out = _hunt(runtime, hunt_rootfs, ["proc"], priv=True)
    assert attached == 0, out
    assert triggers >= 10, out                  # the trapped mount really ran, many times


def test_nested_userns_root_cannot_trace_or_start_the_helper(isoboxd, runtime, hunt_rootfs):
    """A non-privileged container: `unshare -U -r -m` gives a full CapEff in the nested user
    namespace, which does not own the container's pid namespace, so the kernel would refuse
    a proc mount; isoboxd must refuse it too, before any helper exists."""
    attached, triggers, out = _hunt(runtime, hunt_rootfs, ["proc"], priv=False, env=["NESTED=1"])
    assert "unshare failed" not in out, out
    assert attached == 0, out
    assert triggers >= 10, out


# ---------------------------------------------------------------- every fork site seals its child

def _state() -> bytes:
    """In a helper: "dumpable fd,fd,..." (the listing's own fd, closed again, left out)."""
    from isobox.linux import syscalls as sc
    names = []
    for n in sorted(int(n) for n in os.listdir("/proc/self/fd")):
        try:
            os.fstat(n)
            names.append(n)
        except OSError:
            pass
    return f"{sc.prctl(sc.PR_GET_DUMPABLE)} {','.join(map(str, names))}".encode()


def _parse(payload: bytes) -> tuple[int, set[int]]:
    dumpable, _, fds = payload.decode().partition(" ")
    return int(dumpable), {int(x) for x in fds.split(",") if x}


@pytest.fixture
def decoy():
    """An fd a server would hold (think /dev/fuse): no helper may inherit it."""
    fd = os.open("/dev/null", os.O_RDONLY)       # inheritable on purpose: fork keeps it
    yield fd
    os.close(fd)


def test_fork_helper_children_are_sealed(decoy):
    from isobox.daemon.fs import nsexec
    from isobox.daemon.fs.nsexec import _HDR
    keep = os.open("/dev/zero", os.O_RDONLY)
    try:
        def child(wfd: int) -> None:
            state = _state()
            os.write(wfd, _HDR.pack(0, len(state)) + state)
            os._exit(0)
        _, payload = nsexec.fork_helper(child, "test helper", [keep])
    finally:
        os.close(keep)
    dumpable, fds = _parse(payload)
    assert dumpable == 0
    assert decoy not in fds and keep in fds and len(fds) == 2, fds      # keep and its report pipe


def test_run_fn_and_run_as_children_are_sealed(decoy):
    from isobox.daemon.fs import nsexec
    _, payload, _ = nsexec.run_fn(os.getpid(), lambda: (0, _state(), -1))
    dumpable, fds = _parse(payload)
    assert dumpable == 0 and decoy not in fds and len(fds) == 1, fds    # its socket only


def test_mount_helpers_are_sealed(decoy):
    from isobox.daemon.syscalls import nsmount
    c = nsmount.open_caller(os.getpid())
    try:
        _, payload = nsmount._run(lambda wfd: nsmount._ok(wfd, _state()), c)
        dumpable, fds = _parse(payload)
        assert dumpable == 0 and decoy not in fds, fds
        assert fds <= set(c.fds.values()) | {max(fds)}, fds    # the caller's handles + the report pipe
    finally:
        c.close()


# ---------------------------------------------------------------- capabilities, the kernel's way

def test_nested_userns_root_gets_no_emulated_privilege(isoboxd, runtime, busybox_rootfs):
    """In a privileged container, container root may have isoboxd make /dev/null, mount a new
    proc and set its own kernel.dmesg_restrict; the root of a user namespace nested in it (full CapEff)
    may do none of these (dmesg_restrict: CAP_SYS_ADMIN, emulated per container)."""
    script = ("mkdir -p /tmp/p; "
              "mknod /tmp/ok c 1 3 && echo root-mknod-ok; "
              "unshare -U -r sh -c 'mknod /tmp/nested c 1 3' 2>/dev/null && echo nested-mknod-ok; "
              "unshare -U -r -m sh -c 'mount -t proc proc /tmp/p' 2>/dev/null && echo nested-proc-ok; "
              "v=$(cat /proc/sys/kernel/dmesg_restrict); w=$((1 - v)); "
              "unshare -U -r sh -c \"echo $w > /proc/sys/kernel/dmesg_restrict\" 2>/dev/null; "
              "[ \"$(cat /proc/sys/kernel/dmesg_restrict)\" = \"$v\" ] && echo nested-sysctl-refused; "
              "echo $w > /proc/sys/kernel/dmesg_restrict && echo root-sysctl-ok; "
              "ls /tmp")
    r = runtime.run(runtime.bundle(busybox_rootfs, ["sh", "-c", script], edit=privileged))
    out = r.stdout + r.stderr
    assert "root-mknod-ok" in out, out
    assert "nested-mknod-ok" not in out and "nested" not in out.split("root-mknod-ok")[-1].split(), out
    assert "nested-proc-ok" not in out, out
    assert "nested-sysctl-refused" in out and "root-sysctl-ok" in out, out   # non-namespaced, emulated
