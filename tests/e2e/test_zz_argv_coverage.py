"""Conformance by what the engines really do: every isobox-runc call recorded during the
end-to-end suite (each engine's ISOBOX_ARGV_LOG file under ARGV_DIR), reduced to
(command, sorted flag names), must have a test of its own in tests/integration that calls
isobox-runc with exactly that flag set.

Named test_zz_* so it runs after the engine suites in the same session."""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from e2e.conftest import ARGV_DIR, read_argv_records

CONF = "tests/integration/test_conformance.py"
FORMS = "tests/integration/test_engine_forms.py"
SHIM = ("--log", "--log-format", "--root")
CONMON_LOG = ("--log", "--log-format")

COVERED: dict[tuple[str, tuple[str, ...]], str] = {
    # go-runc's Version() (dockerd's info, podman info)
    ("", ("--version",)): f"{FORMS}::test_version_form",
    # containerd-shim-runc-v2 (dockerd 20.10, containerd 1.6 and its CRI plugin): --root, --log,
    # --log-format json everywhere
    ("create", tuple(sorted(("--bundle", "--pid-file") + SHIM))):
        f"{FORMS}::test_shim_create_pid_file_start_delete_force",
    ("create", tuple(sorted(("--bundle", "--console-socket", "--pid-file") + SHIM))):
        f"{CONF}::test_driven_like_containerds_shim",
    ("start", SHIM): f"{CONF}::test_driven_like_containerds_shim",
    ("exec", tuple(sorted(("--detach", "--pid-file", "--process") + SHIM))):
        f"{CONF}::test_driven_like_containerds_shim",
    ("exec", tuple(sorted(("--console-socket", "--detach", "--pid-file", "--process") + SHIM))):
        f"{FORMS}::test_shim_exec_console_socket_detach",
    ("kill", SHIM): f"{CONF}::test_driven_like_containerds_shim",
    # the CRI plugin's shim, after kill (tests/e2e/test_cri.py)
    ("kill", tuple(sorted(("--all",) + SHIM))): f"{FORMS}::test_shim_kill_all_reaches_what_a_shared_pid_namespace_leaves",
    ("delete", SHIM): f"{CONF}::test_driven_like_containerds_shim",
    ("delete", tuple(sorted(("--force",) + SHIM))): f"{FORMS}::test_shim_create_pid_file_start_delete_force",
    ("pause", SHIM): f"{FORMS}::test_shim_pause_resume_ps_update",
    ("resume", SHIM): f"{FORMS}::test_shim_pause_resume_ps_update",
    ("ps", tuple(sorted(("--format",) + SHIM))): f"{FORMS}::test_shim_pause_resume_ps_update",
    ("update", tuple(sorted(("--resources",) + SHIM))): f"{FORMS}::test_shim_pause_resume_ps_update",
    # Podman 4.3's conmon and libpod: the default --root; --log-format=json --log on create and exec
    ("create", tuple(sorted(("--bundle", "--pid-file") + CONMON_LOG))):
        f"{FORMS}::test_conmon_create_start_kill_delete_force",
    ("create", tuple(sorted(("--bundle", "--console-socket", "--pid-file") + CONMON_LOG))):
        f"{FORMS}::test_conmon_terminal_create_and_exec_tty",
    ("start", ()): f"{FORMS}::test_conmon_create_start_kill_delete_force",
    ("exec", tuple(sorted(("--detach", "--pid-file", "--process") + CONMON_LOG))):
        f"{FORMS}::test_conmon_create_start_kill_delete_force",
    ("exec", tuple(sorted(("--console-socket", "--detach", "--pid-file", "--process", "--tty") + CONMON_LOG))):
        f"{FORMS}::test_conmon_terminal_create_and_exec_tty",
    ("kill", ()): f"{FORMS}::test_conmon_create_start_kill_delete_force",
    ("pause", ()): f"{FORMS}::test_conmon_create_start_kill_delete_force",
    ("resume", ()): f"{FORMS}::test_conmon_create_start_kill_delete_force",
    ("delete", ("--force",)): f"{FORMS}::test_conmon_create_start_kill_delete_force",
    # dockerd 20.10's BuildKit (go-runc Run: no --root, foreground, stdio pipes)
    ("run", tuple(sorted(("--bundle",) + CONMON_LOG))): f"{FORMS}::test_buildkit_run_foreground",
}


def signature(argv: list[str]) -> tuple[str, tuple[str, ...]]:
    """(command, sorted canonical flag names), global and command flags alike, parsed as
    isobox-runc parses them (aliases and --flag=value folded)."""
    from isobox.runc import args
    p = args.parse(argv)
    return p.command, tuple(sorted({"--" + k for k in (*p.globals, *p.flags)}))


def _tests_exist(node: str) -> bool:
    path, _, name = node.partition("::")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, path)) as f:
        return f"def {name}(" in f.read()


def test_covered_table_names_real_tests():
    for node in set(COVERED.values()):
        assert _tests_exist(node), node


def test_every_recorded_form_has_a_test_of_its_own(capsys):
    records = read_argv_records()
    if not records:
        pytest.skip(f"no isobox-runc calls recorded in {ARGV_DIR} (run the e2e suites in this session)")
    seen: Counter = Counter()
    engines: dict = {}
    for rec in records:
        sig = signature(rec["argv"])
        seen[sig] += 1
        engines.setdefault(sig, set()).add(rec["engine"])
    missing = {sig: sorted(engines[sig]) for sig in seen if sig not in COVERED}
    with capsys.disabled():
        print(f"\n{len(records)} isobox-runc calls, {len(seen)} forms:")
        for sig, n in sorted(seen.items()):
            print(f"  {n:5d}  {sig[0] or '(global)'} {' '.join(sig[1])}  [{', '.join(sorted(engines[sig]))}]")
        path = os.path.join(ARGV_DIR, "calls-per-docker-run.json")
        if os.path.exists(path):
            with open(path) as f:
                bench = json.load(f)
            print(f"isobox-runc calls per `docker run --rm`: {bench['calls']} ({', '.join(bench['commands'])})")
    assert not missing, f"forms the engines issued with no test of their own: {missing}"
