"""Messages between the runtime and the processes it forks: one SOCK_SEQPACKET datagram per
step ("ok", "err:<one line>", or a payload with a file descriptor attached)."""
from __future__ import annotations

import socket

from isobox.errors import IsoboxError


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, msg: str, fds: list[int] | None = None) -> None:
    if fds:
        socket.send_fds(sock, [msg.encode()], fds)
    else:
        sock.send(msg.encode())


def recv(sock: socket.socket, what: str) -> tuple[str, list[int]]:
    """Next message; an "err:" message or a closed peer becomes an IsoboxError."""
    data, fds, _, _ = socket.recv_fds(sock, 4096, 4)
    msg = data.decode(errors="replace")
    if not data:
        raise IsoboxError(f"{what} exited before finishing the container set-up")
    if msg.startswith("err:"):
        raise IsoboxError(msg[4:])
    return msg, fds


def error_line(exc: BaseException) -> str:
    if isinstance(exc, IsoboxError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return f"{type(exc).__name__}: {exc}"
