"""`isobox events [--follow] [--json] [CONTAINER]`: what isoboxd refused or did, and why."""
from __future__ import annotations

import json
import os
import sys
import time

from isobox.daemon import paths
from isobox.errors import IsoboxError

POLL = 0.2


def events(argv: list[str], path: str = paths.AUDIT_LOG) -> int:
    follow = "--follow" in argv or "-f" in argv
    raw = "--json" in argv
    rest = [a for a in argv if a not in ("--follow", "-f", "--json")]
    if any(a.startswith("-") for a in rest) or len(rest) > 1:
        raise IsoboxError("usage: isobox events [--follow] [--json] [CONTAINER]")
    want = rest[0] if rest else ""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        if not follow:
            print(f"isobox: no events yet ({path} does not exist)", file=sys.stderr)
            return 0
        while not os.path.exists(path):
            time.sleep(POLL)
        f = open(path, "rb")
    with f:
        while True:
            line = f.readline()
            if not line:
                if not follow:
                    return 0
                time.sleep(POLL)
                continue
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if want and not str(e.get("container", "")).startswith(want):
                continue
            sys.stdout.write(line.decode() if raw else format_event(e) + "\n")
            sys.stdout.flush()


def format_event(e: dict) -> str:
    args = ", ".join(f"{k}={v}" for k, v in (e.get("args") or {}).items())
    err = f" ({e['errno']})" if e.get("errno") else ""
    return (f"{e.get('time', '')}  {e.get('container', '') or '-'}  pid {e.get('pid')} {e.get('command', '')}  "
            f"{e.get('syscall')}({args})  {e.get('decision')}{err}: {e.get('reason', '')}"
            + (f"  (x{e['count']})" if e.get("count", 1) > 1 else ""))
