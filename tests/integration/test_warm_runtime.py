"""isobox-runc's warm path: the installed wrapper hands start/state/kill/delete/... to
isoboxd's pre-imported worker (daemon/warm.py), which must behave exactly like the
in-process runtime: the caller's fds, working directory, environment and exit code."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ids_held, leftovers
from isobox.daemon import client, paths

WRAPPER = "/usr/local/bin/isobox-runc"


@pytest.fixture
def warm():
    if not os.path.exists(WRAPPER):
        pytest.skip("isobox-runc is not installed (scripts/setup.sh)")
    client.ensure_running()
    deadline = time.monotonic() + 10
    while not os.path.exists(paths.WARM_SOCKET) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.exists(paths.WARM_SOCKET), "the warm worker did not start"


def wrapper(runtime, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([WRAPPER, "--root", runtime.root, *args], capture_output=True, text=True, timeout=60,
                          env=env, **kw)


def started(runtime, rootfs: str) -> str:
    b = runtime.bundle(rootfs, ["sh", "-c", "exec sleep 300 </dev/null >/dev/null 2>&1"])
    cid = runtime.new_id()
    runtime("run", "--detach", "--bundle", b, cid, check=True, timeout=30)
    return cid


def served_warm(runtime, tmp_path, *args: str, env=None) -> tuple[subprocess.CompletedProcess, bool]:
    log = tmp_path / f"log-{time.monotonic_ns()}"
    r = wrapper(runtime, "--debug", "--log", str(log), *args, env=env)
    text = log.read_text() if log.exists() else ""
    return r, "served by isoboxd's warm worker" in text


def test_state_kill_delete_are_served_warm_with_the_callers_output(warm, runtime, busybox_rootfs, tmp_path):
    status = subprocess.run(["isobox", "daemon", "--status"], capture_output=True, text=True, timeout=30)
    assert "warm worker answering" in status.stdout, status.stdout + status.stderr
    cid = started(runtime, busybox_rootfs)
    r, warm_ = served_warm(runtime, tmp_path, "state", cid)
    assert r.returncode == 0 and warm_, r.stderr
    assert json.loads(r.stdout)["status"] == "running"
    r, warm_ = served_warm(runtime, tmp_path, "kill", cid, "KILL")
    assert r.returncode == 0 and warm_, r.stderr
    deadline = time.monotonic() + 10
    while json.loads(wrapper(runtime, "state", cid).stdout)["status"] != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r, warm_ = served_warm(runtime, tmp_path, "delete", cid)
    assert r.returncode == 0 and warm_, r.stderr
    # errors: the same line and exit code as in-process
    r, warm_ = served_warm(runtime, tmp_path, "delete", cid)
    local = wrapper(runtime, "delete", cid, env={**os.environ, "ISOBOX_WARM": "0"})
    assert warm_ and r.returncode == local.returncode == 1
    assert r.stderr == local.stderr == "isobox-runc: container does not exist\n"


def test_run_stays_in_the_callers_process(warm, runtime, busybox_rootfs, tmp_path):
    b = runtime.bundle(busybox_rootfs, ["true"])
    cid = runtime.new_id()
    r, warm_ = served_warm(runtime, tmp_path, "run", "--bundle", b, cid)
    assert r.returncode == 0 and not warm_, r.stderr


# A shim's part in a warm create or detached exec, as a script: it becomes a child
# subreaper (as containerd-shim and conmon are), calls the wrapper with the shim's flags and
# stdio that is not a pipe to pytest (the container's process keeps it), reports the
# process's parent, starts a created container, and reaps the process.
SHIM = r"""
import ctypes, json, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)          # PR_SET_CHILD_SUBREAPER
wrapper, root, cwd, pid_file, log, out, fd3 = sys.argv[1:8]
args = sys.argv[8:]
if fd3 != "-":
    os.dup2(int(fd3), 3)                                          # the engine's preserved fd
with open(out, "wb") as f:
    r = subprocess.run([wrapper, "--root", root, "--debug", "--log", log, "--log-format", "json", *args],
                       stdin=subprocess.DEVNULL, stdout=f, stderr=f, cwd=cwd, pass_fds=(3,) if fd3 != "-" else ())
if fd3 != "-":
    os.close(3)
    os.close(int(fd3))
pid = int(open(pid_file).read()) if r.returncode == 0 else 0
ppid = 0
if pid:
    with open(f"/proc/{pid}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
fds = sorted(os.listdir(f"/proc/{pid}/fd")) if pid else []
print(json.dumps({"code": r.returncode, "pid": pid, "ppid": ppid, "me": os.getpid(), "fds": fds}), flush=True)
if args[0] == "create":
    subprocess.run([wrapper, "--root", root, "start", args[-1]], check=r.returncode == 0)
if pid:
    os.waitpid(pid, 0)                                            # the subreaper reaps its process
"""


def as_shim(runtime, cwd: str, *args: str, fd3: int = -1) -> tuple[dict, str]:
    """(report, the debug log) of one call made as a shim makes it (see SHIM); args end with
    the container id and include --pid-file cwd/pid. fd3: a descriptor of the test's, handed
    over as the shim's fd 3 (--preserve-fds)."""
    log, out, pid_file = os.path.join(cwd, "log.json"), os.path.join(cwd, "call.out"), os.path.join(cwd, "pid")
    r = subprocess.run([sys.executable, "-c", SHIM, WRAPPER, runtime.root, cwd, pid_file, log, out,
                        str(fd3) if fd3 >= 0 else "-", *args],
                       capture_output=True, text=True, timeout=60, pass_fds=(fd3,) if fd3 >= 0 else ())
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.splitlines()[0])
    report["out"] = open(out).read()
    return report, open(log).read() if os.path.exists(log) else ""


def shim_create(runtime, bundle: str, cid: str, *flags: str, fd3: int = -1) -> tuple[dict, str]:
    return as_shim(runtime, bundle, "create", "--bundle", bundle, "--pid-file", os.path.join(bundle, "pid"),
                   *flags, cid, fd3=fd3)


def test_create_is_served_warm_and_its_init_is_the_callers_child(warm, runtime, busybox_rootfs):
    """The worker does the work; the init is cloned by the engine's own client, so the
    engine's subreaper (the shim) is the one that reaps it."""
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "echo warm-init-$$"])
    cid = runtime.new_id()
    report, log = shim_create(runtime, b, cid)
    assert report["code"] == 0, report["out"]
    assert "served by isoboxd's warm worker" in log
    # the client exited after create: its child, the init, went to the shim
    assert report["ppid"] == report["me"]
    assert "warm-init-1" in open(os.path.join(b, "call.out")).read()


def test_a_detached_exec_is_served_warm_and_its_process_goes_to_the_callers_subreaper(warm, runtime,
                                                                                     busybox_rootfs, tmp_path):
    cid = started(runtime, busybox_rootfs)
    work = str(tmp_path / "exec")
    os.mkdir(work)
    report, log = as_shim(runtime, work, "exec", "--detach", "--pid-file", os.path.join(work, "pid"), cid,
                          "sh", "-c", "cat /proc/1/comm; exec sleep 2")
    assert report["code"] == 0 and "served by isoboxd's warm worker" in log, report["out"]
    assert report["ppid"] == report["me"]
    assert open(os.path.join(work, "call.out")).read().startswith("sleep")     # the container's pid 1
    # nothing the worker handed the helper (namespaces, pipes, the console) reaches the process
    assert report["fds"] == ["0", "1", "2"], report
    # a foreground exec stays in the caller's process (it waits as the subreaper)
    r, warm_ = served_warm(runtime, tmp_path, "exec", cid, "true")
    assert r.returncode == 0 and not warm_, r.stderr
    # errors: the local path's line and code
    r, warm_ = served_warm(runtime, tmp_path, "exec", "--detach", cid, "/no/such/program")
    local = wrapper(runtime, "exec", "--detach", cid, "/no/such/program", env={**os.environ, "ISOBOX_WARM": "0"})
    assert warm_ and r.returncode == local.returncode == 1 and r.stderr == local.stderr, (r.stderr, local.stderr)


def test_warm_create_failures_match_the_local_ones_and_leave_nothing(warm, runtime, busybox_rootfs, tmp_path):
    for args in (["no-such-program"], ["sh"]):
        edit = None if args != ["sh"] else (lambda spec: spec["process"].update(cwd="/no/such/dir"))
        b = runtime.bundle(busybox_rootfs, args, edit=edit)
        results = []
        for env in (None, {**os.environ, "ISOBOX_WARM": "0"}):
            cid = runtime.new_id()
            log = tmp_path / f"log-{cid}"
            with open(tmp_path / f"err-{cid}", "w+") as err:
                r = subprocess.run([WRAPPER, "--root", runtime.root, "--debug", "--log", str(log), "create",
                                    "--bundle", b, cid], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=err, env=env, timeout=60)
                err.seek(0)
                results.append((r.returncode, err.read()))
            assert ("served by isoboxd's warm worker" in log.read_text()) == (env is None)
            assert not os.path.exists(os.path.join(runtime.root, cid))
            assert leftovers(cid) == [] and ids_held(runtime.root) == []
        assert results[0] == results[1] and results[0][0] == 1, results
        assert results[0][1].count("\n") == 1 and results[0][1].startswith("isobox-runc: "), results


def test_warm_create_with_console_socket_preserved_fds_and_hooks(warm, runtime, busybox_rootfs, tmp_path):
    from test_exec_tty import ConsoleServer, read_until
    mark = tmp_path / "prestart-ran"

    def edit(spec):
        spec["process"]["terminal"] = True
        spec["hooks"] = {"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", f"cat > {mark}"]}]}

    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "tty; echo via-fd3 >&3; echo warm-$((40+2)); sleep 1"], edit=edit)
    cid = runtime.new_id()
    server = ConsoleServer(str(tmp_path / "console.sock"))
    r3, w3 = os.pipe()
    try:
        report, log = shim_create(runtime, b, cid, "--console-socket", server.path, "--preserve-fds", "1", fd3=w3)
        os.close(w3)
        w3 = -1
        assert report["code"] == 0 and "served by isoboxd's warm worker" in log, report["out"]
        master = server.master()
        try:
            out = read_until(master, b"warm-42")
            assert b"/dev/pts/" in out and b"warm-42" in out
        finally:
            os.close(master)
        assert os.read(r3, 100) == b"via-fd3\n"
        assert json.loads(mark.read_text())["id"] == cid          # the hook got the state on stdin
    finally:
        os.close(r3)
        if w3 >= 0:
            os.close(w3)


def test_stdin_cwd_and_environment_reach_the_worker(warm, runtime, busybox_rootfs, tmp_path):
    cid = started(runtime, busybox_rootfs)
    # stdin: update -r - reads the resources from the caller's stdin
    r = subprocess.run([WRAPPER, "--root", runtime.root, "update", "-r", "-", cid], capture_output=True, text=True,
                       input=json.dumps({"pids": {"limit": 77}}), timeout=60)
    assert r.returncode == 0, r.stderr
    pid = json.loads(runtime("state", cid, check=True).stdout)["pid"]
    with open(f"/proc/{pid}/cgroup") as f:
        rel = next(line.split(":", 2)[2].strip() for line in f if line.split(":")[1] == "pids")
    with open(f"/sys/fs/cgroup/pids{rel}/pids.max") as f:
        assert f.read().strip() == "77"
    # cwd: a relative --root is the caller's, not the worker's
    parent, name = os.path.split(runtime.root)
    r = subprocess.run([WRAPPER, "--root", name, "list", "-q"], capture_output=True, text=True, cwd=parent, timeout=60)
    assert r.returncode == 0 and cid in r.stdout.split(), r.stderr
    # environment: ISOBOX_ARGV_LOG is honoured, with the caller's parent as ppid
    rec = tmp_path / "argv.jsonl"
    r = wrapper(runtime, "state", cid, env={**os.environ, "ISOBOX_ARGV_LOG": str(rec)})
    assert r.returncode == 0
    line = json.loads(rec.read_text().splitlines()[-1])
    assert line["argv"][-2:] == ["state", cid] and line["ppid"] == os.getpid()


def test_a_non_root_caller_is_not_served(warm, runtime, tmp_path):
    """The worker acts as root: its socket is root's only, so another user runs in-process
    (and gets the runtime's own answer for what it may not do)."""
    nobody = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    log = tmp_path / "log"
    os.chmod(tmp_path, 0o777)
    r = subprocess.run([WRAPPER, "--debug", "--log", str(log), "--root", str(tmp_path / "r"), "list"],
                       capture_output=True, text=True, preexec_fn=drop, timeout=60)
    assert "served by isoboxd's warm worker" not in (log.read_text() if log.exists() else "")
    assert r.returncode in (0, 1)


def test_a_killed_worker_is_replaced_and_calls_keep_working(warm, runtime, busybox_rootfs, tmp_path):
    cid = started(runtime, busybox_rootfs)
    with open(f"/run/isobox/isoboxd.pid") as f:
        holder = int(f.read())
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(holder)], capture_output=True,
                                               text=True).stdout.split()]
    warm_pid = next(p for p in workers if b"isobox.daemon.warm" in open(f"/proc/{p}/cmdline", "rb").read())
    os.kill(warm_pid, signal.SIGKILL)
    r = wrapper(runtime, "state", cid)         # served in-process meanwhile, or by the new worker
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == cid
    deadline = time.monotonic() + 15
    while True:
        r, warm_ = served_warm(runtime, tmp_path, "state", cid)
        if warm_:
            break
        assert time.monotonic() < deadline, "the holder did not restart the warm worker"
        time.sleep(0.2)
    # the killed worker's spares died with it: nothing of it is left
    time.sleep(0.2)
    left = subprocess.run(["pgrep", "-P", str(warm_pid)], capture_output=True, text=True).stdout.split()
    assert left == []


def test_a_client_naming_a_process_it_did_not_fork_is_refused(warm, runtime, busybox_rootfs, tmp_path):
    """The worker only drives an init its own client cloned. A (root) client that answers
    the clone request with another process's pid, here the host's pid 1, gets one error line;
    that process is not touched and nothing of the container is left."""
    import socket
    from isobox.runc import warm_client
    b = runtime.bundle(busybox_rootfs, ["true"])
    cid = runtime.new_id()
    with open("/proc/1/uid_map") as f:
        uid_map = f.read()
    with open("/proc/1/cgroup") as f:
        cgroups = f.read()
    err_r, err_w = os.pipe()
    null = os.open("/dev/null", os.O_RDWR)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    got, code = [], b""
    try:
        s.settimeout(30)
        s.connect(paths.WARM_SOCKET)
        request = warm_client.encode(["--root", runtime.root, "create", "--bundle", b, cid], os.getcwd(),
                                     dict(os.environ), os.getppid())
        socket.send_fds(s, [request], [null, null, err_w])
        while True:
            msg = s.recv(4096)
            if not msg:
                break
            got.append(msg[:1])
            if msg.startswith(warm_client.SPAWN):
                socket.send_fds(s, [b"1"], [theirs.fileno()])
            elif msg.startswith(b"R"):
                code = msg
                break
    finally:
        for fd in (null, err_w):
            os.close(fd)
        s.close()
        ours.close()
        theirs.close()
    err = os.read(err_r, 4096).decode()
    os.close(err_r)
    assert got[:2] == [b"A", warm_client.SPAWN] and code == b"R1", (got, code)
    assert err == "isobox-runc: the isobox-runc client named pid 1, which is not its child\n"
    with open("/proc/1/uid_map") as f:
        assert f.read() == uid_map
    with open("/proc/1/cgroup") as f:
        assert f.read() == cgroups
    assert not os.path.exists(os.path.join(runtime.root, cid))
    assert leftovers(cid) == [] and ids_held(runtime.root) == []


def _warm_worker_pid() -> int:
    with open("/run/isobox/isoboxd.pid") as f:
        holder = int(f.read())
    children = subprocess.run(["pgrep", "-P", str(holder)], capture_output=True, text=True).stdout.split()
    return next(int(p) for p in children if b"isobox.daemon.warm" in open(f"/proc/{p}/cmdline", "rb").read())


def test_reload_brings_new_code_in_and_keeps_containers(warm, runtime, busybox_rootfs, tmp_path):
    """`isobox daemon --reload` (what setup.sh runs after an upgrade): a new server and a new
    warm worker import the code on disk; running containers keep their emulated files."""
    cid = started(runtime, busybox_rootfs)
    generation = client.call({"op": "ping"})["generation"]
    worker = _warm_worker_pid()
    # twice: a server that itself came from a reload must also go at once (its SIGTERM was
    # once taken by a worker thread and handled seconds later, past the reload's deadline)
    for _ in range(2):
        r = subprocess.run(["isobox", "daemon", "--reload"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "isoboxd: reloaded" in r.stdout, r.stdout + r.stderr
    server = client.call({"op": "ping"})
    assert server["generation"] == generation + 2
    # only the server's main thread, where Python runs handlers, may take SIGTERM
    sigterm = 1 << (signal.SIGTERM - 1)
    checked = 0
    for tid in os.listdir(f"/proc/{server['pid']}/task"):
        try:
            with open(f"/proc/{server['pid']}/task/{tid}/status") as f:
                blocked = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
        except (FileNotFoundError, ProcessLookupError):
            continue  # a short-lived thread (an unregister's FUSE invalidation) ended meanwhile
        assert bool(blocked & sigterm) == (int(tid) != server["pid"]), tid
        checked += 1
    assert checked >= 2, "the server's main thread and at least one worker thread"
    assert _warm_worker_pid() != worker
    r = runtime("exec", cid, "cat", "/proc/uptime")
    assert r.returncode == 0 and len(r.stdout.split()) == 2, r.stderr
    r, warm_ = served_warm(runtime, tmp_path, "state", cid)
    assert r.returncode == 0 and warm_, r.stderr


def test_reload_from_a_moved_checkout_imports_from_there(warm, tmp_path):
    """A checkout set up from a new place (a clean clone beside an older one): after its
    `isobox daemon --reload`, the new server and worker import that checkout's code, not the
    code the holder started with."""
    import isobox
    here = os.path.dirname(os.path.dirname(isobox.__file__))
    moved = str(tmp_path / "moved" / "src")
    shutil.copytree(os.path.join(here, "isobox"), os.path.join(moved, "isobox"),
                    ignore=shutil.ignore_patterns("__pycache__"))

    def reload_from(src: str) -> list[bytes]:
        code = (f"import sys; sys.path[:0] = [{src!r}]; sys.argv = ['isobox', 'daemon', '--reload']; "
                "from isobox.cli.main import main; sys.exit(main())")
        r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "isoboxd: reloaded" in r.stdout, r.stdout + r.stderr
        deadline = time.monotonic() + 10     # the worker restarts on its own thread, after the server
        while True:
            try:
                cmdlines = [open(f"/proc/{pid}/cmdline", "rb").read()
                            for pid in (client.call({"op": "ping"})["pid"], _warm_worker_pid())]
            except (OSError, StopIteration):
                cmdlines = []
            if (cmdlines and all(repr(src).encode() in c for c in cmdlines)) or time.monotonic() > deadline:
                return cmdlines
            time.sleep(0.05)

    try:
        cmdlines = reload_from(moved)
        assert cmdlines and all(repr(moved).encode() in c for c in cmdlines), cmdlines
    finally:
        cmdlines = reload_from(here)
    assert cmdlines and not any(repr(moved).encode() in c for c in cmdlines), cmdlines
