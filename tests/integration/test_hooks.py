"""OCI hooks on real containers: each kind at its point with the state on stdin, order, args and
env, failure and timeout semantics, and createContainer/startContainer inside the container.

Host-side hooks are small /bin/sh scripts in the test's tmp dir. createContainer runs in the
container's mount namespace and startContainer inside the container, so what they record goes
into a private copy of the rootfs (the shared busybox_rootfs is never written)."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from conftest import RUNC, ids_held, leftovers, make_rootfs


# --- helpers -----------------------------------------------------------------------------

def detached(runtime, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """An isobox-runc command whose container outlives it: stdio in files, not pipes."""
    n = len(os.listdir(runtime.tmp))
    out, err = os.path.join(runtime.tmp, f"out{n}"), os.path.join(runtime.tmp, f"err{n}")
    with open(out, "w") as o, open(err, "w") as e:
        p = subprocess.run([*RUNC, "--root", runtime.root, *args], stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                           timeout=timeout)
    with open(out) as o, open(err) as e:
        return subprocess.CompletedProcess(p.args, p.returncode, o.read(), e.read())


def script(tmp: str, name: str, body: str) -> str:
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, 0o755)
    return path


def recorder(tmp: str, name: str, log: str) -> str:
    """A host hook that appends its name to log and saves its stdin as <name>.json."""
    return script(tmp, f"{name}.sh", f'echo {name} >> {log}\ncat > {tmp}/{name}.json')


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def with_hooks(hooks: dict):
    def edit(spec: dict) -> None:
        spec["hooks"] = hooks
    return edit


def state(runtime, cid: str) -> dict:
    r = runtime("state", cid)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_stopped(runtime, cid: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while state(runtime, cid)["status"] != "stopped":
        assert time.monotonic() < deadline, "container did not stop"
        time.sleep(0.02)


@pytest.fixture
def private_rootfs(tmp_path) -> str:
    return make_rootfs(str(tmp_path / "private-rootfs"))


def check_state(data: dict, cid: str, status: str, pid: int, bundle: str) -> None:
    assert data["ociVersion"]
    assert data["id"] == cid
    assert data["status"] == status
    assert data["pid"] == pid
    assert data["bundle"] == bundle
    assert data["annotations"] == {"org.example.hooks": "yes"}


# --- every kind at its point ---------------------------------------------------------------

def test_each_hook_runs_at_its_point_with_the_state(runtime, private_rootfs):
    tmp, log = runtime.tmp, os.path.join(runtime.tmp, "order")
    in_ctr = script(tmp, "in-container.sh", 'echo $1 >> /tmp/order\ncat > /tmp/$1.json')
    hooks = {k: [{"path": recorder(tmp, k, log)}] for k in ("prestart", "createRuntime", "poststart", "poststop")}
    # the container hooks are named by their first argument; startContainer's path is in the rootfs
    hooks["createContainer"] = [{"path": in_ctr, "args": ["x", "createContainer"]}]
    hooks["startContainer"] = [{"path": "/hook.sh", "args": ["x", "startContainer"]}]
    script(private_rootfs, "hook.sh", 'echo $1 >> /tmp/order\ncat > /tmp/$1.json')

    def edit(spec):
        spec["hooks"] = hooks
        spec["annotations"] = {"org.example.hooks": "yes"}
    bundle = runtime.bundle(private_rootfs, ["sh", "-c", "echo process >> /tmp/order"], edit=edit)
    cid = runtime.new_id()
    r = detached(runtime, "create", "--bundle", bundle, cid)
    assert r.returncode == 0, r.stderr
    pid = state(runtime, cid)["pid"]
    ctr_tmp = os.path.join(private_rootfs, "tmp")

    assert lines(log) == ["prestart", "createRuntime"]
    assert lines(os.path.join(ctr_tmp, "order")) == ["createContainer"]
    for name in ("prestart", "createRuntime"):
        check_state(read_json(os.path.join(tmp, f"{name}.json")), cid, "creating", pid, bundle)
    check_state(read_json(os.path.join(ctr_tmp, "createContainer.json")), cid, "creating", pid, bundle)

    r = detached(runtime, "start", cid)
    assert r.returncode == 0, r.stderr
    assert lines(log) == ["prestart", "createRuntime", "poststart"]
    check_state(read_json(os.path.join(ctr_tmp, "startContainer.json")), cid, "created", pid, bundle)
    check_state(read_json(os.path.join(tmp, "poststart.json")), cid, "running", pid, bundle)
    wait_stopped(runtime, cid)
    assert lines(os.path.join(ctr_tmp, "order")) == ["createContainer", "startContainer", "process"]

    r = runtime("delete", cid)
    assert r.returncode == 0, r.stderr
    assert lines(log) == ["prestart", "createRuntime", "poststart", "poststop"]
    check_state(read_json(os.path.join(tmp, "poststop.json")), cid, "stopped", pid, bundle)
    assert leftovers(cid) == []


def test_hooks_run_in_order_with_args_and_exact_env(runtime, busybox_rootfs):
    tmp, log = runtime.tmp, os.path.join(runtime.tmp, "calls")
    # sh -c without further arguments sets $0 to its own argv[0]: the hook's args[0]
    cmd = f'echo "$0|$FOO|$(env | grep -v ^PWD= | sort | tr "\\n" ,)" >> {log}'
    hooks = {"createRuntime": [{"path": "/bin/sh", "args": [f"argv0-{i}", "-c", cmd], "env": [f"FOO=v{i}", "BAR=x"]}
                               for i in range(3)],
             # a script: the kernel gives the interpreter the script's path as $0, args[1:] follow
             "poststart": [{"path": script(tmp, "args.sh", f'echo "$1|$2|$#|$(env | grep -v ^PWD=)" >> {log}'),
                            "args": ["ignored", "one", "two words"]}]}
    bundle = runtime.bundle(busybox_rootfs, ["true"], edit=with_hooks(hooks))
    r = runtime.run(bundle)
    assert r.returncode == 0, r.stderr
    with open(log) as f:
        calls = f.read().splitlines()
    assert calls == [f"argv0-{i}|v{i}|BAR=x,FOO=v{i}," for i in range(3)] + ["one|two words|2|"]


def test_create_container_hook_runs_in_the_container_namespaces(runtime, private_rootfs):
    tmp = runtime.tmp
    body = ("for ns in mnt pid net uts ipc user; do echo $ns=$(readlink /proc/self/ns/$ns); done > /tmp/ns\n"
            "id -u > /tmp/uid\nls / > /tmp/root")
    hooks = {"createContainer": [{"path": script(tmp, "ns.sh", body)}]}
    bundle = runtime.bundle(private_rootfs, ["true"], edit=with_hooks(hooks))
    cid = runtime.new_id()
    r = detached(runtime, "create", "--bundle", bundle, cid)
    assert r.returncode == 0, r.stderr
    pid = state(runtime, cid)["pid"]
    with open(os.path.join(private_rootfs, "tmp/ns")) as f:
        seen = dict(line.split("=", 1) for line in f.read().splitlines())
    for ns in ("mnt", "pid", "net", "uts", "ipc", "user"):
        assert seen[ns] == os.readlink(f"/proc/{pid}/ns/{ns}"), ns
    assert seen["mnt"] != os.readlink("/proc/self/ns/mnt")
    assert lines(os.path.join(private_rootfs, "tmp/uid")) == ["0"]      # container root
    assert "hook.sh" not in lines(os.path.join(private_rootfs, "tmp/root"))
    assert "bin" in lines(os.path.join(private_rootfs, "tmp/root"))     # its / is the container's


# --- failures --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["createRuntime", "prestart", "createContainer"])
def test_create_hook_failure_fails_create_and_leaves_nothing(runtime, busybox_rootfs, kind):
    tmp = runtime.tmp
    ok = recorder(tmp, "first", os.path.join(tmp, "log"))
    bad = script(tmp, "bad.sh", "echo something broke >&2\nexit 3")
    after = recorder(tmp, "after", os.path.join(tmp, "log"))
    hooks = {kind: [{"path": ok}, {"path": bad}, {"path": after}], "poststop": [{"path": recorder(tmp, "ps", os.path.join(tmp, "stop"))}]}
    if kind == "createContainer":
        hooks = {kind: [{"path": bad}]}
    bundle = runtime.bundle(busybox_rootfs, ["true"], edit=with_hooks(hooks))
    cid = runtime.new_id()
    r = detached(runtime, "create", "--bundle", bundle, cid)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    assert kind in err[0] and bad in err[0] and "exit status 3" in err[0] and "something broke" in err[0]
    if kind != "createContainer":
        assert lines(os.path.join(tmp, "log")) == ["first"]          # the hooks after the failure never ran
        assert lines(os.path.join(tmp, "stop")) == ["ps"]            # and the lifecycle went on to poststop
    assert runtime("state", cid).returncode != 0
    assert leftovers(cid) == []
    assert ids_held(runtime.root) == []
    assert os.listdir(runtime.root) == []


def test_hook_timeout_kills_it_and_fails_create(runtime, busybox_rootfs):
    hang = script(runtime.tmp, "hang.sh", "sleep 29.25")
    bundle = runtime.bundle(busybox_rootfs, ["true"], edit=with_hooks({"createRuntime": [{"path": hang, "timeout": 1}]}))
    cid = runtime.new_id()
    t0 = time.monotonic()
    r = detached(runtime, "create", "--bundle", bundle, cid)
    assert time.monotonic() - t0 < 15
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "createRuntime" in err[0] and "timed out after 1s" in err[0], r.stderr
    assert subprocess.run(["pgrep", "-f", "sleep 29.25"], capture_output=True).stdout == b""
    assert leftovers(cid) == [] and ids_held(runtime.root) == []


def test_create_container_hook_timeout(runtime, busybox_rootfs):
    hang = script(runtime.tmp, "hang.sh", "sleep 29.5")
    bundle = runtime.bundle(busybox_rootfs, ["true"],
                            edit=with_hooks({"createContainer": [{"path": hang, "timeout": 1}]}))
    cid = runtime.new_id()
    r = detached(runtime, "create", "--bundle", bundle, cid)
    assert r.returncode != 0 and "timed out" in r.stderr, r.stderr
    assert subprocess.run(["pgrep", "-f", "sleep 29.5"], capture_output=True).stdout == b""
    assert leftovers(cid) == [] and ids_held(runtime.root) == []


def test_start_container_failure_never_runs_the_process(runtime, private_rootfs):
    script(private_rootfs, "hook.sh", "echo refusing >&2\nexit 5")
    bundle = runtime.bundle(private_rootfs, ["sh", "-c", "touch /tmp/ran"],
                            edit=with_hooks({"startContainer": [{"path": "/hook.sh"}]}))
    cid = runtime.new_id()
    r = detached(runtime, "create", "--bundle", bundle, cid)
    assert r.returncode == 0, r.stderr
    r = detached(runtime, "start", cid)
    assert r.returncode != 0
    assert "startContainer hook #0 (/hook.sh)" in r.stderr and "exit status 5" in r.stderr, r.stderr
    assert "refusing" in r.stderr
    wait_stopped(runtime, cid)
    assert not os.path.exists(os.path.join(private_rootfs, "tmp/ran"))
    assert runtime("delete", cid).returncode == 0


def test_start_container_failure_in_run(runtime, private_rootfs):
    script(private_rootfs, "hook.sh", "exit 7")
    bundle = runtime.bundle(private_rootfs, ["sh", "-c", "touch /tmp/ran"],
                            edit=with_hooks({"startContainer": [{"path": "/hook.sh"}]}))
    r = runtime.run(bundle)
    assert r.returncode != 0 and "startContainer" in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(private_rootfs, "tmp/ran"))
    assert os.listdir(runtime.root) == []


def test_poststart_and_poststop_failures_only_warn(runtime, busybox_rootfs):
    tmp = runtime.tmp
    bad = script(tmp, "bad.sh", "exit 9")
    after = recorder(tmp, "after", os.path.join(tmp, "log"))
    hooks = {"poststart": [{"path": bad}, {"path": after}], "poststop": [{"path": bad}, {"path": after}]}
    bundle = runtime.bundle(busybox_rootfs, ["sh", "-c", "exit 4"], edit=with_hooks(hooks))
    r = runtime.run(bundle)
    assert r.returncode == 4, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "level=warning" in ln]
    assert len(warnings) == 2 and all("exit status 9" in w for w in warnings), r.stderr
    assert "poststart" in warnings[0] and "poststop" in warnings[1]
    assert lines(os.path.join(tmp, "log")) == ["after", "after"]     # the rest still ran
    assert os.listdir(runtime.root) == []

    # the same through create / start / delete
    cid = runtime.new_id()
    assert detached(runtime, "create", "--bundle", bundle, cid).returncode == 0
    r = detached(runtime, "start", cid)
    assert r.returncode == 0 and "poststart" in r.stderr, r.stderr
    wait_stopped(runtime, cid)
    r = runtime("delete", cid)
    assert r.returncode == 0 and "poststop" in r.stderr, r.stderr
    assert runtime("state", cid).returncode != 0
    assert leftovers(cid) == []


# --- validation and features -------------------------------------------------------------------

@pytest.mark.parametrize("hooks, words", [
    ({"createRuntime": [{"path": "relative/hook"}]}, "absolute"),
    ({"createRuntime": [{"args": ["x"]}]}, "absolute"),
    ({"poststop": [{"path": "/bin/true", "args": ["a", 1]}]}, "args must be a list of strings"),
    ({"poststop": [{"path": "/bin/true", "env": "A=b"}]}, "env must be a list of strings"),
    ({"prestart": [{"path": "/bin/true", "timeout": 0}]}, "timeout must be a positive integer"),
    ({"prestart": [{"path": "/bin/true", "timeout": 1.5}]}, "timeout must be a positive integer"),
    ({"prestart": [{"path": "/bin/true", "timeout": True}]}, "timeout must be a positive integer"),
    ({"preStart": [{"path": "/bin/true"}]}, "unknown hook kind"),
])
def test_bad_hooks_are_refused_with_one_line(runtime, busybox_rootfs, hooks, words):
    bundle = runtime.bundle(busybox_rootfs, ["true"], edit=with_hooks(hooks))
    cid = runtime.new_id()
    r = detached(runtime, "create", "--bundle", bundle, cid)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and words in err[0], r.stderr
    assert leftovers(cid) == [] and ids_held(runtime.root) == []


def test_features_lists_the_hooks(runtime):
    r = runtime("features", check=True)
    assert json.loads(r.stdout)["hooks"] == ["prestart", "createRuntime", "createContainer", "startContainer",
                                             "poststart", "poststop"]
