"""Request bodies decoded the way dockerd's Go encoding/json decodes them, and re-encoded.

What the gate checks must be exactly what dockerd acts on. Python's json and Go's differ:

- Go matches an object key to a struct field case-insensitively (exact name first), with
  Unicode simple folding: "hostconfig", "HOSTCONFIG" and "Hoſtconfig" (U+017F) are HostConfig.
- Duplicate keys: the last one wins, field by field. A struct (or pointer to one) that
  appears twice is decoded INTO the same value, so {"HostConfig":{"Binds":[..]},
  "hostconfig":{"Privileged":true}} keeps both Binds and Privileged. A map is merged the
  same way; an array is decoded element by element into the slice's old backing array, so
  struct elements merge with what an earlier duplicate put there (golang/go#21092).
- null leaves a string, bool or struct unchanged, and sets a pointer, slice or map to nil.
- Invalid UTF-8 and lone surrogates in strings become U+FFFD; NaN/Infinity are not JSON.
- json.Decoder (what dockerd uses) reads the first value and ignores what follows.
- Container create (runconfig.ContainerConfigWrapper) embeds *container.HostConfig at the
  top level besides the inner "HostConfig" field (a deprecated API form): {"Binds":[..]}
  without "HostConfig" is the host config; with one, a few fields are copied across.

decode() mirrors those rules over a schema (the Go types, reduced to what the gate checks;
fields of other types are kept as raw JSON: "Any"), and encode() writes the value back with
Go's field names and one key per field, so dockerd receives exactly what was checked. Keys
that match no field are kept under their own names: dockerd ignores them today, and the
gate must not drop anything a newer dockerd might read.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any as TAny


class GoJSONError(ValueError):
    """The body is not something dockerd would decode without an error."""


class Num(str):
    """A JSON number, kept as its literal text (Go parses it per field type; Python's float
    would turn 1e400 into inf, which is not JSON)."""


class Obj(list):
    """A JSON object as its (key, value) pairs, duplicates and order kept."""


_MISSING = object()
_SURROGATE = re.compile("[\ud800-\udfff]")


def _fix(s: str) -> str:
    # Go's decoder turns an unpaired \uD800-\uDFFF escape into U+FFFD.
    return _SURROGATE.sub("\ufffd", s)


def fold(name: str) -> str:
    """Go's case folding for key matching, as far as it can reach an ASCII field name:
    ASCII letters, and the two non-ASCII letters that fold to them (ſ U+017F -> s,
    K U+212A -> k). Any other non-ASCII letter cannot match an ASCII name."""
    out = []
    for ch in name:
        if ch == "\u017f":
            ch = "s"
        elif ch == "\u212a":
            ch = "k"
        elif "A" <= ch <= "Z":
            ch = chr(ord(ch) + 32)
        out.append(ch)
    return "".join(out)


# --- types -------------------------------------------------------------------------------

class GoType:
    name = "value"

    def zero(self) -> TAny:
        return None

    def decode(self, old: TAny, v: TAny) -> TAny:
        raise NotImplementedError

    def encode(self, val: TAny) -> TAny:
        return val


def _kind(v: TAny) -> str:
    if v is None:
        return "null"
    if isinstance(v, Obj):
        return "object"
    if isinstance(v, list):
        return "array"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, Num):
        return "number"
    return "string"


class _Str(GoType):
    name = "string"

    def zero(self) -> str:
        return ""

    def decode(self, old, v):
        if v is None:
            return old                      # null leaves a string unchanged
        if isinstance(v, str) and not isinstance(v, Num):
            return _fix(v)
        raise GoJSONError(f"cannot unmarshal {_kind(v)} into a Go string")


class _Bool(GoType):
    name = "bool"

    def zero(self) -> bool:
        return False

    def decode(self, old, v):
        if v is None:
            return old
        if isinstance(v, bool):
            return v
        raise GoJSONError(f"cannot unmarshal {_kind(v)} into a Go bool")


class _Any(GoType):
    """A field the gate does not check: the raw JSON, forwarded as received (last duplicate)."""
    name = "any"

    def decode(self, old, v):
        return v

    def encode(self, val):
        return val


Str, Bool, Any = _Str(), _Bool(), _Any()


@dataclass
class Ptr(GoType):
    elem: GoType

    def decode(self, old, v):
        if v is None:
            return None                     # null sets a pointer to nil
        return self.elem.decode(old if old is not None else self.elem.zero(), v)

    def encode(self, val):
        return None if val is None else self.elem.encode(val)


@dataclass
class GoSlice:
    """A Go slice: its backing array (len = cap) and its length."""
    backing: list
    length: int

    @property
    def items(self) -> list:
        return self.backing[:self.length]


@dataclass
class Slice(GoType):
    elem: GoType

    def decode(self, old, v):
        if v is None:
            return None
        if not isinstance(v, list) or isinstance(v, Obj):
            raise GoJSONError(f"cannot unmarshal {_kind(v)} into a Go slice")
        backing = list(old.backing) if old is not None else []
        length = old.length if old is not None else 0
        i = 0
        for item in v:
            if i >= len(backing):           # grow as reflect does: cap*1.5, at least 4; len copied
                newcap = max(len(backing) + len(backing) // 2, 4)
                backing = backing[:length] + [self.elem.zero() for _ in range(newcap - length)]
            if i >= length:
                length = i + 1
            backing[i] = self.elem.decode(backing[i], item)   # into the old element: merges
            i += 1
        if i < length:
            length = i
        if i == 0:
            return GoSlice([], 0)
        return GoSlice(backing, length)

    def encode(self, val):
        return None if val is None else [self.elem.encode(x) for x in val.items]


@dataclass
class Map(GoType):
    """map[string]T: keys exact (no folding), merged into an existing map, last duplicate wins."""
    elem: GoType

    def decode(self, old, v):
        if v is None:
            return None
        if not isinstance(v, Obj):
            raise GoJSONError(f"cannot unmarshal {_kind(v)} into a Go map")
        m = dict(old) if old is not None else {}
        for k, item in v:
            # each value is decoded into a fresh zero value (never merged)
            m[_fix(k)] = self.elem.decode(self.elem.zero(), item)
        return m

    def encode(self, val):
        return None if val is None else Obj((k, self.elem.encode(x)) for k, x in val.items())


@dataclass
class StructVal:
    fields: dict = field(default_factory=dict)      # Go field name -> value (fields the body set)
    unknown: list = field(default_factory=list)     # (key, raw JSON) that matched no field

    def get(self, name: str, default: TAny = None) -> TAny:
        return self.fields.get(name, default)


class Struct(GoType):
    def __init__(self, name: str, fields: dict[str, GoType]):
        self.name = name
        self.fields = fields
        self._folded: dict[str, str] = {}
        for f in fields:
            self._folded.setdefault(fold(f), f)

    def zero(self) -> StructVal:
        return StructVal()

    def field_for(self, key: str) -> str | None:
        if key in self.fields:                      # an exact match is preferred
            return key
        return self._folded.get(fold(key))

    def decode(self, old, v):
        if v is None:
            return old                              # null leaves a struct unchanged
        if not isinstance(v, Obj):
            raise GoJSONError(f"cannot unmarshal {_kind(v)} into Go struct {self.name}")
        sv = StructVal(dict(old.fields), list(old.unknown)) if old is not None else StructVal()
        for k, item in v:
            f = self.field_for(k)
            if f is None:
                sv.unknown.append((k, item))
                continue
            t = self.fields[f]
            prev = sv.fields.get(f, _MISSING)
            sv.fields[f] = t.decode(t.zero() if prev is _MISSING else prev, item)
        return sv

    def encode(self, val):
        out = Obj((f, self.fields[f].encode(x)) for f, x in val.fields.items())
        out.extend(val.unknown)
        return out


# --- the Docker API types (moby v20.10 api/types) ----------------------------------------

DEVICE_MAPPING = Struct("DeviceMapping", {"PathOnHost": Str, "PathInContainer": Str, "CgroupPermissions": Str})
DRIVER = Struct("mount.Driver", {"Name": Str, "Options": Map(Str)})
VOLUME_OPTIONS = Struct("mount.VolumeOptions", {"NoCopy": Any, "Labels": Any, "DriverConfig": Ptr(DRIVER)})
MOUNT = Struct("mount.Mount", {
    "Type": Str, "Source": Str, "Target": Str, "ReadOnly": Any, "Consistency": Any,
    "BindOptions": Any, "VolumeOptions": Ptr(VOLUME_OPTIONS), "TmpfsOptions": Any})

RESOURCES_FIELDS: dict[str, GoType] = {
    **{n: Any for n in (
        "CpuShares", "Memory", "NanoCpus", "CgroupParent", "BlkioWeight", "BlkioWeightDevice",
        "BlkioDeviceReadBps", "BlkioDeviceWriteBps", "BlkioDeviceReadIOps", "BlkioDeviceWriteIOps",
        "CpuPeriod", "CpuQuota", "CpuRealtimePeriod", "CpuRealtimeRuntime", "CpusetCpus", "CpusetMems",
        "DeviceCgroupRules", "DeviceRequests", "KernelMemory", "KernelMemoryTCP", "MemoryReservation",
        "MemorySwap", "MemorySwappiness", "OomKillDisable", "PidsLimit", "Ulimits", "CpuCount",
        "CpuPercent", "IOMaximumIOps", "IOMaximumBandwidth")},
    "Devices": Slice(DEVICE_MAPPING),
}
HOST_CONFIG_FIELDS: dict[str, GoType] = {
    **{n: Any for n in (
        "ContainerIDFile", "LogConfig", "PortBindings", "RestartPolicy", "AutoRemove", "VolumeDriver",
        "CapAdd", "CapDrop", "Dns", "DnsOptions", "DnsSearch", "ExtraHosts", "GroupAdd", "Cgroup",
        "Links", "OomScoreAdj", "Privileged", "PublishAllPorts", "ReadonlyRootfs", "SecurityOpt",
        "StorageOpt", "Tmpfs", "ShmSize", "Sysctls", "ConsoleSize", "Isolation", "MaskedPaths",
        "ReadonlyPaths", "Init")},
    "Binds": Slice(Str), "VolumesFrom": Slice(Str), "Mounts": Slice(MOUNT),
    "NetworkMode": Str, "PidMode": Str, "IpcMode": Str, "UTSMode": Str, "UsernsMode": Str,
    "CgroupnsMode": Str, "Runtime": Str,
    **RESOURCES_FIELDS,                                     # container.Resources is embedded
}
HOST_CONFIG = Struct("container.HostConfig", HOST_CONFIG_FIELDS)
CONFIG_FIELDS: dict[str, GoType] = {
    **{n: Any for n in (
        "Hostname", "Domainname", "AttachStdin", "AttachStdout", "AttachStderr", "ExposedPorts", "Tty",
        "OpenStdin", "StdinOnce", "Env", "Cmd", "Healthcheck", "ArgsEscaped", "Volumes", "WorkingDir",
        "Entrypoint", "NetworkDisabled", "MacAddress", "OnBuild", "Labels", "StopSignal", "StopTimeout",
        "Shell")},
    "Image": Str, "User": Str,
}
# runconfig.ContainerConfigWrapper: *Config and (deprecated) *HostConfig embedded, their
# fields promoted to the top level, next to HostConfig, Cpuset and NetworkingConfig.
CONTAINER_CREATE = Struct("runconfig.ContainerConfigWrapper", {
    **CONFIG_FIELDS, **HOST_CONFIG_FIELDS,
    "HostConfig": Ptr(HOST_CONFIG), "Cpuset": Str, "NetworkingConfig": Any})

EXEC_CREATE = Struct("types.ExecConfig", {n: Any for n in (
    "User", "Privileged", "Tty", "AttachStdin", "AttachStderr", "AttachStdout", "Detach", "DetachKeys",
    "Env", "WorkingDir", "Cmd")})

VOLUME_CREATE = Struct("volume.VolumeCreateBody", {
    "Driver": Str, "DriverOpts": Map(Str), "Labels": Any, "Name": Str})

CONTAINER_SPEC = Struct("swarm.ContainerSpec", {
    **{n: Any for n in (
        "Labels", "Command", "Args", "Hostname", "Env", "Dir", "User", "Groups", "Privileges", "Init",
        "StopSignal", "TTY", "OpenStdin", "ReadOnly", "StopGracePeriod", "Healthcheck", "Hosts",
        "DNSConfig", "Secrets", "Configs", "Isolation", "Sysctls", "Capabilities", "CapabilityAdd",
        "CapabilityDrop", "Ulimits")},
    "Image": Str, "Mounts": Slice(MOUNT)})
TASK_SPEC = Struct("swarm.TaskSpec", {
    **{n: Any for n in ("PluginSpec", "NetworkAttachmentSpec", "Resources", "RestartPolicy", "Placement",
                        "Networks", "LogDriver", "ForceUpdate", "Runtime")},
    "ContainerSpec": Ptr(CONTAINER_SPEC)})
SERVICE_SPEC = Struct("swarm.ServiceSpec", {
    **{n: Any for n in ("Name", "Labels", "Mode", "UpdateConfig", "RollbackConfig", "Networks", "EndpointSpec")},
    "TaskTemplate": TASK_SPEC})


# --- decoding and encoding ---------------------------------------------------------------

def _no_constant(name: str):
    raise GoJSONError(f"invalid character in JSON: {name}")


_DECODER = json.JSONDecoder(object_pairs_hook=Obj, parse_float=Num, parse_int=Num, parse_constant=_no_constant)


def parse(body: bytes) -> TAny:
    """The first JSON value of body as dockerd's json.Decoder reads it (trailing data ignored),
    objects as Obj pairs, numbers as Num."""
    text = body.decode("utf-8", errors="replace")          # Go: invalid UTF-8 -> U+FFFD
    i = 0
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    if i == len(text):
        raise GoJSONError("empty body (EOF)")
    try:
        value, _end = _DECODER.raw_decode(text, i)
    except json.JSONDecodeError as e:
        raise GoJSONError(f"invalid JSON: {e.msg} at offset {e.pos}") from None
    except RecursionError:
        raise GoJSONError("invalid JSON: nested too deeply") from None
    return value


def decode(schema: GoType, body: bytes) -> TAny:
    """body decoded into schema as Go would decode it into the zero value of that type."""
    return schema.decode(schema.zero(), parse(body))


def _dump(v: TAny) -> str:
    if isinstance(v, Obj):
        return "{" + ",".join(json.dumps(k) + ":" + _dump(x) for k, x in v) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_dump(x) for x in v) + "]"
    if isinstance(v, Num):
        return str.__str__(v)
    return json.dumps(v)


def encode(schema: GoType, value: TAny) -> bytes:
    return _dump(schema.encode(value)).encode()


# --- container create: the host config dockerd will use ------------------------------------

_TOP_COPIED = ("Memory", "MemorySwap", "CpuShares", "CpusetCpus", "VolumeDriver")


def _nonzero(v: TAny) -> bool:
    if isinstance(v, Num):
        try:
            return float(v) != 0
        except ValueError:
            return True
    return v not in (None, "", False)


@dataclass
class ContainerCreate:
    config: StructVal                       # the wrapper as decoded (Config fields at the top)
    host_config: StructVal | None           # what runconfig's getHostConfig() returns

    def body(self) -> bytes:
        """The canonical body: Config fields, then the one HostConfig dockerd would use
        (top-level host-config fields folded in as getHostConfig does), then the rest."""
        out = Obj()
        for f, v in self.config.fields.items():
            if f in CONFIG_FIELDS:
                out.append((f, CONTAINER_CREATE.fields[f].encode(v)))
        if self.host_config is not None:
            out.append(("HostConfig", HOST_CONFIG.encode(self.host_config)))
        if "NetworkingConfig" in self.config.fields:
            out.append(("NetworkingConfig", self.config.fields["NetworkingConfig"]))
        out.extend(self.config.unknown)
        return _dump(out).encode()


def container_create(body: bytes) -> ContainerCreate:
    w = decode(CONTAINER_CREATE, body)
    if w is None:                           # a JSON null: Go leaves the zero wrapper
        w = StructVal()
    top = {f: v for f, v in w.fields.items() if f in HOST_CONFIG_FIELDS}
    inner = w.fields.get("HostConfig")
    hc: StructVal | None
    if inner is None:
        # the embedded *HostConfig is allocated by any top-level host-config key (even null)
        hc = StructVal(dict(top)) if top else None
    else:
        hc = StructVal(dict(inner.fields), list(inner.unknown))
        for f in _TOP_COPIED:
            if _nonzero(top.get(f)) and not _nonzero(hc.fields.get(f)):
                hc.fields[f] = top[f]
    cpuset = w.fields.get("Cpuset", "")
    if hc is not None and cpuset and not _nonzero(hc.fields.get("CpusetCpus")):
        hc.fields["CpusetCpus"] = cpuset
    return ContainerCreate(w, hc)
