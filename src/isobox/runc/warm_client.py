"""isobox-runc's warm path, client side: hand this call to isoboxd's pre-imported worker.

A fresh `isobox-runc` spends most of its time importing (see docs/warm-runtime.md). The
commands that create no process of the caller's (start, state, kill, delete, list, ps,
pause, resume, update, features) do not need to run here: this module sends argv, the
working directory, the environment and fds 0-2 to isoboxd's warm worker, which forks a
copy of itself that has everything imported, runs the same main() with the caller's fds,
and sends back the exit code. create and a detached exec go there too, but their container
process must descend from the caller (the engine's shim reaps it): the worker asks this
process to clone the init or fork the exec helper and drives it from there
(init/handover.py). run and a foreground exec stay in this process.

Imported by the wrapper before anything else, so it uses only built-in modules: _socket, and
posix rather than os (with -S nothing has imported os yet, and os costs ~2 ms of a 20 ms
call). A create also imports what its init runs (handover.preload) while the worker works.
Any failure to reach the worker means "run locally": the warm path is an optimisation,
never a requirement."""
import _socket
import posix

SOCKET = "/run/isobox/isobox-runc.sock"     # daemon/paths.py's WARM_SOCKET (not imported: lean)
LOCAL = b"L"
ACCEPTED = b"A"
RESULT = b"R"
SPAWN = b"C"                                # init/handover.SPAWN: "clone the init now"
MAX_FDS = 64                                # daemon/warm.py's: stdio and up to 61 preserved fds
SPAWN_EXEC = b"X"                           # init/handover.SPAWN_EXEC: "fork the exec helper"
LOCAL_ONLY = frozenset({"run"})             # its container stays this process's child (run waits);
                                            # the worker also hands a foreground exec back ("L")


def _bytes(s) -> bytes:
    return s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")   # os.fsencode's


def _preserved(argv: list) -> int:
    """--preserve-fds N (or =N): an unusable value is the runtime's to report, locally."""
    for i, a in enumerate(argv):
        if a == "--preserve-fds" and i + 1 < len(argv):
            v = argv[i + 1]
        elif a.startswith("--preserve-fds="):
            v = a[len("--preserve-fds="):]
        else:
            continue
        return int(v) if v.isdigit() else MAX_FDS
    return 0


def encode(argv: list, cwd, env: dict, ppid: int) -> bytes:
    """NUL-separated: version, cwd, caller's ppid, argc, argv..., KEY=VALUE... (str or bytes)"""
    parts = [b"1", _bytes(cwd), str(ppid).encode(), str(len(argv)).encode()]
    parts += [_bytes(a) for a in argv]
    parts += [_bytes(k) + b"=" + _bytes(v) for k, v in env.items()]
    return b"\0".join(parts)


def forward(argv: list) -> "int | None":
    """The worker's exit code for this call, or None when this process must run it itself."""
    if posix.environ.get(b"ISOBOX_WARM") == b"0" or LOCAL_ONLY.intersection(argv):
        return None     # (a container named "run" is merely not sped up)
    try:
        cwd = posix.getcwdb()
    except OSError:
        return None
    spawning = "create" in argv or ("exec" in argv and ("--detach" in argv or "-d" in argv))
    sent = 3 + _preserved(argv)          # the engine's preserved fds reach the worker as well
    if sent > MAX_FDS:
        return None
    accepted = False
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    try:
        s.connect(SOCKET)
        fds = b"".join(fd.to_bytes(4, "little") for fd in range(sent))
        s.sendmsg([encode(argv, cwd, posix.environ, posix.getppid())],
                  [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        if spawning:
            # imported while the worker prepares; the init this process clones inherits them
            from isobox.init import handover
            handover.preload()
        # "L": run it here. "A": a worker took the call (written before it runs anything);
        # for a create, "C" asks for the init's clone; "R<code>" when it is done. Without "A"
        # nothing ran, so running it here is safe.
        while True:
            # fds arrive close-on-exec: the exec helper's pipes and namespaces must not reach
            # the container's process (it keeps only what close_host_fds leaves it)
            msg, anc, _flags, _addr = s.recvmsg(1 << 20, _socket.CMSG_SPACE(16 * 4), _socket.MSG_CMSG_CLOEXEC)
            if not msg:
                break
            if msg == ACCEPTED:
                accepted = True
            elif msg.startswith(RESULT) and msg[1:].isdigit() and accepted:
                return int(msg[1:])
            elif msg.startswith(SPAWN) and accepted and spawning:
                handover.spawn_here(s, msg[1:], sent)     # the init keeps only fds 0..sent-1
            elif msg.startswith(SPAWN_EXEC) and accepted and spawning:
                from isobox.init import channel
                handover.exec_here(s, msg[1:], channel.received_fds(anc), sent)
            else:
                break
    except OSError:
        pass
    finally:
        s.close()
    if not accepted:
        return None
    posix.write(2, b"isobox-runc: isoboxd's worker ended during the call; check the container's state and retry\n")
    return 1
