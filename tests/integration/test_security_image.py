"""The built-in image is never a container's writable root (the attack review's finding 6).

`isobox run` used to hand the image directory itself to isobox-runc as root.path: container
root (idmapped onto the image's on-disk owner, host root) could write into it, and every
later `isobox run` ran what it left there. Each run now gets a writable overlay of its own
over the read-only image (/var/lib/isobox/containers/<id>/{upper,work,rootfs}, root-only),
removed when the run ends; a run that died is collected by a later one.

Every test drives the real `isobox run` and checks, by the container's id, that no mount,
per-container directory, bundle, state, cgroup or ID range is left, and that the image on
disk is byte-for-byte what it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from conftest import leftovers

ISOBOX = [sys.executable, "-I", "-m", "isobox.cli.main"]
RUNC = [sys.executable, "-I", "-m", "isobox.runc.main"]
IMAGE = "/var/lib/isobox/images/busybox/rootfs"
CONTAINERS = "/var/lib/isobox/containers"
STATE = "/run/isobox"
BUNDLES = "/run/isobox-bundles"

# Everything a container could leave for the next one: a new file, an edited one, a deleted
# one (a whiteout in a layer), /bin/sh replaced by a script, and /bin/busybox (the target of
# every applet link) replaced by a rename, the only way past ETXTBSY while it runs.
ATTACK = r"""
set -e
echo trojan > /etc/trojan
echo 'evil::0:0::/:/bin/sh' >> /etc/passwd
rm /bin/ls
rm /bin/sh
printf '#!/bin/busybox sh\necho TROJAN\n' > /bin/sh
chmod 755 /bin/sh
cat /bin/busybox > /bb.new
echo TROJAN-MARK >> /bb.new
chmod 755 /bb.new
mv /bb.new /bin/busybox
mkdir -p /usr/local/bin
echo x > /usr/local/bin/new
echo wrote
"""

# What the next container sees: run through `sh`, so a replaced /bin/sh shows at once.
CHECK = r"""
echo shell-ok
test -e /etc/trojan && echo found:/etc/trojan
grep -q evil /etc/passwd && echo found:passwd
test -e /bin/ls || echo found:no-ls
grep -q TROJAN-MARK /bin/busybox && echo found:busybox
test -e /usr/local/bin/new && echo found:new
echo checked
"""


def fingerprint(root: str) -> dict[str, tuple]:
    """Every entry of the tree: type, mode, owner, mtime, and content hash or link target."""
    out: dict[str, tuple] = {}
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [os.path.join(dirpath, n) for n in sorted(dirnames + filenames)]
    for p in paths:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            what = os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                what = hashlib.sha256(f.read()).hexdigest()
        else:
            what = ""
        out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, what)
    return out


@pytest.fixture
def image():
    """The image's fingerprint before the test; after it, the image must be unchanged (if a
    test broke it, it is rebuilt so that no other test runs on what the attack left)."""
    r = subprocess.run([*ISOBOX, "run", "true"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr          # builds the image if this host has none yet
    before = fingerprint(IMAGE)
    yield before
    after = fingerprint(IMAGE)
    if after != before:
        marker = os.path.join(os.path.dirname(IMAGE), ".built")
        if os.path.exists(marker):
            os.unlink(marker)
        subprocess.run([*ISOBOX, "run", "true"], capture_output=True, timeout=60)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == [], f"the image on the host changed: {changed}"


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = _ppid(pid)
    return False


class Run:
    """A foreground `isobox run` whose container says `ready` and then waits for a line.
    Its output is read by threads, so that a hung container fails the test (timeouts) rather
    than hanging it."""

    def __init__(self, *args: str):
        self.p = subprocess.Popen([*ISOBOX, "run", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(self.p.stdout, self.lines), daemon=True),
                        threading.Thread(target=self._read, args=(self.p.stderr, None), daemon=True)]
        for t in self.readers:
            t.start()

    def _read(self, pipe, lines: queue.Queue | None) -> None:
        try:
            for line in pipe:
                (self.out if lines is not None else self.err).append(line)
                if lines is not None:
                    lines.put(line)
        except (OSError, ValueError):
            pass
        if lines is not None:
            lines.put(None)

    def ready(self, timeout: float = 60) -> str:
        """Waits for `ready`; returns the container's id (its init descends from this run)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"not ready within {timeout}s: {''.join(self.out)}") from None
            if line is None:
                self.p.wait(timeout=30)
                raise AssertionError(f"the container ended before it was ready: {''.join(self.out + self.err)}")
            if line.strip() == "ready":
                break
        for name in os.listdir(STATE):
            try:
                with open(os.path.join(STATE, name, "state.json")) as f:
                    st = json.load(f)
            except (OSError, ValueError):
                continue
            if st.get("pid") and _descends(st["pid"], self.p.pid):
                self.cid, self.pid = st["id"], st["pid"]
                return self.cid
        raise AssertionError("no container state for this run")

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        """Lets the container go on; its exit code and all it printed."""
        self.p.stdin.write("go\n")
        self.p.stdin.close()
        self.p.wait(timeout=timeout)
        for t in self.readers:
            t.join(timeout=timeout)
        return self.p.returncode, "".join(self.out), "".join(self.err)

    def kill(self) -> None:
        """Ends whatever is left (a test that failed halfway): the container first, so that
        this run ends by itself and removes its layer; SIGKILL only if it does not."""
        if self.p.poll() is None and getattr(self, "cid", None):
            subprocess.run([*RUNC, "delete", "--force", self.cid], capture_output=True, timeout=30)
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.sigkill()
        self.close()

    def sigkill(self) -> None:
        """SIGKILL to `isobox run` itself: it cleans up nothing (a later run collects)."""
        self.p.kill()
        self.p.wait(timeout=30)

    def close(self) -> None:
        """Only stdin: the reader threads end at EOF, which a container that outlives its run
        holds back (and closing a pipe a thread is reading would block on its lock)."""
        try:
            self.p.stdin.close()
        except (OSError, ValueError):
            pass


def unowned() -> list[str]:
    """Per-container dirs, and overlay mounts in them, whose `isobox run` is gone: what a run
    leaks shows here however many others run at the same time."""
    from isobox.cli.layer import owner_alive
    try:
        names = [n for n in os.listdir(CONTAINERS) if not n.startswith(".")]
    except FileNotFoundError:
        names = []
    out = [os.path.join(CONTAINERS, n) for n in names if not owner_alive(os.path.join(CONTAINERS, n))]
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4]
            if mnt.startswith(CONTAINERS + "/") and not owner_alive(os.path.dirname(mnt)):
                out.append(line.strip())
    return out


def left_of(cid: str) -> list[str]:
    """Whatever of container cid survives: its layer dir, bundle, state, mounts, cgroups, IDs."""
    out = [p for p in (os.path.join(CONTAINERS, cid), os.path.join(BUNDLES, cid), os.path.join(STATE, cid))
           if os.path.lexists(p)]
    out += leftovers(cid)
    from isobox.ids.allocator import Allocator
    out += [f"ids {b} held by {h.container_id}" for h, b in Allocator().holders() if h.container_id == cid]
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _attack_then_check(priv: list[str]):
    a = Run(*priv, "sh", "-c", ATTACK + "echo ready; read x")
    try:
        cid_a = a.ready()
        code, out, err = a.finish()
    finally:
        a.kill()
    # the container's root is writable: every step of the attack worked on its own layer
    assert code == 0 and "wrote" in out, out + err
    assert left_of(cid_a) == []
    b = Run("sh", "-c", CHECK + "echo ready; read x")
    try:
        cid_b = b.ready()
        code, out, err = b.finish()
    finally:
        b.kill()
    assert code == 0 and "shell-ok" in out and "checked" in out, out + err
    assert "TROJAN" not in out and "found:" not in out, out
    assert left_of(cid_b) == []


def test_non_privileged_run_cannot_trojan_the_next(image):
    _attack_then_check([])


def test_privileged_run_cannot_trojan_the_next(image):
    _attack_then_check(["--privileged"])


def test_layer_is_private_and_root_only(image):
    """While a container runs: its / is an overlay, its layer lies in a root-only directory,
    and the image is not among what the container can write."""
    r = Run("sh", "-c", "grep ' / ' /proc/self/mountinfo; echo ready; read x")
    try:
        cid = r.ready()
        st = os.lstat(CONTAINERS)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and st.st_mode & 0o077 == 0, oct(st.st_mode)
        mine = os.path.join(CONTAINERS, cid)
        assert os.lstat(os.path.join(mine, "upper")).st_uid == 0
        with open("/proc/self/mountinfo") as f:
            host = [l for l in f if l.split()[4] == os.path.join(mine, "rootfs")]
        assert len(host) == 1 and " - overlay " in host[0] and f"lowerdir={IMAGE}" in host[0], host
        assert f"upperdir={mine}/upper" in host[0], host
        code, out, err = r.finish()
    finally:
        r.kill()
    assert code == 0, err
    assert " - overlay " in out.splitlines()[0], out     # not an idmapped bind of the image
    assert left_of(cid) == []


def test_failing_run_leaves_nothing(image):
    r = subprocess.run([*ISOBOX, "run", "/no/such/command"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "/no/such/command" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert unowned() == []


def test_container_killed_midway_leaves_nothing(image):
    r = Run("sh", "-c", "echo x > /etc/midway; echo ready; sleep 1000")
    try:
        cid = r.ready()
        os.kill(r.pid, signal.SIGKILL)
        code, _, err = r.finish()
    finally:
        r.kill()
    assert code == 137, err
    assert left_of(cid) == []


def test_signalled_run_leaves_nothing(image):
    """SIGTERM to `isobox run` goes to the container; its exit ends the run, which cleans up."""
    r = Run("sh", "-c", "trap 'exit 143' TERM; echo x > /etc/term; echo ready; sleep 1000 & wait")
    try:
        cid = r.ready()
        r.p.send_signal(signal.SIGTERM)
        code, _, err = r.finish()
    finally:
        r.kill()
    assert code == 143, err
    assert left_of(cid) == []


def test_killed_run_is_collected_by_a_later_run_once_its_container_ended(image):
    r = Run("sh", "-c", "echo x > /etc/orphan; echo ready; sleep 1000")
    cid = None
    try:
        cid = r.ready()
        pid = r.pid
        r.sigkill()                                    # no cleanup of its own
        r.close()
        assert os.path.exists(os.path.join(STATE, cid, "state.json"))   # the garbage is there
        # its container still runs: a later run must not take its layer from under it
        later = subprocess.run([*ISOBOX, "run", "true"], capture_output=True, text=True, timeout=60)
        assert later.returncode == 0, later.stderr
        assert _alive(pid)
        assert os.path.exists(os.path.join(STATE, cid, "state.json"))
        assert os.path.isdir(os.path.join(CONTAINERS, cid, "upper"))
        subprocess.run([*RUNC, "kill", cid, "KILL"], capture_output=True, timeout=30)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
        later = subprocess.run([*ISOBOX, "run", "true"], capture_output=True, text=True, timeout=60)
        assert later.returncode == 0, later.stderr
        assert left_of(cid) == []
    finally:
        r.kill()
        if cid:        # whatever the assertions left: the container, then its layer (by a run)
            subprocess.run([*RUNC, "delete", "--force", cid], capture_output=True, timeout=30)
            subprocess.run([*ISOBOX, "run", "true"], capture_output=True, timeout=60)


def test_concurrent_runs_are_isolated(image):
    script = ("echo {me} > /etc/only-{me}; echo {me} > /etc/who; echo ready; read x; "
              "cat /etc/who; ls /etc")
    a = Run("sh", "-c", script.format(me="a"))
    b = Run("--privileged", "sh", "-c", script.format(me="b"))
    try:
        cid_a, cid_b = a.ready(), b.ready()      # both have written before either reads
        code_a, out_a, err_a = a.finish()
        code_b, out_b, err_b = b.finish()
    finally:
        a.kill()
        b.kill()
    assert code_a == 0 and code_b == 0, err_a + err_b
    lines_a, lines_b = out_a.split(), out_b.split()
    assert lines_a[1] == "a" and "only-a" in lines_a and "only-b" not in lines_a, out_a
    assert lines_b[1] == "b" and "only-b" in lines_b and "only-a" not in lines_b, out_b
    assert left_of(cid_a) == [] and left_of(cid_b) == []


def test_rootfs_dir_stays_the_users_own(tmp_path, busybox_rootfs):
    """--rootfs DIR keeps its meaning: the user's directory is the container's root, written
    in place, with no layer of isobox's."""
    root = str(tmp_path / "rootfs")
    shutil.copytree(busybox_rootfs, root, symlinks=True)
    r = subprocess.run([*ISOBOX, "run", "--rootfs", root, "sh", "-c", "echo mine > /etc/mine"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(root, "etc/mine")) as f:
        assert f.read() == "mine\n"
    assert unowned() == []


def _dead_owner() -> str:
    """pid and start time of a process that has ended."""
    from isobox.ids.procinfo import proc_starttime
    p = subprocess.Popen(["sleep", "10"])
    line = f"{p.pid} {proc_starttime(p.pid)}\n"
    p.kill()
    p.wait()
    return line


def _fake_layer(cid: str, owner: str | None) -> str:
    """What a run killed inside create leaves: its dir, owner file, mounted overlay, bundle."""
    d = os.path.join(CONTAINERS, cid)
    for sub in ("upper", "work", "rootfs"):
        os.makedirs(os.path.join(d, sub))
    if owner is not None:
        with open(os.path.join(d, "owner"), "w") as f:
            f.write(owner)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={IMAGE},upperdir={d}/upper,workdir={d}/work", f"{d}/rootfs"], check=True)
    os.makedirs(os.path.join(BUNDLES, cid))
    with open(os.path.join(BUNDLES, cid, "config.json"), "w") as f:
        f.write("{}")
    return d


def _drop(cid: str) -> None:
    d = os.path.join(CONTAINERS, cid)
    subprocess.run(["umount", "-l", f"{d}/rootfs"], capture_output=True)
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(os.path.join(BUNDLES, cid), ignore_errors=True)


@pytest.mark.parametrize("owner", ["dead", "none"])
def test_layer_of_a_run_killed_in_create_is_collected(image, owner):
    cid = "run-gc" + os.urandom(5).hex()
    try:
        _fake_layer(cid, _dead_owner() if owner == "dead" else None)
        r = subprocess.run([*ISOBOX, "run", "true"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert left_of(cid) == []
    finally:
        _drop(cid)


def test_layer_of_a_live_run_is_not_collected(image):
    from isobox.ids.procinfo import proc_starttime
    cid = "run-gc" + os.urandom(5).hex()
    try:
        d = _fake_layer(cid, f"{os.getpid()} {proc_starttime(os.getpid())}\n")
        r = subprocess.run([*ISOBOX, "run", "true"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(os.path.join(d, "rootfs")) and os.path.isdir(os.path.join(d, "upper"))
    finally:
        _drop(cid)


@pytest.mark.parametrize("path", [IMAGE, IMAGE + "/etc", "/"])
def test_rootfs_may_not_be_isobox_storage(image, path):
    """--rootfs naming the image (or a directory above it) would make it writable again."""
    r = subprocess.run([*ISOBOX, "run", "--rootfs", path, "sh", "-c", "echo x > /etc/trojan"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "isobox's storage" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(IMAGE, "etc/trojan"))
    assert unowned() == []
