"""`isobox-runc`: runc's command line over isobox's lifecycle. Parsing and output only."""
from __future__ import annotations

from isobox import jsonfast as json  # json without its import cost (see jsonfast)
import os
import sys

from isobox import __version__
from isobox.errors import IsoboxError
from isobox.runc import args as argparse_runc
from isobox.runc.log import Log

SPEC_VERSION = "1.2.0"


def _commit() -> str:
    return os.environ.get("ISOBOX_COMMIT", "") or "release"


def _version() -> str:
    return f"isobox-runc version {__version__}\ncommit: {_commit()}\nspec: {SPEC_VERSION}\n"


def _list(store, flags) -> None:
    from isobox.lifecycle.state import oci_state
    states = []
    for cid in store.ids():
        try:
            states.append(oci_state(store, store.load(cid)))
        except IsoboxError:
            continue
    fmt = flags.get("format", "table")
    if flags.get("quiet"):
        sys.stdout.write("".join(s["id"] + "\n" for s in states))
    elif fmt == "json":
        sys.stdout.write(json.dumps(states) + "\n")
    elif fmt == "table":
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [(s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"]) for s in states]
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        for r in rows:
            sys.stdout.write("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
    else:
        raise IsoboxError(f"invalid format option {fmt!r}: use table or json")


def _spec(flags) -> None:
    from isobox.runc.spec_template import template
    if flags.get("rootless"):
        raise IsoboxError("isobox always runs containers in their own user namespace; --rootless is not needed")
    path = os.path.join(str(flags.get("bundle") or "."), "config.json")
    if os.path.exists(path):
        raise IsoboxError(f"file {path} exists; remove it first")
    with open(path, "w") as f:
        json.dump(template(), f, indent="\t")


def preserve_fds(flags) -> int:
    raw = str(flags.get("preserve-fds") or "0")
    if not raw.isdigit():
        raise IsoboxError(f"--preserve-fds {raw!r} must be a number of file descriptors")
    n = int(raw)
    for fd in range(3, 3 + n):
        try:
            os.fstat(fd)
        except OSError:
            raise IsoboxError(f"--preserve-fds {n}: file descriptor {fd} is not open") from None
    return n


def dispatch(p, log: Log) -> int:
    from isobox.lifecycle.state import DEFAULT_ROOT, StateStore
    g = p.globals
    if g.get("systemd-cgroup"):
        raise IsoboxError("--systemd-cgroup is not supported: isobox uses the cgroupfs driver "
                          "(set SystemdCgroup=false in containerd and cgroupDriver: cgroupfs in the kubelet)")
    if str(g.get("rootless", "auto")).lower() == "true":
        raise IsoboxError("--rootless=true is not supported: isobox runs as root and puts every container "
                          "in its own user namespace")
    store = StateStore(str(g.get("root") or DEFAULT_ROOT))
    cmd, f, a = p.command, p.flags, p.args
    if cmd in ("create", "run"):
        if f.get("no-pivot"):
            raise IsoboxError("--no-pivot is refused: without pivot_root the host's root stays reachable "
                              "from the container")
        console_socket = str(f["console-socket"]) if f.get("console-socket") else None
        preserve = preserve_fds(f)
        bundle = str(f.get("bundle") or os.getcwd())
        pid_file = str(f["pid-file"]) if f.get("pid-file") else None
        if cmd == "create":
            from isobox.lifecycle.create import create
            create(store, a[0], bundle, pid_file, log, console_socket=console_socket, preserve_fds=preserve)
            return 0
        from isobox.lifecycle.run import run
        return run(store, a[0], bundle, pid_file, bool(f.get("detach")), bool(f.get("keep")), log,
                   console_socket=console_socket, preserve_fds=preserve)
    if cmd == "start":
        from isobox.lifecycle.control import start
        start(store, a[0], log)
        return 0
    if cmd == "state":
        from isobox.lifecycle.state import oci_state
        sys.stdout.write(json.dumps(oci_state(store, store.load(a[0])), indent="  ") + "\n")
        return 0
    if cmd == "list":
        _list(store, f)
        return 0
    if cmd == "kill":
        from isobox.lifecycle.control import kill, parse_signal
        sig = parse_signal(a[1] if len(a) > 1 else "TERM")
        kill(store, a[0], sig, bool(f.get("all")))
        return 0
    if cmd == "delete":
        from isobox.lifecycle.control import delete
        delete(store, a[0], bool(f.get("force")), log=log)
        return 0
    if cmd == "spec":
        _spec(f)
        return 0
    if cmd in ("checkpoint", "restore"):
        raise IsoboxError(f"{cmd} is not supported: isobox has no CRIU integration "
                          "(containers in their own user namespace cannot be checkpointed by it yet)")
    if cmd == "exec":
        from isobox.runc.exec_cmd import exec_command
        return exec_command(store, p, log)
    if cmd in ("ps", "pause", "resume", "update", "events"):
        from isobox.runc import manage_cmd
        return manage_cmd.dispatch(store, p, log)
    if cmd == "features":
        from isobox.runc.features import features
        sys.stdout.write(json.dumps(features(), indent="    ") + "\n")
        return 0
    raise IsoboxError(f"unknown command {cmd!r}")


def _record(path: str, argv: list[str]) -> None:
    """Append this call's argv as one JSON line: the end-to-end suite records what the
    engines really call, to check each (command, flag set) has a test of its own."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # a call served by isoboxd's warm worker names the engine's process, not the worker
            ppid = int(os.environ.get("ISOBOX_CALLER_PPID") or os.getppid())
            os.write(fd, (json.dumps({"argv": argv, "ppid": ppid}) + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    trace = os.environ.get("ISOBOX_ARGV_LOG")
    if trace:
        _record(trace, argv)
    log = Log(None)
    try:
        p = argparse_runc.parse(argv)
        g = p.globals
        fmt = str(g.get("log-format") or "text")
        if fmt not in ("text", "json"):
            raise IsoboxError(f"invalid log-format {fmt!r}: use text or json")
        log = Log(str(g["log"]) if g.get("log") else None, fmt, bool(g.get("debug")))
        if os.environ.get("ISOBOX_WARM_WORKER"):
            log.debug(f"served by isoboxd's warm worker (pid {os.getpid()})")
        if g.get("version"):
            sys.stdout.write(_version())
            return 0
        if g.get("help") or not p.command:
            sys.stdout.write("usage: isobox-runc [global flags] create|start|run|state|list|kill|delete|spec|"
                             "features [flags] [id]\n")
            return 0 if g.get("help") else 1
        return dispatch(p, log)
    except IsoboxError as e:
        log.error(str(e))
        sys.stderr.write(f"isobox-runc: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - never a traceback for the engine to parse
        msg = f"internal error: {type(e).__name__}: {e} (rerun with --debug and report it)"
        log.error(msg)
        sys.stderr.write(f"isobox-runc: {msg}\n")
        if log.debug_on:
            import traceback
            traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
