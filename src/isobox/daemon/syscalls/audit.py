"""The audit log: one JSON line per refusal and per action isoboxd took for a container
(time, container, pid, command, syscall, decoded arguments, decision, reason), read by
`isobox events`. Appended with O_APPEND single writes, so lines never interleave.

Buffered: the notify loop only appends a tuple per call and writes the batch when it has
nothing else to do (or every FLUSH_EVERY seconds under load), so formatting and writing never
sit between two callers. Identical events in one batch (same container, pid, syscall,
arguments and verdict) become one line with a "count": a container that loops on a refused
call cannot grow the log by a line per call."""
from __future__ import annotations

import json
import os
import threading
import time

from isobox.daemon import paths
from isobox.daemon.syscalls.call import Call, Verdict

FLUSH_EVERY = 0.2            # seconds an event may wait in the buffer while the loop is busy
FLUSH_AT = 2048              # events: a batch this large is written at once
COMM_TTL = 1.0               # seconds a pid's command name is reused
DECISIONS = {"error": "refused", "value": "performed", "answered": "performed", "continue": "allowed"}


def _read_comm(pid: int) -> str:
    try:
        fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return os.read(fd, 64).decode(errors="replace").strip()
    except OSError:
        return ""         # ESRCH: the caller exited right after its answer (seen in a CI run)
    finally:
        os.close(fd)


def entry(when: float, container: str, pid: int, comm: str, call_name: str, detail: dict, v: Verdict) -> dict:
    e = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when * 1000) % 1000:03d}Z",
        "container": container, "pid": pid, "command": comm, "syscall": call_name, "args": detail,
        "decision": DECISIONS[v.kind], "reason": v.reason,
    }
    if v.kind == "error":
        e["errno"] = os.strerror(v.errno)
    return e


def _same_key(detail: dict) -> tuple | None:
    try:
        key = tuple(detail.items())
        hash(key)
        return key
    except TypeError:
        return None          # an unhashable argument: never merged


class Audit:
    def __init__(self, path: str = paths.AUDIT_LOG):
        self.path = path
        self.lock = threading.Lock()
        self.pending: list[tuple] = []
        self.oldest = 0.0
        self.comms: dict[int, tuple[float, str]] = {}
        self.fd = -1

    def add(self, call: Call, v: Verdict) -> None:
        """Buffers one event (microseconds); the command name is read now (the caller may
        already have exited: then it is empty) and reused for COMM_TTL per pid."""
        now = time.time()
        hit = self.comms.get(call.pid)
        if hit is None or now - hit[0] > COMM_TTL:
            if len(self.comms) > 4096:
                self.comms.clear()
            hit = self.comms[call.pid] = (now, _read_comm(call.pid))
        with self.lock:
            if not self.pending:
                self.oldest = now
            self.pending.append((now, call.container.id if call.container else "", call.pid, hit[1], call.name,
                                 call.detail, v))
            due = len(self.pending) >= FLUSH_AT or now - self.oldest > FLUSH_EVERY
        if due:
            self.flush()

    def write(self, call: Call, v: Verdict) -> None:
        """One event, written at once (the pool's slow handlers: they are not in a hurry)."""
        self.add(call, v)
        self.flush()

    def has_pending(self) -> bool:
        return bool(self.pending)

    def flush(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
        if not batch:
            return
        lines: list[str] = []
        merged: dict[tuple, dict] = {}
        for when, cid, pid, comm, name, detail, v in batch:
            dk = _same_key(detail)
            key = None if dk is None else (cid, pid, name, dk, v.kind, v.errno, v.reason)
            if key is not None and key in merged:
                merged[key]["count"] = merged[key].get("count", 1) + 1
                continue
            e = entry(when, cid, pid, comm, name, detail, v)
            if key is not None:
                merged[key] = e
            lines.append(e)
        data = "".join(json.dumps(e) + "\n" for e in lines).encode()
        with self.lock:
            if self.fd < 0:
                os.makedirs(os.path.dirname(self.path), mode=0o750, exist_ok=True)
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            os.write(self.fd, data)
