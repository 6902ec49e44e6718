"""The gate's HTTP/1.1 proxy: a unix socket in front of dockerd's, every request parsed (h11).

Concurrency: one thread per client connection (blocking sockets), not asyncio. The policy
rules are ordinary synchronous code that may itself ask dockerd things (image IDs, which
container holds the engine socket); in an event loop one slow check would stall every other
client, in a thread it stalls only its own connection. The bulk of the work is socket
recv/send, which releases the GIL, so 20 concurrent `docker run`s and any number of idle
long-lived streams (`logs -f`, `events`, attach) cost one mostly-sleeping thread each.

Per connection, in lock-step (the docker CLI never pipelines):
  client --h11 SERVER--> [normalise target, maybe buffer body, rules.check] --h11 CLIENT--> dockerd
  dockerd --h11 CLIENT--> events --h11 SERVER--> client       (framing kept, headers verbatim)
Hijacked requests (attach, exec start) switch to raw bidirectional piping after the response
head, with half-close propagated both ways.
"""
from __future__ import annotations

import json
import re
import select
import socket
import struct
import sys
import threading
from dataclasses import dataclass
from http import HTTPStatus
from typing import Iterable
from urllib.parse import parse_qs, quote, unquote_to_bytes

import h11

from isobox.gate.request import Decision, Peer, Request

RECV_SIZE = 256 * 1024
MAX_HEAD = 1 << 20              # Go's http.DefaultMaxHeaderBytes: dockerd accepts no larger head
MAX_BODY = 16 << 20             # JSON bodies the rules read; nothing legitimate comes close
HIJACK_TYPES = (b"application/vnd.docker.raw-stream", b"application/vnd.docker.multiplexed-stream")

# Without rules.needs_body: the requests whose JSON body can create or change containers.
# /build and archive uploads are excluded: their bodies are tar streams (build policy is in
# the query string) and may be far larger than MAX_BODY.


class BadRequest(Exception):
    """A request the gate refuses before asking the rules (malformed or ambiguous)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Gone(Exception):
    """A peer closed or reset its connection: drop this client connection quietly."""


# ------------------------------------------------------------------ request target
_VERSION = re.compile(r"^/v([0-9.]+)(?=/|$)")      # dockerd's own route prefix: /v{version:[0-9.]+}
_GOOD_VERSION = re.compile(r"^\d+(\.\d+)*$")
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_PATH_SAFE = "/:@!$&'()*+,;=~"


@dataclass
class Target:
    version: str                 # "1.41", "" when absent
    path: str                    # decoded, resolved, without the version prefix
    raw_query: str               # forwarded verbatim
    query: dict[str, list[str]]

    def forward(self) -> bytes:
        """The target sent to dockerd: exactly what the rules saw, re-encoded."""
        out = (f"/v{self.version}" if self.version else "") + quote(self.path, safe=_PATH_SAFE)
        if self.raw_query:
            out += "?" + self.raw_query
        return out.encode("ascii")


def _decode_path(raw: bytes) -> str:
    # dockerd's router matches Go's decoded URL.Path: %2F is a "/" there, so it must be here too.
    if _BAD_PERCENT.search(raw):
        raise BadRequest("malformed percent-encoding in the path")
    try:
        path = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the path is not UTF-8") from None
    if any(c < " " or c == "\x7f" for c in path):
        raise BadRequest("control characters in the path")
    if "%" in path or "?" in path or "#" in path:
        # %25.., %3F, %23: a second decoder (or a proxy behind us) would read another path
        raise BadRequest("an encoded '%', '?' or '#' in the path is ambiguous")
    return path


def _resolve(path: str) -> str:
    """Collapse //, drop . and trailing /, resolve .. (refused above the root: ambiguous)."""
    segs: list[str] = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not segs:
                raise BadRequest("'..' climbs above the root of the path")
            segs.pop()
            continue
        segs.append(seg)
    return "/" + "/".join(segs)


def _parse_query(raw: bytes) -> dict[str, list[str]]:
    # Go's url.ParseQuery drops pairs with ';' or bad escapes that Python would keep: refuse
    # rather than let the rules and dockerd read different parameters.
    if b";" in raw or _BAD_PERCENT.search(raw):
        raise BadRequest("malformed query string")
    try:
        return parse_qs(raw.decode("ascii"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the query string is not UTF-8") from None


def parse_target(target: bytes) -> Target:
    if not target.startswith(b"/"):
        raise BadRequest("the request target must be an absolute path")
    if not target.isascii():
        raise BadRequest("non-ASCII bytes in the request target")
    if b"#" in target:
        raise BadRequest("a fragment in the request target is ambiguous")
    raw_path, _, raw_query = target.partition(b"?")
    path = _resolve(_decode_path(raw_path))
    version = ""
    m = _VERSION.match(path)
    if m:
        version = m.group(1)
        if not _GOOD_VERSION.match(version):
            raise BadRequest(f"malformed API version {version!r}")
        path = path[m.end():] or "/"
    return Target(version, path, raw_query.decode("ascii"), _parse_query(raw_query))


# ------------------------------------------------------------------ streamed chunked bodies
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class ChunkedScanner:
    """Where a chunked request body ends, found without copying it: bodies the rules do not
    read (`docker cp`, build contexts) go to dockerd as received, which h11's per-chunk events
    and our re-framing made 25% slower for a 200 MiB copy. Forwarding framing verbatim is only
    safe if dockerd ends the body exactly where we do (else the rest would be a request the
    rules never saw), so only the canonical form both agree on passes: hex sizes without
    extensions or whitespace, CRLF line ends, no trailers. The Docker CLI sends nothing else."""

    def __init__(self) -> None:
        self.state = "size"       # size line | data | crlf after data | final CRLF
        self.left = 0
        self.line = b""

    def feed(self, data: bytes) -> int | None:
        """The offset in data just past the body's end, or None if the body goes on."""
        i, n = 0, len(data)
        while i < n:
            if self.state == "data":
                take = min(self.left, n - i)
                i += take
                self.left -= take
                if not self.left:
                    self.state = "crlf"
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self.line += data[i:]
                if len(self.line) > 64:
                    raise BadRequest("malformed chunked body: chunk line too long")
                return None
            line, self.line, i = self.line + data[i:j + 1], b"", j + 1
            if not line.endswith(b"\r\n"):
                raise BadRequest("malformed chunked body: bare LF")
            line = line[:-2]
            if self.state == "size":
                if not _HEX.fullmatch(line):
                    raise BadRequest("malformed chunked body: chunk size (extensions are refused)")
                self.left = int(line, 16)
                self.state = "data" if self.left else "end"
            elif line:
                raise BadRequest("malformed chunked body: " + ("trailers are refused" if self.state == "end"
                                                               else "no CRLF after a chunk"))
            elif self.state == "crlf":
                self.state = "size"
            else:
                return i
        return None


# ------------------------------------------------------------------ the rules
class Rules:
    """The policy (isobox.gate.rules), told where dockerd and the policy file are. The gate
    never runs without it: a gate that forwarded everything would be worse than none, since
    users would believe they are protected."""

    def __init__(self, engine: str, policy: str | None = None) -> None:
        from isobox.gate import rules
        # The rules ask dockerd about containers and images: on its real socket, not ours.
        rules.ENGINE_SOCKET = engine
        if policy:
            rules.POLICY_PATH = policy
        self.module = rules

    def needs_body(self, method: str, path: str) -> bool:
        return bool(self.module.needs_body(method, path))

    def check(self, req: Request) -> Decision:
        return self.module.check(req)


# ------------------------------------------------------------------ helpers
def peer_of(sock: socket.socket) -> Peer | None:
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
    except OSError:
        return None
    return Peer(pid, uid, gid)


def _send(sock: socket.socket, parts: list[bytes] | bytes | None) -> None:
    if not parts:
        return
    try:
        if isinstance(parts, (bytes, bytearray, memoryview)):
            sock.sendall(parts)
        elif sum(len(p) for p in parts) <= 65536:
            sock.sendall(b"".join(parts))
        else:                                   # a large Data event: no join copy
            for p in parts:
                sock.sendall(p)
    except OSError as e:
        raise Gone(str(e)) from None


def _hup(ev: int) -> bool:
    return bool(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL))


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """The Connection header's options, lower case (h11 gives header names lower case)."""
    return [t.strip() for k, v in headers if k == b"connection" for t in v.lower().split(b",")]


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _is_hijack(method: str, path: str) -> bool:
    parts = path.split("/")
    return method == "POST" and len(parts) == 4 and (
        (parts[1] == "containers" and parts[3] == "attach") or (parts[1] == "exec" and parts[3] == "start"))


def log(msg: str) -> None:
    sys.stderr.write(f"isobox gate: {msg}\n")
    sys.stderr.flush()


# ------------------------------------------------------------------ one client connection
class Connection:
    def __init__(self, sock: socket.socket, engine: str, rules: Rules):
        self.sock = sock
        self.engine = engine
        self.rules = rules
        self.peer = peer_of(sock)
        self.down = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.up_sock: socket.socket | None = None
        self.up: h11.Connection | None = None
        self.poller: select.poll | None = None
        self.method = b""                    # the request being answered (HEAD has no body)

    def serve(self) -> None:
        try:
            while self._one_request():
                pass
        except Gone:
            pass
        except Exception as e:  # noqa: BLE001 - one broken connection never takes the gate down
            log(f"connection error: {type(e).__name__}: {e}")
        finally:
            self._close_upstream()
            self.sock.close()

    # -- reading from the client ----------------------------------------------------
    def _client_event(self):
        while True:
            ev = self.down.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            try:
                data = self.sock.recv(RECV_SIZE)
            except OSError as e:
                raise Gone(str(e)) from None
            self.down.receive_data(data)

    def _read_body(self, limit: int) -> bytes:
        body = bytearray()
        while True:
            ev = self._client_event()
            if isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > limit:
                    raise BadRequest(f"request body larger than {limit} bytes", status=413)
            elif isinstance(ev, h11.EndOfMessage):
                return bytes(body)
            else:
                raise Gone("client closed inside a request body")

    # -- one request/response cycle ---------------------------------------------------
    def _one_request(self) -> bool:
        try:
            ev = self._client_event()
        except h11.RemoteProtocolError as e:
            return self._refuse(e.error_status_hint, f"isobox gate: malformed request: {e}")
        if not isinstance(ev, h11.Request):
            return False                  # ConnectionClosed between requests
        try:
            return self._handle(ev)
        except BadRequest as e:
            return self._refuse(e.status, f"isobox gate: {e}")
        except h11.RemoteProtocolError as e:
            return self._refuse(e.error_status_hint, f"isobox gate: malformed request: {e}")

    def _handle(self, ev: h11.Request) -> bool:
        names = [k for k, _ in ev.headers]
        if b"content-length" in names and b"transfer-encoding" in names:
            raise BadRequest("Content-Length together with Transfer-Encoding")
        method = ev.method.decode("ascii")
        target = parse_target(ev.target)
        req = Request(method=method, path=target.path, version=target.version, query=target.query,
                      headers=list(ev.headers), body=b"", peer=self.peer,
                      raw_target=ev.target.decode("ascii", "replace"))
        buffered = self.rules.needs_body(method, target.path)
        if buffered:
            cl = _header(ev.headers, b"content-length")
            if cl is not None and int(cl) > MAX_BODY:
                raise BadRequest(f"request body larger than {MAX_BODY} bytes", status=413)
            self._continue_100()
            req.body = self._read_body(MAX_BODY)
        decision = self._check(req)
        if not decision.allow:
            log(f"refused {method} {req.raw_target} ({self._who()}): {decision.message}")
            return self._refuse(decision.status, decision.message)
        body = decision.body if decision.body is not None else (req.body if buffered else None)
        self.method = ev.method
        if not self._forward_request(ev, target, body):
            return False
        return self._relay_response(_is_hijack(method, target.path))

    def _check(self, req: Request) -> Decision:
        try:
            return self.rules.check(req)
        except Exception as e:  # noqa: BLE001 - a failing rule refuses (fail closed), it never crashes
            log(f"policy check failed on {req.method} {req.raw_target}: {type(e).__name__}: {e}")
            return Decision(False, status=500, message=f"isobox gate: policy check failed: {type(e).__name__}: {e}")

    def _who(self) -> str:
        p = self.peer
        return f"pid {p.pid} uid {p.uid}" if p else "unknown peer"

    def _continue_100(self) -> None:
        # We drop Expect upstream (the body reaches dockerd only after the rules saw it), so the
        # client's 100-continue must come from us.
        if self.down.they_are_waiting_for_100_continue:
            _send(self.sock, self.down.send(h11.InformationalResponse(status_code=100, headers=[])))

    # -- answering ourselves -----------------------------------------------------------
    def _refuse(self, status: int, message: str) -> bool:
        """A dockerd-style error ({"message": ...}); keep the connection only if the request was
        read to its end (else the unread body would be taken for the next request)."""
        keep = self.down.their_state is h11.DONE and self.down.our_state is h11.SEND_RESPONSE
        body = json.dumps({"message": message}).encode() + b"\n"
        headers = [(b"Content-Type", b"application/json"), (b"Content-Length", str(len(body)).encode())]
        if not keep:
            headers.append((b"Connection", b"close"))
        try:
            _send(self.sock, self.down.send(h11.Response(status_code=status, headers=headers, reason=_reason(status))))
            _send(self.sock, self.down.send(h11.Data(data=body)))
            _send(self.sock, self.down.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            return False
        return keep and self._next_cycle()

    def _next_cycle(self) -> bool:
        if self.down.our_state is h11.DONE and self.down.their_state is h11.DONE:
            self.down.start_next_cycle()
            return True
        return False

    # -- dockerd side ----------------------------------------------------------------
    def _upstream(self) -> None:
        if self.up is not None and self.up.our_state is h11.IDLE and self.up.their_state is h11.IDLE:
            # An idle keep-alive connection dockerd closed meanwhile reads as EOF: reconnect
            # rather than fail the client's request on it.
            if not select.select([self.up_sock], [], [], 0)[0]:
                return
        self._close_upstream()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.engine)
        except OSError as e:
            s.close()
            raise BadRequest(f"cannot reach the engine at {self.engine}: {e}", status=502) from None
        self.up_sock = s
        self.up = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.poller = select.poll()
        self.poller.register(s, select.POLLIN)
        self.poller.register(self.sock, 0)     # HUP/ERR only; a pipelined request waits its turn

    def _close_upstream(self) -> None:
        if self.up_sock is not None:
            self.up_sock.close()
        self.up_sock, self.up, self.poller = None, None, None

    def _up_send(self, ev) -> None:
        _send(self.up_sock, self.up.send_with_data_passthrough(ev))

    def _forward_request(self, ev: h11.Request, target: Target, body: bytes | None) -> bool:
        """Send the request (head, then body: the buffered one, or streamed from the client).
        False: dockerd stopped reading (it answered early); its answer is still relayed."""
        self._upstream()
        drop = {b"expect"} | ({b"content-length", b"transfer-encoding"} if body is not None else set())
        headers = [(k, v) for k, v in ev.headers.raw_items() if k.lower() not in drop]
        if body is not None:
            headers.append((b"Content-Length", str(len(body)).encode()))
        if _header(ev.headers, b"host") is None:
            headers.append((b"Host", b"docker"))        # an HTTP/1.0 client; we speak 1.1 to dockerd
        try:
            self._up_send(h11.Request(method=ev.method, target=target.forward(), headers=headers))
            if body is not None:
                if body:
                    self._up_send(h11.Data(data=body))
                self._up_send(h11.EndOfMessage())
            elif _header(ev.headers, b"transfer-encoding") == b"chunked" and ev.http_version == b"1.1":
                self._stream_chunked_verbatim(ev)
            else:
                self._stream_body()
        except Gone:
            # dockerd closed mid-request: relay what it said, then close the client connection
            self._relay_response(False)
            return False
        return True

    def _stream_body(self) -> None:
        self._continue_100()
        while True:
            ev = self._client_event()
            if isinstance(ev, h11.Data):
                self._up_send(ev)
            elif isinstance(ev, h11.EndOfMessage):
                self._up_send(h11.EndOfMessage())
                return
            else:
                raise Gone("client closed inside a request body")

    def _stream_chunked_verbatim(self, ev: h11.Request) -> None:
        self._continue_100()
        scanner = ChunkedScanner()
        data = self.down.trailing_data[0]        # body bytes read along with the head
        while True:
            end = scanner.feed(data) if data else None
            if end is not None:
                _send(self.up_sock, data[:end])
                break
            _send(self.up_sock, data)
            try:
                data = self.sock.recv(RECV_SIZE)
            except OSError as e:
                raise Gone(str(e)) from None
            if not data:
                raise BadRequest("the client closed inside a chunked body")
        self.up.send(h11.EndOfMessage())        # the terminator went verbatim: only the state moves
        self.down = self._resynced(ev, data[end:])

    @staticmethod
    def _resynced(ev: h11.Request, rest: bytes) -> h11.Connection:
        """h11 still holds the body we consumed ourselves and has no call to drop it: continue
        with a fresh parser primed with an equivalent bodiless request (same method, version and
        keep-alive, so the response is framed the same), then the bytes that followed the body."""
        tokens = [t for t in _connection_tokens(ev.headers) if t in (b"close", b"keep-alive")]
        head = ev.method + b" / HTTP/1.1\r\nHost: gate\r\n"
        if tokens:
            head += b"Connection: " + b", ".join(tokens) + b"\r\n"
        fresh = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        fresh.receive_data(head + b"\r\n")
        assert isinstance(fresh.next_event(), h11.Request) and isinstance(fresh.next_event(), h11.EndOfMessage)
        fresh.receive_data(rest)
        return fresh

    def _up_event(self):
        """The next response event from dockerd. While waiting, watch the client for a full
        close (POLLHUP, which a half-close does not raise): a `docker events` or `logs -f` the
        user interrupted must not pin this thread and its dockerd stream forever."""
        while True:
            try:
                ev = self.up.next_event()
            except h11.RemoteProtocolError as e:
                raise Gone(f"engine answered malformed HTTP: {e}") from None
            if ev is not h11.NEED_DATA:
                return ev
            self.up.receive_data(self._up_recv(wait=True))

    def _up_recv(self, wait: bool) -> bytes:
        """Bytes from dockerd (b"" at its EOF). Without wait, what has already arrived is read
        without a poll; the poll, which also notices a client that went away, only comes when
        dockerd has nothing yet."""
        if not wait:
            try:
                return self.up_sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            except OSError as e:
                raise Gone(str(e)) from None
        while True:
            ready = dict(self.poller.poll())
            if _hup(ready.get(self.sock.fileno(), 0)):
                raise Gone("client closed while waiting for the engine")
            if self.up_sock.fileno() in ready:
                break
        try:
            return self.up_sock.recv(RECV_SIZE)
        except OSError as e:
            raise Gone(str(e)) from None

    def _relay_response(self, hijackable: bool) -> bool:
        while True:
            ev = self._up_event()
            if isinstance(ev, h11.InformationalResponse):
                if ev.status_code == 101:
                    self._hijack(ev)
                    return False
                continue                          # 100 Continue: ours was already sent
            if isinstance(ev, h11.Response):
                if hijackable and self._raw_stream(ev):
                    self._hijack(ev)
                    return False
                head = self.down.send(ev)
                _send(self.sock, head)
                if (_header(ev.headers, b"transfer-encoding") == b"chunked" and self.method != b"HEAD"
                        and ev.status_code not in (204, 304) and self.up.their_state is h11.SEND_BODY
                        and b"\r\ntransfer-encoding: chunked\r\n" in head.lower()):
                    return self._relay_chunked_verbatim(ev)
            elif isinstance(ev, h11.Data):
                _send(self.sock, self.down.send_with_data_passthrough(ev))
            elif isinstance(ev, h11.EndOfMessage):
                _send(self.sock, self.down.send(ev))
                return self._after_response()
            else:
                raise Gone("engine closed before answering")

    def _relay_chunked_verbatim(self, ev: h11.Response) -> bool:
        """A chunked response body (`docker cp` out, `save`, `logs`) goes to the client as
        dockerd framed it: h11 would hand it over chunk by chunk and frame it again, which made
        a 200 MiB download 23% slower. The scanner finds the body's end, so the keep-alive
        connection stays in step; the client's parser sees the same bytes either way."""
        scanner = ChunkedScanner()
        data = self.up.trailing_data[0]
        while True:
            try:
                end = scanner.feed(data) if data else None
            except BadRequest as e:
                raise Gone(f"engine answered a malformed chunked body: {e}") from None
            if end is not None:
                _send(self.sock, data[:end])
                break
            _send(self.sock, data)
            data = self._up_recv(wait=False)
            if not data:
                raise Gone("engine closed inside a chunked body")
        self.down.send(h11.EndOfMessage())        # the terminator went verbatim: only the state moves
        close = b"close" in _connection_tokens(ev.headers)
        if data[end:] or close or ev.http_version != b"1.1":
            self._close_upstream()                # (dockerd never sends more than it was asked)
        else:
            self.up = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)   # idle, in step
        return self._next_cycle()

    def _after_response(self) -> bool:
        if self.up.our_state is h11.DONE and self.up.their_state is h11.DONE:
            self.up.start_next_cycle()
        else:
            self._close_upstream()
        return self._next_cycle()

    @staticmethod
    def _raw_stream(ev: h11.Response) -> bool:
        """dockerd's answer to an attach/exec start of an old client (no Upgrade header):
        200 and a raw stream until close, no framing."""
        ctype = (_header(ev.headers, b"content-type") or b"").split(b";")[0].strip()
        return (ev.status_code == 200 and ctype in HIJACK_TYPES and _header(ev.headers, b"content-length") is None
                and _header(ev.headers, b"transfer-encoding") is None)

    # -- hijacked connections ----------------------------------------------------------
    def _hijack(self, ev: h11.InformationalResponse | h11.Response) -> None:
        head = b"HTTP/1.1 %d %s\r\n" % (ev.status_code, ev.reason or b"")
        head += b"".join(k + b": " + v + b"\r\n" for k, v in ev.headers.raw_items()) + b"\r\n"
        to_client = self.up.trailing_data[0]          # stream bytes already read with the head
        to_engine = self.down.trailing_data[0]        # stdin the client sent after its request
        _send(self.sock, head + to_client)
        _send(self.up_sock, to_engine)
        pipe(self.sock, self.up_sock)


def pipe(client: socket.socket, engine: socket.socket) -> None:
    """Copy bytes both ways until both directions ended. EOF on one side becomes
    shutdown(SHUT_WR) on the other (`echo x | docker exec -i c cat` needs cat to see EOF);
    a full close (HUP) of a side that already sent EOF ends everything."""
    other = {client.fileno(): engine, engine.fileno(): client}
    by_fd = {client.fileno(): client, engine.fileno(): engine}
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    eof: set[int] = set()
    while len(eof) < 2:
        for fd, ev in poller.poll():
            if fd in eof:
                if _hup(ev):
                    return
                continue
            try:
                data = by_fd[fd].recv(RECV_SIZE)
            except OSError:
                return
            if data:
                try:
                    other[fd].sendall(data)
                except OSError:
                    return
                continue
            eof.add(fd)
            poller.modify(fd, 0)
            try:
                other[fd].shutdown(socket.SHUT_WR)
            except OSError:
                pass


# ------------------------------------------------------------------ the listener
class Gate:
    def __init__(self, listener: socket.socket, engine: str, rules: Rules | None = None):
        self.listener = listener
        self.engine = engine
        self.rules = rules or Rules(engine)

    def serve_forever(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError as e:
                if self.listener.fileno() < 0:
                    return
                log(f"accept: {e}")
                continue
            conn = Connection(sock, self.engine, self.rules)
            threading.Thread(target=conn.serve, name="gate-conn", daemon=True).start()
