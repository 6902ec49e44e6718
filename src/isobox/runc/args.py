"""A small runc-compatible argument parser.

Hand-written instead of argparse on purpose: engines call the runtime many times per
container, argparse costs import time, and on a bad flag it prints a usage dump and exits 2,
where isobox promises one line saying what is wrong. Flags accept runc's (urfave/cli) forms:
-flag, --flag, --flag=value and --flag value.
"""
from __future__ import annotations


from isobox.errors import IsoboxError

# name -> False (a switch), True (one value) or MULTI (repeatable, collected in a list);
# aliases map to the canonical name
MULTI = "multi"
GLOBAL = {"root": True, "log": True, "log-format": True, "debug": False, "systemd-cgroup": False,
          "criu": True, "rootless": True, "help": False, "version": False}
GLOBAL_ALIASES = {"h": "help", "v": "version"}

_UPDATE_FLAGS = {name: True for name in (
    "resources", "blkio-weight", "cpu-period", "cpu-quota", "cpu-rt-period", "cpu-rt-runtime", "cpu-share",
    "cpuset-cpus", "cpuset-mems", "kernel-memory", "kernel-memory-tcp", "memory", "memory-reservation",
    "memory-swap", "pids-limit", "l3-cache-schema", "mem-bw-schema")}

COMMANDS: dict[str, tuple[dict[str, object], dict[str, str], int]] = {
    # command: (flags, aliases, positional args: n exactly, -2 = id and an optional signal,
    #           -3 = id then anything, -4 = anything)
    "create": ({"bundle": True, "pid-file": True, "console-socket": True, "no-pivot": False,
                "no-new-keyring": False, "preserve-fds": True}, {"b": "bundle"}, 1),
    "run": ({"bundle": True, "pid-file": True, "console-socket": True, "no-pivot": False, "no-new-keyring": False,
             "preserve-fds": True, "detach": False, "keep": False, "no-subreaper": False},
            {"b": "bundle", "d": "detach"}, 1),
    "start": ({}, {}, 1),
    "state": ({}, {}, 1),
    "list": ({"format": True, "quiet": False}, {"f": "format", "q": "quiet"}, 0),
    "kill": ({"all": False}, {"a": "all"}, -2),
    "delete": ({"force": False}, {"f": "force"}, 1),
    "spec": ({"bundle": True, "rootless": False}, {"b": "bundle"}, 0),
    "features": ({}, {}, 0),
    "exec": ({"console-socket": True, "cwd": True, "env": MULTI, "tty": False, "user": True,
              "additional-gids": MULTI, "process": True, "detach": False, "pid-file": True, "process-label": True,
              "apparmor": True, "no-new-privs": False, "cap": MULTI, "preserve-fds": True, "cgroup": MULTI,
              "ignore-paused": False}, {"e": "env", "t": "tty", "u": "user", "g": "additional-gids",
                                        "p": "process", "d": "detach", "c": "cap"}, -3),
    "ps": ({"format": True}, {"f": "format"}, -3),
    "pause": ({}, {}, 1),
    "resume": ({}, {}, 1),
    "update": (_UPDATE_FLAGS, {"r": "resources"}, 1),
    "events": ({"interval": True, "stats": False}, {}, 1),
    "checkpoint": ({}, {}, -4),
    "restore": ({}, {}, -4),
}
# flags end at the first positional argument: what follows is the command to run
STOP_AT_FIRST_ARG = {"exec", "ps"}


class Parsed:
    """The parsed command line (a plain class: see lifecycle.state.ContainerState)."""
    __slots__ = ("globals", "command", "flags", "args")

    def __init__(self) -> None:
        self.globals: dict[str, str | bool] = {}
        self.command = ""
        self.flags: dict[str, str | bool] = {}
        self.args: list[str] = []


def _take(argv: list[str], i: int, table: dict[str, object], aliases: dict[str, str], where: str,
          out: dict[str, str | bool]) -> int:
    arg = argv[i]
    name, eq, value = arg.lstrip("-").partition("=")
    name = aliases.get(name, name)
    if name not in table:
        raise IsoboxError(f"unknown flag {arg.split('=')[0]} for {where}")
    if table[name]:
        if not eq:
            if i + 1 >= len(argv):
                raise IsoboxError(f"flag --{name} of {where} needs a value")
            i += 1
            value = argv[i]
        if table[name] == MULTI:
            out.setdefault(name, []).append(value)  # type: ignore[union-attr]
        else:
            out[name] = value
    else:
        if eq and value.lower() not in ("true", "false", "1", "0"):
            raise IsoboxError(f"flag --{name} of {where} takes no value")
        out[name] = not eq or value.lower() in ("true", "1")
    return i + 1


def parse(argv: list[str]) -> Parsed:
    p = Parsed()
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        i = _take(argv, i, GLOBAL, GLOBAL_ALIASES, "isobox-runc", p.globals)
    if i >= len(argv):
        return p
    p.command = argv[i]
    if p.command not in COMMANDS:
        raise IsoboxError(f"unknown command {p.command!r} (isobox-runc supports: {', '.join(COMMANDS)})")
    flags, aliases, npos = COMMANDS[p.command]
    i += 1
    if p.command in ("checkpoint", "restore"):
        p.args = argv[i:]        # declared unsupported: its flags are not worth a separate error
        return p
    while i < len(argv):
        a = argv[i]
        if a == "--":
            p.args += argv[i + 1:]
            break
        if a.startswith("-") and len(a) > 1 and not (p.command == "kill" and p.args and _is_signal(a)):
            # runc's global flags may also follow the command
            name = a.lstrip("-").partition("=")[0]
            if name not in flags and name not in aliases and (name in GLOBAL or name in GLOBAL_ALIASES):
                i = _take(argv, i, GLOBAL, GLOBAL_ALIASES, "isobox-runc", p.globals)
            else:
                i = _take(argv, i, flags, aliases, p.command, p.flags)
        else:
            p.args.append(a)
            i += 1
            if p.command in STOP_AT_FIRST_ARG:
                p.args += argv[i:]
                break
    if npos == -3 and not p.args:
        raise IsoboxError(f"{p.command} needs a container id")
    if npos == -2:
        if not 1 <= len(p.args) <= 2:
            raise IsoboxError(f"{p.command} needs a container id and an optional signal")
    elif npos >= 0 and len(p.args) != npos:
        if npos == 1 and not p.args:
            raise IsoboxError(f"{p.command} needs a container id")
        raise IsoboxError(f"{p.command} takes {npos} argument(s), got {len(p.args)}")
    return p


def _is_signal(a: str) -> bool:
    return a[1:].isdigit()
