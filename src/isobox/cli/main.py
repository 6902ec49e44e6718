"""`isobox`: the user's command (setup, run, demo)."""
from __future__ import annotations

import os
import sys

from isobox.errors import IsoboxError

USAGE = """usage: isobox COMMAND
  setup                      create the ID pool (/etc/subuid, /etc/subgid) and isobox's directories
  run [--privileged] [--memory SIZE] [--cpus N] [--rootfs DIR | IMAGE] [CMD...]
                             run CMD (default: sh) in a new isolated container
  doctor                     check what isobox needs from the kernel and the host
  install [--docker] [--containerd] [--podman] [--default] [--gate]
                             register isobox-runc with the engines (no flag: every engine on PATH);
                             --default makes it their default runtime; --gate moves dockerd's socket
                             behind `isobox gate` and gives BuildKit isobox's runc; prints what to reload
  uninstall [--docker] [--containerd] [--podman] [--gate]
                             remove what install added (the .isobox-backup files stay)
  events [--follow] [--json] [CONTAINER]
                             what isoboxd refused or did for containers, and why
  daemon [--status | --stop [--force]]
                             run isoboxd in the foreground (for service managers), show or stop it
  gate --listen SOCKET --engine SOCKET [--policy FILE] [--mode MODE] [--group GROUP] [--owner USER]
                             serve the Docker API on SOCKET, enforcing the policy, in front of dockerd's
  demo                       run a privileged container and show what it believes next to what the host sees
"""


def _setup(argv: list[str]) -> int:
    from isobox.ids.pool import ensure_pool
    start, count = ensure_pool()
    from isobox.ids.allocator import Allocator
    Allocator().use_wal()
    os.makedirs("/var/lib/isobox", mode=0o700, exist_ok=True)
    os.makedirs("/etc/isobox", mode=0o755, exist_ok=True)
    from isobox.policy.model import DEFAULT_PATH, default_toml, load
    try:   # the default policy, only if the admin has none
        fd = os.open(DEFAULT_PATH, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(default_toml())
    load(DEFAULT_PATH)   # an existing file that isobox-runc would refuse fails set-up in one line
    from isobox.cli.image import builtin_rootfs
    root = builtin_rootfs()
    from isobox.cli import layer
    layer.collect()      # the layers of `isobox run`s that died, once their containers ended
    print(f"isobox: ID pool {start}-{start + count - 1} ({count // 65536} containers of 65536 IDs) "
          f"for user isobox; built-in image at {root}")
    return 0


def _parse_run(argv: list[str]) -> dict:
    opts: dict = {"privileged": False, "memory": None, "cpus": None, "rootfs": None, "image": None, "args": []}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            opts["args"] = argv[i + 1:]
            break
        if a == "--privileged":
            opts["privileged"] = True
        elif a.split("=")[0] in ("--memory", "-m", "--cpus", "--rootfs"):
            key, eq, val = a.partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise IsoboxError(f"{key} needs a value")
                i += 1
                val = argv[i]
            opts[{"-m": "memory"}.get(key, key.lstrip("-"))] = val
        elif a.startswith("-"):
            raise IsoboxError(f"unknown flag {a} for run (see `isobox --help`)")
        else:
            if opts["rootfs"] is None and opts["image"] is None and not os.path.isabs(a) and a == "busybox":
                opts["image"] = a
            else:
                opts["args"] = argv[i:]
                break
        i += 1
    return opts


def _run(argv: list[str]) -> int:
    import uuid
    from contextlib import nullcontext
    from isobox.cli import bundle, image, layer
    from isobox.lifecycle import control, foreground
    from isobox.lifecycle.run import run
    from isobox.lifecycle.state import StateStore
    o = _parse_run(argv)
    cid = "run-" + uuid.uuid4().hex[:12]
    if o["rootfs"]:
        # the user's own directory: the container's root, written in place
        rootfs = os.path.abspath(o["rootfs"])
        if not os.path.isdir(rootfs):
            raise IsoboxError(f"--rootfs {o['rootfs']!r} is not a directory")
        layer.refuse_storage(rootfs)
        root = nullcontext(rootfs)
    else:
        # the built-in image is never written: a layer of this container's own goes over it
        rootfs = layer.rootfs_of(cid)
        root = layer.writable_layer(cid, image.builtin_rootfs(o["image"] or "busybox"))
    spec = bundle.make_spec(o["args"] or ["sh"], rootfs, o["privileged"], o["memory"], o["cpus"])
    # from here until the container runs, a SIGTERM or SIGINT waits (and then goes to the
    # container) instead of ending this process before it removed its layer
    foreground.hold_signals()
    store = StateStore()
    with root:
        path = bundle.write_bundle(cid, spec)
        try:
            return run(store, cid, path, None, detach=False, keep=False)
        finally:
            control.delete(store, cid, force=True)     # no-op unless run left it: never rm a live layer
            bundle.remove_bundle(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 1
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "setup":
            return _setup(rest)
        if cmd == "run":
            return _run(rest)
        if cmd == "doctor":
            from isobox.cli.doctor import doctor
            return doctor()
        if cmd in ("install", "uninstall"):
            from isobox.engines.install import run as engines_run
            return engines_run(rest, uninstall=cmd == "uninstall")
        if cmd == "events":
            from isobox.cli.events import events
            return events(rest)
        if cmd == "daemon":
            from isobox.cli.daemon import daemon
            return daemon(rest)
        if cmd == "gate":
            from isobox.cli.gate import gate
            return gate(rest)
        if cmd == "demo":
            from isobox.cli.demo import demo
            return demo()
        if cmd == "--version":
            from isobox import __version__
            print(f"isobox {__version__}")
            return 0
        raise IsoboxError(f"unknown command {cmd!r} (see `isobox --help`)")
    except IsoboxError as e:
        sys.stderr.write(f"isobox: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one line, no traceback
        sys.stderr.write(f"isobox: internal error: {type(e).__name__}: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
