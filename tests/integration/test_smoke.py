"""The shortest path through the runtime: run a command, see it isolated, leave nothing."""
from conftest import ids_held, leftovers


def test_run_prints_container_view(runtime, busybox_rootfs):
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "echo $$; id -u; cat /proc/self/uid_map"])
    r = runtime.run(b)
    assert r.returncode == 0, r.stderr
    pid1, uid, umap = r.stdout.split("\n", 2)
    assert pid1 == "1" and uid == "0"
    base = int(umap.split()[1])
    assert base >= 1048576 and umap.split()[0] == "0" and umap.split()[2] == "65536"
    cid = runtime.ids[-1]
    assert leftovers(cid) == []
    assert ids_held(runtime.root) == []


def test_exit_code_is_the_containers(runtime, busybox_rootfs):
    r = runtime.run(runtime.bundle(busybox_rootfs, ["sh", "-c", "exit 7"]))
    assert r.returncode == 7


def test_container_process_gets_default_signal_dispositions(runtime, busybox_rootfs):
    # the runtime is Python, which ignores SIGPIPE; that must not leak into the container
    r = runtime.run(runtime.bundle(busybox_rootfs, ["grep", "-E", "SigIgn|SigBlk", "/proc/self/status"]))
    assert r.returncode == 0, r.stderr
    assert "SigIgn:\t0000000000000000" in r.stdout and "SigBlk:\t0000000000000000" in r.stdout
