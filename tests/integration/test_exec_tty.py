"""exec and terminals: the contract containerd's shim and conmon rely on."""
import fcntl
import json
import os
import socket
import struct
import subprocess
import termios
import threading
import time

import pytest

from conftest import RUNC


def detached(runtime, *args, timeout=60):
    """Runtime calls whose container inherits our stdio must not get pipes (they would stay
    open as long as the container lives)."""
    out = os.path.join(runtime.tmp, "out.txt")
    err = os.path.join(runtime.tmp, "err.txt")
    with open(out, "w") as o, open(err, "w") as e:
        r = subprocess.run([*RUNC, "--root", runtime.root, *args], stdin=subprocess.DEVNULL, stdout=o,
                           stderr=e, text=True, timeout=timeout)
    with open(err) as e:
        r.stderr = e.read()
    return r


@pytest.fixture
def running(runtime, busybox_rootfs):
    b = runtime.bundle(busybox_rootfs, ["sleep", "300"])
    cid = runtime.new_id()
    r = detached(runtime, "run", "-d", "--bundle", b, cid)
    assert r.returncode == 0, r.stderr
    st = json.loads(runtime("state", cid, check=True).stdout)
    return cid, st["pid"]


def test_exec_joins_every_namespace_and_cgroup(runtime, running):
    cid, init = running
    r = runtime("exec", cid, "sh", "-c", "echo $$; sleep 1 & echo $!; wait")
    assert r.returncode == 0, r.stderr
    inner_pid = int(r.stdout.split()[0])
    assert inner_pid > 1
    r = detached(runtime, "exec", "-d", "--pid-file", os.path.join(runtime.tmp, "p"), cid, "sleep", "30")
    assert r.returncode == 0, r.stderr
    pid = int(open(os.path.join(runtime.tmp, "p")).read())
    for ns in ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") == os.readlink(f"/proc/{init}/ns/{ns}"), ns
    with open(f"/proc/{pid}/cgroup") as a, open(f"/proc/{init}/cgroup") as b:
        assert a.read() == b.read()
    # an orphan for the caller's subreaper, not a child of the runtime
    ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    assert ppid != os.getpid()
    with open(f"/proc/{pid}/uid_map") as a:
        assert a.read().split()[1] == open(f"/proc/{init}/uid_map").read().split()[1]


def test_exec_flags_override_the_process(runtime, running):
    cid, _ = running
    r = runtime("exec", "--env", "FOO=bar", "--cwd", "/tmp", "--user", "1000:1000", "-g", "44", "--no-new-privs",
                cid, "sh", "-c", "echo $FOO; pwd; id -u; id -g; id -G; grep NoNewPrivs /proc/self/status")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[:4] == ["bar", "/tmp", "1000", "1000"]
    assert "44" in lines[4].split() and lines[5].split()[1] == "1"


def test_exec_cap_adds_a_capability(runtime, running):
    cid, _ = running
    without = runtime("exec", cid, "grep", "CapEff", "/proc/self/status").stdout.split()[1]
    with_cap = runtime("exec", "--cap", "CAP_SYS_ADMIN", cid, "grep", "CapEff", "/proc/self/status").stdout.split()[1]
    assert int(with_cap, 16) == int(without, 16) | (1 << 21)


def test_exec_process_file(runtime, running):
    cid, _ = running
    path = os.path.join(runtime.tmp, "process.json")
    with open(path, "w") as f:
        json.dump({"args": ["sh", "-c", "echo $A; pwd; id -u"], "env": ["A=from-file", "PATH=/bin"], "cwd": "/etc",
                   "user": {"uid": 7, "gid": 7}}, f)
    r = runtime("exec", "--process", path, "--env", "A=ignored", cid)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["from-file", "/etc", "7"]


def test_exec_exit_code_and_missing_binary(runtime, running):
    cid, _ = running
    assert runtime("exec", cid, "sh", "-c", "exit 9").returncode == 9
    r = runtime("exec", cid, "no-such-binary")
    assert r.returncode != 0 and "executable file not found" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_exec_never_sees_host_fds_but_preserved_ones(runtime, running):
    cid, _ = running
    runc = " ".join([*RUNC, "--root", runtime.root])
    # the caller holds fds 3 and 5 open (inheritable) when it calls the runtime
    r = subprocess.run(["sh", "-c", f"exec 3</etc/hostname 5</etc/hostname; exec {runc} exec {cid} ls /proc/self/fd"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    fds = sorted(int(x) for x in r.stdout.split())
    assert len(fds) == 4 and fds[:3] == [0, 1, 2], fds       # 0-2 plus the one ls opens itself
    r = subprocess.run(["sh", "-c", f"exec 3</etc/hostname 5</etc/hostname; "
                                    f"exec {runc} exec --preserve-fds 1 {cid} sh -c 'cat /proc/self/fd/3; ls /proc/self/fd'"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with open("/etc/hostname") as f:
        assert r.stdout.startswith(f.read())
    assert "5" not in r.stdout.split()[-4:]


def test_exec_in_stopped_container_is_one_line(runtime, busybox_rootfs):
    b = runtime.bundle(busybox_rootfs, ["true"])
    cid = runtime.new_id()
    assert runtime("run", "--keep", "--bundle", b, cid).returncode == 0
    r = runtime("exec", cid, "true")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == ["isobox-runc: cannot exec in a stopped container"]


class ConsoleServer:
    """go-runc's side of the console socket: accept one connection, one message, one fd."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)
        self.result = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.sock.accept()
        msg, fds, _, _ = socket.recv_fds(conn, 4096, 4)
        rest = conn.recv(1)
        self.result = (msg, fds, rest)
        conn.close()

    def master(self, timeout=10):
        self.thread.join(timeout)
        msg, fds, rest = self.result
        assert len(fds) == 1 and rest == b"", "exactly one message with exactly one fd"
        assert msg.startswith(b"/dev/pts/")
        return fds[0]


def read_until(fd, needle, timeout=10):
    end = time.time() + timeout
    buf = b""
    os.set_blocking(fd, False)
    while time.time() < end and needle not in buf:
        try:
            buf += os.read(fd, 4096)
        except BlockingIOError:
            time.sleep(0.02)
        except OSError:
            break
    return buf


def test_create_with_console_socket_gives_a_container_tty(runtime, busybox_rootfs):
    def tty(spec):
        spec["process"]["terminal"] = True
    b = runtime.bundle(busybox_rootfs, ["sh"], edit=tty)
    server = ConsoleServer(os.path.join(runtime.tmp, "console.sock"))
    cid = runtime.new_id()
    r = detached(runtime, "create", "--console-socket", server.path, "--bundle", b, cid)
    assert r.returncode == 0, r.stderr
    master = server.master()
    assert os.isatty(master)
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    runtime("start", cid, check=True)
    os.write(master, b"tty; stty size; sleep 30 & jobs; echo done-$((6*7))\n")
    out = read_until(master, b"done-42")
    assert b"/dev/pts/0" in out, out
    assert b"33 111" in out, out          # window size set through the master reaches the process
    assert b"sleep 30" in out, out        # job control: the shell has a controlling terminal
    os.close(master)


def test_exec_tty_with_console_socket(runtime, running):
    cid, _ = running
    server = ConsoleServer(os.path.join(runtime.tmp, "exec-console.sock"))
    r = detached(runtime, "exec", "-t", "-d", "--console-socket", server.path, cid, "sh", "-c", "tty; sleep 2")
    assert r.returncode == 0, r.stderr
    master = server.master()
    assert os.isatty(master)
    assert b"/dev/pts/" in read_until(master, b"/dev/pts/")
    os.close(master)


def test_run_with_terminal_relays_in_the_foreground(runtime, busybox_rootfs):
    def tty(spec):
        spec["process"]["terminal"] = True
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "tty; exit 4"], edit=tty)
    r = runtime.run(b)
    assert r.returncode == 4, r.stderr
    assert "/dev/pts/0" in r.stdout


def test_terminal_without_console_socket_refused_on_create(runtime, busybox_rootfs):
    def tty(spec):
        spec["process"]["terminal"] = True
    b = runtime.bundle(busybox_rootfs, ["sh"], edit=tty)
    r = detached(runtime, "create", "--bundle", b, runtime.new_id())
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "isobox-runc: cannot allocate tty if runc will detach without setting console socket"]


def test_exec_gets_the_containers_seccomp_filter(runtime, busybox_rootfs):
    def profile(spec):
        spec["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
                                    "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}
    b = runtime.bundle(busybox_rootfs, ["sleep", "300"], edit=profile)
    cid = runtime.new_id()
    assert detached(runtime, "run", "-d", "--bundle", b, cid).returncode == 0
    r = runtime("exec", cid, "sh", "-c", "mkdir /tmp/x; echo rc=$?; grep Seccomp: /proc/self/status")
    assert "Operation not permitted" in r.stderr and "rc=1" in r.stdout
    assert "Seccomp:\t2" in r.stdout
