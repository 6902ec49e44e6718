"""The warm path's wire format and the one constant the lean client keeps a copy of."""
from __future__ import annotations

from isobox.daemon import paths, warm
from isobox.init import handover
from isobox.runc import warm_client
from isobox.seccomp import Seccomp, bpfcache
from isobox.spec.plan import Plan, Process, Rlimit


def test_the_client_names_the_workers_socket():
    assert warm_client.SOCKET == paths.WARM_SOCKET      # a copy: the client imports nothing of isobox


def test_a_request_round_trips():
    argv = ["--root", "/run/x y", "delete", "--force", "c\u00e9"]
    env = {"PATH": "/usr/bin", "A": "b=c", "EMPTY": ""}
    got = warm.decode(warm_client.encode(argv, "/tmp/w d", env, 4242))
    assert got == (argv, "/tmp/w d", env, 4242)


def test_run_and_a_foreground_exec_never_leave_the_callers_process():
    assert warm_client.LOCAL_ONLY.isdisjoint(warm.WARM)
    assert "run" in warm_client.LOCAL_ONLY
    assert warm.command(["exec", "c1", "ls", "-d"]) is None          # -d after the id is ls's
    assert warm.command(["exec", "--detach", "c1", "ls"]) == "exec"
    assert warm.command(["--root", "/r", "create", "--bundle", "b", "c1"]) == "create"
    assert warm.SPAWNS == {"create", "exec"}       # the client forks their processes (init/handover.py)
    assert (warm_client.SPAWN, warm_client.SPAWN_EXEC) == (handover.SPAWN, handover.SPAWN_EXEC)


def _plan(**over) -> Plan:
    proc = Process(args=["sh", "-c", "x"], env=["PATH=/bin", "A=b=c"], cwd="/w", uid=1000, gid=1000,
                   additional_gids=[10, 20], umask=0o22, caps_bounding=0x3f, caps_effective=0x1,
                   caps_permitted=0x3, caps_inheritable=0, caps_ambient=0, no_new_privileges=True,
                   rlimits=[Rlimit(7, 1024, 4096)], oom_score_adj=None, terminal=True)
    base = dict(id="c1", bundle="/b", rootfs="/b/rootfs", readonly_root=True, new_namespaces=0x7e020000,
                join_namespaces={"network": "/run/netns/x"}, join_user="", shares_userns_of="", uid_base=65536,
                gid_base=65536, id_size=65536, explicit_mapping=False, mounts=[], masked_paths=["/proc/kcore"],
                readonly_paths=[], devices=[], hostname="h", domainname="", sysctl={}, cgroups_path="/x",
                resources={}, process=proc, annotations={"a": "b"},
                hooks={"startContainer": [{"path": "/bin/true", "args": ["true"], "env": [], "timeout": None}]})
    base.update(over)
    return Plan(**base)


def test_the_init_gets_what_container_run_reads():
    plan = _plan()
    got, new_cgroupns, preserve = handover.decode(handover.encode(plan, True, 2))
    assert (new_cgroupns, preserve) == (True, 2)
    assert got.process == plan.process
    assert (got.id, got.bundle, got.annotations, got.hooks) == (plan.id, plan.bundle, plan.annotations, plan.hooks)
    assert got.seccomp is None


def test_the_init_gets_a_loadable_seccomp_program():
    sec = Seccomp.__new__(Seccomp)
    sec.compiled = bpfcache.Shipped(b"\x06\x00\x00\x00\x00\x00\xff\x7f", 8, True)   # RET ALLOW
    sec.cid, sec.bundle, sec.annotations, sec.trap_socket = "c1", "/b", {}, "/run/isobox/trap.sock"
    sec.key, sec.listener_path, sec.listener_metadata, sec.notes = "k", "", "", []
    got, _, _ = handover.decode(handover.encode(_plan(seccomp=sec), False, 0))
    assert got.seccomp.compiled.bpf == sec.compiled.bpf
    assert got.seccomp.compiled.flags() == 8 and got.seccomp.compiled.uses_notify
    assert (got.seccomp.key, got.seccomp.socket_path) == ("k", "/run/isobox/trap.sock")
