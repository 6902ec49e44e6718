"""Messages between the runtime and the processes it forks: one SOCK_SEQPACKET datagram per
step ("ok", "err:<one line>", or a payload with a file descriptor attached).

Uses the _socket extension directly: the socket.py wrapper pulls in enum and selectors,
about 10 ms of import time on every container start, for two helpers written here. File
descriptors are packed by hand too: `array` imports collections (~4 ms)."""
from __future__ import annotations

import _socket
import sys

from isobox.errors import IsoboxError

_SCM_RIGHTS = _socket.SCM_RIGHTS
_SOL_SOCKET = _socket.SOL_SOCKET


def pair() -> tuple[_socket.socket, _socket.socket]:
    return _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)


def pack_fds(fds: list[int]) -> bytes:
    """An SCM_RIGHTS payload: C ints in native order."""
    return b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)


def unpack_fds(payload: bytes) -> list[int]:
    return [int.from_bytes(payload[i:i + 4], sys.byteorder, signed=True) for i in range(0, len(payload) - 3, 4)]


def received_fds(ancdata) -> list[int]:
    """The fds of recvmsg's SCM_RIGHTS ancillary data."""
    return [fd for level, kind, payload in ancdata if level == _SOL_SOCKET and kind == _SCM_RIGHTS
            for fd in unpack_fds(payload)]


def rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """sendmsg's ancillary data passing fds (none for an empty list)."""
    return [(_SOL_SOCKET, _SCM_RIGHTS, pack_fds(fds))] if fds else []


def send(sock: _socket.socket, msg: str, fds: list[int] | None = None) -> None:
    sock.sendmsg([msg.encode()], rights(fds or []))


def recv(sock: _socket.socket, what: str) -> tuple[str, list[int]]:
    """Next message; an "err:" message or a closed peer becomes an IsoboxError."""
    data, anc, _, _ = sock.recvmsg(4096, _socket.CMSG_LEN(4 * 4))
    fds = received_fds(anc)
    msg = data.decode(errors="replace")
    if not data:
        raise IsoboxError(f"{what} exited before finishing the container set-up")
    if msg.startswith("err:"):
        raise IsoboxError(msg[4:])
    return msg, fds


def connect_unix(path: str, what: str) -> _socket.socket:
    """A stream connection to a host socket (an engine's console socket, a seccomp listener)."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except OSError as e:
        s.close()
        raise IsoboxError(f"cannot connect to {what} {path}: {e.strerror}") from None
    return s


def error_line(exc: BaseException) -> str:
    if isinstance(exc, IsoboxError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return f"{type(exc).__name__}: {exc}"
