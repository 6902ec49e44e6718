"""Seccomp profile logic without containers: validation, the trap merge, compilation."""
from __future__ import annotations

import subprocess
import sys

import pytest

from isobox.errors import IsoboxError
from isobox.seccomp import check, prepare, profile as P
from isobox.seccomp.compile import compile_profile


def engine_profile(**kw) -> dict:
    return {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [{"names": ["read", "write", "mount"], "action": "SCMP_ACT_ALLOW"},
                         {"names": ["mount", "umount2", "unshare"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                         {"names": ["umount2"], "action": "SCMP_ACT_KILL",
                          "args": [{"index": 1, "value": 2, "op": "SCMP_CMP_EQ"}]}], **kw}


def test_trap_merge_rewrites_engine_rules():
    prof = P.merge_trap(P.parse(engine_profile()))
    by_names = [(r.names, r.action) for r in prof.rules]
    assert (("read", "write"), P.ACT_ALLOW) in by_names
    assert (("unshare",), P.ACT_ERRNO | 1) in by_names          # untrapped names keep their rule
    assert by_names[-1] == (P.TRAPPED, P.ACT_NOTIFY)
    assert not any(set(r.names) & set(P.TRAPPED) for r in prof.rules[:-1])
    assert prof.default_action == P.ACT_ERRNO | 1 and prof.trap
    assert any("umount2" in n and "SCMP_ACT_KILL" in n for n in prof.notes)


def test_trap_merge_without_profile_covers_every_x86_abi():
    prof = P.merge_trap(None)
    assert prof.default_action == P.ACT_ALLOW
    assert set(prof.arches) == {P.ARCHES[a] for a in ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32")}


def test_trap_off_by_default_and_listener_conflict():
    assert check(None) is None
    with pytest.raises(IsoboxError, match="only one seccomp listener"):
        check({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/x.sock",
               "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}, trap_socket="/run/t.sock")


def test_compiled_filter_has_notify_and_all_arches():
    sec = prepare(engine_profile(), cid="c1", trap_socket="/run/isoboxd.sock")
    pfc = compile_profile(sec.compiled.profile).export_pfc()
    for arch in ("x86_64", "x86", "x32"):
        assert f"filter for arch {arch} " in pfc
    assert "0x7fc00000" in pfc                      # SCMP_ACT_NOTIFY
    assert sec.compiled.uses_notify


def test_unknown_syscall_names_are_skipped():
    sec = prepare({"defaultAction": "SCMP_ACT_ALLOW",
                   "syscalls": [{"names": ["no_such_call", "mkdir"], "action": "SCMP_ACT_ERRNO"}]})
    assert sec.compiled.skipped == ["no_such_call"]
    assert any("no_such_call" in n for n in sec.notes)


def test_only_listed_arches():
    sec = prepare({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
                   "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]})
    pfc = compile_profile(sec.compiled.profile).export_pfc()
    assert "arch x86_64" in pfc and "arch x86 " not in pfc and "arch x32" not in pfc


@pytest.mark.parametrize("obj, words", [
    ({}, "defaultAction is required"),
    ({"defaultAction": "SCMP_ACT_NOTIFY"}, "cannot be the default"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 70000}, "errnoRet"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_PDP11"]}, "unknown architecture"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [], "action": "SCMP_ACT_ALLOW"}]}, "names"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["x"]}]}, "action is required"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["x"], "action": "SCMP_ACT_ERRNO",
                                                       "args": [{"index": 0, "op": "SCMP_CMP_EQ", "value": -1}]}]},
     "unsigned 64-bit"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/x.sock"}, "no rule uses SCMP_ACT_NOTIFY"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "rel.sock",
      "syscalls": [{"names": ["x"], "action": "SCMP_ACT_NOTIFY"}]}, "absolute"),
])
def test_bad_profiles(obj, words):
    with pytest.raises(IsoboxError, match=words) as e:
        P.parse(obj)
    assert "\n" not in str(e.value) and str(e.value).startswith("linux.seccomp:")


def test_errno_defaults_and_actions():
    p = P.parse({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["a"], "action": "SCMP_ACT_TRACE"}, {"names": ["b"], "action": "SCMP_ACT_KILL"},
        {"names": ["c"], "action": "SCMP_ACT_LOG"}, {"names": ["d"], "action": "SCMP_ACT_TRAP"},
        {"names": ["e"], "action": "SCMP_ACT_KILL_THREAD"}, {"names": ["f"], "action": "SCMP_ACT_KILL_PROCESS"}]})
    assert p.default_action == P.ACT_ERRNO | 1
    assert [r.action for r in p.rules] == [P.ACT_TRACE | 1, P.ACT_KILL_THREAD, P.ACT_LOG, P.ACT_TRAP,
                                           P.ACT_KILL_THREAD, P.ACT_KILL_PROCESS]


def test_libseccomp_is_imported_lazily():
    code = ("import sys, isobox.runc.main, isobox.spec.rewrite, isobox.init.container, isobox.seccomp; "
            "print('pyseccomp' in sys.modules, 'ctypes.util' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
