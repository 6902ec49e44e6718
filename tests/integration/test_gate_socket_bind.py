"""isobox-runc and sockets served by an isobox gate (policy/gatesock.py).

A real `isobox gate` runs on a temp socket in front of a dummy unix server standing in for
dockerd; a policy file denies the gate's socket the way the default one denies
/var/run/docker.sock. The runtime must let a container bind the gate's socket (the gate
enforces the policy on every call), and keep refusing a plain socket at a denied path, the
engine socket behind the gate, and a gate socket whose gate is gone."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ids_held, leftovers

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


def _stop(pid: int, sig: int = signal.SIGTERM) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return


class GateProc:
    """`isobox gate --listen <tmp>/gate.sock --engine <tmp>/engine.sock`, the engine a socket
    that only listens (the runtime never talks to it; the gate only when a client calls)."""

    def __init__(self, tmp: str):
        from isobox.policy import gatesock
        self.tmp = tmp
        self.sock = os.path.join(tmp, "gate.sock")
        self.engine_path = os.path.join(tmp, "engine.sock")
        self.engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.engine.bind(self.engine_path)
        self.engine.listen(8)
        self.state = gatesock.state_path(self.sock)
        self.log = os.path.join(tmp, "gate.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "isobox.cli.main", "gate", "--listen", self.sock, "--engine",
                 self.engine_path], stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env=dict(os.environ, PYTHONPATH=SRC))
        end = time.time() + 30
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"isobox gate exited {self.proc.returncode}: {open(self.log).read()}")
            if os.path.exists(self.state) and self._mine():
                return
            time.sleep(0.05)
        raise RuntimeError(f"isobox gate wrote no state file: {open(self.log).read()}")

    def _mine(self) -> bool:
        try:
            with open(self.state) as f:
                return json.load(f).get("pid") == self.proc.pid
        except (OSError, ValueError):
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            _stop(self.proc.pid, sig)
            self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        self.engine.close()


@pytest.fixture
def gate():
    tmp = tempfile.mkdtemp(prefix="isobox-gs-", dir="/tmp")       # short: a unix socket path
    g = GateProc(tmp)
    try:
        g.start()
        yield g
    finally:
        g.close()
        try:
            os.unlink(g.state)        # a SIGKILLed gate leaves it behind
        except FileNotFoundError:
            pass
        subprocess.run(["rm", "-rf", tmp])


def _policy(tmp: str, *deny: str) -> dict:
    """ISOBOX_POLICY naming a root-owned file that adds `deny` to the built-in deny list."""
    path = os.path.join(tmp, "policy.toml")
    with open(path, "w") as f:
        f.write("[mounts]\ndeny_extra = [" + ", ".join(json.dumps(d) for d in deny) + "]\n")
    os.chmod(path, 0o644)
    return {**os.environ, "ISOBOX_POLICY": path}


def _bind(source: str):
    def edit(spec):
        spec["mounts"].append({"destination": "/var/run/docker.sock", "type": "bind", "source": source,
                               "options": ["rbind", "rw"]})
    return edit


def _run(runtime, rootfs: str, source: str, env: dict) -> tuple[subprocess.CompletedProcess, str]:
    b = runtime.bundle(rootfs, ["sh", "-c", "test -S /var/run/docker.sock && echo socket-there"],
                       edit=_bind(source))
    cid = runtime.new_id()
    return runtime("run", "--bundle", b, cid, env=env), cid


def _refused(runtime, r: subprocess.CompletedProcess, cid: str) -> str:
    assert r.returncode != 0, r.stdout
    assert leftovers(cid) == []
    assert ids_held(runtime.root) == []
    return r.stderr


def test_the_gate_records_what_it_serves(gate):
    with open(gate.state) as f:
        st = json.load(f)
    s = os.stat(gate.sock)
    assert (st["listen"], st["dev"], st["ino"], st["engine"]) == (gate.sock, s.st_dev, s.st_ino, gate.engine_path)
    info = os.stat(gate.state)
    assert info.st_uid == 0 and info.st_mode & 0o077 == 0
    assert os.stat(os.path.dirname(gate.state)).st_mode & 0o077 == 0


def test_a_denied_socket_served_by_the_gate_may_be_bound(runtime, busybox_rootfs, gate):
    r, _ = _run(runtime, busybox_rootfs, gate.sock, _policy(gate.tmp, gate.sock))
    assert r.returncode == 0, r.stderr
    assert "socket-there" in r.stdout


def test_a_plain_socket_at_a_denied_path_is_refused(runtime, busybox_rootfs, gate):
    plain = os.path.join(gate.tmp, "plain.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(plain)
        s.listen(1)
        r, cid = _run(runtime, busybox_rootfs, plain, _policy(gate.tmp, plain))
    assert f"bind mount of {plain} refused by" in _refused(runtime, r, cid)


def test_the_engine_socket_behind_the_gate_is_refused_even_if_not_denied(runtime, busybox_rootfs, gate):
    r, cid = _run(runtime, busybox_rootfs, gate.engine_path, _policy(gate.tmp))
    assert f"the engine socket behind the isobox gate on {gate.sock}" in _refused(runtime, r, cid)


def test_a_stale_record_of_a_dead_gate_is_refused(runtime, busybox_rootfs, gate):
    gate.stop(signal.SIGKILL)                         # no cleanup: socket file and record stay
    assert os.path.exists(gate.state) and os.path.exists(gate.sock)
    r, cid = _run(runtime, busybox_rootfs, gate.sock, _policy(gate.tmp, gate.sock))
    assert f"bind mount of {gate.sock} refused by" in _refused(runtime, r, cid)


def test_a_stopped_gate_removes_its_record(gate):
    gate.stop()
    assert not os.path.exists(gate.state) and not os.path.exists(gate.sock)


def test_records_in_a_directory_others_may_write_are_ignored(gate, tmp_path):
    """The runtime trusts only a root-only directory: anyone able to write there could forge one."""
    from isobox.policy import gatesock
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    with open(gate.state) as f:
        (d / "x.json").write_text(f.read())
    os.chmod(d / "x.json", 0o600)
    fd = os.open(gate.sock, os.O_PATH | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        assert gatesock.classify(fd, st, str(d))[0] == "gate"
        os.chmod(d, 0o777)
        assert gatesock.classify(fd, st, str(d)) is None
        os.chmod(d, 0o700)
        os.chmod(d / "x.json", 0o666)
        assert gatesock.classify(fd, st, str(d)) is None
    finally:
        os.close(fd)


def test_a_record_whose_pid_was_reused_is_refused(gate, tmp_path):
    """Same pid, other start time: not the process that wrote the record."""
    from isobox.policy import gatesock
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    with open(gate.state) as f:
        st = json.load(f)
    st["start"] -= 1
    (d / "x.json").write_text(json.dumps(st))
    fd = os.open(gate.sock, os.O_PATH | os.O_CLOEXEC)
    try:
        assert gatesock.classify(fd, os.fstat(fd), str(d)) is None
    finally:
        os.close(fd)
