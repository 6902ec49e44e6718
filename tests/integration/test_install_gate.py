"""`isobox install --gate` / `uninstall --gate` through the CLI against a temporary root
(ISOBOX_GATE_ROOT prefixes every host path, ISOBOX_DOCKER_CONFIG names daemon.json): real files,
real sockets and real processes; the host's /etc/docker, /etc/systemd and /var/run/docker.sock
are never touched. `isobox doctor`'s gate rows are checked against a real `isobox gate`."""
from __future__ import annotations

import grp
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
ISOBOX = [sys.executable, "-I", "-m", "isobox.cli.main"]
REAL = ("/etc/docker/daemon.json", "/etc/systemd/system/isobox-gate.service", "/etc/default/docker",
        "/etc/isobox/gate-install.json", "/var/run/docker.sock", "/usr/local/lib/isobox/buildkit-bin")
DOCKER_SOCKET_UNIT = """[Socket]
ListenStream=/run/docker.sock
SocketMode=0660
SocketUser=root
SocketGroup=docker
"""
DOCKER_SERVICE_UNIT = """[Service]
EnvironmentFile=-/etc/default/docker
ExecStart=/usr/sbin/dockerd -H fd:// --containerd=/run/containerd/containerd.sock $DOCKER_OPTS
"""


@pytest.fixture(autouse=True)
def real_files_untouched():
    def snap():
        out = {}
        for p in REAL:
            try:
                st = os.lstat(p)
                out[p] = (st.st_mtime_ns, st.st_ino)
            except FileNotFoundError:
                out[p] = None
        return out
    before = snap()
    yield
    assert snap() == before


@pytest.fixture
def root():
    d = tempfile.mkdtemp(prefix="isobox-gi-", dir="/tmp")        # short: sockets live under it
    os.makedirs(os.path.join(d, "etc/docker"))
    os.makedirs(os.path.join(d, "var/run"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def env(root):
    return dict(os.environ, ISOBOX_GATE_ROOT=root, ISOBOX_DOCKER_CONFIG=os.path.join(root, "etc/docker/daemon.json"),
                PYTHONPATH=SRC)


def systemd(root: str) -> None:
    """A host systemd runs (sd_booted: /run/systemd/system) with Debian's docker units."""
    os.makedirs(os.path.join(root, "run/systemd/system"))
    units = os.path.join(root, "lib/systemd/system")
    os.makedirs(units)
    with open(os.path.join(units, "docker.socket"), "w") as f:
        f.write(DOCKER_SOCKET_UNIT)
    with open(os.path.join(units, "docker.service"), "w") as f:
        f.write(DOCKER_SERVICE_UNIT)


def isobox(env, *args):
    return subprocess.run([*ISOBOX, *args], capture_output=True, text=True, env=env, timeout=120)


def tree(root: str) -> dict[str, tuple]:
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (stat.S_IMODE(st.st_mode), st.st_mtime_ns,
                                             os.readlink(p) if os.path.islink(p) else None)
    return out


def public_socket(root: str, mode: int, gid: int) -> socket.socket:
    """The socket dockerd serves today, with the access clients know (kept open by the test)."""
    path = os.path.join(root, "var/run/docker.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    os.chown(path, 0, gid)
    os.chmod(path, mode)
    return s


def test_systemd_install_idempotent_and_reverted(root, env):
    systemd(root)
    (open(os.path.join(root, "etc/docker/daemon.json"), "w")).write('{"log-level": "warn"}\n')
    gid = os.getgid() if os.getgid() else 7
    s = public_socket(root, 0o640, gid)
    try:
        r = isobox(env, "install", "--gate")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        s.close()
    assert "gate: installed (systemd)" in r.stdout and "systemctl daemon-reload" in r.stdout
    etc = os.path.join(root, "etc/systemd/system")
    sock_dropin = open(os.path.join(etc, "docker.socket.d/isobox-gate.conf")).read()
    assert "ListenStream=\nListenStream=/run/isobox/engine/docker.sock\n" in sock_dropin
    assert "DirectoryMode=0700" in sock_dropin
    assert "Environment=PATH=/usr/local/lib/isobox/buildkit-bin:" in open(
        os.path.join(etc, "docker.service.d/isobox-gate.conf")).read()
    unit = open(os.path.join(etc, "isobox-gate.service")).read()
    assert (f"gate --listen /var/run/docker.sock --engine /run/isobox/engine/docker.sock --mode 640 "
            f"--group {gid} --owner 0\n") in unit
    assert os.readlink(os.path.join(etc, "multi-user.target.wants/isobox-gate.service")) == "../isobox-gate.service"
    st = os.stat(os.path.join(root, "run/isobox/engine"))
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0
    wrapper = os.path.join(root, "usr/local/lib/isobox/buildkit-bin/runc")
    assert stat.S_IMODE(os.stat(wrapper).st_mode) == 0o755
    assert 'exec /usr/local/bin/isobox-runc "$@"' in open(wrapper).read()
    assert json.loads(open(env["ISOBOX_DOCKER_CONFIG"]).read())["runtimes"]["isobox"]   # the gate needs it
    before = tree(root)
    r2 = isobox(env, "install", "--gate")
    assert r2.returncode == 0 and r2.stdout.count("nothing changed") == 2, r2.stdout
    assert tree(root) == before
    r3 = isobox(env, "uninstall", "--gate")
    assert r3.returncode == 0 and "systemctl" in r3.stdout, r3.stdout
    left = set(tree(root))
    assert not any(p.startswith(("etc/systemd", "usr/local/lib/isobox/buildkit-bin", "etc/isobox/gate"))
                   and not os.path.isdir(os.path.join(root, p)) for p in left), left
    assert json.loads(open(env["ISOBOX_DOCKER_CONFIG"]).read())["runtimes"]["isobox"]   # --gate only
    assert "nothing changed" in isobox(env, "uninstall", "--gate").stdout


def test_systemd_refuses_a_service_without_fd(root, env):
    systemd(root)
    dropin = os.path.join(root, "etc/systemd/system/docker.service.d")
    os.makedirs(dropin)
    with open(os.path.join(dropin, "local.conf"), "w") as f:
        f.write("[Service]\nExecStart=\nExecStart=/usr/sbin/dockerd -H unix:///var/run/docker.sock\n")
    r = isobox(env, "install", "--gate")
    assert r.returncode == 1 and "does not take docker.socket's socket (-H fd://)" in r.stdout, r.stdout
    assert not os.path.exists(os.path.join(root, "etc/systemd/system/isobox-gate.service"))


def test_without_systemd_daemon_json_hosts_and_defaults(root, env):
    cfg = os.path.join(root, "etc/docker/daemon.json")
    with open(cfg, "w") as f:
        f.write('{"hosts": ["unix:///var/run/docker.sock", "tcp://127.0.0.1:2375"]}\n')
    os.makedirs(os.path.join(root, "etc/default"))
    with open(os.path.join(root, "etc/default/docker"), "w") as f:
        f.write('# Docker Upstart and SysVinit configuration file\n#DOCKER_OPTS="--dns 8.8.8.8"\n')
    r = isobox(env, "install", "--gate", "--docker")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "installed (daemon.json)" in r.stdout and "service docker restart" in r.stdout
    assert "tcp://127.0.0.1:2375: clients there bypass the gate" in r.stdout
    hosts = json.loads(open(cfg).read())["hosts"]
    assert hosts == ["unix:///run/isobox/engine/docker.sock", "tcp://127.0.0.1:2375"]
    defaults = open(os.path.join(root, "etc/default/docker")).read()
    assert defaults.startswith("# Docker Upstart") and 'export PATH="/usr/local/lib/isobox/buildkit-bin:$PATH"' in defaults
    # the block is shell Debian's init script sources: run it as the script would
    sh = subprocess.run(["sh", "-c", f". {root}/etc/default/docker >/dev/null 2>&1; echo $PATH"],
                        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert sh.stdout.startswith("/usr/local/lib/isobox/buildkit-bin:")
    before = tree(root)
    assert isobox(env, "install", "--gate", "--docker").stdout.count("nothing changed") == 2
    assert tree(root) == before
    r = isobox(env, "uninstall", "--gate", "--docker")
    assert r.returncode == 0 and "stop the gate first" in r.stdout, r.stdout
    assert json.loads(open(cfg).read()) == {"hosts": ["unix:///var/run/docker.sock", "tcp://127.0.0.1:2375"]}
    assert open(os.path.join(root, "etc/default/docker")).read() == \
        '# Docker Upstart and SysVinit configuration file\n#DOCKER_OPTS="--dns 8.8.8.8"\n'
    assert os.path.exists(cfg + ".isobox-backup") and os.path.exists(os.path.join(root, "etc/default/docker.isobox-backup"))


def test_without_systemd_refuses_host_flags(root, env):
    """dockerd refuses `hosts` in daemon.json together with -H: found in DOCKER_OPTS, or on the
    command line of the dockerd the pid file names (a real process here)."""
    os.makedirs(os.path.join(root, "etc/default"))
    with open(os.path.join(root, "etc/default/docker"), "w") as f:
        f.write('DOCKER_OPTS="-H unix:///var/run/docker.sock --dns 8.8.8.8"\n')
    r = isobox(env, "install", "--gate")
    assert r.returncode == 1 and "DOCKER_OPTS" in r.stdout and "remove the -H flags" in r.stdout, r.stdout
    assert "hosts" not in open(os.path.join(root, "etc/docker/daemon.json")).read()
    os.unlink(os.path.join(root, "etc/default/docker"))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--host=tcp://0.0.0.0:2375"])
    try:
        with open(os.path.join(root, "var/run/docker.pid"), "w") as f:
            f.write(str(proc.pid))
        r = isobox(env, "install", "--gate")
        assert r.returncode == 1 and "running dockerd's command line has -H tcp://0.0.0.0:2375" in r.stdout, r.stdout
    finally:
        proc.kill()
        proc.wait()
    assert not os.path.exists(os.path.join(root, "etc/isobox/gate-install.json"))


# --- doctor ----------------------------------------------------------------------------------------

ENGINE = """import os, socket, sys, time
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""


def start(cmd: list[str], env: dict, ready: str) -> subprocess.Popen:
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    end = time.time() + 30
    while time.time() < end and not os.path.exists(ready):
        assert p.poll() is None, cmd
        time.sleep(0.05)
    return p


def stop(p: subprocess.Popen) -> None:
    p.terminate()                                   # by its own pid: started by this test
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def rows(env) -> dict[str, tuple]:
    r = subprocess.run([sys.executable, "-c", "from isobox.engines.gate_install import doctor_rows; import json; "
                        "print(json.dumps(doctor_rows()))"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return {row[0]: row for row in json.loads(r.stdout)}


def test_doctor_gate_rows(root, env):
    """A stand-in dockerd (a real listener whose PATH starts with the installed wrapper dir), a real
    `isobox gate` on the temp root's /var/run/docker.sock, and doctor's verdict on each."""
    systemd(root)
    assert isobox(env, "install", "--gate").returncode == 0
    public = os.path.join(root, "var/run/docker.sock")
    engine = os.path.join(root, "run/isobox/engine/docker.sock")
    assert rows(env)["docker gate"][1] == "warn"                  # nothing serves it yet
    plain = start([sys.executable, "-c", ENGINE, public], env, public)   # dockerd on the public socket
    try:
        row = rows(env)["docker gate"]
        assert row[1] == "warn" and "not an isobox gate" in row[2], row
    finally:
        stop(plain)
        os.unlink(public)
    wrapper_dir = os.path.join(root, "usr/local/lib/isobox/buildkit-bin")
    eng = start([sys.executable, "-c", ENGINE, engine], dict(env, PATH=f"{wrapper_dir}:/usr/sbin:/usr/bin"), engine)
    gid = grp.getgrnam("docker").gr_gid if "docker" in [g.gr_name for g in grp.getgrall()] else 0
    gate = start([*ISOBOX, "gate", "--listen", public, "--engine", engine, "--mode", "640", "--group", str(gid),
                  "--owner", "0"], env, public)
    try:
        st = os.stat(public)
        assert (stat.S_IMODE(st.st_mode), st.st_gid, st.st_uid) == (0o640, gid, 0)
        got = rows(env)
        assert got["docker gate"][1] == "ok" and "served by isobox gate" in got["docker gate"][2], got
        assert got["docker buildkit"][1] == "ok" and wrapper_dir in got["docker buildkit"][2], got
        from isobox.policy.gatesock import state_path
        record = state_path(public)
        saved = open(record, "rb").read()
        os.unlink(record)                                        # what the runtime trusts is gone
        try:
            row = rows(env)["docker gate"]
            assert row[1] == "warn" and record in row[2] and "restart the gate" in row[2], row
        finally:
            fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, saved)
            os.close(fd)
        assert rows(env)["docker gate"][1] == "ok"
        os.chmod(os.path.dirname(engine), 0o755)                 # dockerd's socket reachable by anyone
        assert rows(env)["docker gate"][1] == "FAIL"
    finally:
        stop(gate)
        stop(eng)
    os.chmod(os.path.dirname(engine), 0o700)
    os.unlink(engine)                                            # the stand-in leaves its socket
    eng = start([sys.executable, "-c", ENGINE, engine], dict(env, PATH="/usr/sbin:/usr/bin"), engine)
    gate = start([*ISOBOX, "gate", "--listen", public, "--engine", engine], env, public)
    try:
        row = rows(env)["docker buildkit"]
        assert row[1] == "warn" and "/usr/sbin/runc" in row[2] and "isobox install --gate" in row[2], row
    finally:
        stop(gate)
        stop(eng)
