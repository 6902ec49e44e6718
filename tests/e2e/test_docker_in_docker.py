"""Docker in Docker: Debian bookworm's docker.io (dockerd 20.10, its containerd and runc) as
pid 1 of a `docker run --runtime=isobox --privileged` container of the tests' dockerd,
importing and running an image whose layer holds set-uid and set-gid root files.

isoboxd lets a container make set-id files (open with a set-id mode, chmod, as tar
extraction does) only on its own storage, and performs every overlay a container mounts,
refusing one whose upper directory is on a host bind (daemon/syscalls/storage.py, mount.py).
Where the inner dockerd keeps /var/lib/docker decides what happens:

  * on the container's rootfs (isobox's overlay over the outer dockerd's layers, its upper
    directory in that dockerd's root-only data root): overlay2's probe mount fails with the
    kernel's own EINVAL (an overlay cannot be an overlay's upper layer), dockerd picks vfs;
    the import extracts bin/suid 4755 root, and the inner `docker run` sees it so. On the
    host the file lies in the outer upper directory, below a directory no host user enters.
  * on a tmpfs of the container's (--tmpfs): isoboxd performs overlay2's mounts (their upper
    directories are on the container's own tmpfs) and dockerd picks overlay2.
  * on a host bind (-v HOSTDIR:/var/lib/docker, HOSTDIR 0755 in /tmp): isoboxd refuses
    overlay2's probe mounts, dockerd picks vfs, and extracting bin/suid is refused (EPERM):
    the import fails ("ApplyLayer exit status 1 ... open /bin/suid: operation not
    permitted"); the same image without set-id bits imports and runs there. HOSTDIR never
    holds a set-id file owned outside the container's ID range.

The image is the debootstrap tree of tests/debian_trees.py with docker.io, cached as
/var/cache/isobox-test/bookworm-docker (about a minute to build the first time); the tests
skip only when it cannot be built. What each case showed (storage driver, modes, the
refusal) is written to the terminal as "dind: ..." lines."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile

import pytest

import debian_trees
from e2e import hostclean
from e2e.conftest import BUSYBOX, unique
from e2e.test_docker import RT, host_pid, remove, wait_for

SUITE = "bookworm"
TREE = "bookworm-docker"                  # a cache entry of its own: the bookworm tree stays as it is
INCLUDE = ("docker.io",)                  # debootstrap resolves containerd, runc, iptables, tini
IMAGE = "isobox-test/bookworm-docker:latest"
INNER_IMAGE = "isobox-dind/setid:latest"
PLAIN_IMAGE = "isobox-dind/plain:latest"
# no network here, and the outer container's netns is docker's bridge: no iptables, no docker0
INNER_DOCKERD = ("dockerd", "--iptables=false", "--ip-masq=false", "--ip-forward=false", "--bridge=none")
APPLETS = ("sh", "ls", "stat", "id", "cat", "echo", "true")
SETID = stat.S_ISUID | stat.S_ISGID
CAPS_XATTR = "security.capability"


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def note(request):
    """Writes a "dind: ..." line to the terminal (what each step showed)."""
    report = request.config.pluginmanager.get_plugin("terminalreporter")

    def write(line: str) -> None:
        if report is not None:
            report.write_line(f"dind: {line}")
    return write


@pytest.fixture(scope="module")
def dind_image(dockerd, tmp_path_factory, note):
    """The bookworm + docker.io tree imported into the tests' dockerd (skips if it cannot be built)."""
    try:
        path, took = debian_trees.tree(SUITE, include=INCLUDE, name=TREE)
    except debian_trees.Unavailable as e:
        pytest.skip(f"no Debian image with docker.io: {e}")
    note(f"debootstrap {SUITE} --include={','.join(INCLUDE)}: {path} "
         + (f"built in {took:.0f}s" if took else "reused from the cache"))
    tar = str(tmp_path_factory.mktemp("dind-tar") / f"{TREE}.tar")
    try:
        subprocess.run(["tar", "-C", path, "--exclude", "./" + debian_trees.MARKER, "-cf", tar, "."],
                       check=True, capture_output=True, timeout=600)
        dockerd("import", tar, IMAGE, check=True, timeout=600)
    finally:
        if os.path.exists(tar):
            os.unlink(tar)
    try:
        yield IMAGE
    finally:
        dockerd("rmi", "-f", IMAGE)


def image_tar(path: str, setid: bool) -> None:
    """A root filesystem tar: static busybox with a few applets, /etc/passwd and /etc/group,
    and two copies of busybox, bin/suid and bin/sgid, owned 0:0, mode 4755 and 2755 (0755
    each without setid)."""
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()

    def member(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o755, data: bytes = b"",
               link: str = "") -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = kind, mode, 0, 0, "root", "root"
        ti.linkname, ti.size = link, len(data)
        t.addfile(ti, io.BytesIO(data) if data else None)

    with tarfile.open(path, "w") as t:
        for d in ("bin", "etc", "dev", "proc", "sys", "tmp"):
            member(d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755)
        member("etc/passwd", mode=0o644, data=b"root:x:0:0:root:/:/bin/sh\n")
        member("etc/group", mode=0o644, data=b"root:x:0:\n")
        member("bin/busybox", data=busybox)
        member("bin/suid", mode=0o4755 if setid else 0o755, data=busybox)
        member("bin/sgid", mode=0o2755 if setid else 0o755, data=busybox)
        for applet in APPLETS:
            member(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")


@pytest.fixture(scope="module")
def srv():
    """A host directory with the two image tars, bound read-only at /srv of the outer containers."""
    d = tempfile.mkdtemp(prefix="isobox-dind-srv-", dir="/tmp")
    try:
        os.chmod(d, 0o755)
        image_tar(os.path.join(d, "setid.tar"), setid=True)
        image_tar(os.path.join(d, "plain.tar"), setid=False)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ helpers

def inner(docker, name: str, script: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """sh -c script in the outer container (its docker CLI talks to the inner dockerd)."""
    return docker("exec", name, "sh", "-c", script, timeout=timeout)


def logs(docker, name: str, n: int = 40) -> str:
    r = docker("logs", "--tail", str(n), name)
    return r.stdout + r.stderr


@contextlib.contextmanager
def outer(docker, image: str, srv_dir: str, *args: str):
    """docker run -d --runtime=isobox --privileged [args] with dockerd as pid 1, once the
    inner dockerd answers; removed (and checked for leaks) on exit."""
    name = unique("dind")
    try:
        r = docker("run", "-d", "--name", name, RT, "--privileged", "-v", f"{srv_dir}:/srv:ro", *args,
                   image, *INNER_DOCKERD)
        assert r.returncode == 0, r.stderr
        up = wait_for(lambda: inner(docker, name, "docker version -f '{{.Server.Version}}'",
                                    timeout=30).returncode == 0, timeout=90, step=1)
        assert up, f"the inner dockerd did not answer:\n{logs(docker, name)}"
        yield name
    finally:
        remove(docker, name)


def storage_driver(docker, name: str) -> tuple[str, list[str]]:
    """The inner dockerd's storage driver, and its log lines about the drivers it tried."""
    r = inner(docker, name, "docker info -f '{{.Driver}}'")
    assert r.returncode == 0, (r.stdout, r.stderr)
    log = docker("logs", name)
    tried = [l for l in (log.stdout + log.stderr).splitlines() if "storage-driver=" in l and "level=error" in l]
    return r.stdout.strip(), tried


def events(docker, name: str) -> list[dict]:
    """isoboxd's audit records for the container (`isobox events --json`)."""
    cid = docker.inspect(name, "{{.Id}}")
    r = subprocess.run(["isobox", "events", "--json", cid], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [json.loads(l) for l in r.stdout.splitlines() if l.strip().startswith("{")]


def setid_ops(evs: list[dict], decision: str) -> list[dict]:
    """Records of opens and chmods with a set-id mode on bin/suid or bin/sgid."""
    return [e for e in evs if e.get("decision") == decision
            and str(e.get("args", {}).get("path", "")).endswith(("/bin/suid", "/bin/sgid"))
            and int(str(e.get("args", {}).get("mode", "0")), 0) & SETID]


def id_range(pid: int, which: str) -> tuple[int, int]:
    with open(f"/proc/{pid}/{which}_map") as f:
        inside, base, length = map(int, f.read().split()[:3])
    assert inside == 0
    return base, length


def dangerous_files(top: str, uids: tuple[int, int], gids: tuple[int, int]) -> list[str]:
    """Files below top (walked from the host, symlinks not followed) that would give a host
    user an ID outside the container's range: set-uid with an owner outside the uid range,
    set-gid with a group outside the gid range, or any file capabilities."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(top):
        for n in filenames + dirnames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
                continue
            if st.st_mode & stat.S_ISUID and not uids[0] <= st.st_uid < uids[0] + uids[1]:
                bad.append(f"{p}: set-uid, owner {st.st_uid}, mode {st.st_mode & 0o7777:o}")
            if st.st_mode & stat.S_ISGID and not gids[0] <= st.st_gid < gids[0] + gids[1]:
                bad.append(f"{p}: set-gid, group {st.st_gid}, mode {st.st_mode & 0o7777:o}")
            if stat.S_ISREG(st.st_mode):
                try:
                    os.getxattr(p, CAPS_XATTR, follow_symlinks=False)
                    bad.append(f"{p}: file capabilities")
                except OSError:
                    pass
    return bad


def setid_files(top: str) -> list[tuple[str, os.stat_result]]:
    out = []
    for dirpath, _, filenames in os.walk(top):
        for n in filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_mode & SETID:
                out.append((p, st))
    return out


def closed_to_host_users(path: str) -> str | None:
    """The first directory on the way to path that lets no one but root in (owned by root,
    no search bit for others, nor for a group other than root's), or None."""
    parts = [p for p in os.path.realpath(path).split("/") if p]
    for i in range(len(parts) + 1):
        d = "/" + "/".join(parts[:i])
        st = os.lstat(d)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o001 \
                and (not st.st_mode & 0o010 or st.st_gid == 0):
            return d
    return None


def mounts_below(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [l.split()[4] for l in f]
    return [p for p in points if p == path or p.startswith(path + "/")]


STAT = "stat -c '%n %a %A %U %G' /bin/suid /bin/sgid"


def stat_lines(out: str) -> dict[str, tuple[str, ...]]:
    return {f[0]: tuple(f[1:]) for f in (l.split() for l in out.splitlines()) if len(f) == 5}


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("where", ["rootfs", "tmpfs"])
def test_inner_docker_extracts_setuid_image_on_container_storage(where, dockerd, dind_image, srv, note):
    args = () if where == "rootfs" else ("--tmpfs", "/var/lib/docker:rw,exec,suid,dev,size=512m")
    with outer(dockerd, dind_image, srv, *args) as c:
        driver, tried = storage_driver(dockerd, c)
        note(f"[{where}] inner dockerd picked {driver}; drivers it refused: "
             + ("; ".join(l.split("msg=", 1)[-1] for l in tried) or "none"))
        if where == "tmpfs":
            # isoboxd performs overlay2's mounts: their upper directories are the container's own tmpfs
            assert driver == "overlay2", (driver, tried)
        else:
            assert driver in ("overlay2", "vfs"), (driver, tried)

        r = inner(dockerd, c, f"docker import /srv/setid.tar {INNER_IMAGE} >/dev/null && "
                              f"docker run --rm --network none {INNER_IMAGE} {STAT}")
        assert r.returncode == 0, (r.stdout, r.stderr, logs(dockerd, c))
        got = stat_lines(r.stdout)
        note(f"[{where}] inner docker run --rm: {got}")
        assert got.get("/bin/suid") == ("4755", "-rwsr-xr-x", "root", "root"), r.stdout
        assert got.get("/bin/sgid") == ("2755", "-rwxr-sr-x", "root", "root"), r.stdout

        # the extraction made its set-id files through isoboxd, which allowed them here
        evs = events(dockerd, c)
        assert setid_ops(evs, "performed"), [e for e in evs if e.get("decision") != "performed"][-10:]
        assert not setid_ops(evs, "refused"), setid_ops(evs, "refused")

        if where == "rootfs":
            # on the host: in the outer upper directory, out of every host user's reach
            upper = dockerd.inspect(c, "{{.GraphDriver.Data.UpperDir}}")
            found = setid_files(os.path.join(upper, "var/lib/docker"))
            assert any(p.endswith("/bin/suid") for p, _ in found), found
            for p, st in found:
                assert closed_to_host_users(p), f"{p} ({st.st_mode & 0o7777:o}, uid {st.st_uid}) is reachable"
            note(f"[rootfs] host side: {len(found)} set-id files in the outer upper directory, e.g. "
                 f"{found[0][0]} mode {found[0][1].st_mode & 0o7777:o} uid {found[0][1].st_uid}, "
                 f"behind {closed_to_host_users(found[0][0])}")


def test_inner_docker_on_a_host_bind_gets_no_setuid_root_file(dockerd, dind_image, srv, note):
    host = tempfile.mkdtemp(prefix="isobox-dind-lib-", dir="/tmp")     # /tmp is 1777: host users reach it
    try:
        os.chmod(host, 0o755)
        with outer(dockerd, dind_image, srv, "-v", f"{host}:/var/lib/docker") as c:
            pid = host_pid(dockerd, c)
            uids, gids = id_range(pid, "uid"), id_range(pid, "gid")
            driver, tried = storage_driver(dockerd, c)
            note(f"[host bind] inner dockerd picked {driver}; drivers it refused: "
                 + ("; ".join(l.split("msg=", 1)[-1] for l in tried) or "none"))
            assert driver != "overlay2", tried
            overlays = [e for e in events(dockerd, c) if e.get("syscall") == "mount"
                        and e.get("args", {}).get("fstype") == "overlay"]
            assert overlays and all(e["decision"] == "refused" and "host directory" in e.get("reason", "")
                                    for e in overlays), overlays

            r = inner(dockerd, c, f"docker import /srv/setid.tar {INNER_IMAGE}")
            note(f"[host bind] docker import of the set-id image: exit {r.returncode}: "
                 f"{(r.stdout + r.stderr).strip()}")
            bad = dangerous_files(host, uids, gids)
            assert not bad, bad
            if r.returncode != 0:
                assert "operation not permitted" in r.stderr.lower(), r.stderr
                refused = setid_ops(events(dockerd, c), "refused")
                assert refused and all("host directory" in e.get("reason", "") for e in refused), refused
                note(f"[host bind] isoboxd: {refused[0]['syscall']} {refused[0]['args']} -> {refused[0]['reason']}")
            else:
                run = inner(dockerd, c, f"docker run --rm --network none {INNER_IMAGE} {STAT}")
                note(f"[host bind] the import succeeded; inside: {run.stdout.strip()} {run.stderr.strip()}")

            # the same image without set-id bits: the host bind itself works for the inner dockerd
            ok = inner(dockerd, c, f"docker import /srv/plain.tar {PLAIN_IMAGE} >/dev/null && "
                                   f"docker run --rm --network none {PLAIN_IMAGE} {STAT}")
            assert ok.returncode == 0, (ok.stdout, ok.stderr)
            assert stat_lines(ok.stdout).get("/bin/suid") == ("755", "-rwxr-xr-x", "root", "root"), ok.stdout
            assert not dangerous_files(host, uids, gids)
        assert not dangerous_files(host, uids, gids)
        assert not mounts_below(host), mounts_below(host)
    finally:
        hostclean.umount_below(host)
        shutil.rmtree(host, ignore_errors=True)
    assert not os.path.exists(host)
