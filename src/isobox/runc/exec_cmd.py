"""`isobox-runc exec`: turn runc's exec flags (or --process FILE) into one OCI process."""
from __future__ import annotations

import json

from isobox.errors import IsoboxError


def _user(text: str) -> tuple[int, int | None]:
    uid, _, gid = text.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise IsoboxError(f"--user {text!r}: use numeric uid[:gid] (names are not resolved by isobox-runc)")
    return int(uid), int(gid) if gid else None


def _merge_env(base: list[str], extra: list[str]) -> list[str]:
    env = {e.partition("=")[0]: e for e in base}
    for e in extra:
        env[e.partition("=")[0]] = e
    return list(env.values())


def build_process(config: dict, flags: dict, args: list[str]) -> dict:
    """The process object: --process FILE wins; otherwise the container's own process with
    the command line's args and overrides (what runc does)."""
    from isobox.spec.config import check_process
    if flags.get("process"):
        path = str(flags["process"])
        try:
            with open(path) as f:
                proc = json.load(f)
        except OSError as e:
            raise IsoboxError(f"--process {path}: {e.strerror}") from None
        except ValueError as e:
            raise IsoboxError(f"--process {path} is not valid JSON: {e}") from None
        check_process(proc, "--process")
        return proc
    if not args:
        raise IsoboxError("exec needs a command to run (or --process FILE)")
    base = config.get("process", {})
    proc = {
        "terminal": bool(flags.get("tty")),
        "args": list(args),
        "env": _merge_env(base.get("env", []), list(flags.get("env") or [])),
        "cwd": str(flags.get("cwd") or base.get("cwd") or "/"),
        "user": dict(base.get("user", {"uid": 0, "gid": 0})),
        "capabilities": {k: list(v) for k, v in (base.get("capabilities") or {}).items()},
        "noNewPrivileges": bool(flags.get("no-new-privs")) or bool(base.get("noNewPrivileges")),
        "rlimits": list(base.get("rlimits", [])),
    }
    if flags.get("user"):
        uid, gid = _user(str(flags["user"]))
        proc["user"] = {"uid": uid, "gid": gid if gid is not None else proc["user"].get("gid", 0)}
    gids = flags.get("additional-gids") or []
    if gids:
        if not all(str(g).isdigit() for g in gids):
            raise IsoboxError("--additional-gids takes numeric group ids")
        proc["user"]["additionalGids"] = [int(g) for g in gids]
    from isobox.linux.capabilities import canonical
    for cap in flags.get("cap") or []:
        name = canonical(cap)
        for key in ("bounding", "effective", "permitted"):
            caps = proc["capabilities"].setdefault(key, [])
            if name not in caps:
                caps.append(name)
    check_process(proc, "exec")
    return proc


def exec_command(store, p, log) -> int:
    from isobox.lifecycle.exec import exec_process
    from isobox.runc.main import preserve_fds
    from isobox.spec.rewrite import process_from_spec
    f, a = p.flags, p.args
    if f.get("cgroup"):
        raise IsoboxError("exec --cgroup is not supported: the process joins the container's own cgroup")
    cid = a[0]
    st = store.load(cid)
    config = store.load_config(st.id)
    proc_spec = build_process(config, f, a[1:])
    proc = process_from_spec(proc_spec)
    from isobox.policy.model import load as load_policy
    load_policy()        # a tampered or broken policy file stops exec as it stops create
    from isobox import seccomp
    # the container's own profile (and isobox's trap), compiled before anything is entered
    sec = seccomp.prepare((config.get("linux") or {}).get("seccomp"), cid=st.id, bundle=st.bundle,
                          annotations=st.annotations, trap_socket=seccomp.trap_socket())
    if sec is not None:
        from isobox.daemon.client import daemon_key
        sec.key = daemon_key(store.root, st.id)
    return exec_process(store, st, proc, detach=bool(f.get("detach")),
                        pid_file=str(f["pid-file"]) if f.get("pid-file") else None,
                        console_socket=str(f["console-socket"]) if f.get("console-socket") else None,
                        preserve_fds=preserve_fds(f), ignore_paused=bool(f.get("ignore-paused")), seccomp=sec)
