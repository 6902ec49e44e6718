"""ps, pause, resume, update and events: commands on a container's cgroup."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from isobox.errors import IsoboxError
from isobox.lifecycle.state import StateStore, cgroup_of, status


def _cg_call(fn, *args):
    from isobox.cgroups.layout import CgroupError
    try:
        return fn(*args)
    except CgroupError as e:
        raise IsoboxError(str(e)) from None


def ps(store: StateStore, cid: str, fmt: str, ps_args: list[str]) -> None:
    st = store.load(cid)
    if status(store, st) == "stopped":
        raise IsoboxError("container not running")
    pids = sorted(_cg_call(cgroup_of(st).pids))
    if fmt == "json":
        sys.stdout.write(json.dumps(pids) + "\n")
        return
    if fmt != "table":
        raise IsoboxError(f"invalid format option {fmt!r}: use table or json")
    # LC_ALL=C: column headers in a stable language
    out = subprocess.run(["ps", *(ps_args or ["-ef"])], capture_output=True, text=True,
                         env={**os.environ, "LC_ALL": "C"})
    if out.returncode != 0:
        raise IsoboxError(f"ps {' '.join(ps_args or ['-ef'])} failed: {out.stderr.strip()}")
    lines = out.stdout.splitlines()
    header = lines[0].split()
    if "PID" not in header:
        raise IsoboxError("ps output has no PID column; pass options that include it")
    col = header.index("PID")
    wanted = set(pids)
    sys.stdout.write(lines[0] + "\n")
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > col and fields[col].isdigit() and int(fields[col]) in wanted:
            sys.stdout.write(line + "\n")


def pause(store: StateStore, cid: str) -> None:
    st = store.load(cid)
    s = status(store, st)
    if s != "running":
        raise IsoboxError("container not running" if s != "paused" else "container already paused")
    _cg_call(cgroup_of(st).freeze)


def resume(store: StateStore, cid: str) -> None:
    st = store.load(cid)
    if status(store, st) != "paused":
        raise IsoboxError("container not paused")
    _cg_call(cgroup_of(st).thaw)


def _bytes(text: str, flag: str) -> int:
    if text.strip() == "-1":
        return -1
    m = re.fullmatch(r"(\d+)\s*([kKmMgGtT]?)[iI]?[bB]?", text.strip())
    if not m:
        raise IsoboxError(f"--{flag} {text!r}: use a number of bytes with an optional k, m, g or t suffix")
    return int(m.group(1)) * 1024 ** ("kmgt".find(m.group(2).lower()) + 1) if m.group(2) else int(m.group(1))


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise IsoboxError(f"--{flag} {text!r} must be an integer") from None


def resources_from_flags(flags: dict) -> dict:
    """runc's update flags -> an OCI linux.resources object."""
    res: dict = {}
    for flag in ("kernel-memory", "kernel-memory-tcp", "l3-cache-schema", "mem-bw-schema"):
        if flag in flags:
            raise IsoboxError(f"--{flag} is not supported by isobox (kernel memory and Intel RDT are not managed)")
    mem = {"memory": "limit", "memory-reservation": "reservation", "memory-swap": "swap"}
    for flag, key in mem.items():
        if flag in flags:
            res.setdefault("memory", {})[key] = _bytes(str(flags[flag]), flag)
    cpu = {"cpu-period": "period", "cpu-quota": "quota", "cpu-share": "shares", "cpu-rt-period": "realtimePeriod",
           "cpu-rt-runtime": "realtimeRuntime"}
    for flag, key in cpu.items():
        if flag in flags:
            res.setdefault("cpu", {})[key] = _int(str(flags[flag]), flag)
    for flag, key in (("cpuset-cpus", "cpus"), ("cpuset-mems", "mems")):
        if flag in flags:
            res.setdefault("cpu", {})[key] = str(flags[flag])
    if "pids-limit" in flags:
        res["pids"] = {"limit": _int(str(flags["pids-limit"]), "pids-limit")}
    if "blkio-weight" in flags:
        res["blockIO"] = {"weight": _int(str(flags["blkio-weight"]), "blkio-weight")}
    return res


def update(store: StateStore, cid: str, flags: dict) -> None:
    st = store.load(cid)
    if status(store, st) == "stopped":
        raise IsoboxError("container not running")
    src = flags.get("resources")
    if src:
        try:
            text = sys.stdin.read() if src == "-" else open(str(src)).read()
            res = json.loads(text)
        except OSError as e:
            raise IsoboxError(f"--resources {src}: {e.strerror}") from None
        except ValueError as e:
            raise IsoboxError(f"--resources {src} is not valid JSON: {e}") from None
        if not isinstance(res, dict):
            raise IsoboxError("--resources must hold one OCI linux.resources object")
    else:
        res = resources_from_flags(flags)
        if not res:
            raise IsoboxError("update needs --resources FILE (or -) or at least one limit flag")
    if "devices" in res:    # clamped to the policy in force, as on create
        from isobox.cgroups.devices import allowed
        from isobox.policy import model
        _cg_call(cgroup_of(st).update, res, allowed(model.load().device_map()))
    else:
        _cg_call(cgroup_of(st).update, res)
    # keep the stored spec in step, so a later reader sees the limits in force
    config = store.load_config(st.id)
    merged = config.setdefault("linux", {}).setdefault("resources", {})
    for key, val in res.items():
        if isinstance(val, dict) and isinstance(merged.get(key), dict):
            merged[key].update(val)
        else:
            merged[key] = val
    store.save_config(st.id, config)


def events(store: StateStore, cid: str, stats_once: bool, interval: str) -> None:
    st = store.load(cid)
    if status(store, st) == "stopped":
        raise IsoboxError("container not running")
    cg = cgroup_of(st)
    period = _duration(interval)
    while True:
        sys.stdout.write(json.dumps({"type": "stats", "id": st.id, "data": _cg_call(cg.stats)}) + "\n")
        sys.stdout.flush()
        if stats_once:
            return
        time.sleep(period)
        if status(store, st) == "stopped":
            return


def _duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text or "5s")
    if not m:
        raise IsoboxError(f"--interval {text!r}: use a duration like 5s or 500ms")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[m.group(2)]


def dispatch(store: StateStore, p, log) -> int:
    cmd, f, a = p.command, p.flags, p.args
    if cmd == "ps":
        ps(store, a[0], str(f.get("format") or "table"), a[1:])
    elif cmd == "pause":
        pause(store, a[0])
    elif cmd == "resume":
        resume(store, a[0])
    elif cmd == "update":
        update(store, a[0], f)
    elif cmd == "events":
        events(store, a[0], bool(f.get("stats")), str(f.get("interval") or "5s"))
    return 0

