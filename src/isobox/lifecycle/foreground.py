"""A process the runtime waits for in the foreground (`run`, `exec` without --detach):
the signals it forwards, how it waits, and how an exit status becomes the exit code."""
from __future__ import annotations

import os
import signal

FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
           signal.SIGWINCH)


def hold_signals() -> None:
    """Block the forwarded signals until follow() has its handlers in place: one arriving
    earlier would kill the runtime and orphan the process. (The container side clears its
    mask before exec.)"""
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARD)


def follow(pid: int, master: int | None = None) -> int:
    """Forward signals to pid and wait for it (relaying its pty when master is given)."""
    for sig in FORWARD:
        signal.signal(sig, lambda s, _f: forward(pid, s))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARD)
    if master is not None:
        from isobox.lifecycle import relay
        return relay.relay(master, pid)
    return wait(pid)


def forward(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def exit_code(status: int) -> int:
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def wait(pid: int) -> int:
    while True:
        try:
            wpid, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            return 255
        if wpid == pid:
            return exit_code(status)
