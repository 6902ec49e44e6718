"""Helpers shared by the containerd and Podman end-to-end tests.

Images are built locally (there is no image registry here): a busybox-static rootfs made by
isobox.cli.image.build_busybox_rootfs, packed as a plain rootfs tar (for `podman import`) or as
an OCI image archive with correct sha256 digests (for `ctr images import`)."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import tarfile
import time

from e2e import hostclean

try:  # tests/e2e/conftest.py (pytest registers it as "conftest") owns the argv directory
    from conftest import ARGV_DIR, argv_log  # type: ignore
except ImportError:  # pragma: no cover - run without the e2e conftest
    ARGV_DIR = "/run/isobox-e2e/argv"

    def argv_log(engine: str) -> str:
        os.makedirs(ARGV_DIR, exist_ok=True)
        path = os.path.join(ARGV_DIR, engine + ".jsonl")
        open(path, "w").close()
        return path

ISOBOX_RUNC = "/usr/local/bin/isobox-runc"
E2E_RUN = "/run/isobox-e2e"
E2E_LIB = "/var/lib/isobox-e2e"
GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def rootfs_tar(dest: str) -> str:
    """A tar of the busybox rootfs, members owned 0:0, at dest."""
    from isobox.cli.image import build_busybox_rootfs
    work = dest + ".d"
    shutil.rmtree(work, ignore_errors=True)
    build_busybox_rootfs("/bin/busybox", work)

    def owner(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.mtime = 0
        return ti

    with tarfile.open(dest, "w") as t:
        for name in sorted(os.listdir(work)):
            t.add(os.path.join(work, name), arcname=name, filter=owner)
    shutil.rmtree(work, ignore_errors=True)
    return dest


def _blob(blobs: dict, data: bytes, media: str) -> dict:
    d = hashlib.sha256(data).hexdigest()
    blobs[d] = data
    return {"mediaType": media, "digest": "sha256:" + d, "size": len(data)}


def oci_archive(dest: str, ref: str, layer_tar: str | None = None, cmd: tuple[str, ...] = ("/bin/sh",)) -> str:
    """An OCI image layout tar (oci-layout, index.json, blobs/sha256/*) with one gzip layer: the
    rootfs tar layer_tar (the e2e conftest's busybox_tar) or a busybox rootfs built here;
    annotated with ref so `ctr images import` names it; cmd is the image's Cmd."""
    if layer_tar:
        with open(layer_tar, "rb") as f:
            raw = f.read()
    else:
        own = rootfs_tar(dest + ".layer.tar")
        with open(own, "rb") as f:
            raw = f.read()
        os.unlink(own)
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    gz = gzip.compress(raw, mtime=0)
    blobs: dict[str, bytes] = {}
    layer = _blob(blobs, gz, "application/vnd.oci.image.layer.v1.tar+gzip")
    config = {
        "architecture": GOARCH, "os": "linux", "created": "1970-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": list(cmd), "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "isobox e2e busybox"}],
    }
    cfg = _blob(blobs, json.dumps(config, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cfg, "layers": [layer]}
    man = _blob(blobs, json.dumps(manifest, sort_keys=True).encode(), "application/vnd.oci.image.manifest.v1+json")
    man["platform"] = {"architecture": GOARCH, "os": "linux"}
    man["annotations"] = {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1]}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [man]}

    def add(t: tarfile.TarFile, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
        t.addfile(ti, io.BytesIO(data))

    with tarfile.open(dest, "w") as t:
        add(t, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add(t, "index.json", json.dumps(index).encode())
        for d, data in blobs.items():
            add(t, f"blobs/sha256/{d}", data)
    return dest


def read_argv(path: str) -> list[list[str]]:
    """Every isobox-runc argv recorded in an ISOBOX_ARGV_LOG file."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l)["argv"] for l in f if l.strip()]


_VALUED = {"--root", "--log", "--log-format", "--criu", "--rootless", "--bundle", "-b", "--pid-file",
           "--console-socket", "--process", "-p", "--preserve-fds", "--cwd", "--env", "-e", "--user", "-u",
           "--cap", "-c", "--apparmor", "--process-label", "--format", "-f", "--signal", "-s", "--empty-ns",
           "--additional-gids", "-g", "--resources", "-r"}
_COMMANDS = {"create", "start", "run", "exec", "state", "list", "ps", "kill", "pause", "resume", "update",
             "events", "delete", "spec", "features", "checkpoint", "restore"}


def argv_forms(argvs: list[list[str]]) -> set[tuple[str, tuple[str, ...]]]:
    """(command, sorted flag names) for each recorded call: the shape an engine used."""
    forms = set()
    for argv in argvs:
        cmd, flags, i = "", [], 0
        while i < len(argv):
            a = argv[i]
            if a.startswith("-"):
                name = a.split("=", 1)[0]
                flags.append(("g:" if not cmd else "") + name)
                if "=" not in a and name in _VALUED:
                    i += 1
            elif not cmd and a in _COMMANDS:
                cmd = a
            i += 1
        forms.add((cmd or "-", tuple(sorted(set(flags)))))
    return forms


def roots_in(argvs: list[list[str]]) -> set[str]:
    """The --root state dirs the engine passed to isobox-runc."""
    out = set()
    for argv in argvs:
        for i, a in enumerate(argv):
            if a == "--root" and i + 1 < len(argv):
                out.add(argv[i + 1])
            elif a.startswith("--root="):
                out.add(a.split("=", 1)[1])
    return out


def uid_map_base(text: str) -> int:
    """The host start of a one-line uid_map `0 BASE LEN`."""
    m = re.search(r"^\s*0\s+(\d+)\s+(\d+)\s*$", text, re.M)
    assert m, f"no uid_map line in {text!r}"
    return int(m.group(1))


def proc_uid_map(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/uid_map") as f:
        _, base, length = f.read().split()[:3]
    return int(base), int(length)


def wait_for(pred, timeout: float = 20.0, step: float = 0.1):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > end:
            return v
        time.sleep(step)


def kill_pid(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM then SIGKILL one process we started, by its pid."""
    import signal
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            if not os.path.exists(f"/proc/{pid}"):
                return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def run(cmd: list[str], timeout: float = 90, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\nstdout: {r.stdout}\nstderr: {r.stderr}")
    return r


def run_pty(cmd: list[str], timeout: float = 60, rows: int = 40, cols: int = 123, env=None) -> tuple[int, str]:
    """Run cmd with a new pseudo-terminal (rows x cols) as its controlling terminal and stdio,
    the way a user's shell would; returns (exit code, everything written to the terminal)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def ctty() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    p = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                         preexec_fn=ctty, env=env)
    os.close(slave)
    out = b""
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: every slave fd is closed
                    break
                if not data:
                    break
                out += data
            elif p.poll() is not None:
                break
        else:
            p.kill()
        rc = p.wait(timeout=15)
    finally:
        os.close(master)
    return rc, out.decode(errors="replace").replace("\r", "")


def ids_held_by(names) -> list:
    """Allocator holders whose container id is one of names (any --root)."""
    from isobox.ids.allocator import Allocator
    names = set(names)
    return [(h, b) for h, b in Allocator().holders() if h.container_id in names]


def containerd_config(root: str, state: str, sock: str, rest: str, top: str = "") -> str:
    """A version-2 containerd config of the tests' own: root, state and socket, no debug or
    metrics listener; `top` adds top-level keys, `rest` the plugin tables."""
    return f"""version = 2
root = "{root}"
state = "{state}"
{top}
[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

{rest}"""


@contextlib.contextmanager
def own_containerd(config: str, sock: str, root: str, state: str, engine: str, log_path: str):
    """A containerd of the tests' own (config file `config`: own root, state and socket), every
    isobox-runc call it makes recorded in ARGV_DIR/<engine>.jsonl; yields its Popen once it
    answers. Afterwards it is stopped by pid, what it left mounted under root or state is
    unmounted, root, state and the sockets go, and so do the /run/containerd directories it
    made (ctr's FIFOs, the shims' sockets and their runtime's --root live there whatever the
    state dir says) once empty."""
    for d in (root, state, ARGV_DIR):
        os.makedirs(d, exist_ok=True)
    shared = hostclean.absent()
    record = argv_log(engine)
    env = dict(os.environ, ISOBOX_ARGV_LOG=record)
    log = open(log_path, "wb")
    proc = subprocess.Popen(["containerd", "--config", config], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        ok = wait_for(lambda: proc.poll() is not None or
                      run(["ctr", "-a", sock, "version"], check=False, timeout=10).returncode == 0, 30)
        with open(log_path, errors="replace") as f:
            assert ok and proc.poll() is None, f.read()[-3000:]
        yield proc
    finally:
        kill_pid(proc.pid)
        log.close()
        for d in (root, state):
            hostclean.umount_below(d)
            shutil.rmtree(d, ignore_errors=True)
        for r in roots_in(read_argv(record)):  # the shims' isobox-runc --root, emptied by delete
            if r.startswith("/run/containerd/") and os.path.isdir(r) and not os.listdir(r):
                os.rmdir(r)
        hostclean.remove(shared)
        for p in (sock, sock + ".ttrpc"):
            if os.path.exists(p):
                os.unlink(p)
