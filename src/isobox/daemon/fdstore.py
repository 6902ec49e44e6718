"""The holder's store of seccomp listener fds, and the channel that lends them to the server.

Containers hand their listener in at TRAP_SOCKET (the holder owns it, so it keeps working
while a server restarts). The holder keeps every listener and sends a copy to the current
server over a SOCK_SEQPACKET pair; a new server gets all of them again. A listener is
forgotten when the server reports that every task using it exited (its fd hung up).

Who may hand in a listener: anyone can connect (container processes are unprivileged host
users), so the holder records the sender's pid (SCM_CREDENTIALS, stamped by the kernel) and
the server accepts the listener only if that pid belongs to the registered container it names."""
from __future__ import annotations

import array
import json
import logging
import os
import socket
import struct
import threading

log = logging.getLogger("isoboxd")
MAX_MSG = 64 * 1024


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
        """Accepts listeners from containers (one message with one fd per connection)."""
        tmp = f"{path}.{os.getpid()}"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        srv.bind(tmp)
        os.chmod(tmp, 0o666)         # container processes are unprivileged host users
        # the kernel stamps each message with its sender's pid: the process that loaded the
        # filter, which the connecting pid (SO_PEERCRED) need not be (exec's helper connects)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        os.rename(tmp, path)
        srv.listen(128)
        while True:
            conn, _ = srv.accept()
            # one thread per connection: anyone may connect, and a client that never sends must
            # not hold up the listeners of containers behind it
            threading.Thread(target=self._take, args=(conn,), daemon=True).start()

    def _take(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(5)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                msg, fd, pid = recv_fd(conn)
                if fd is None:
                    return
                try:
                    meta = json.loads(msg)
                    if not isinstance(meta, dict):
                        raise ValueError("not an object")
                except ValueError:
                    os.close(fd)
                    return
                meta["peer"] = pid
                self.put(meta, fd)
            except OSError as e:
                log.warning("trap socket: %s", e)

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
