"""Foreground terminals without an engine: `isobox-runc run` or `exec -t` with no console
socket makes its own socket pair, receives the pty master the container made, and copies
bytes between it and its own stdio until the process exits (as runc does)."""
from __future__ import annotations

import _socket
import errno
import os
import select
import signal

from isobox.errors import IsoboxError


def socket_pair() -> tuple[_socket.socket, _socket.socket]:
    return _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)


def receive_master(sock: _socket.socket) -> int:
    from isobox.init.channel import unpack_fds
    fds: list[int] = []
    _, anc, _, _ = sock.recvmsg(4096, _socket.CMSG_LEN(4))
    for level, kind, data in anc:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += unpack_fds(data)
    sock.close()
    if len(fds) != 1:
        raise IsoboxError("the container did not send its terminal")
    return fds[0]


def _copy_winsize(master: int) -> None:
    import fcntl
    import termios
    try:
        size = fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(master, termios.TIOCSWINSZ, size)
    except OSError:
        pass


def relay(master: int, pid: int) -> int:
    """Copy stdin -> master and master -> stdout until pid exits; returns its exit code.
    (SIGWINCH resizes the pty; the kernel passes it on to the foreground process group.)"""
    import termios
    import tty
    saved = None
    if os.isatty(0):
        saved = termios.tcgetattr(0)
        tty.setraw(0)
        _copy_winsize(master)
    signal.signal(signal.SIGWINCH, lambda *_: _copy_winsize(master))
    code = None
    stdin_open = True
    try:
        while True:
            rlist = [master] + ([0] if stdin_open else [])
            try:
                ready, _, _ = select.select(rlist, [], [], 0.1)
            except InterruptedError:
                continue
            if master in ready:
                try:
                    data = os.read(master, 65536)
                except OSError as e:
                    if e.errno != errno.EIO:
                        raise
                    data = b""
                if data:
                    os.write(1, data)
                elif code is not None:
                    break
            if 0 in ready:
                data = os.read(0, 65536)
                if data:
                    os.write(master, data)
                else:
                    stdin_open = False
                    os.write(master, b"\x04")     # EOF for the line discipline
            if code is None:
                code = _reaped(pid)
                if code is not None and master not in ready:
                    break
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        os.close(master)
    return code if code is not None else 255


def _reaped(pid: int) -> int | None:
    while True:
        try:
            wpid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 255
        if wpid == 0:
            return None
        if wpid == pid:
            from isobox.lifecycle.foreground import exit_code
            return exit_code(status)
