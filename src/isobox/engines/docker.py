"""dockerd: /etc/docker/daemon.json `runtimes.isobox` and, with --default, `default-runtime`.

Reload (moby 20.10 daemon/reload_unix.go, reloadPlatform): on SIGHUP dockerd re-reads the file,
replaces its runtimes when the `runtimes` key is present and takes `default-runtime` when it is
non-empty. So SIGHUP is enough to add isobox or make it the default; it is NOT enough when the
new file has no `default-runtime` (the old default stays) or no `runtimes` key at all (the old
runtimes stay): those need a restart."""
from __future__ import annotations

import json
import os

from isobox.engines import common as c
from isobox.errors import IsoboxError

DEFAULT_PATH = "/etc/docker/daemon.json"
ENV = "ISOBOX_DOCKER_CONFIG"
PIDFILE = "/var/run/docker.pid"
HUP = f"kill -HUP $(cat {PIDFILE})"
SOURCE = "moby 20.10 daemon/reload_unix.go reloadPlatform"


def path(p: str | None = None) -> str:
    return c.config_path(ENV, DEFAULT_PATH, p)


def parse(text: str | None, where: str = DEFAULT_PATH) -> dict:
    if text is None or not text.strip():
        return {}
    try:
        cfg = json.loads(text)
    except ValueError as e:
        raise IsoboxError(f"{where} is not valid JSON ({e}); fix it first, it was left untouched") from None
    if not isinstance(cfg, dict):
        raise IsoboxError(f"{where} is not a JSON object; fix it first, it was left untouched")
    rt = cfg.get("runtimes")
    if rt is not None and not isinstance(rt, dict):
        raise IsoboxError(f"{where}: `runtimes` is not an object; fix it first, it was left untouched")
    return cfg


def dump(cfg: dict) -> str:
    return json.dumps(cfg, indent=2) + "\n"


def install_config(cfg: dict, undo: dict, binary: str = c.RUNC_BINARY, default: bool = False,
                   created: bool = False) -> tuple[dict, dict]:
    """The new config and undo record (inputs are not modified)."""
    cfg = json.loads(json.dumps(cfg))
    undo = dict(undo)
    if created:
        c.remember(undo, "file", None, "created")
    if "runtimes" not in cfg:
        c.remember(undo, "runtimes", None, {})
        cfg["runtimes"] = {}
    want = {"path": binary}
    if cfg["runtimes"].get(c.RUNTIME_NAME) != want:
        cfg["runtimes"][c.RUNTIME_NAME] = want
    if default and cfg.get("default-runtime") != c.RUNTIME_NAME:
        c.remember(undo, "default-runtime", cfg.get("default-runtime"), c.RUNTIME_NAME)
        cfg["default-runtime"] = c.RUNTIME_NAME
    return cfg, undo


def uninstall_config(cfg: dict, undo: dict) -> tuple[dict, dict, list[str]]:
    """The config without what install added, the undo record left, and why SIGHUP is not enough."""
    cfg = json.loads(json.dumps(cfg))
    undo = dict(undo)
    restart: list[str] = []
    if cfg.get("default-runtime") == c.RUNTIME_NAME:
        prev = undo.get("default-runtime", {}).get("previous")
        if prev and prev != c.RUNTIME_NAME:
            cfg["default-runtime"] = prev
        else:
            del cfg["default-runtime"]
            restart.append("the file no longer names a default-runtime, and SIGHUP only applies a non-empty one")
    undo.pop("default-runtime", None)
    rts = cfg.get("runtimes")
    if isinstance(rts, dict) and c.RUNTIME_NAME in rts:
        del rts[c.RUNTIME_NAME]
        if not rts and "runtimes" in undo:
            del cfg["runtimes"]
            restart.append("the file no longer has a `runtimes` key, and SIGHUP keeps the old runtimes then "
                           "(isobox stays listed in `docker info` until a restart; harmless)")
    undo.pop("runtimes", None)
    return cfg, undo, restart


def status_of(cfg: dict, binary: str = c.RUNC_BINARY) -> tuple[bool, bool, str]:
    """(registered, default, detail)."""
    rt = (cfg.get("runtimes") or {}).get(c.RUNTIME_NAME)
    registered = isinstance(rt, dict) and bool(rt.get("path"))
    detail = ""
    if registered and rt.get("path") != binary:
        detail = f"runtime isobox points at {rt.get('path')}, not {binary}"
    return registered, cfg.get("default-runtime") == c.RUNTIME_NAME, detail


def install(p: str | None = None, default: bool = False, binary: str = c.RUNC_BINARY) -> c.Outcome:
    where = path(p)
    text = c.read_text(where)
    cfg = parse(text, where)
    undo = c.load_undo(where)
    new, new_undo = install_config(cfg, undo, binary, default, created=text is None)
    what = "runtime isobox" + (" as the default runtime" if default else "")
    if new == cfg and text is not None:
        return c.Outcome("docker", where, False, f"{where} already has {what}; nothing changed")
    c.commit(where, text, dump(new), undo, new_undo)
    bak = where + c.BACKUP_SUFFIX
    return c.Outcome(
        "docker", where, True,
        f"added {what} to {where}" + (f" (original kept in {bak})" if os.path.exists(bak) else " (new file)"),
        f"reload dockerd: {HUP} (dockerd 20.10 applies `runtimes` and `default-runtime` on SIGHUP, "
        f"{SOURCE}; no restart; running containers keep their runtime); then "
        f"`docker run --runtime=isobox ...`" + (" or plain `docker run`" if default else ""))


def uninstall(p: str | None = None) -> c.Outcome:
    where = path(p)
    text = c.read_text(where)
    cfg = parse(text, where)
    undo = c.load_undo(where)
    new, new_undo, restart = uninstall_config(cfg, undo)
    if new == cfg:
        return c.Outcome("docker", where, False, f"{where} has no isobox entries; nothing changed")
    created = "file" in new_undo
    new_undo.pop("file", None)
    if created and not new:
        os.unlink(where)
        c.save_undo(where, new_undo)
        summary = f"removed {where} (isobox install had created it)"
        restart.append("the config file is gone")
    else:
        c.commit(where, text, dump(new), undo, new_undo)
        summary = f"removed isobox from {where}"
    reload = (f"restart dockerd: {'; '.join(restart)} ({SOURCE})" if restart
              else f"reload dockerd: {HUP} (applies the new `runtimes`, {SOURCE})")
    return c.Outcome("docker", where, True, summary, reload,
                     ["containers created with --runtime=isobox cannot start again until isobox is installed; "
                      "remove them (docker rm -f) first"])
