"""No process of isobox-runc that holds host credentials is reachable from a container.

The processes the runtime puts into a container's namespaces: the container's init while it
waits for `start` (and while it is being cloned), the builder forked into the container's pid
namespace, exec's joining helper and the process it forks, createContainer hooks. A container
that shares the pid namespace of another (a pod: shared user and pid namespaces) sees each of
them come and go, and its root holds CAP_SYS_PTRACE over everything in their user namespace.

The attacker is a static probe (tests/probes/runtime_reach.c) in a privileged sibling: it
reaches for the waiting init (ptrace, /proc/PID/{mem,environ,root,cwd,fd}), or spins
PTRACE_SEIZE on every new pid while the host creates, starts and execs; any process it gets
must already be the container's program (its exe is the target binary), never isobox's own
(a Python interpreter, host uid 0 in the container's user namespace, with the runtime's fds).
Each scenario runs in-process (`python -m isobox.runc.main`) and through the installed
wrapper, served by isoboxd's warm worker (the engine's client clones the init / forks exec's
helper, init/handover.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import RUNC
from probes import build, rootfs_with
from test_isolation import privileged

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

WRAPPER = "/usr/local/bin/isobox-runc"
WARM_MARK = "served by isoboxd's warm worker"
TARGET_EXE = "/bin/busybox"              # every program of the busybox rootfs
HOOK_NAME = "isobox-hook-probe"          # the createContainer hook's host binary
PATHS = ("local", "warm")


# --- helpers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reach_rootfs(tmp_path_factory) -> str:
    return rootfs_with(tmp_path_factory, "runtime_reach")


@pytest.fixture
def path(request) -> str:
    """"local" (the runtime in the caller's process) or "warm" (the wrapper, via isoboxd)."""
    if request.param == "warm":
        from isobox.daemon import client, paths
        if not os.path.exists(WRAPPER):
            pytest.skip("isobox-runc is not installed (scripts/setup.sh)")
        client.ensure_running()
        deadline = time.monotonic() + 10
        while not os.path.exists(paths.WARM_SOCKET) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(paths.WARM_SOCKET), "the warm worker did not start"
    return request.param


class Call:
    """One isobox-runc command; stdio in files (a container may keep them), --debug log read
    back to tell whether isoboxd's worker served it. strict: every create, start and detached
    exec of the warm path must have been served warm; otherwise they are counted in `warm`
    (isoboxd is the host's: a concurrent `isobox daemon --reload` makes a call run locally)."""

    def __init__(self, runtime, path: str, strict: bool = True):
        self.runtime = runtime
        self.path = path
        self.strict = strict
        self.n = 0
        self.warm = 0

    def __call__(self, *args: str, pass_fds=(), prefix=(), timeout: float = 60) -> tuple[int, str, str]:
        self.n += 1
        base = os.path.join(self.runtime.tmp, f"call-{self.path}-{self.n}")
        runc = [WRAPPER] if self.path == "warm" else RUNC
        with open(base + ".out", "w") as o, open(base + ".err", "w") as e:
            code = subprocess.run([*prefix, *runc, "--root", self.runtime.root, "--debug", "--log", base + ".log",
                                   *args], stdin=subprocess.DEVNULL, stdout=o, stderr=e, pass_fds=pass_fds,
                                  timeout=timeout).returncode
        log = open(base + ".log").read() if os.path.exists(base + ".log") else ""
        if self.path == "warm" and (args[0] in ("create", "start") or "--detach" in args):
            self.warm += WARM_MARK in log
            assert WARM_MARK in log or not self.strict, f"{args[0]} was not served warm: {log[-500:]}"
        return code, open(base + ".out").read(), open(base + ".err").read()


def _state(runtime, cid: str) -> dict:
    return json.loads(runtime("state", cid, check=True).stdout)


def _wait_stopped(runtime, cid: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _state(runtime, cid)["status"] != "stopped":
        assert time.monotonic() < deadline, f"{cid} did not stop"
        time.sleep(0.05)


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _uid_base(pid: int) -> int:
    with open(f"/proc/{pid}/uid_map") as f:
        return int(f.read().split()[1])


def _running(runtime, rootfs: str, args: list[str], stdout: str | None = None) -> tuple[str, int]:
    """A privileged container (CAP_SYS_PTRACE, CAP_KILL... in its user namespace) started
    locally; its output goes to stdout (a host file) when given."""
    b = runtime.bundle(rootfs, args, edit=privileged)
    cid = runtime.new_id()
    err = os.path.join(runtime.tmp, f"{cid}.err")
    with open(stdout or os.devnull, "w") as out, open(err, "w") as e:     # the init keeps them
        code = subprocess.run([*RUNC, "--root", runtime.root, "create", "--bundle", b, cid],
                              stdin=subprocess.DEVNULL, stdout=out, stderr=e, timeout=60).returncode
    assert code == 0, open(err).read()
    runtime("start", cid, check=True)
    return cid, _state(runtime, cid)["pid"]


def _pod_member(sibling_pid: int, extra=None):
    """A spec edit: share the sibling's pid, ipc and network namespaces (so its user namespace)."""
    def edit(spec: dict) -> None:
        for ns in spec["linux"]["namespaces"]:
            if ns["type"] in ("pid", "ipc", "network"):
                ns["path"] = f"/proc/{sibling_pid}/ns/{'net' if ns['type'] == 'network' else ns['type']}"
        if extra:
            extra(spec)
    return edit


def _fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            pass
    return out


def _undumpable(pid: int) -> bool:
    """proc(5): the files under /proc/PID of a task whose dumpable attribute is not 1 belong to
    root (of its memory map's user namespace: the host's for isobox's processes), not to its
    euid (only the /proc/PID directory itself always shows the euid). Telling for a task whose
    euid is not 0, which the callers check too."""
    return os.stat(f"/proc/{pid}/environ").st_uid == 0


def _ns_pid(pid: int) -> int:
    return int(_status(pid)["NSpid"].split()[-1])


# fd 3 of the runtime becomes the first --preserve-fds fd (engines hand it over that way)
DUP_TO_3 = [sys.executable, "-I", "-c",
            "import os, sys; os.dup2(int(sys.argv[1]), 3); os.execv(sys.argv[2], sys.argv[2:])"]


# --- the created init ----------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_a_created_init_waits_as_the_container_user_untraceable_and_with_only_its_fds(
        path, runtime, reach_rootfs, tmp_path):
    """Finding 10: the init waits for `start` with the container's credentials (not host uid 0,
    which a pod sibling's CAP_SYS_PTRACE covers), not dumpable, holding stdio, the preserved
    fds and the start FIFO only, whatever else its caller leaked to the runtime."""
    call = Call(runtime, path)
    sibling, spid = _running(runtime, reach_rootfs, ["sleep", "1000"])
    base = _uid_base(spid)
    b = runtime.bundle(reach_rootfs, ["sh", "-c", "echo started-$(id -u) >&3"], edit=_pod_member(spid))
    cid = runtime.new_id()
    r3, w3 = os.pipe()
    leaked = os.open("/etc", os.O_RDONLY | os.O_DIRECTORY)        # a host directory (CVE-2024-21626's shape)
    try:
        code, _, err = call("create", "--bundle", b, "--preserve-fds", "1", cid, pass_fds=(w3, leaked),
                            prefix=[*DUP_TO_3, str(w3)])
        assert code == 0, err
        os.close(w3)
        w3 = -1
        pid = _state(runtime, cid)["pid"]
        found = []
        st = _status(pid)
        for key in ("Uid", "Gid"):
            if st[key].split() != [str(base)] * 4:
                found.append(f"{key}: {st[key]} (the container's root is {base})")
        if not _undumpable(pid):
            found.append(f"dumpable: /proc/{pid}/environ is owned by {os.stat(f'/proc/{pid}/environ').st_uid}")
        fifo = os.path.join(runtime.root, cid, "start.fifo")
        pipe3 = f"pipe:[{os.fstat(r3).st_ino}]"
        for fd, target in sorted(_fd_targets(pid).items()):
            if fd <= 2 or (fd == 3 and target == pipe3) or target == fifo:
                continue
            found.append(f"fd {fd} -> {target}")
        targets = _fd_targets(pid)
        if targets.get(3) != pipe3 or fifo not in targets.values():
            found.append(f"missing the preserved fd or the FIFO: {targets}")

        # the sibling's root, with every capability in the shared user namespace
        r = runtime("exec", sibling, "/runtime_reach", "reach", str(_ns_pid(pid)))
        assert r.returncode == 0 and "seize" in r.stdout, r.stderr
        found += [f"sibling reached it: {line}" for line in r.stdout.splitlines() if " ok" in line]
        assert not found, f"the created init (host pid {pid}, {path}):\n" + "\n".join(found)

        # and the container still starts, with its preserved fd
        code, _, err = call("start", cid)
        assert code == 0, err
        assert os.read(r3, 100) == b"started-0\n"
    finally:
        os.close(leaked)
        os.close(r3)
        if w3 >= 0:
            os.close(w3)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_credentials_capabilities_no_new_privs_and_seccomp_are_set_before_start(path, runtime, reach_rootfs):
    """As runc: everything but execve happens before the start FIFO, so what waits is already
    the process's user (host base+1000 here), with its capabilities and filter."""
    def user(spec: dict) -> None:
        spec["process"]["user"] = {"uid": 1000, "gid": 1000, "additionalGids": [5]}
        spec["process"]["noNewPrivileges"] = True
        # ambient, so that uid 1000 keeps it across execve
        for key in ("bounding", "effective", "permitted", "inheritable", "ambient"):
            spec["process"]["capabilities"][key] = ["CAP_NET_BIND_SERVICE"]

    call = Call(runtime, path)
    b = runtime.bundle(reach_rootfs, ["sh", "-c", "id -u; id -G; grep -E '^(CapEff|NoNewPrivs|Seccomp):' "
                                      "/proc/self/status"], edit=user)
    cid = runtime.new_id()
    code, _, err = call("create", "--bundle", b, cid)
    assert code == 0, err
    pid = _state(runtime, cid)["pid"]
    base = _uid_base(pid)
    st = _status(pid)
    waiting = {k: st[k].split() for k in ("Uid", "Gid", "Groups", "CapEff", "CapPrm", "CapBnd", "CapAmb",
                                          "NoNewPrivs", "Seccomp")}
    cap = ["0000000000000400"]
    assert waiting == {"Uid": [str(base + 1000)] * 4, "Gid": [str(base + 1000)] * 4, "Groups": [str(base + 5)],
                       "CapEff": cap, "CapPrm": cap, "CapBnd": cap, "CapAmb": cap, "NoNewPrivs": ["1"],
                       "Seccomp": ["2"]}, waiting
    assert _undumpable(pid)
    code, _, err = call("start", cid)
    assert code == 0, err
    _wait_stopped(runtime, cid)
    out = open(os.path.join(runtime.tmp, f"call-{path}-1.out")).read().split("\n")
    assert out[:3] == ["1000", "1000 5", "CapEff:\t0000000000000400"], out


# --- spinning on new pids ------------------------------------------------------------------

def _hunt(runtime, rootfs: str, seconds: float, work) -> list[str]:
    """Runs work(sibling_id, sibling_pid) while a probe in the privileged sibling spins
    PTRACE_SEIZE on each new pid of its pid namespace; the probe's ATTACHED lines."""
    out = os.path.join(runtime.tmp, f"hunt-{time.monotonic_ns()}.out")
    sibling, spid = _running(runtime, rootfs, ["/runtime_reach", "hunt", str(seconds)], stdout=out)
    work(sibling, spid)
    _wait_stopped(runtime, sibling, timeout=seconds + 30)
    text = open(out).read()
    assert "hunt attached=" in text, text
    return [line for line in text.splitlines() if line.startswith("ATTACHED")]


def _foreign(attached: list[str], allowed: tuple[str, ...]) -> list[str]:
    return [line for line in attached if not any(f" exe={exe} " in line or line.endswith(f" exe={exe}")
                                                 for exe in allowed)]


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_execs_joining_process_is_never_traceable(path, runtime, reach_rootfs):
    """CVE-2016-9962's shape: while the host runs `exec` again and again, the sibling's root
    (the container itself here) attaches only to processes that already are the program."""
    call = Call(runtime, path, strict=False)
    detach = ("--detach",) if path == "warm" else ()     # the warm path serves detached execs
    seconds = 12.0
    done = []

    def work(cid: str, _pid: int) -> None:
        deadline = time.monotonic() + seconds - 2
        while time.monotonic() < deadline:
            code, _, err = call("exec", *detach, cid, "sleep", "0.1")
            assert code == 0, err
            done.append(1)

    attached = _hunt(runtime, reach_rootfs, seconds, work)
    assert len(done) >= 10, f"only {len(done)} execs"
    assert path == "local" or call.warm >= 10, f"only {call.warm} of {len(done)} execs were served warm"
    assert not _foreign(attached, (TARGET_EXE,)), "\n".join(attached)
    # the probe did see the new pids: it got the exec'd programs
    assert any(f"exe={TARGET_EXE}" in line for line in attached), attached


def _pod_cycle(call, runtime, rootfs: str, seconds: float, hook: str | None, done: list):
    """work() for _hunt: create a pod member of the sibling again and again (its init is
    cloned into, and its builder forked into, the sibling's pid namespace), start it, delete it."""
    def work(_cid: str, spid: int) -> None:
        def hooks(spec: dict) -> None:
            if hook:
                spec["hooks"] = {"createContainer": [{"path": hook, "args": [HOOK_NAME, "sleep", "50"]}]}
        b = runtime.bundle(rootfs, ["sleep", "0.2"], edit=_pod_member(spid, hooks))
        deadline = time.monotonic() + seconds - 3
        while time.monotonic() < deadline:
            cid = runtime.new_id()
            code, _, err = call("create", "--bundle", b, cid)
            assert code == 0, err
            code, _, err = call("start", cid)
            assert code == 0, err
            _wait_stopped(runtime, cid)
            runtime("delete", "--force", cid, check=True)
            done.append(cid)
    return work


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_a_pod_members_init_and_builder_are_never_traceable(path, runtime, reach_rootfs):
    """The builder (host root, pid N of the sibling's pid namespace) and the member's init,
    from its clone to its execve, stay out of the sibling's reach."""
    done: list = []
    seconds = 14.0
    call = Call(runtime, path, strict=False)
    attached = _hunt(runtime, reach_rootfs, seconds, _pod_cycle(call, runtime, reach_rootfs, seconds, None, done))
    assert len(done) >= 4, f"only {len(done)} pod members"
    assert path == "local" or call.warm >= 6, f"only {call.warm} calls of {len(done)} members were served warm"
    assert not _foreign(attached, (TARGET_EXE,)), "\n".join(attached)
    assert any(f"exe={TARGET_EXE}" in line for line in attached), attached    # the members' `sleep`


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_create_container_hooks_are_traceable_only_once_they_are_the_hook(path, runtime, reach_rootfs, tmp_path):
    """A createContainer hook joins the member's namespaces (the sibling's pid namespace) and
    execs a host binary as container root: the sibling may trace the hook program (as with
    runc), never the runtime's child that joins the namespaces."""
    hook = str(tmp_path / HOOK_NAME)
    shutil.copy2(build("runtime_reach"), hook)
    os.chmod(hook, 0o755)
    done: list = []
    seconds = 14.0
    call = Call(runtime, path, strict=False)
    attached = _hunt(runtime, reach_rootfs, seconds, _pod_cycle(call, runtime, reach_rootfs, seconds, hook, done))
    assert len(done) >= 4, f"only {len(done)} pod members"
    assert path == "local" or call.warm >= 6, f"only {call.warm} calls of {len(done)} members were served warm"
    # seen from the sibling's mount namespace, the host binary's path is its own
    foreign = [line for line in _foreign(attached, (TARGET_EXE,)) if f"/{HOOK_NAME} " not in line]
    assert not foreign, "\n".join(attached)
