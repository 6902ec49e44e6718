"""Podman: /etc/containers/containers.conf.

  [engine]
  cgroup_manager = "cgroupfs"            # no systemd on the hosts isobox targets
  runtime_supports_json = [..., "isobox", "isobox-runc"]
  runtime = "isobox"                     # with --default
  [engine.runtimes]
  isobox = ["/usr/local/bin/isobox-runc"]

runtime_supports_json is matched by the runtime's name: "isobox" for `--runtime isobox`, and the
binary's base name "isobox-runc" for `--runtime /usr/local/bin/isobox-runc`. A list set in this
file replaces podman's built-in one (no merge), so when the key is absent the built-in entries are
written too. Podman has no daemon: every podman command reads the file; only a running
`podman system service` needs a restart."""
from __future__ import annotations

import os

from isobox.engines import common as c
from isobox.engines.containerd import _parse, _walk
from isobox.errors import IsoboxError

DEFAULT_PATH = "/etc/containers/containers.conf"
ENV = "ISOBOX_PODMAN_CONFIG"
BUILTIN_JSON_RUNTIMES = ["crun", "runc", "kata", "runsc", "youki", "krun", "ocijail"]
OUR_NAMES = [c.RUNTIME_NAME, os.path.basename(c.RUNC_BINARY)]
RELOAD = ("nothing to reload: podman reads containers.conf on every command (restart `podman system "
          "service` if one runs); containers created before keep the runtime they were created with")


def path(p: str | None = None) -> str:
    return c.config_path(ENV, DEFAULT_PATH, p)


def _set(table, key, value, undo: dict, record: str | None) -> None:
    cur = table.get(key)
    cur_plain = cur.unwrap() if hasattr(cur, "unwrap") else cur
    if cur_plain != value:
        if record:
            c.remember(undo, record, cur_plain, value)
        table[key] = value


def install_text(text: str | None, undo: dict, binary: str = c.RUNC_BINARY, default: bool = False,
                 where: str = DEFAULT_PATH) -> tuple[str, dict]:
    import tomlkit
    undo = dict(undo)
    if text is None:
        c.remember(undo, "file", None, "created")
        text = ""
    doc = _parse(text, where)
    made: list[str] = []
    if "engine" not in doc:
        doc["engine"] = tomlkit.table()
        made.append("engine")
    engine = _walk(doc, ("engine",), create=False)
    names = OUR_NAMES if os.path.basename(binary) == OUR_NAMES[1] else [c.RUNTIME_NAME, os.path.basename(binary)]
    rsj = engine.get("runtime_supports_json")
    if rsj is None:
        c.remember(undo, "engine.runtime_supports_json", None, "created")
        arr = tomlkit.array()
        arr.extend(BUILTIN_JSON_RUNTIMES + names)
        engine["runtime_supports_json"] = arr
    else:
        if not isinstance(rsj, list):
            raise IsoboxError(f"{where}: engine.runtime_supports_json is not a list; fix it first, "
                              "it was left untouched")
        for n in names:
            if n not in rsj:
                rsj.append(n)
    _set(engine, "cgroup_manager", "cgroupfs", undo, "engine.cgroup_manager")
    if default:
        _set(engine, "runtime", c.RUNTIME_NAME, undo, "engine.runtime")
    if "runtimes" not in engine:
        engine["runtimes"] = tomlkit.table()
        made.append("engine.runtimes")
    rts = _walk(engine, ("runtimes",), create=False)
    if made:
        c.remember(undo, "tables", None, made)
    # by name ("--runtime isobox") and by the binary's bare name ("--runtime isobox-runc"):
    # Podman looks names up in this table only, never on PATH
    for name in (c.RUNTIME_NAME, os.path.basename(binary)):
        cur = rts.get(name)
        if cur is None or list(cur) != [binary]:
            arr = tomlkit.array()
            arr.append(binary)
            rts[name] = arr
    return doc.as_string(), undo


def uninstall_text(text: str, undo: dict, where: str = DEFAULT_PATH) -> tuple[str | None, dict]:
    undo = dict(undo)
    made = (undo.pop("tables", None) or {}).get("set") or []
    doc = _parse(text, where)
    engine = doc.get("engine")
    if engine is not None and hasattr(engine, "keys"):
        rts = engine.get("runtimes")
        if rts is not None and hasattr(rts, "keys") and c.RUNTIME_NAME in rts:
            binary = list(rts[c.RUNTIME_NAME])[:1]
            del rts[c.RUNTIME_NAME]
            for b in binary:
                if os.path.basename(b) in rts and list(rts[os.path.basename(b)]) == [b]:
                    del rts[os.path.basename(b)]
            if len(rts) == 0 and "engine.runtimes" in made:
                del engine["runtimes"]
        else:
            binary = []
        rsj = engine.get("runtime_supports_json")
        if isinstance(rsj, list):
            ours = set(OUR_NAMES) | {os.path.basename(b) for b in binary}
            for n in [x for x in rsj if x in ours]:
                rsj.remove(n)
            if "engine.runtime_supports_json" in undo and list(rsj) == BUILTIN_JSON_RUNTIMES:
                del engine["runtime_supports_json"]
        for key, ours_value in (("runtime", c.RUNTIME_NAME), ("cgroup_manager", "cgroupfs")):
            rec = undo.get(f"engine.{key}")
            if key == "runtime" and engine.get("runtime") == c.RUNTIME_NAME:
                prev = rec.get("previous") if rec else None
                if prev and prev != c.RUNTIME_NAME:
                    engine["runtime"] = prev
                else:
                    del engine["runtime"]
            elif key == "cgroup_manager" and rec and engine.get(key) == ours_value:
                if rec.get("previous") is None:
                    del engine[key]
                else:
                    engine[key] = rec["previous"]
        if len(engine) == 0 and "engine" in made:
            del doc["engine"]
    for k in ("engine.runtime_supports_json", "engine.cgroup_manager", "engine.runtime"):
        undo.pop(k, None)
    new = doc.as_string()
    if undo.pop("file", None) and not new.strip() and new != text:
        return None, undo
    return new, undo


def status_of(data: dict, binary: str = c.RUNC_BINARY) -> tuple[bool, bool, str]:
    engine = data.get("engine") or {}
    rt = (engine.get("runtimes") or {}).get(c.RUNTIME_NAME) or []
    registered = bool(rt)
    problems = []
    if registered and binary not in rt:
        problems.append(f"runtimes.isobox is {rt}, not [{binary!r}]")
    rsj = engine.get("runtime_supports_json")
    if registered and (rsj is None or not set(OUR_NAMES) <= set(rsj)):
        problems.append("isobox and isobox-runc are missing from runtime_supports_json")
    if registered and engine.get("cgroup_manager") != "cgroupfs":
        problems.append("cgroup_manager is not cgroupfs")
    return registered, engine.get("runtime") == c.RUNTIME_NAME, "; ".join(problems)


def install(p: str | None = None, default: bool = False, binary: str = c.RUNC_BINARY) -> c.Outcome:
    where = path(p)
    text = c.read_text(where)
    undo = c.load_undo(where)
    new, new_undo = install_text(text, undo, binary, default, where)
    what = "runtime isobox" + (" as the default runtime" if default else "")
    if new == text:
        return c.Outcome("podman", where, False, f"{where} already has {what}; nothing changed")
    c.commit(where, text, new, undo, new_undo)
    bak = where + c.BACKUP_SUFFIX
    return c.Outcome("podman", where, True,
                     f"added {what} (cgroupfs manager, JSON-capable) to {where}"
                     + (f"; original kept in {bak}" if text is not None else "; new file"),
                     RELOAD + "; then `podman --runtime isobox run ...`" + (" or plain `podman run`" if default else ""))


def uninstall(p: str | None = None) -> c.Outcome:
    return c.uninstall_file("podman", path(p), uninstall_text, RELOAD, "runtime")
