"""The Docker API gate end to end: `isobox gate` (the CLI, as a subprocess) in front of the
test dockerd's socket, driven by the real docker CLI (Debian's 20.10) and by raw sockets.

The workflows here must not notice the gate; malformed requests must get a 400 (or a closed
connection) and leave the gate serving everyone else."""
from __future__ import annotations

import concurrent.futures
import fcntl
import json
import os
import pty
import re
import select
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import termios
import time

import pytest

from e2e.conftest import DOCKER, IMAGE, Gate, stop_pid, unique


PING = b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"


def raw(path: str, data: bytes, timeout: float = 10, shut: bool = False) -> bytes:
    """Send data on a fresh connection, read until the other side closes (or resets)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    return out


def status(resp: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", resp)
    return int(m.group(1)) if m else None


def body_json(resp: bytes) -> dict:
    head, _, body = resp.partition(b"\r\n\r\n")
    assert re.search(rb"(?im)^content-type: application/json", head), head
    return json.loads(body)


@pytest.fixture(scope="module")
def gate(dockerd):
    tmp = tempfile.mkdtemp(prefix="isobox-gate-", dir="/tmp")        # short: a unix socket path
    g = Gate(dockerd, tmp)
    try:
        g.start()
        yield g
    finally:
        g.stop()
        gone = not os.path.exists(g.sock)
        shutil.rmtree(tmp, ignore_errors=True)
    assert gone, "the gate left its socket behind"


def rm_f(docker, *names: str) -> None:
    docker("rm", "-f", *names)


# ---------------------------------------------------------------------------- basics
def test_version_and_ping_headers(gate, dockerd):
    r = gate("version", "--format", "{{.Server.APIVersion}} {{.Server.Os}}", check=True)
    assert r.stdout.strip().endswith(" linux"), r.stdout
    direct, through = raw(dockerd.sock, PING), raw(gate.sock, PING)
    assert status(through) == 200 and through.endswith(b"OK")

    def headers(resp: bytes) -> dict[bytes, bytes]:
        lines = resp.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]
        return {k: v for k, _, v in (ln.partition(b": ") for ln in lines) if k != b"Date"}
    assert headers(through) == headers(direct)
    assert b"Api-Version" in headers(through) and b"Ostype" in headers(through)


def test_listen_socket_copies_the_engine_socket(gate, dockerd):
    mine, engine = os.stat(gate.sock), os.stat(dockerd.sock)
    assert stat.S_ISSOCK(mine.st_mode)
    assert (stat.S_IMODE(mine.st_mode), mine.st_uid, mine.st_gid) == \
        (stat.S_IMODE(engine.st_mode), engine.st_uid, engine.st_gid)


def test_ps_and_run_rm(gate):
    assert gate("ps", check=True).stdout.startswith("CONTAINER ID")
    assert gate("run", "--rm", IMAGE, "echo", "hi", check=True).stdout == "hi\n"


def test_run_detached_and_logs_follow(gate):
    name = unique("gate")
    try:
        gate("run", "-d", "--name", name, IMAGE, "sh", "-c",
             "for i in 1 2 3; do echo line$i; sleep 0.3; done", check=True)
        r = gate("logs", "-f", name, check=True, timeout=60)
        assert r.stdout == "line1\nline2\nline3\n", r.stdout
    finally:
        rm_f(gate, name)


# ---------------------------------------------------------------------------- hijacked streams
def test_exec_stdin_half_close(gate):
    name = unique("gate")
    try:
        gate("run", "-d", "--name", name, IMAGE, "sleep", "600", check=True)
        r = gate("exec", "-i", name, "cat", input="x", timeout=30)
        assert (r.returncode, r.stdout) == (0, "x"), r.stderr
        r = gate("exec", "-i", name, "wc", "-c", input="y" * 300000, timeout=30)
        assert r.stdout.strip() == "300000", r.stderr
    finally:
        rm_f(gate, name)


def test_exec_it_on_a_pty(gate):
    name = unique("gate")
    try:
        gate("run", "-d", "--name", name, IMAGE, "sleep", "600", check=True)
        out, code = on_pty(gate, ["exec", "-it", name, "sh"], rows=21, cols=83,
                           script=[(rb"# ", b"tty; stty size; echo G$((40+2))T\n"), (rb"G42T\r\n", b"exit 3\n")])
        assert code == 3, out
        assert re.search(rb"^/dev/pts/\d+\r$", out, re.M) and re.search(rb"^21 83\r$", out, re.M), out
    finally:
        rm_f(gate, name)


def on_pty(docker, args: list[str], rows: int, cols: int, script: list[tuple[bytes, bytes]],
           timeout: float = 30) -> tuple[bytes, int]:
    """Run the docker CLI on a pty (its controlling terminal); for each (pattern, reply) wait for
    the pattern, then type the reply. Returns everything read and the exit code."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen([DOCKER, *args], stdin=slave, stdout=slave, stderr=slave, env=docker.env,
                            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    buf = b""
    try:
        for pattern, reply in script:
            end = time.monotonic() + timeout
            while not re.search(pattern, buf) and time.monotonic() < end:
                if select.select([master], [], [], 0.3)[0]:
                    try:
                        buf += os.read(master, 4096)
                    except OSError:
                        break
            assert re.search(pattern, buf), f"{pattern!r} not in {buf!r}"
            os.write(master, reply)
        code = proc.wait(timeout)
        while select.select([master], [], [], 0.1)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
        return buf, code
    finally:
        if proc.poll() is None:
            stop_pid(proc.pid, timeout=5)
            proc.wait(5)
        os.close(master)


# ---------------------------------------------------------------------------- other workflows
def test_cp_both_ways(gate, tmp_path):
    name = unique("gate")
    src = tmp_path / "in.bin"
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    try:
        gate("run", "-d", "--name", name, IMAGE, "sleep", "600", check=True)
        # Into /, not /tmp: under isobox a running container's /tmp is a mount of its own that
        # dockerd's archive code does not see (`docker cp` to it fails without the gate too).
        gate("cp", str(src), f"{name}:/in.bin", check=True)
        assert gate("exec", name, "wc", "-c", "/in.bin", check=True).stdout.split()[0] == str(len(data))
        gate("cp", f"{name}:/in.bin", str(tmp_path / "out.bin"), check=True)
        assert (tmp_path / "out.bin").read_bytes() == data
    finally:
        rm_f(gate, name)


def test_networks_and_volumes(gate):
    net, vol = unique("gate-net"), unique("gate-vol")
    try:
        gate("network", "create", net, check=True)
        assert net in gate("network", "ls", "--format", "{{.Name}}", check=True).stdout.split()
        gate("volume", "create", vol, check=True)
        assert vol in gate("volume", "ls", "--format", "{{.Name}}", check=True).stdout.split()
        r = gate("run", "--rm", "--network", net, "-v", f"{vol}:/data", IMAGE, "sh", "-c",
                 "echo kept > /data/f && cat /data/f", check=True)
        assert r.stdout == "kept\n"
    finally:
        gate("network", "rm", net)
        gate("volume", "rm", vol)
    assert net not in gate("network", "ls", "--format", "{{.Name}}", check=True).stdout.split()
    assert vol not in gate("volume", "ls", "--format", "{{.Name}}", check=True).stdout.split()


@pytest.fixture
def isobox_default(dockerd):
    """The policy (rules.py, build.runtime) refuses a classic build unless dockerd's default
    runtime is isobox (RUN steps run on it): restart the fixture's dockerd that way, then back.
    The gate stays up: it connects to dockerd's socket per client connection."""
    dockerd.restart(default_runtime="isobox")
    try:
        yield dockerd
    finally:
        dockerd.restart(default_runtime=None)


def test_classic_build(gate, isobox_default, tmp_path):
    tag = f"isobox-e2e/{unique('gate-build')}:latest"
    (tmp_path / "Dockerfile").write_text(f"FROM {IMAGE}\nRUN echo built\n")
    try:
        assert gate.env["DOCKER_BUILDKIT"] == "0"          # a classic build (the fixture's env)
        r = gate("build", "-t", tag, str(tmp_path), check=True)
        assert "built" in r.stdout, r.stdout
        assert gate("image", "inspect", "-f", "{{.Id}}", tag, check=True).stdout.startswith("sha256:")
    finally:
        gate("rmi", "-f", tag)


def test_events_since_until(gate):
    since = str(int(time.time()) - 1)
    vol = unique("gate-ev")
    gate("volume", "create", vol, check=True)
    gate("volume", "rm", vol, check=True)
    until = str(int(time.time()) + 1)
    time.sleep(1.2)
    r = gate("events", "--since", since, "--until", until, "--filter", f"volume={vol}",
             "--format", "{{.Type}} {{.Action}}", check=True, timeout=30)
    assert r.stdout.split("\n")[:2] == ["volume create", "volume destroy"], r.stdout


# ---------------------------------------------------------------------------- load
def test_200_sequential_requests(gate):
    for i in range(200):
        r = gate("ps", "-q")
        assert r.returncode == 0, (i, r.stderr)


def test_20_concurrent_runs(gate):
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: gate("run", "--rm", IMAGE, "true", timeout=300), range(20)))
    failed = [r.stderr for r in results if r.returncode != 0]
    assert not failed, failed


# ---------------------------------------------------------------------------- malformed and ambiguous
def test_garbage_request_line(gate):
    r = raw(gate.sock, b"\x16\x03\x01 GARBAGE\r\n\r\n")
    assert r == b"" or status(r) == 400, r


def test_content_length_with_transfer_encoding(gate):
    r = raw(gate.sock, b"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert status(r) == 400, r
    assert "Transfer-Encoding" in body_json(r)["message"]


def test_huge_header(gate):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(gate.sock)
        resp = b""
        try:
            s.sendall(b"GET /v1.41/containers/json HTTP/1.1\r\nHost: d\r\nX-Big: ")
            block = b"a" * (1 << 20)
            for _ in range(100):                      # 100 MB, if the gate were to read it all
                s.sendall(block)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := s.recv(65536):
                resp += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    assert resp == b"" or status(resp) in (400, 431), resp[:200]


def test_unterminated_chunked_body(gate):
    # buffered for the rules, then streamed to dockerd (an archive upload: dockerd answers 404)
    for head, codes in ((b"POST /v1.41/containers/create", (400,)),
                        (b"PUT /v1.41/containers/nonexistent/archive?path=/", (400, 404))):
        r = raw(gate.sock, head + b" HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n10\r\n{\"Ima", shut=True)
        assert r == b"" or status(r) in codes, r


def test_a_stalled_client_does_not_block_others(gate):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(gate.sock)
        s.sendall(b"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\nContent-Length: 100\r\n\r\n{")
        assert gate("ps", timeout=20).returncode == 0


@pytest.mark.parametrize("target,code", [
    (b"/v1.41/containers/json/", 200),
    (b"/v1.41//containers//json", 200),
    (b"/v1.41/images/../containers/json", 200),
    (b"/v1.41/containers%2Fjson", 200),
    (b"/v1.41/../../containers/json", 400),
    (b"/v1.41/containers%252Fjson", 400),
    (b"/v1.41/containers/json?all=1;x=2", 400),
    (b"/v1.41/containers/json?all=%zz", 400),
    (b"/v1.4x1/containers/json", 404),
    (b"http://docker/v1.41/containers/json", 400),
])
def test_path_normalisation(gate, target, code):
    r = raw(gate.sock, b"GET " + target + b" HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
    assert status(r) == code, r[:300]
    if code == 400:
        assert body_json(r)["message"]


def test_keep_alive_parses_every_request(gate):
    """Two requests on one connection: the second is parsed (and normalised) too, not tunnelled."""
    r = raw(gate.sock, b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n"
                       b"GET /v1.41/../../x HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
    first, _, rest = r.partition(b"\r\n\r\nOK")
    assert status(first) == 200 and status(rest) == 400, r


ARCHIVE = b"PUT /v1.41/containers/nonexistent/archive?path=/ HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_streamed_chunked_body_then_next_request(gate):
    """A streamed (not buffered) chunked body is forwarded as received; the request after it on
    the same connection is still parsed."""
    r = raw(gate.sock, ARCHIVE + b"3\r\nabc\r\n0\r\n\r\n" + PING)
    assert status(r) == 404 and b"\r\n\r\nOK" in r and r.count(b"HTTP/1.1 ") == 2, r


def test_chunked_download_then_next_requests_are_still_parsed(gate):
    """A chunked response (`docker cp` out) is relayed as dockerd framed it; on the same
    connection, the next request is still parsed: a normalised ping, then a create with the
    host's root bound (Go's case-insensitive keys) that must be refused, not tunnelled."""
    name = unique("gate")
    try:
        gate("create", "--name", name, IMAGE, "true", check=True)
        get = b"GET /v1.41/containers/" + name.encode() + b"/archive?path=/bin/busybox HTTP/1.1\r\nHost: d\r\n\r\n"
        body = json.dumps({"Image": IMAGE, "hostconfig": {"binds": ["/:/h"]}}).encode()
        create = (b"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        r = raw(gate.sock, get + b"GET //_ping HTTP/1.1\r\nHost: d\r\n\r\n" + create, timeout=30)
        head, _, rest = r.partition(b"\r\n\r\n")
        assert status(head) == 200 and re.search(rb"(?im)^transfer-encoding: chunked", head), head
        # the tar of busybox (over a megabyte) in dockerd's chunks, then the two answers
        second = rest.index(b"\r\n0\r\n\r\nHTTP/1.1 200") + len(b"\r\n0\r\n\r\n")   # (busybox holds "HTTP/1.1")
        assert second > 1 << 20
        ping, _, third = rest[second:].partition(b"\r\n\r\nOK")
        assert status(third) == 403 and b"isobox gate" in third, third[:300]
    finally:
        rm_f(gate, name)


@pytest.mark.parametrize("body", [b"3;ext=1\r\nabc\r\n0\r\n\r\n", b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n",
                                  b"3\nabc\r\n0\r\n\r\n", b"3\r\nabcd\r\n0\r\n\r\n", b" 3\r\nabc\r\n0\r\n\r\n"])
def test_non_canonical_chunked_framing_is_refused(gate, body):
    """Framing dockerd might read differently (so that the rest became a request the rules never
    saw) is refused, not forwarded."""
    r = raw(gate.sock, ARCHIVE + body + PING)
    assert status(r) == 400 and r.count(b"HTTP/1.1 ") == 1, r


def test_still_serving_after_abuse(gate):
    assert gate.alive(), gate.log()
    assert gate("ps", check=True).returncode == 0
    assert "Traceback" not in gate.log()


def test_refusal_reaches_the_cli_as_a_daemon_error(gate):
    r = gate("stop", "x%2Fy")        # the CLI sends x%252Fy: a double-encoded path
    assert r.returncode != 0
    assert "Error response from daemon: isobox gate: an encoded" in r.stderr, r.stderr
