"""Shared end-to-end fixtures: a dockerd started by the tests (with its own containerd), the
busybox image every engine imports, and the argv record directory.

Every engine fixture sets ISOBOX_ARGV_LOG to a file of its own under ARGV_DIR
(docker.jsonl, containerd.jsonl, podman.jsonl, ...), truncated when the fixture starts;
test_zz_argv_coverage.py reads them all at the end of the session.

The daemons are stopped by the PID they were started with, never by name."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid

import pytest

from e2e import hostclean



def _top_conftest():
    """tests/conftest.py's helpers under a name of their own: pytest registers this file as
    "conftest" too, so `from conftest import ...` here would import this module itself."""
    import importlib.util
    name = "isobox_tests_conftest"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conftest.py")
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


_top = _top_conftest()
BUSYBOX, ids_held, leftovers = _top.BUSYBOX, _top.ids_held, _top.leftovers
# Tests collected after this file see it as sys.modules["conftest"]: keep tests/conftest.py's
# helpers importable from it (`from conftest import RUNC` in tests/integration).
RUNC, make_rootfs, Runtime = _top.RUNC, _top.make_rootfs, _top.Runtime

ARGV_DIR = "/run/isobox-e2e/argv"               # every engine's isobox-runc argv records (*.jsonl)
ISOBOX_RUNC = "/usr/local/bin/isobox-runc"
DOCKER = "/usr/bin/docker"                      # Debian's 20.10 CLI; /usr/local/bin/docker (28.x) is not used
DOCKERD = "/usr/sbin/dockerd"
IMAGE = "isobox-e2e/busybox:latest"
DOCKER_DATA = "/var/lib/isobox-e2e/docker"
DOCKER_EXEC = "/run/isobox-e2e/docker"
DOCKER_PIDFILE = "/run/isobox-e2e/docker.pid"
DOCKER_ARGV = os.path.join(ARGV_DIR, "docker.jsonl")


def argv_log(engine: str) -> str:
    """ARGV_DIR/<engine>.jsonl, emptied: call once when that engine's daemon starts."""
    os.makedirs(ARGV_DIR, exist_ok=True)
    path = os.path.join(ARGV_DIR, f"{engine}.jsonl")
    open(path, "w").close()
    return path


def read_argv_records(directory: str = ARGV_DIR) -> list[dict]:
    """Every record of every engine: {"argv": [...], "ppid": n, "engine": file stem}."""
    out = []
    if not os.path.isdir(directory):
        return out
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(directory, name)) as f:
            for line in f:
                line = line.strip()
                if line:
                    rec = json.loads(line)
                    rec["engine"] = name[:-len(".jsonl")]
                    out.append(rec)
    return out


def build_busybox_tar(path: str) -> str:
    """A tar of the busybox-static rootfs (isobox's built-in image), for `docker import`,
    `ctr image import` (wrap it yourself) or `podman import`. Files are root-owned."""
    from isobox.cli.image import build_busybox_rootfs
    with tempfile.TemporaryDirectory(prefix="isobox-e2e-img-") as tmp:
        root = os.path.join(tmp, "rootfs")
        build_busybox_rootfs(BUSYBOX, root)

        def owner(ti: tarfile.TarInfo) -> tarfile.TarInfo:
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = "root"
            return ti
        with tarfile.open(path, "w") as tar:
            for entry in sorted(os.listdir(root)):
                tar.add(os.path.join(root, entry), arcname=entry, filter=owner)
    return path


SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
GATE_PING = b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"


class Gate:
    """`isobox gate` (this checkout's) on `listen` (default: a socket in tmp) in front of the
    fixture's dockerd, with extra CLI arguments; callable like Dockerd. ready() says when it
    serves; subclasses wait for more."""

    def __init__(self, dockerd, tmp: str, listen: str | None = None, extra: tuple[str, ...] = ()):
        self.dockerd = dockerd
        self.tmp = tmp
        self.sock = listen or os.path.join(tmp, "gate.sock")
        self.extra = extra
        self.log_path = os.path.join(tmp, "gate.log")
        self.env = dict(dockerd.env, DOCKER_HOST=f"unix://{self.sock}")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "isobox.cli.main", "gate", "--listen", self.sock, "--engine", self.dockerd.sock,
                 *self.extra],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env=dict(os.environ, PYTHONPATH=SRC))     # this checkout's isobox, whatever the venv links
        end = time.time() + 30
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"isobox gate exited {self.proc.returncode}:\n{self.log()}")
            if self.ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"isobox gate did not answer:\n{self.log()}")

    def ready(self) -> bool:
        if not os.path.exists(self.sock):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            try:
                s.connect(self.sock)
                s.sendall(GATE_PING)
                return b" 200 " in s.recv(20)
            except OSError:
                return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid, timeout=10)
            self.proc.wait(10)
            self.proc = None

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __call__(self, *args: str, check: bool = False, timeout: float = 120, input: str | None = None,
                 **kw) -> subprocess.CompletedProcess:
        r = subprocess.run([DOCKER, *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                           input=input, stdin=None if input is not None else subprocess.DEVNULL, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} through the gate failed ({r.returncode}):\n"
                                 f"{r.stdout}\n{r.stderr}\n--- gate log:\n{self.log()[-3000:]}")
        return r


def stop_pid(pid: int, timeout: float = 30) -> None:
    """SIGTERM, wait, then SIGKILL: only this pid, which the caller started."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.time() + timeout
    while time.time() < end:
        if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Dockerd:
    """One dockerd (and the containerd it starts itself) on a private socket."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.sock = os.path.join(tmp, "docker.sock")
        self.config = os.path.join(tmp, "daemon.json")
        self.log_path = os.path.join(tmp, "dockerd.log")
        self.proc: subprocess.Popen | None = None
        self.argv_log = argv_log("docker")
        self.env = dict(os.environ, DOCKER_HOST=f"unix://{self.sock}", DOCKER_BUILDKIT="0",
                        DOCKER_CONFIG=os.path.join(tmp, "cli"))
        self.default_runtime: str | None = None
        self.path_prefix: str | None = None     # a directory put first on dockerd's PATH (BuildKit's runc)
        self.run_dirs = hostclean.absent()          # what its containerd makes in /run/containerd

    # -- daemon -----------------------------------------------------------------------
    def start(self, default_runtime: str | None = None) -> None:
        cfg = {"runtimes": {"isobox": {"path": ISOBOX_RUNC}}}
        if default_runtime:
            cfg["default-runtime"] = default_runtime
        self.default_runtime = default_runtime
        with open(self.config, "w") as f:
            json.dump(cfg, f)
        os.makedirs(DOCKER_DATA, exist_ok=True)
        os.makedirs(DOCKER_EXEC, exist_ok=True)
        env = dict(os.environ, ISOBOX_ARGV_LOG=self.argv_log)
        env.pop("DOCKER_HOST", None)
        if self.path_prefix:
            env["PATH"] = f"{self.path_prefix}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [DOCKERD, "--config-file", self.config, "--host", f"unix://{self.sock}", "--data-root", DOCKER_DATA,
             "--exec-root", DOCKER_EXEC, "--pidfile", DOCKER_PIDFILE],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True)
        log.close()
        end = time.time() + 60
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {self.proc.returncode}:\n{self.log_tail()}")
            if os.path.exists(self.sock) and self._ping():
                return
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not answer on {self.sock}:\n{self.log_tail()}")

    def _ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(self.sock)
                s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                return b"OK" in s.recv(4096)
        except OSError:
            return False

    def stop(self, final: bool = False) -> None:
        """final: for good (not a restart), so what its containerd made in /run/containerd goes."""
        if self.proc is not None:
            stop_pid(self.proc.pid, timeout=45)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
        if final:
            hostclean.remove(self.run_dirs)

    def restart(self, default_runtime: str | None = None) -> None:
        self.stop()
        self.start(default_runtime)

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    # -- CLI ---------------------------------------------------------------------------
    def __call__(self, *args: str, check: bool = False, timeout: float = 120, input: str | None = None,
                 **kw) -> subprocess.CompletedProcess:
        r = subprocess.run([DOCKER, *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                           input=input, stdin=None if input is not None else subprocess.DEVNULL, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def inspect(self, name: str, fmt: str) -> str:
        return self("inspect", "-f", fmt, name, check=True).stdout.strip()

    @property
    def runtime_root(self) -> str:
        """The --root dockerd 20.10's runc shim passes to isobox-runc."""
        return os.path.join(DOCKER_EXEC, "runtime-runc", "moby")


@pytest.fixture(scope="session")
def busybox_tar(tmp_path_factory) -> str:
    return build_busybox_tar(str(tmp_path_factory.mktemp("e2e-image") / "busybox.tar"))


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory, busybox_tar):
    for exe in (DOCKERD, DOCKER, ISOBOX_RUNC):
        if not os.access(exe, os.X_OK):
            pytest.skip(f"{exe} is not installed")
    if os.path.exists(DOCKER_PIDFILE):
        try:
            old = int(open(DOCKER_PIDFILE).read())
        except ValueError:
            old = 0
        if old and os.path.exists(f"/proc/{old}"):
            pytest.fail(f"a dockerd (pid {old}) from another run still uses {DOCKER_PIDFILE}")
    tmp = tempfile.mkdtemp(prefix="isobox-e2e-docker-", dir="/tmp")   # short: a unix socket path
    d = Dockerd(tmp)
    try:
        d.start()
        d("import", busybox_tar, IMAGE, check=True)
        yield d
    finally:
        d.stop(final=True)
        for path in (DOCKER_EXEC, DOCKER_DATA):
            hostclean.umount_below(path)
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.unlink(DOCKER_PIDFILE)
        except FileNotFoundError:
            pass
        shutil.copy(d.log_path, str(tmp_path_factory.getbasetemp() / "dockerd.log"))
        shutil.rmtree(tmp, ignore_errors=True)


def container_leaks(cid: str, runtime_root: str) -> list:
    """Mounts, cgroups, state and ID ranges a removed container left behind."""
    out = list(leftovers(cid))
    if os.path.exists(os.path.join(runtime_root, cid)):
        out.append(os.path.join(runtime_root, cid))
    out += [h for h in ids_held(runtime_root) if h[0].container_id == cid]
    return out


def unique(prefix: str = "e2e") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
