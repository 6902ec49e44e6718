"""The compiled-filter cache: what it trusts, what it refuses, and that a hit needs no libseccomp."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from isobox.seccomp import bpfcache, check
from isobox.seccomp.compile import compile_profile, library_path

HERE = os.path.dirname(os.path.abspath(__file__))
DOCKER = os.path.join(HERE, "..", "data", "docker-like-default.json")


def profile():
    with open(DOCKER) as f:
        return check(json.load(f), trap_socket="/run/isobox/isoboxd-trap.sock")


@pytest.fixture
def stored(tmp_path):
    d = tmp_path / "cache"
    prof = profile()
    compiled = compile_profile(prof)
    prog = bpfcache.Program(prof, compiled.export_bpf(), compiled.skipped)
    bpfcache.store(prog, library_path(), str(d))
    return d, prof, prog


def test_a_stored_program_comes_back_byte_for_byte(stored):
    d, prof, prog = stored
    got = bpfcache.lookup(prof, str(d))
    assert got is not None and got.bpf == prog.bpf and got.skipped == prog.skipped
    assert len(got.bpf) % 8 == 0 and len(got.bpf) > 8 * 100
    assert got.flags() & bpfcache.SECCOMP_FILTER_FLAG_NEW_LISTENER      # the trap notifies


def test_another_profile_misses(stored):
    d, prof, _ = stored
    other = check({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]})
    assert bpfcache.lookup(other, str(d)) is None


@pytest.mark.parametrize("tamper", ["file-mode", "dir-mode", "owner", "symlink", "truncated", "library"])
def test_untrusted_or_stale_files_are_ignored(stored, tamper, tmp_path):
    d, prof, _ = stored
    path = d / bpfcache.key(prof)
    if tamper == "file-mode":
        os.chmod(path, 0o644)
    elif tamper == "dir-mode":
        os.chmod(d, 0o755)
    elif tamper == "owner":
        os.chown(path, 1000, 1000)
    elif tamper == "symlink":
        real = tmp_path / "elsewhere"
        os.rename(path, real)
        os.symlink(real, path)
    elif tamper == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:-3])
    else:          # compiled by another libseccomp: its recorded identity no longer matches
        data = path.read_bytes()
        head, _, rest = data.partition(b"\n")
        lib, _, ident = rest.partition(b"\0")
        path.write_bytes(head + b"\n" + lib + b"\0" + b"1" + ident)
    assert bpfcache.lookup(prof, str(d)) is None


def test_a_hit_imports_no_libseccomp_binding():
    """Two fresh interpreters: the first compiles and stores, the second only reads."""
    code = ("import sys, json; from isobox.seccomp import prepare; "
            f"sec = prepare(json.load(open({DOCKER!r})), trap_socket='/run/isobox/isoboxd-trap.sock'); "
            "print('pyseccomp' in sys.modules, len(sec.compiled.bpf))")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
            for _ in range(2)]
    assert outs[1][0] == "False", outs
    assert outs[0][1] == outs[1][1]
