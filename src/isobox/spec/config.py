"""Loading and structurally validating an OCI bundle's config.json.

Only shape is checked here (types, required fields); what isobox allows is decided in
rewrite.py. Every failure is one IsoboxError line naming the field.
"""
from __future__ import annotations

from isobox import jsonfast as json  # json without its import cost (see jsonfast)
import os

from isobox.errors import IsoboxError

_ID_PUNCT = frozenset("_+-.")


def _id_chars_ok(cid: str) -> bool:
    r"""What re.match(r"^[\w+\-.]+$", cid) accepted, without importing re (~12 ms per runtime
    call): \w is str.isalnum() or "_", and "$" also matches before one final newline."""
    body = cid[:-1] if cid.endswith("\n") else cid
    return bool(body) and all(c.isalnum() or c in _ID_PUNCT for c in body)


# Longer ids than a path component allows (NAME_MAX) get a hashed directory name:
# see key() below.
MAX_ID_LEN = 1024


def validate_id(cid: str) -> str:
    if not cid:
        raise IsoboxError("container id cannot be empty")
    if len(cid) > MAX_ID_LEN:
        raise IsoboxError(f"invalid container id: longer than {MAX_ID_LEN} characters")
    if cid in (".", "..") or not _id_chars_ok(cid):
        raise IsoboxError(f"invalid container id format: {cid!r} (use letters, digits, '_', '+', '-', '.')")
    return cid


_KEY_MAX = 200


def key(cid: str) -> str:
    """The name of the container's state and cgroup directories.

    Ids may be up to 1,024 characters, a directory name only 255 bytes: a long id keeps a
    readable prefix plus a hash. '~' cannot appear in a valid id, so keys never collide
    with ids."""
    raw = cid.encode()
    if len(raw) <= _KEY_MAX:
        return cid
    import hashlib
    return raw[:64].decode(errors="ignore") + "~" + hashlib.sha256(raw).hexdigest()[:40]


def _expect(cond: bool, field: str, what: str) -> None:
    if not cond:
        raise IsoboxError(f"config.json: {field} {what}")


def _str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def load_bundle(bundle: str) -> dict:
    """Read and shape-check <bundle>/config.json; returns the parsed spec."""
    if not os.path.isdir(bundle):
        raise IsoboxError(f"bundle {bundle!r} is not a directory")
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise IsoboxError(f"no config.json in bundle {bundle!r} (create one with `isobox-runc spec`)") from None
    except OSError as e:
        raise IsoboxError(f"cannot read {path}: {e.strerror}") from None
    try:
        spec = json.loads(raw)
    except ValueError as e:
        raise IsoboxError(f"config.json is not valid JSON: {e}") from None
    check_spec(spec)
    return spec


def check_process(proc: object, field: str = "process") -> None:
    _expect(isinstance(proc, dict), field, "must be an object")
    assert isinstance(proc, dict)
    _expect(_str_list(proc.get("args")) and proc.get("args"), f"{field}.args", "must be a non-empty list of strings")
    _expect(_str_list(proc.get("env", [])), f"{field}.env", "must be a list of strings")
    cwd = proc.get("cwd", "/")
    _expect(isinstance(cwd, str) and cwd.startswith("/"), f"{field}.cwd", "must be an absolute path")
    user = proc.get("user", {})
    _expect(isinstance(user, dict), f"{field}.user", "must be an object")
    for k in ("uid", "gid"):
        v = user.get(k, 0)
        _expect(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 - 1, f"{field}.user.{k}",
                "must be a non-negative integer")
    ag = user.get("additionalGids", [])
    _expect(isinstance(ag, list) and all(isinstance(g, int) and g >= 0 for g in ag), f"{field}.user.additionalGids",
            "must be a list of non-negative integers")
    caps = proc.get("capabilities", {})
    _expect(isinstance(caps, dict), f"{field}.capabilities", "must be an object")
    for k, v in caps.items():
        _expect(_str_list(v), f"{field}.capabilities.{k}", "must be a list of strings")
    rl = proc.get("rlimits", [])
    _expect(isinstance(rl, list), f"{field}.rlimits", "must be a list")
    for r in rl:
        _expect(isinstance(r, dict) and isinstance(r.get("type"), str) and isinstance(r.get("hard"), int)
                and isinstance(r.get("soft"), int), f"{field}.rlimits", "entries need type, soft and hard")


def check_spec(spec: object) -> None:
    _expect(isinstance(spec, dict), "the top level", "must be an object")
    assert isinstance(spec, dict)
    _expect(isinstance(spec.get("ociVersion"), str), "ociVersion", "is missing")
    root = spec.get("root")
    _expect(isinstance(root, dict) and isinstance(root.get("path"), str) and root.get("path"), "root.path",
            "is missing")
    check_process(spec.get("process"))
    mounts = spec.get("mounts", [])
    _expect(isinstance(mounts, list), "mounts", "must be a list")
    for i, m in enumerate(mounts):
        _expect(isinstance(m, dict) and isinstance(m.get("destination"), str), f"mounts[{i}].destination",
                "is missing")
        _expect(m["destination"].startswith("/"), f"mounts[{i}].destination", "must be an absolute path")
        _expect(_str_list(m.get("options", [])), f"mounts[{i}].options", "must be a list of strings")
    linux = spec.get("linux", {})
    _expect(isinstance(linux, dict), "linux", "must be an object")
    ns = linux.get("namespaces", [])
    _expect(isinstance(ns, list) and all(isinstance(n, dict) and isinstance(n.get("type"), str) for n in ns),
            "linux.namespaces", "must be a list of {type, path}")
    for key in ("uidMappings", "gidMappings"):
        maps = linux.get(key, [])
        _expect(isinstance(maps, list), f"linux.{key}", "must be a list")
        for m in maps:
            _expect(isinstance(m, dict) and all(isinstance(m.get(k), int) for k in ("containerID", "hostID", "size")),
                    f"linux.{key}", "entries need containerID, hostID and size")
    for key in ("maskedPaths", "readonlyPaths"):
        _expect(_str_list(linux.get(key, [])), f"linux.{key}", "must be a list of strings")
    _expect(isinstance(linux.get("sysctl", {}), dict), "linux.sysctl", "must be an object")
    _expect(isinstance(linux.get("resources", {}), dict), "linux.resources", "must be an object")
    _expect(isinstance(spec.get("hostname", ""), str), "hostname", "must be a string")
