"""Bundles for `isobox run`: the runtime's default spec, adjusted for the user's flags."""
from __future__ import annotations

import json
import os
import re

from isobox.errors import IsoboxError
from isobox.linux.capabilities import NAMES, last_cap
from isobox.runc.spec_template import template

BUNDLES = "/run/isobox-bundles"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)[bB]?", text.strip())
    if not m:
        raise IsoboxError(f"invalid size {text!r}: use a number with an optional k, m or g suffix (e.g. 256m)")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]


def make_spec(args: list[str], rootfs: str, privileged: bool, memory: str | None, cpus: str | None,
              hostname: str = "isobox") -> dict:
    spec = template(args)
    spec["root"] = {"path": rootfs, "readonly": False}
    spec["hostname"] = hostname
    proc = spec["process"]
    proc["noNewPrivileges"] = False
    if privileged:
        caps = list(NAMES[: last_cap() + 1])
        proc["capabilities"] = {k: list(caps) for k in ("bounding", "effective", "permitted")}
        # like dockerd's --privileged: no masks or read-only paths asked for (isobox adds its own)
        spec["linux"]["maskedPaths"] = []
        spec["linux"]["readonlyPaths"] = []
        for m in spec["mounts"]:
            if m["destination"] == "/sys":
                m["options"] = [o for o in m["options"] if o != "ro"]
    else:
        base = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
                "CAP_KILL", "CAP_AUDIT_WRITE"]
        proc["capabilities"] = {k: list(base) for k in ("bounding", "effective", "permitted")}
    res = spec["linux"].setdefault("resources", {})
    if memory:
        res["memory"] = {"limit": parse_size(memory)}
    if cpus:
        try:
            n = float(cpus)
        except ValueError:
            n = 0
        if n <= 0:
            raise IsoboxError(f"invalid --cpus {cpus!r}: use a positive number such as 0.5 or 2")
        res["cpu"] = {"period": 100000, "quota": int(n * 100000)}
    return spec


def write_bundle(cid: str, spec: dict) -> str:
    d = os.path.join(BUNDLES, cid)
    os.makedirs(d, mode=0o700)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(spec, f)
    return d


def remove_bundle(path: str) -> None:
    try:
        os.unlink(os.path.join(path, "config.json"))
        os.rmdir(path)
    except FileNotFoundError:
        pass
