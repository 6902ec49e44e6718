"""`isobox gate --listen SOCKET --engine SOCKET [--policy FILE] [--mode MODE] [--group GROUP] [--owner USER]`:
the Docker API gate in the foreground (for service managers and tests)."""
from __future__ import annotations

import argparse
import grp
import os
import signal
import socket
import stat
from dataclasses import dataclass

from isobox.errors import IsoboxError


@dataclass
class Perms:
    uid: int
    gid: int
    mode: int


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="isobox gate", add_help=True)
    p.add_argument("--listen", required=True, help="the socket docker clients connect to")
    p.add_argument("--engine", required=True, help="dockerd's own socket")
    p.add_argument("--policy", help="policy file (default: /etc/isobox/policy.toml)")
    p.add_argument("--mode", help="octal mode of the listen socket (default: the socket it replaces, "
                                  "else the engine's)")
    p.add_argument("--group", help="group of the listen socket (name or GID; default as for --mode)")
    p.add_argument("--owner", help="owner of the listen socket (name or UID; default as for --mode): "
                                   "isobox install --gate passes the replaced socket's owner")
    try:
        return p.parse_args(argv)
    except SystemExit as e:
        raise IsoboxError("usage: isobox gate --listen SOCKET --engine SOCKET [--policy FILE] "
                          "[--mode MODE] [--group GROUP] [--owner USER]") if e.code else e


def _alive(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def _socket_stat(path: str) -> os.stat_result | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st if stat.S_ISSOCK(st.st_mode) else None


def _perms(args: argparse.Namespace) -> Perms:
    """Clients must see the same access as before: copy the socket --listen replaces (dockerd's
    old root:docker 0660), else the engine socket's; --mode/--group override."""
    ref = _socket_stat(args.listen) or _socket_stat(args.engine)
    uid = ref.st_uid if ref else 0
    gid = ref.st_gid if ref else 0
    mode = stat.S_IMODE(ref.st_mode) if ref else 0o660
    if args.group is not None:
        try:
            gid = int(args.group) if args.group.isdigit() else grp.getgrnam(args.group).gr_gid
        except KeyError:
            raise IsoboxError(f"--group {args.group!r}: no such group") from None
    if args.owner is not None:
        import pwd
        try:
            uid = int(args.owner) if args.owner.isdigit() else pwd.getpwnam(args.owner).pw_uid
        except KeyError:
            raise IsoboxError(f"--owner {args.owner!r}: no such user") from None
    if args.mode is not None:
        try:
            mode = int(args.mode, 8)
        except ValueError:
            raise IsoboxError(f"--mode {args.mode!r} is not an octal mode") from None
    return Perms(uid, gid, mode)


def _listen(path: str, perms: Perms) -> socket.socket:
    if os.path.lexists(path):
        if _socket_stat(path) is None:
            raise IsoboxError(f"--listen {path}: exists and is not a socket")
        if _alive(path):
            raise IsoboxError(f"--listen {path}: something already serves it")
        os.unlink(path)                           # a stale socket (dockerd's, or ours from a crash)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)                         # born 0600: no moment with broader access
    try:
        s.bind(path)
    finally:
        os.umask(old)
    os.chown(path, perms.uid, perms.gid)
    os.chmod(path, perms.mode)
    s.listen(512)
    return s


def _remove_ours(path: str, ino: int) -> None:
    st = _socket_stat(path)
    if st is not None and st.st_ino == ino:       # never someone else's socket put there since
        os.unlink(path)


def _load_policy(path: str | None) -> str:
    from isobox.policy.model import ENV, load, policy_path
    if path:
        os.environ[ENV] = os.path.abspath(path)  # the rules read the policy as the runtime does
    chosen = policy_path()
    load(chosen)                                  # refuse to start on a policy the runtime would refuse
    return chosen


def _stop(signum: int, frame) -> None:
    raise KeyboardInterrupt


def gate(argv: list[str]) -> int:
    args = _parse(argv)
    policy = _load_policy(args.policy)
    from isobox.gate.proxy import Gate, Rules, log
    rules = Rules(args.engine, policy)
    perms = _perms(args)
    listener = _listen(args.listen, perms)
    ino = os.stat(args.listen).st_ino
    # the socket it serves is an engine socket too: only [gate] socket_images may bind it
    rules.module.LISTEN_SOCKET = os.path.abspath(args.listen)
    signal.signal(signal.SIGTERM, _stop)
    state = _record(args.listen, args.engine, log)
    log(f"serving {args.listen} (mode {perms.mode:o}, gid {perms.gid}) for {args.engine}, policy {policy}")
    try:
        Gate(listener, args.engine, rules).serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
        if state:
            from isobox.policy.gatesock import forget
            forget(state)
        _remove_ours(args.listen, ino)
    return 0


def _record(listen: str, engine: str, log) -> str | None:
    """Tell isobox-runc this socket is the gate's (policy/gatesock.py): without the record the
    runtime's deny list refuses every bind of it, [gate] socket_images or not."""
    from isobox.policy.gatesock import record
    try:
        return record(listen, engine)
    except OSError as e:
        log(f"cannot record the gate for isobox-runc ({e}): containers cannot bind {listen}")
        return None
