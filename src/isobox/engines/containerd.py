"""containerd: /etc/containerd/config.toml, a CRI runtime `isobox` on the runc v2 shim with
BinaryName = isobox-runc and SystemdCgroup = false; with --default, default_runtime_name.

The CRI runtimes live in a different table per config `version` (Sysbox's installer broke on
exactly this, nestybox/sysbox#1013):
  1 (containerd 1.x, old plugin ids):  [plugins.cri.containerd.runtimes.isobox]
  2 (containerd 1.x):                  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.isobox]
  3 (containerd 2.x):                  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.isobox]
A file without `version` is version 1 (as containerd reads it); no file: a minimal version 2.

containerd has no config reload: SIGHUP is not among the signals it handles
(cmd/containerd/command/main_unix.go handledSignals: TERM, INT, USR1, CHLD, PIPE), so Go's default
action applies and SIGHUP ends the daemon. A restart is needed; running containers survive it
(their shims keep running). `ctr run` ignores the CRI table: use `ctr run --runc-binary`.

tomlkit (comment- and format-preserving) is imported only inside install/uninstall; status reads
with the standard library's tomllib."""
from __future__ import annotations


from isobox.engines import common as c
from isobox.errors import IsoboxError

DEFAULT_PATH = "/etc/containerd/config.toml"
ENV = "ISOBOX_CONTAINERD_CONFIG"
SECTIONS = {
    1: ("plugins", "cri", "containerd"),
    2: ("plugins", "io.containerd.grpc.v1.cri", "containerd"),
    3: ("plugins", "io.containerd.cri.v1.runtime", "containerd"),
}
CRI_IDS = {1: ("cri", "io.containerd.grpc.v1.cri"), 2: ("cri", "io.containerd.grpc.v1.cri"),
           3: ("io.containerd.cri.v1.runtime", "io.containerd.grpc.v1.cri")}
RUNTIME_TYPE = "io.containerd.runc.v2"
MINIMAL = "version = 2\n"
RELOAD = ("restart containerd (it has no config reload, and SIGHUP would end it: containerd's "
          "handledSignals in cmd/containerd/command/main_unix.go lack it); running containers survive "
          "the restart")


def path(p: str | None = None) -> str:
    return c.config_path(ENV, DEFAULT_PATH, p)


def version_of(data, where: str = DEFAULT_PATH) -> int:
    v = data.get("version", 1)
    if isinstance(v, bool) or not isinstance(v, int) or v not in SECTIONS:
        raise IsoboxError(f"{where}: config version {v!r} is not 1, 2 or 3; fix it first, it was left untouched")
    return int(v)


def _parse(text: str, where: str):
    import tomlkit
    from tomlkit.exceptions import TOMLKitError
    try:
        return tomlkit.parse(text)
    except TOMLKitError as e:
        raise IsoboxError(f"{where} is not valid TOML ({e}); fix it first, it was left untouched") from None


def _walk(doc, keys, create: bool, created: list[str] | None = None, base: tuple = ()):
    """The table at `keys`; with create, missing tables are added and their dotted paths
    appended to `created` (uninstall removes only tables install created, and only when empty)."""
    import tomlkit
    cur = doc
    for i, k in enumerate(keys):
        if k not in cur:
            if not create:
                return None
            cur[k] = tomlkit.table(is_super_table=True)
            if created is not None:
                created.append(".".join((*base, *keys[:i + 1])))
        cur = cur[k]
        if not hasattr(cur, "keys"):
            raise IsoboxError(f"`{'.'.join(keys)}` is not a table; fix it first, it was left untouched")
    return cur


def _runtime_table(binary: str):
    import tomlkit
    t = tomlkit.table()
    t["runtime_type"] = RUNTIME_TYPE
    o = tomlkit.table()
    o["BinaryName"] = binary
    o["SystemdCgroup"] = False
    t["options"] = o
    return t


def install_text(text: str | None, undo: dict, binary: str = c.RUNC_BINARY, default: bool = False,
                 where: str = DEFAULT_PATH) -> tuple[str, dict, int]:
    """(new text, new undo record, config version). The text is unchanged when nothing was missing."""
    undo = dict(undo)
    if text is None:
        c.remember(undo, "file", None, "created")
        text = MINIMAL
    doc = _parse(text, where)
    version = version_of(doc, where)
    made: list[str] = []
    sect = _walk(doc, SECTIONS[version], create=True, created=made)
    rts = _walk(sect, ("runtimes",), create=True, created=made, base=SECTIONS[version])
    if made:
        c.remember(undo, "tables", None, made)
    # A `runtimes` table in the file REPLACES containerd's built-in map (checked with `containerd
    # config dump`): without a runc entry, the default handler "runc" would vanish and the CRI
    # plugin would refuse to load. So the built-in runc entry is written too when it is missing.
    if (sect.get("default_runtime_name") or "runc") == "runc" and "runc" not in rts:
        import tomlkit
        t = tomlkit.table()
        t["runtime_type"] = RUNTIME_TYPE
        rts["runc"] = t
        c.remember(undo, "runc", None, "added")
    cur = rts.get(c.RUNTIME_NAME)
    if cur is None:
        rts[c.RUNTIME_NAME] = _runtime_table(binary)
    else:
        if not hasattr(cur, "keys"):
            raise IsoboxError(f"{where}: runtimes.isobox is not a table; fix it first, it was left untouched")
        if cur.get("runtime_type") != RUNTIME_TYPE:
            cur["runtime_type"] = RUNTIME_TYPE
        opts = _walk(cur, ("options",), create=True)
        for k, v in (("BinaryName", binary), ("SystemdCgroup", False)):
            if opts.get(k) != v:
                opts[k] = v
    if default and sect.get("default_runtime_name") != c.RUNTIME_NAME:
        prev = sect.get("default_runtime_name")
        c.remember(undo, "default_runtime_name", None if prev is None else str(prev), c.RUNTIME_NAME)
        sect["default_runtime_name"] = c.RUNTIME_NAME
    new = doc.as_string()
    return new, undo, version


def _prune(doc, keys, made) -> None:
    """Drop the tables along `keys` (deepest first) that install created and that are empty now."""
    for n in range(len(keys), 0, -1):
        if ".".join(keys[:n]) not in made:
            continue
        parent = _walk(doc, keys[:n - 1], create=False) if n > 1 else doc
        if parent is None or keys[n - 1] not in parent:
            continue
        t = parent[keys[n - 1]]
        if hasattr(t, "keys") and len(t) == 0:
            del parent[keys[n - 1]]


def uninstall_text(text: str, undo: dict, where: str = DEFAULT_PATH) -> tuple[str | None, dict]:
    """(new text, or None when the file should go; the undo record left)."""
    undo = dict(undo)
    doc = _parse(text, where)
    version = version_of(doc, where)
    keys = SECTIONS[version]
    sect = _walk(doc, keys, create=False)
    if sect is not None:
        if sect.get("default_runtime_name") == c.RUNTIME_NAME:
            prev = undo.get("default_runtime_name", {}).get("previous")
            if prev and prev != c.RUNTIME_NAME:
                sect["default_runtime_name"] = prev
            else:
                del sect["default_runtime_name"]
        rts = sect.get("runtimes")
        if rts is not None and hasattr(rts, "keys") and c.RUNTIME_NAME in rts:
            del rts[c.RUNTIME_NAME]
        if (rts is not None and hasattr(rts, "keys") and "runc" in undo
                and (rts.get("runc") or {}).unwrap() == {"runtime_type": RUNTIME_TYPE}):
            del rts["runc"]
        _prune(doc, (*keys, "runtimes"), (undo.get("tables") or {}).get("set") or [])
    undo.pop("default_runtime_name", None)
    undo.pop("tables", None)
    undo.pop("runc", None)
    new = doc.as_string()
    if undo.pop("file", None) and new.strip() in ("", MINIMAL.strip()) and new != text:
        return None, undo
    return new, undo


def status_of(data: dict, binary: str = c.RUNC_BINARY) -> tuple[bool, bool, str]:
    """(registered, default, problems that `isobox install` fixes) from a tomllib-parsed config."""
    version = version_of(data)
    sect = data
    for k in SECTIONS[version]:
        sect = sect.get(k) or {}
    rt = (sect.get("runtimes") or {}).get(c.RUNTIME_NAME) or {}
    opts = rt.get("options") or {}
    registered = bool(opts.get("BinaryName"))
    problems = []
    if registered and opts.get("BinaryName") != binary:
        problems.append(f"BinaryName is {opts.get('BinaryName')}, not {binary}")
    if registered and opts.get("SystemdCgroup"):
        problems.append("SystemdCgroup must be false")
    return registered, sect.get("default_runtime_name") == c.RUNTIME_NAME, "; ".join(problems)


def info_of(data: dict) -> str:
    """What doctor adds for containerd: the config version and whether CRI is disabled."""
    version = version_of(data)
    out = f"config version {version}"
    if set(data.get("disabled_plugins") or ()) & set(CRI_IDS[version]):
        out += ("; the CRI plugin is disabled (disabled_plugins): only `ctr run --runc-binary` reaches isobox "
                "until you enable it")
    return out


def _cri_note(text: str, where: str) -> list[str]:
    import tomllib
    try:
        data = tomllib.loads(text)
        disabled = set(data.get("disabled_plugins") or ())
        if disabled & set(CRI_IDS[version_of(data, where)]):
            return ["the CRI plugin is disabled in this file (disabled_plugins): Kubernetes/crictl cannot use "
                    "the handler until you enable it"]
    except (tomllib.TOMLDecodeError, IsoboxError):
        pass
    return []


CTR_NOTE = (f"`ctr run` ignores CRI runtimes: use `ctr run --runc-binary {c.RUNC_BINARY} ...`; "
            "Kubernetes uses the handler `isobox` (deploy/kubernetes/runtimeclass.yaml)")


def install(p: str | None = None, default: bool = False, binary: str = c.RUNC_BINARY) -> c.Outcome:
    where = path(p)
    text = c.read_text(where)
    undo = c.load_undo(where)
    new, new_undo, version = install_text(text, undo, binary, default, where)
    what = "CRI runtime isobox" + (" as the default runtime" if default else "")
    if new == text:
        return c.Outcome("containerd", where, False, f"{where} already has {what}; nothing changed")
    c.commit(where, text, new, undo, new_undo)
    bak = where + c.BACKUP_SUFFIX
    summary = (f"added {what} to {where} (config version {version}, table "
               f"{'.'.join(SECTIONS[version])}.runtimes.isobox)"
               + (f"; original kept in {bak}" if text is not None else "; new file"))
    return c.Outcome("containerd", where, True, summary, RELOAD, [CTR_NOTE, *_cri_note(new, where)])


def uninstall(p: str | None = None) -> c.Outcome:
    return c.uninstall_file("containerd", path(p), uninstall_text, RELOAD, "handler")
