"""`isobox doctor`: what isobox needs from the kernel and the host, and what to fix."""
from __future__ import annotations

import os
import shutil

from isobox.fileio import read_text

OK, WARN, FAIL = "ok", "warn", "FAIL"

# What the test suite proved, and where (cgroups issue): printed so an operator of a pure-v2
# host knows which v2 paths ran only against a fake tree.
CGROUP_PROOFS = (
    "cgroup v1: memory, cpu, cpuset, pids, blkio throttling, devices allow-list and freezer are proven by "
    "tests on a real hybrid host",
    "cgroup v2: hugetlb limits, the BPF device program and cgroup.freeze are proven on a real cgroup2 "
    "(the hybrid host's unified hierarchy); memory.max, cpu.max, cpu.weight, pids.max, io.* and v2 stats "
    "are unit-tested against a cgroup tree the tests build",
)



def _idmap_check(path: str) -> tuple[str, str]:
    """Try an idmapped clone of `path` with a throwaway user namespace."""
    from isobox.linux import syscalls as k
    from isobox.mounts.rootfs import idmapped_clone
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(done_w)
            os.close(ready_r)
            k.unshare(k.CLONE_NEWUSER)
            os.write(ready_w, b"1")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        os.read(ready_r, 1)
        for kind in ("uid", "gid"):
            with open(f"/proc/{pid}/{kind}_map", "w") as f:
                f.write("0 3000000000 65536")
        ufd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.close(idmapped_clone(path, ufd))
            return OK, f"idmapped mounts work on {path}"
        except OSError as e:
            return FAIL, f"idmapped mounts fail on {path} ({e.strerror}): keep images on ext4, xfs, btrfs or tmpfs"
        finally:
            os.close(ufd)
    finally:
        os.close(done_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def _isoboxd() -> tuple[str, str, str]:
    from isobox.daemon import client, paths
    if client.running():
        r = client.call({"op": "stats"})
        warm = ("its warm worker serves isobox-runc's start/state/kill/delete" if client.warm_worker_answers() else
                f"its warm worker does not answer on {paths.WARM_SOCKET} (isobox-runc runs every call itself; "
                f"see {paths.LOG})")
        return ("isoboxd", OK, f"running, {r['containers']} containers, RSS {r['rss_kib']} KiB; FUSE at {paths.FS_ROOT}; "
                f"{warm}")
    if client.holder_alive():
        return ("isoboxd", WARN, f"holder alive but the server does not answer; see {paths.LOG}")
    return ("isoboxd", OK, "not running; isobox-runc starts it on the first create (or run `isobox daemon`)")


def checks() -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    n = read_text("/proc/sys/user/max_user_namespaces")
    out.append(("user namespaces", OK if n and int(n) > 0 else FAIL,
                f"max_user_namespaces={n}" if n and int(n) > 0 else "set user.max_user_namespaces > 0"))
    os.makedirs("/var/lib/isobox", mode=0o700, exist_ok=True)
    status, msg = _idmap_check("/var/lib/isobox")
    out.append(("idmapped mounts", status, msg))
    actions = read_text("/proc/sys/kernel/seccomp/actions_avail")
    out.append(("seccomp user-notify", OK if "user_notif" in actions else FAIL,
                "available" if "user_notif" in actions else "the kernel lacks SECCOMP_RET_USER_NOTIF (needs >= 5.0)"))
    out.append(("FUSE", OK if os.path.exists("/dev/fuse") else FAIL,
                "/dev/fuse present" if os.path.exists("/dev/fuse") else "modprobe fuse (needed by isoboxd)"))
    out.append(_isoboxd())
    from isobox.cgroups.layout import detect
    layout = detect()
    names = ", ".join(",".join(h.controllers) or "(v2)" for h in layout.hierarchies)
    out.append(("cgroups", OK, f"{layout.mode}: {names}; driver cgroupfs (set SystemdCgroup=false in containerd "
                               "and cgroupDriver: cgroupfs in the kubelet)"))
    for line in CGROUP_PROOFS:
        out.append(("cgroups proven", OK, line))
    try:
        from isobox.ids.pool import read_pool
        start, count = read_pool()
        out.append(("ID pool", OK, f"isobox:{start}:{count} ({count // 65536} containers)"))
    except Exception as e:  # noqa: BLE001
        out.append(("ID pool", FAIL, f"{e}; run `isobox setup`"))
    try:
        from isobox.policy.model import load
        pol = load()
        out.append(("policy", OK, f"{pol.path or 'built-in defaults'}"))
    except Exception as e:  # noqa: BLE001
        out.append(("policy", FAIL, str(e)))
    try:   # found, isobox registered, default runtime, what to run (config files read, never written)
        from isobox.engines.install import doctor_rows
        out.extend(doctor_rows())
    except Exception as e:  # noqa: BLE001
        for engine, binary in (("docker", "dockerd"), ("containerd", "containerd"), ("podman", "podman")):
            found = shutil.which(binary)
            out.append((engine, WARN, (f"found at {found}; " if found else "not installed; ") + f"status unknown: {e}"))
    if shutil.which("dockerd"):
        try:   # is /var/run/docker.sock an isobox gate, and is BuildKit's runc isobox's
            from isobox.engines.gate_install import doctor_rows as gate_rows
            out.extend(gate_rows())
        except Exception as e:  # noqa: BLE001
            out.append(("docker gate", WARN, f"status unknown: {e}"))
    return out


def doctor() -> int:
    rows = checks()
    w = max(len(r[0]) for r in rows)
    for name, status, msg in rows:
        print(f"{status:4}  {name:{w}}  {msg}")
    return 1 if any(s == FAIL for _, s, _ in rows) else 0
