"""`isobox daemon`: run isoboxd in the foreground (service managers), stop it, or show it."""
from __future__ import annotations

import os
import signal
import time

from isobox.daemon import client, paths
from isobox.errors import IsoboxError
from isobox.fileio import read_text

STOP_TIMEOUT = 10.0


def daemon(argv: list[str]) -> int:
    if not argv:
        from isobox.daemon.holder import run
        return run()
    if argv == ["--status"]:
        return status()
    if argv in (["--stop"], ["--stop", "--force"]):
        return stop(force="--force" in argv)
    if argv == ["--reload"]:
        return reload()
    raise IsoboxError(f"unknown arguments {' '.join(argv)!r}: use "
                      "`isobox daemon [--status | --reload | --stop [--force]]`")


def status() -> int:
    if not client.running():
        print("isoboxd: not running" + (" (holder alive, server restarting)" if client.holder_alive() else ""))
        return 1
    r = client.call({"op": "stats"})
    ping = client.call({"op": "ping"})
    print(f"isoboxd: running, holder pid {read_text(paths.HOLDER_PID, '?')}, server pid {ping['pid']} "
          f"(generation {ping['generation']}), {r['containers']} containers, RSS {r['rss_kib']} KiB, "
          f"warm worker {'answering' if client.warm_worker_answers() else 'not answering'}")
    return 0


def reload() -> int:
    """After an upgrade: the holder (SIGHUP) starts a new server on the same FUSE connection
    and a new warm worker, both importing the code now on disk, from where this command's
    own code lies (a checkout set up from a new place); containers keep running."""
    if not client.holder_alive():
        print("isoboxd: not running (nothing to reload)")
        return 0
    from isobox.daemon.holder import publish_code_path
    publish_code_path()
    before = client.call({"op": "ping"})["generation"] if client.running() else -1
    pid = int(read_text(paths.HOLDER_PID, "0"))
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        try:
            now = client.call({"op": "ping"})["generation"]
        except (OSError, IsoboxError):
            now = before
        if now != before and client.warm_worker_answers():
            break
        if time.monotonic() > deadline:
            raise IsoboxError(f"isoboxd (pid {pid}) did not start a new server within {STOP_TIMEOUT:g}s; "
                              f"see {paths.LOG}")
        time.sleep(0.05)
    print(f"isoboxd: reloaded (holder pid {pid}, server generation {now}, new warm worker)")
    return 0


def stop(force: bool = False) -> int:
    if not client.holder_alive():
        from isobox.daemon.holder import detach_old_mount
        left = detach_old_mount()
        print("isoboxd: not running" + (f" (detached {paths.FS_ROOT}, left by a holder that died)" if left else ""))
        return 0
    if not force and client.running():
        n = client.call({"op": "stats"})["containers"]
        if n:
            raise IsoboxError(f"{n} containers use isoboxd: their /proc files would fail until they are "
                              f"recreated; delete them first or use --stop --force")
    pid = int(read_text(paths.HOLDER_PID, "0"))
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while client.holder_alive():
        if time.monotonic() > deadline:
            raise IsoboxError(f"isoboxd (pid {pid}) did not stop within {STOP_TIMEOUT:g}s")
        time.sleep(0.02)
    print(f"isoboxd: stopped (pid {pid})")
    return 0

