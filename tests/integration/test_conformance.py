"""isobox-runc against runc itself, and driven exactly as containerd's runc shim drives it."""
import json
import os
import shutil
import subprocess
import time

import pytest

from conftest import RUNC
from test_exec_tty import ConsoleServer, read_until

RUNC_BIN = shutil.which("runc")


def quiet(cmd, **kw):
    """A runtime call whose container may inherit stdio: files, never pipes."""
    tmp = kw.pop("tmp")
    with open(os.path.join(tmp, "o"), "w") as o, open(os.path.join(tmp, "e"), "w") as e:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=o, stderr=e, timeout=60, **kw)
    r.stdout = open(os.path.join(tmp, "o")).read()
    r.stderr = open(os.path.join(tmp, "e")).read()
    return r


def shape(value):
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return type(value).__name__


@pytest.fixture
def runc_container(tmp_path, busybox_rootfs):
    if not RUNC_BIN:
        pytest.skip("runc is not installed")
    bundle = tmp_path / "runc-bundle"
    bundle.mkdir()
    subprocess.run([RUNC_BIN, "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["sleep", "300"]
    spec["root"] = {"path": busybox_rootfs, "readonly": True}
    spec["annotations"] = {"a": "b"}
    (bundle / "config.json").write_text(json.dumps(spec))
    root = str(tmp_path / "runc-root")
    cid = "conf-runc"
    r = quiet([RUNC_BIN, "--root", root, "run", "-d", "--bundle", str(bundle), cid], tmp=str(tmp_path))
    assert r.returncode == 0, r.stderr
    yield [RUNC_BIN, "--root", root], cid
    subprocess.run([RUNC_BIN, "--root", root, "delete", "-f", cid], capture_output=True)


def test_state_and_ps_json_match_runcs_keys_and_types(runtime, busybox_rootfs, runc_container):
    runc, rcid = runc_container

    def annotate(spec):
        spec["annotations"] = {"a": "b"}
    b = runtime.bundle(busybox_rootfs, ["sleep", "300"], edit=annotate)
    cid = runtime.new_id()
    assert quiet([*RUNC, "--root", runtime.root, "run", "-d", "--bundle", b, cid], tmp=runtime.tmp).returncode == 0
    ours = json.loads(runtime("state", cid, check=True).stdout)
    theirs = json.loads(subprocess.run([*runc, "state", rcid], capture_output=True, text=True, check=True).stdout)
    assert list(ours) == list(theirs), (list(ours), list(theirs))
    assert shape(ours) == shape(theirs)
    ours_ps = json.loads(runtime("ps", "--format", "json", cid, check=True).stdout)
    theirs_ps = json.loads(subprocess.run([*runc, "ps", "--format", "json", rcid], capture_output=True, text=True,
                                          check=True).stdout)
    assert shape(ours_ps) == shape(theirs_ps) == ["int"]
    ours_list = json.loads(runtime("list", "--format", "json", check=True).stdout)
    theirs_list = json.loads(subprocess.run([*runc, "list", "--format", "json"], capture_output=True, text=True,
                                            check=True).stdout)
    assert set(ours_list[0]) == set(theirs_list[0])


def test_driven_like_containerds_shim(runtime, busybox_rootfs, tmp_path):
    """create --console-socket --pid-file, start, exec --process --detach --pid-file, kill, delete,
    with --log/--log-format json as the shim passes them."""
    def tty(spec):
        spec["process"]["terminal"] = True
    bundle = runtime.bundle(busybox_rootfs, ["sh"], edit=tty)
    log = os.path.join(bundle, "log.json")
    base = [*RUNC, "--root", runtime.root, "--log", log, "--log-format", "json"]
    cid = runtime.new_id()
    server = ConsoleServer(str(tmp_path / "console.sock"))
    pid_file = str(tmp_path / "init.pid")
    r = quiet([*base, "create", "--bundle", bundle, "--console-socket", server.path, "--pid-file", pid_file, cid],
              tmp=runtime.tmp, cwd=bundle)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    master = server.master()
    init = int(open(pid_file).read())
    assert os.path.exists(f"/proc/{init}")
    assert json.loads(runtime("state", cid, check=True).stdout)["status"] == "created"
    r = quiet([*base, "start", cid], tmp=runtime.tmp)
    assert r.returncode == 0 and r.stdout == ""
    assert json.loads(runtime("state", cid, check=True).stdout)["status"] == "running"
    os.write(master, b"echo shim-$((40+2))\n")
    assert b"shim-42" in read_until(master, b"shim-42")

    process = tmp_path / "runc-process.json"
    process.write_text(json.dumps({"terminal": False, "args": ["sleep", "100"], "env": ["PATH=/bin"], "cwd": "/",
                                   "user": {"uid": 0, "gid": 0}}))
    exec_pid_file = str(tmp_path / "exec.pid")
    r = quiet([*base, "exec", "--process", str(process), "--detach", "--pid-file", exec_pid_file, cid],
              tmp=runtime.tmp)
    assert r.returncode == 0, r.stderr
    exec_pid = int(open(exec_pid_file).read())
    assert open(f"/proc/{exec_pid}/cmdline").read().startswith("sleep")

    r = quiet([*base, "kill", cid, "9"], tmp=runtime.tmp)
    assert r.returncode == 0
    for _ in range(200):
        if json.loads(runtime("state", cid).stdout)["status"] == "stopped":
            break
        time.sleep(0.02)
    assert json.loads(runtime("state", cid).stdout)["status"] == "stopped"
    # kill after stop: the wording containerd maps to "not found"
    r = quiet([*base, "kill", cid, "9"], tmp=runtime.tmp)
    assert r.returncode != 0 and "container not running" in r.stderr
    r = quiet([*base, "delete", cid], tmp=runtime.tmp)
    assert r.returncode == 0
    r = quiet([*base, "delete", cid], tmp=runtime.tmp)
    assert r.returncode != 0 and "does not exist" in r.stderr
    last_error = [json.loads(line) for line in open(log) if '"level": "error"' in line or '"level":"error"' in line]
    assert last_error and "does not exist" in last_error[-1]["msg"]
    os.close(master)


def test_exec_accepts_and_ignores_lsm_flags(runtime, busybox_rootfs):
    b = runtime.bundle(busybox_rootfs, ["sleep", "300"])
    cid = runtime.new_id()
    assert quiet([*RUNC, "--root", runtime.root, "run", "-d", "--bundle", b, cid], tmp=runtime.tmp).returncode == 0
    r = runtime("exec", "--apparmor", "docker-default", "--process-label", "system_u:system_r:container_t:s0", cid,
                "echo", "ok")
    assert r.returncode == 0 and r.stdout == "ok\n"


def test_create_and_run_preserve_fds(runtime, busybox_rootfs):
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "cat /proc/self/fd/3; ls /proc/self/fd"])
    cid = runtime.new_id()
    runc = " ".join([*RUNC, "--root", runtime.root])
    r = subprocess.run(["sh", "-c", f"exec 3</etc/hostname 4</etc/hostname; exec {runc} run --preserve-fds 1 "
                                    f"--bundle {b} {cid}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(open("/etc/hostname").read())
    r = runtime("run", "--preserve-fds", "9", "--bundle", b, runtime.new_id())
    assert r.returncode != 0 and "not open" in r.stderr
