"""The audit log: one JSON line per refusal and per action isoboxd took for a container
(time, container, pid, command, syscall, decoded arguments, decision, reason), read by
`isobox events`. Appended with O_APPEND single writes, so lines never interleave."""
from __future__ import annotations

import json
import os
import threading
import time

from isobox.daemon import paths
from isobox.daemon.syscalls.call import Call, Verdict

_lock = threading.Lock()
_fd: list[int] = []


def _comm(pid: int) -> str:
    try:
        fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return os.read(fd, 64).decode(errors="replace").strip()
    finally:
        os.close(fd)


def record(call: Call, v: Verdict) -> dict:
    decision = {"error": "refused", "value": "performed", "answered": "performed", "continue": "allowed"}[v.kind]
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
        "container": call.container.id if call.container else "",
        "pid": call.pid, "command": _comm(call.pid), "syscall": call.name, "args": call.detail,
        "decision": decision, "reason": v.reason,
    }
    if v.kind == "error":
        entry["errno"] = os.strerror(v.errno)
    return entry


def write(call: Call, v: Verdict, path: str = paths.AUDIT_LOG) -> None:
    line = (json.dumps(record(call, v)) + "\n").encode()
    with _lock:
        if not _fd:
            os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
            _fd.append(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640))
        os.write(_fd[0], line)
