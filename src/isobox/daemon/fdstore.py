"""The holder's store of seccomp listener fds, and the channel that lends them to the server.

Containers hand their listener in at TRAP_SOCKET (the holder owns it, so it keeps working
while a server restarts). The holder keeps every listener and sends a copy to the current
server over a SOCK_SEQPACKET pair; a new server gets all of them again. A listener is
forgotten when the server reports that every task using it exited (its fd hung up).

Who may hand in a listener: host root only. The socket is 0600 in root's 0700 RUN_DIR, and
the peer's SO_PEERCRED uid must be 0: a container's init and exec's process connect just
before they change credentials, while they are still host uid 0 (seccomp.Installer.early).
The holder also records the sender's pid (SCM_CREDENTIALS, stamped by the kernel), and the
server accepts the listener only if that pid belongs to the registered container it names.

Cost per connection: one fd, never a thread (connloop.ConnLoop): at most MAX_CONNS, each
dropped when it has not delivered its listener within IDLE seconds."""
from __future__ import annotations

import array
import json
import logging
import os
import socket
import struct
import threading
import time

from isobox.daemon.connloop import Conn, ConnLoop

log = logging.getLogger("isoboxd")
MAX_MSG = 64 * 1024
IDLE = 2.0           # a legitimate client sends within milliseconds of connecting
MAX_CONNS = 512      # more evict the oldest; a flood costs fds, not threads
LISTENER_LINK = "anon_inode:seccomp notify"      # /proc/self/fd/N of a seccomp listener


def recv_fd(sock: socket.socket) -> tuple[bytes, int | None, int]:
    """(message, its one fd or None, the sender's pid when SO_PASSCRED is on, else 0)."""
    fds = array.array("i")
    msg, anc, _flags, _addr = sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(fds.itemsize) + socket.CMSG_SPACE(12))
    fd, pid = None, 0
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(data[: len(data) - (len(data) % got.itemsize)])
            for extra in got[1:]:
                os.close(extra)          # one listener per message; never leak the rest
            fd = got[0] if got else None
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= 12:
            pid = struct.unpack_from("i", data)[0]
    return msg, fd, pid


def send_fd(sock: socket.socket, msg: bytes, fd: int) -> None:
    sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


class FdStore:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fds: dict[str, tuple[int, dict]] = {}
        self.channel: socket.socket | None = None
        self.counter = 0

    def put(self, meta: dict, fd: int) -> None:
        with self.lock:
            self.counter += 1
            slot = f"{meta.get('key', '')}#{self.counter}"
            meta["slot"] = slot
            self.fds[slot] = (fd, meta)
            self._forward(slot)

    def drop(self, slot: str) -> None:
        with self.lock:
            entry = self.fds.pop(slot, None)
        if entry is not None:
            os.close(entry[0])

    def attach(self, channel: socket.socket) -> None:
        """A new server: it gets every listener kept so far."""
        with self.lock:
            self.channel = channel
            for slot in list(self.fds):
                self._forward(slot)

    def _forward(self, slot: str) -> None:
        if self.channel is None:
            return
        fd, meta = self.fds[slot]
        try:
            send_fd(self.channel, json.dumps(meta).encode(), fd)
        except OSError as e:
            log.warning("cannot lend listener %s to the server: %s", slot, e)

    # -- threads --
    def serve_trap(self, path: str) -> None:
        """Accepts listeners from containers (one message with one fd per connection); never
        returns (a socket that cannot be bound is retried)."""
        while True:
            try:
                listener = bind_private(path, socket.SOCK_STREAM, passcred=True)
                ConnLoop(listener, _read_listener, self._take, name="trap socket", cap=MAX_CONNS,
                         idle=IDLE).serve_forever()
            except Exception:  # noqa: BLE001 - the trap socket must come back
                log.exception("trap socket: cannot serve %s, retrying", path)
                time.sleep(1)

    def _take(self, conn: Conn) -> None:
        msg, fd, pid = conn.request      # type: ignore[misc]
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != LISTENER_LINK:
                raise ValueError("not a seccomp listener")
            meta = json.loads(msg)
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as e:
            log.warning("trap socket: refusing a message from pid %d: %s", conn.peer[0], e)
            os.close(fd)
            return
        meta["peer"] = pid
        self.put(meta, fd)

    def serve_channel(self, channel: socket.socket) -> None:
        """Reads "drop <slot>" from one server generation until it goes away."""
        while True:
            try:
                msg = channel.recv(4096)
            except OSError:
                return
            if not msg:
                return
            if msg.startswith(b"drop "):
                self.drop(msg[5:].decode())


def _read_listener(conn: Conn) -> bool:
    """One message with one fd, or the connection is dropped (EOF, no fd, a truncated message)."""
    msg, fd, pid = recv_fd(conn.sock)
    if fd is None:
        raise EOFError("no listener")
    conn.request = (msg, fd, pid)
    return True


def bind_private(path: str, kind: int, passcred: bool = False) -> socket.socket:
    """A listening unix socket at path that only root may connect to: bound under umask 077
    (the mode never depends on the caller's umask) at a temporary name, then renamed, so
    clients never see a socket nobody listens on."""
    tmp = f"{path}.{os.getpid()}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o077)
        try:
            srv.bind(tmp)
        finally:
            os.umask(old)
        os.chmod(tmp, 0o600)
        if passcred:
            # the kernel stamps each message with its sender's pid (accepted sockets inherit this)
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        srv.listen(128)
        os.rename(tmp, path)
    except BaseException:
        srv.close()
        raise
    return srv
