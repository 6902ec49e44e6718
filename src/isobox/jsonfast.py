"""json.loads/dumps for the runtime's hot path, without importing `json`.

`import json` costs ~15 ms of every isobox-runc call: json.decoder imports `re` (and with
it enum, functools, collections). This module drives the same C accelerator (`_json`)
the json package uses, with the same defaults, so the output and the parsed values are
identical to json.loads / json.dumps (tests/unit/test_jsonfast.py compares them).

Supported: loads(str | bytes), load(file), dumps(obj, indent=None | str | int),
dump(obj, file, indent=...). Malformed input raises json.JSONDecodeError (a ValueError),
with json's messages and positions; the json package is imported only to raise it.
"""
from __future__ import annotations

import _json

__all__ = ["loads", "load", "dumps", "dump"]

_INF = float("inf")
_CONSTANTS = {"-Infinity": -_INF, "Infinity": _INF, "NaN": float("nan")}


class _Context:
    """What _json.make_scanner reads from a json.JSONDecoder() with default arguments."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__
    memo: dict = {}


_scan_once = _json.make_scanner(_Context())
_encode_str = _json.encode_basestring_ascii
_WS = " \t\n\r"


def _error(msg: str, doc: str, pos: int) -> ValueError:
    from json import JSONDecodeError  # error path only
    return JSONDecodeError(msg, doc, pos)


def _skip_ws(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    return i


def _detect_encoding(b: bytes) -> str:
    # json.detect_encoding, verbatim in behaviour
    bstartswith = b.startswith
    if bstartswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "utf-32"
    if bstartswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if bstartswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    if len(b) >= 4:
        if not b[0]:
            return "utf-16-be" if b[1] else "utf-32-be"
        if not b[1]:
            return "utf-16-le" if b[2] or b[3] else "utf-32-le"
    elif len(b) == 2:
        if not b[0]:
            return "utf-16-be"
        if not b[1]:
            return "utf-16-le"
    return "utf-8"


def loads(s: str | bytes | bytearray):
    """json.loads(s) with default arguments."""
    if isinstance(s, str):
        if s.startswith("\ufeff"):
            raise _error("Unexpected UTF-8 BOM (decode using utf-8-sig)", s, 0)
    else:
        if not isinstance(s, (bytes, bytearray)):
            raise TypeError(f"the JSON object must be str, bytes or bytearray, not {s.__class__.__name__}")
        s = s.decode(_detect_encoding(s), "surrogatepass")
    try:
        obj, end = _scan_once(s, _skip_ws(s, 0))
    except StopIteration as err:
        raise _error("Expecting value", s, err.value) from None
    end = _skip_ws(s, end)
    if end != len(s):
        raise _error("Extra data", s, end)
    return obj


def load(fp):
    return loads(fp.read())


def _default(o):
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


def _floatstr(o: float) -> str:
    if o != o:
        return "NaN"
    if o == _INF:
        return "Infinity"
    if o == -_INF:
        return "-Infinity"
    return float.__repr__(o)


def _indented(o, indent: str, level: int, markers: dict, out: list) -> None:
    """json's pure-Python encoder (_make_iterencode) for an indent, default arguments."""
    if isinstance(o, str):
        out.append(_encode_str(o))
    elif o is None:
        out.append("null")
    elif o is True:
        out.append("true")
    elif o is False:
        out.append("false")
    elif isinstance(o, int):
        out.append(int.__repr__(o))
    elif isinstance(o, float):
        out.append(_floatstr(o))
    elif isinstance(o, (list, tuple, dict)):
        is_dict = isinstance(o, dict)
        if not o:
            out.append("{}" if is_dict else "[]")
            return
        mid = _mark(o, markers)
        nl = "\n" + indent * (level + 1)
        out.append(("{" if is_dict else "[") + nl)
        for n, v in enumerate(o.items() if is_dict else o):
            if is_dict:
                k, v = v
                k = _key(k)             # before the separator, as json raises for a bad key
            if n:
                out.append("," + nl)
            if is_dict:
                out.append(_encode_str(k) + ": ")
            _indented(v, indent, level + 1, markers, out)
        out.append("\n" + indent * level + ("}" if is_dict else "]"))
        del markers[mid]
    else:
        mid = _mark(o, markers)
        _indented(_default(o), indent, level, markers, out)
        del markers[mid]


def _mark(o, markers: dict) -> int:
    """Records o as being encoded; a second visit is json's circular-reference error."""
    mid = id(o)
    if mid in markers:
        raise ValueError("Circular reference detected")
    markers[mid] = o
    return mid


def _key(k) -> str:
    if isinstance(k, str):
        return k
    if isinstance(k, float):
        return _floatstr(k)
    if k is True:
        return "true"
    if k is False:
        return "false"
    if k is None:
        return "null"
    if isinstance(k, int):
        return int.__repr__(k)
    raise TypeError(f"keys must be str, int, float, bool or None, not {k.__class__.__name__}")


def dumps(obj, indent: str | int | None = None) -> str:
    """json.dumps(obj) or json.dumps(obj, indent=indent), other arguments at their defaults."""
    if indent is None:
        if isinstance(obj, str):
            return _encode_str(obj)
        # a fresh encoder per call, as json does: its circular-reference markers are per call
        enc = _json.make_encoder({}, _default, _encode_str, None, ": ", ", ", False, False, True)
        return "".join(enc(obj, 0))
    if not isinstance(indent, str):
        indent = " " * indent
    out: list[str] = []
    _indented(obj, indent, 0, {}, out)
    return "".join(out)


def dump(obj, fp, indent: str | int | None = None) -> None:
    fp.write(dumps(obj, indent))
