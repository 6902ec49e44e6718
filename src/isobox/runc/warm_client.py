"""isobox-runc's warm path, client side: hand this call to isoboxd's pre-imported worker.

A fresh `isobox-runc` spends most of its time importing (see docs/warm-runtime.md). The
commands that create no process of the caller's (start, state, kill, delete, list, ps,
pause, resume, update, features) do not need to run here: this module sends argv, the
working directory, the environment and fds 0-2 to isoboxd's warm worker, which forks a
copy of itself that has everything imported, runs the same main() with the caller's fds,
and sends back the exit code. create, run and exec stay in this process: their container
processes must descend from the caller (the engine's shim reaps them).

Imported by the wrapper before anything else, so it uses only builtins (_socket, no json).
Any failure to reach the worker means "run locally": the warm path is an optimisation,
never a requirement."""
import _socket
import os

SOCKET = "/run/isobox/isobox-runc.sock"     # daemon/paths.py's WARM_SOCKET (not imported: lean)
LOCAL = b"L"
ACCEPTED = b"A"
LOCAL_ONLY = frozenset({"create", "run", "exec"})   # their processes descend from this one


def encode(argv: list, cwd: str, env: dict, ppid: int) -> bytes:
    """NUL-separated: version, cwd, caller's ppid, argc, argv..., KEY=VALUE..."""
    parts = [b"1", os.fsencode(cwd), str(ppid).encode(), str(len(argv)).encode()]
    parts += [os.fsencode(a) for a in argv]
    parts += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    return b"\0".join(parts)


def forward(argv: list) -> "int | None":
    """The worker's exit code for this call, or None when this process must run it itself."""
    if os.environ.get("ISOBOX_WARM") == "0" or LOCAL_ONLY.intersection(argv):
        return None     # (a container named "run" is merely not sped up)
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.connect(SOCKET)
        fds = b"".join(fd.to_bytes(4, "little") for fd in (0, 1, 2))
        s.sendmsg([encode(argv, cwd, dict(os.environ), os.getppid())],
                  [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        s.shutdown(_socket.SHUT_WR)
        reply = b""
        while True:
            chunk = s.recv(64)
            if not chunk:
                break
            reply += chunk
    except OSError:
        reply = b""
    finally:
        s.close()
    # "L": run it here. "A": a worker took the call (written before it runs anything), then
    # "R<code>" when it is done. Without "A" nothing ran, so running it here is safe.
    if not reply.startswith(ACCEPTED):
        return None
    if reply[1:2] == b"R" and reply[2:].isdigit():
        return int(reply[2:])
    os.write(2, b"isobox-runc: isoboxd's worker ended during the call; check the container's state and retry\n")
    return 1
