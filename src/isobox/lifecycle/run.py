"""run: create + start + wait in the foreground, forwarding signals, then delete."""
from __future__ import annotations

import os

from isobox.lifecycle import control, foreground
from isobox.lifecycle.create import create
from isobox.lifecycle.state import StateStore
from isobox.linux import syscalls as k


def _wants_terminal(bundle: str) -> bool:
    from isobox import jsonfast as json
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
        foreground.hold_signals()
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
    code = foreground.follow(st.pid, master)
    if not keep:
        control.delete(store, cid, force=True, log=log)
    return code

