"""Terminals: a pty from the container's own devpts, handed over go-runc's way.

The console-socket protocol (go-runc console.go): one stream connection, one message whose
payload is a name, exactly one fd (the pty master) via SCM_RIGHTS. The pty must come from
the container's devpts instance, or `tty` inside names nothing; so the process that makes it
has already entered the container's mount namespace, and the socket was connected by the
runtime beforehand (its path is on the host) and inherited."""
from __future__ import annotations

import _socket
import fcntl
import os
import sys

from isobox.errors import IsoboxError
from isobox.init.channel import rights

TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441
TIOCSCTTY = 0x540E


def check_request(terminal: bool, console_socket: str | None, can_relay: bool) -> None:
    """runc's rules: a tty needs a console socket unless the runtime stays in the foreground
    to relay it; a console socket needs a tty."""
    if terminal and not console_socket and not can_relay:
        raise IsoboxError("cannot allocate tty if runc will detach without setting console socket")
    if not terminal and console_socket:
        raise IsoboxError("cannot use console socket if runc will not detach or allocate tty")


def connect(path: str) -> _socket.socket:
    """Connect to the engine's console socket, before any namespace is entered."""
    from isobox.init.channel import connect_unix
    return connect_unix(path, "console socket")


def open_pty() -> tuple[int, int]:
    """(master, slave) from /dev/ptmx of the current mount namespace."""
    try:
        master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise IsoboxError(f"cannot open /dev/ptmx in the container (is /dev/pts a devpts mount?): "
                          f"{e.strerror}") from None
    fcntl.ioctl(master, TIOCSPTLCK, bytes(4))            # int 0: unlock
    # TIOCGPTPEER opens the peer without a path lookup that a container could redirect
    slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    return master, slave


def pty_name(master: int) -> str:
    buf = bytearray(4)
    fcntl.ioctl(master, TIOCGPTN, buf)
    return f"/dev/pts/{int.from_bytes(buf, sys.byteorder)}"


def send_master(sock: _socket.socket, master: int) -> None:
    name = pty_name(master).encode()
    sock.sendmsg([name], rights([master]))


def make_controlling(slave: int) -> None:
    """New session with the slave as controlling terminal and as stdin/stdout/stderr."""
    os.setsid()
    fcntl.ioctl(slave, TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    if slave > 2:
        os.close(slave)


def setup(sock: _socket.socket) -> None:
    """In the process that will exec the container's program: make the pty, send the master,
    take the slave as the controlling terminal."""
    master, slave = open_pty()
    try:
        send_master(sock, master)
    finally:
        os.close(master)
        sock.close()
    make_controlling(slave)
