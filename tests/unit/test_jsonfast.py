"""isobox.jsonfast must parse and print exactly as json does (for the arguments it takes)."""
from __future__ import annotations

import io
import json
import math
import random

import pytest

from isobox import jsonfast

DOCS = [
    "{}", "[]", "null", "true", "false", "0", "-0", "1e400", "-1e400", "12345678901234567890123456789",
    "1.5", "-2.25e-3", "0.1", '""', '"a\\u00e9\\ud83d\\ude00"', '"\\ud800"', '"\\udc00x"', '"\\n\\t\\"\\\\\\/\\b\\f\\r"',
    "NaN", "Infinity", "-Infinity", "[NaN, Infinity, -Infinity]",
    ' \t\n\r {"a": [1, 2, {"b": null}], "c": "\u00fc\u4e2d\U0001f600"} \n',
    '{"a": 1, "a": 2}', '[[[[[[[]]]]]]]', '{"": ""}', '"\x7f"',
    json.dumps({"ociVersion": "1.2.0", "process": {"args": ["sh", "-c", "echo hi"], "env": ["A=b"]},
                "mounts": [{"destination": "/proc", "type": "proc"}], "x": [1.0, 2.5e10, -3]}),
]
BAD = [
    "", " ", "{", "[", "[1,]", "{'a': 1}", '{"a" 1}', '{"a": 1,}', "tru", "nul", '"abc', '"\\x"', '"\\u12"',
    "1 2", "[1] x", "01", "-", "\ufeff{}", '"a\nb"', '"\x01"', "{1: 2}", "[1 2]", "NaNx", "}", "  ]",
    '"\\ud800\\u"', "1.", ".5", "+1", "[" * 3 + "1" + "]" * 2,
]


@pytest.mark.parametrize("doc", DOCS)
def test_loads_same_as_json(doc):
    a, b = jsonfast.loads(doc), json.loads(doc)
    assert repr(a) == repr(b)
    assert repr(jsonfast.loads(doc.encode())) == repr(json.loads(doc.encode()))


@pytest.mark.parametrize("enc", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32",
                                 "utf-32-le", "utf-32-be"])
def test_loads_bytes_encodings(enc):
    doc = '{"k": "\u00e9\U0001f600", "n": [1, 2]}'
    raw = doc.encode(enc)
    assert jsonfast.loads(raw) == json.loads(raw)
    assert jsonfast.loads(bytearray(raw)) == json.loads(bytearray(raw))


@pytest.mark.parametrize("doc", BAD)
def test_bad_input_same_error(doc):
    with pytest.raises(json.JSONDecodeError) as want:
        json.loads(doc)
    with pytest.raises(json.JSONDecodeError) as got:
        jsonfast.loads(doc)
    assert isinstance(got.value, ValueError)
    assert (got.value.msg, got.value.pos, got.value.lineno, got.value.colno, str(got.value)) == \
        (want.value.msg, want.value.pos, want.value.lineno, want.value.colno, str(want.value))


def test_bad_bytes_and_type():
    with pytest.raises(UnicodeDecodeError):
        json.loads(b'"\xff"')
    with pytest.raises(UnicodeDecodeError):
        jsonfast.loads(b'"\xff"')
    with pytest.raises(TypeError) as want:
        json.loads(1)
    with pytest.raises(TypeError) as got:
        jsonfast.loads(1)
    assert str(got.value) == str(want.value)


VALUES = [
    None, True, False, 0, -1, 2**70, -(2**70), 1.5, 0.1, -0.0, 1e300, 1e-300, float("nan"), float("inf"),
    float("-inf"), "", "abc", "é\u4e2d\U0001f600", "\ud800", "\udfff", "\x00\x1f\x7f\"\\/\n\r\t\b\f", [], {}, (),
    [1, [2, [3, []]]], (1, 2), {"a": {}, "b": [], "c": [{}], "d": {"e": None}},
    {1: "int", 2.5: "float", True: "t", False: "f", None: "n", "s": "s"},
    {"ociVersion": "1.2.0", "id": "c1", "pid": 42, "status": "running", "bundle": "/b", "rootfs": "/b/rootfs",
     "created": "2024-01-01T00:00:00.000000000Z", "annotations": {"k": "v", "ü": "é"}, "owner": ""},
]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
@pytest.mark.parametrize("indent", [None, "  ", "    ", "\t", 0, 2, ""])
def test_dumps_same_as_json(value, indent):
    assert jsonfast.dumps(value, indent=indent) == json.dumps(value, indent=indent)
    if indent is None:
        assert jsonfast.dumps(value) == json.dumps(value)


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "none", "bool"] + (["list", "dict"] * 2 if depth < 4 else [])
    k = rng.choice(kinds)
    if k == "int":
        return rng.choice([rng.randint(-10, 10), rng.randint(-2**80, 2**80)])
    if k == "float":
        return rng.choice([rng.uniform(-1e6, 1e6), rng.random() * 10 ** rng.randint(-300, 300)])
    if k == "str":
        return "".join(chr(rng.choice([rng.randint(0, 0x7f), rng.randint(0x80, 0xffff), rng.randint(0x10000, 0x10ffff)]))
                       for _ in range(rng.randint(0, 8)))
    if k == "none":
        return None
    if k == "bool":
        return rng.random() < 0.5
    if k == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {_random_value(rng, 9) if rng.random() < 0.2 else str(rng.random()): _random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 5))}


def test_random_round_trips():
    rng = random.Random(1234)
    for _ in range(500):
        v = _random_value(rng)
        for indent in (None, "  ", 4):
            text = json.dumps(v, indent=indent)
            assert jsonfast.dumps(v, indent=indent) == text
            assert repr(jsonfast.loads(text)) == repr(json.loads(text))
            assert repr(jsonfast.loads(text.encode())) == repr(json.loads(text.encode()))


def test_dumps_errors_like_json():
    class X:
        pass
    for indent in (None, "  "):
        for bad in (X(), {"a": X()}, [1, {2}], {(1, 2): 1}):
            with pytest.raises(TypeError) as want:
                json.dumps(bad, indent=indent)
            with pytest.raises(TypeError) as got:
                jsonfast.dumps(bad, indent=indent)
            assert str(got.value) == str(want.value)
        loop: list = []
        loop.append(loop)
        d: dict = {}
        d["d"] = d
        for cyc in (loop, d):
            with pytest.raises(ValueError) as want:
                json.dumps(cyc, indent=indent)
            with pytest.raises(ValueError) as got:
                jsonfast.dumps(cyc, indent=indent)
            assert str(got.value) == str(want.value)
    # a failed call leaves nothing behind for the next one
    shared = [1]
    with pytest.raises(TypeError):
        jsonfast.dumps([shared, X()])
    assert jsonfast.dumps([shared, shared]) == "[[1], [1]]"


def test_load_dump_files():
    v = {"a": [1, "é"], "b": None}
    f = io.StringIO()
    jsonfast.dump(v, f)
    assert f.getvalue() == json.dumps(v)
    f.seek(0)
    assert jsonfast.load(f) == v
    g = io.StringIO()
    jsonfast.dump(v, g, indent="\t")
    h = io.StringIO()
    json.dump(v, h, indent="\t")
    assert g.getvalue() == h.getvalue()


def test_no_json_or_re_import():
    import subprocess
    import sys
    code = ("import sys; import isobox.jsonfast as j; j.loads(j.dumps({'a': [1.5, 'x']}, indent='  ')); "
            "print(sorted(m for m in sys.modules if m in ('json', 're', 'enum', 'json.decoder')))")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": ""}, cwd="/", check=False)
    if out.returncode != 0:   # isobox not importable from / in this interpreter: run with our path
        out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r); %s" % (
            jsonfast.__file__.rsplit("/isobox/", 1)[0], code)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_nan_values_round_trip():
    v = jsonfast.loads("[NaN, Infinity, -Infinity]")
    assert math.isnan(v[0]) and v[1] == math.inf and v[2] == -math.inf


def test_container_id_check_same_as_the_regex_it_replaced():
    import re
    import sys

    from isobox.spec.config import _id_chars_ok
    rx = re.compile(r"^[\w+\-.]+$")
    for cp in range(sys.maxunicode + 1):
        c = chr(cp)
        for s in (c, "a" + c, c + "b", c + "\n", "\n" + c):
            assert _id_chars_ok(s) == bool(rx.match(s)), repr(s)
    for s in ("", "\n", "a\n", "a\n\n", "a\nb", "..", "a b", "abc-1.2_3+4"):
        assert _id_chars_ok(s) == bool(rx.match(s)), repr(s)


def test_record_behaves_like_a_dataclass():
    import dataclasses

    from isobox.plain import field, record

    @record
    class A:
        x: int
        y: list = field(default_factory=list)
        z: str = "z"

    @dataclasses.dataclass
    class B:
        x: int
        y: list = dataclasses.field(default_factory=list)
        z: str = "z"

    a, b = A(1), B(1)
    assert (a.x, a.y, a.z) == (b.x, b.y, b.z) and A(1).y is not A(1).y
    assert A(1, [2], z="q") == A(1, [2], "q") != A(2)
    assert repr(A(1)).split("(", 1)[1] == repr(B(1)).split("(", 1)[1]
    with pytest.raises(TypeError):
        A()
    with pytest.raises(TypeError):
        A(1, w=2)
    with pytest.raises(TypeError):
        hash(A(1))

    @record(frozen=True)
    class F:
        a: str
        b: tuple = ()

    f = F("a")
    assert f == F("a", ()) and hash(f) == hash(F("a")) and {f: 1}[F("a")] == 1
    with pytest.raises(AttributeError):
        f.a = "b"
