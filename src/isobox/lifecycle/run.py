"""run: create + start + wait in the foreground, forwarding signals, then delete."""
from __future__ import annotations

import os
import signal

from isobox.lifecycle import control
from isobox.lifecycle.create import create
from isobox.lifecycle.state import StateStore
from isobox.linux import syscalls as k

_FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
            signal.SIGWINCH)


def _wants_terminal(bundle: str) -> bool:
    import json
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            return bool(json.load(f).get("process", {}).get("terminal"))
    except (OSError, ValueError, AttributeError):
        return False      # create reports what is wrong with the bundle


def run(store: StateStore, cid: str, bundle: str, pid_file: str | None, detach: bool, keep: bool, log=None,
        console_socket: str | None = None, preserve_fds: int = 0) -> int:
    # The init must become our child even when a helper cloned it, so we can wait for it.
    k.prctl(k.PR_SET_CHILD_SUBREAPER, 1)
    if not detach:
        # Hold the signals we forward until the handlers are in place: one arriving between
        # start and signal.signal() would kill the runtime and orphan a running container.
        # (The container init clears its mask before exec.)
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARD)
    mine = peer = None
    if not console_socket and not detach and _wants_terminal(bundle):
        from isobox.lifecycle import relay
        mine, peer = relay.socket_pair()
    try:
        st = create(store, cid, bundle, pid_file, log, console_socket=console_socket, console_sock=peer,
                    preserve_fds=preserve_fds)
    finally:
        if peer is not None:
            peer.close()
    master = None
    try:
        if mine is not None:
            master = relay.receive_master(mine)
        control.start(store, cid, log)
    except BaseException:
        control.delete(store, cid, force=True, log=log)
        raise
    if detach:
        return 0
    pid = st.pid
    for sig in _FORWARD:
        signal.signal(sig, lambda s, _f: _forward(pid, s))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARD)
    if master is not None:
        code = relay.relay(master, pid, lambda s: _forward(pid, s))
    else:
        code = _wait(pid)
    if not keep:
        control.delete(store, cid, force=True, log=log)
    return code


def _forward(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait(pid: int) -> int:
    while True:
        try:
            wpid, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            return 255
        if wpid == pid:
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.WEXITSTATUS(status)
