"""The warm path's wire format and the one constant the lean client keeps a copy of."""
from __future__ import annotations

from isobox.daemon import paths, warm
from isobox.runc import warm_client


def test_the_client_names_the_workers_socket():
    assert warm_client.SOCKET == paths.WARM_SOCKET      # a copy: the client imports nothing of isobox


def test_a_request_round_trips():
    argv = ["--root", "/run/x y", "delete", "--force", "c\u00e9"]
    env = {"PATH": "/usr/bin", "A": "b=c", "EMPTY": ""}
    got = warm.decode(warm_client.encode(argv, "/tmp/w d", env, 4242))
    assert got == (argv, "/tmp/w d", env, 4242)


def test_create_run_and_exec_never_leave_the_callers_process():
    assert warm_client.LOCAL_ONLY.isdisjoint(warm.WARM)
    assert {"create", "run", "exec"} <= warm_client.LOCAL_ONLY
