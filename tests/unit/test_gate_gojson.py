"""Request bodies decoded as dockerd's Go encoding/json decodes them, and re-encoded."""
import json

import pytest

from isobox.gate import gojson
from isobox.gate.gojson import GoJSONError, container_create


def hc_of(body: str) -> dict:
    """The HostConfig dockerd would act on, from the gate's re-encoded body."""
    out = json.loads(container_create(body.encode()).body())
    return out.get("HostConfig")


# --- key matching ---------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["HostConfig", "hostconfig", "HOSTCONFIG", "hOsTcOnFiG", "Ho\u017ftConfig"])
def test_keys_match_fields_case_insensitively(key):
    body = json.dumps({"Image": "x", key: {"binds": ["/:/h"]}})
    assert hc_of(body)["Binds"] == ["/:/h"]


def test_kelvin_sign_folds_to_k():
    # U+212A folds to "k" in Go (unicode.SimpleFold); no HostConfig field has a k, so use a map
    v = gojson.Struct("T", {"Kind": gojson.Str}).decode(None, gojson.parse(b'{"\xe2\x84\xaaind": "x"}'))
    assert v.fields == {"Kind": "x"}


def test_other_non_ascii_letters_do_not_fold():
    v = gojson.decode(gojson.CONTAINER_CREATE, '{"Bınds": ["/:/h"]}'.encode())   # dotless i
    assert "Binds" not in v.fields and v.unknown == [("Bınds", ["/:/h"])]


def test_exact_name_is_preferred():
    t = gojson.Struct("T", {"Ab": gojson.Str, "AB": gojson.Str})
    v = t.decode(None, gojson.parse(b'{"AB": "1", "ab": "2"}'))
    assert v.fields == {"AB": "1", "Ab": "2"}     # "ab" folds to the first field in order


# --- duplicates -----------------------------------------------------------------------------------

def test_last_duplicate_wins():
    assert hc_of('{"HostConfig": {"PidMode": "", "PidMode": "host"}}')["PidMode"] == "host"


def test_last_duplicate_wins_across_cases():
    assert hc_of('{"HostConfig": {"Binds": ["/srv:/s"], "binds": ["/:/h"]}}')["Binds"] == ["/:/h"]
    assert hc_of('{"HostConfig": {"binds": ["/:/h"], "BINDS": null}}').get("Binds") is None


def test_duplicate_structs_merge():
    hc = hc_of('{"HostConfig": {"Binds": ["/:/h"]}, "hostconfig": {"Privileged": true}}')
    assert hc["Binds"] == ["/:/h"] and hc["Privileged"] is True


def test_duplicate_slices_merge_struct_elements():
    # Go decodes the second array into the first one's elements (golang/go#21092)
    hc = hc_of('{"HostConfig": {"Mounts": [{"Type": "bind", "Source": "/etc", "Target": "/a"}],'
               ' "mounts": [{"Target": "/b"}]}}')
    assert hc["Mounts"] == [{"Type": "bind", "Source": "/etc", "Target": "/b"}]


def test_slice_elements_beyond_len_survive_within_cap():
    t = gojson.Slice(gojson.Struct("M", {"A": gojson.Str, "B": gojson.Str}))
    v = t.decode(None, gojson.parse(b'[{"A":"1"},{"A":"2"}]'))     # len 2, cap 4
    v = t.decode(v, gojson.parse(b'[{"B":"x"}]'))                  # len 1: element 1 kept behind
    v = t.decode(v, gojson.parse(b'[{}, {"B":"y"}]'))              # element 1 comes back merged
    assert t.encode(v) == [[("A", "1"), ("B", "x")], [("A", "2"), ("B", "y")]]


def test_empty_array_drops_the_backing():
    t = gojson.Slice(gojson.Struct("M", {"A": gojson.Str}))
    v = t.decode(t.decode(None, gojson.parse(b'[{"A":"1"}]')), gojson.parse(b'[]'))
    v = t.decode(v, gojson.parse(b'[{}]'))
    assert t.encode(v) == [[]]


def test_maps_merge_with_exact_keys():
    v = gojson.decode(gojson.VOLUME_CREATE,
                      b'{"DriverOpts": {"device": "/srv"}, "driveropts": {"o": "bind", "Device": "/x"}}')
    assert v.get("DriverOpts") == {"device": "/srv", "o": "bind", "Device": "/x"}


def test_null_leaves_strings_and_sets_pointers_nil():
    hc = hc_of('{"HostConfig": {"PidMode": "host", "pidmode": null}}')
    assert hc["PidMode"] == "host"
    assert hc_of('{"HostConfig": {"PidMode": "host"}, "hostconfig": null}') is None


# --- the deprecated top-level host config -----------------------------------------------------------

def test_top_level_host_config_fields_are_the_host_config():
    hc = hc_of('{"Image": "x", "binds": ["/:/h"], "PidMode": "host"}')
    assert hc["Binds"] == ["/:/h"] and hc["PidMode"] == "host"


def test_inner_host_config_wins_but_copies_a_few_fields():
    hc = hc_of('{"Binds": ["/:/h"], "Memory": 5, "HostConfig": {"Privileged": true}}')
    assert "Binds" not in hc and hc["Memory"] == 5 and hc["Privileged"] is True


def test_a_top_level_null_still_allocates_the_host_config():
    assert hc_of('{"Image": "x", "Binds": null}') == {"Binds": None}


# --- canonical encoding -----------------------------------------------------------------------------

def test_reencoded_body_has_go_names_and_one_key_per_field():
    body = container_create(b'{"image": "a", "IMAGE": "b", "hostconfig": {"binds": ["/x:/y"]}, '
                            b'"Zzz": {"k": 1}, "zzz": 2}').body()
    assert body.count(b'"Image"') == 1 and b'"image"' not in body.lower().replace(b'"image":"b"', b"")
    out = json.loads(body)
    assert out["Image"] == "b" and out["HostConfig"] == {"Binds": ["/x:/y"]}
    # unknown keys are kept under their own names, in order, duplicates included
    assert body.endswith(b'"Zzz":{"k":1},"zzz":2}')


def test_numbers_keep_their_literal_text():
    body = container_create(b'{"HostConfig": {"Memory": 1e400, "CpuShares": 12345678901234567890}}').body()
    assert b"1e400" in body and b"12345678901234567890" in body


def test_lone_surrogates_become_replacement_characters():
    hc = hc_of('{"HostConfig": {"Binds": ["/e\\ud800tc:/h"]}}')
    assert hc["Binds"] == ["/e\ufffdtc:/h"]


def test_invalid_utf8_is_replaced_like_go():
    v = gojson.decode(gojson.VOLUME_CREATE, b'{"Name": "a\xffb"}')
    assert v.get("Name") == "a\ufffdb"


def test_trailing_data_is_ignored_like_json_decoder():
    body = container_create(b'{"Image": "x"} {"HostConfig": {"Binds": ["/:/h"]}}').body()
    assert json.loads(body) == {"Image": "x"}


@pytest.mark.parametrize("body", [
    b"", b"   ", b"{", b'{"Image": NaN}', b'{"HostConfig": {"Binds": "/:/h"}}',
    b'{"HostConfig": {"PidMode": 1}}', b'{"HostConfig": []}', b'[]', b'{"HostConfig": {"Mounts": [1]}}',
    b'{"HostConfig": {"Privileged": true, "Runtime": true}}', b"[" * 100000,
])
def test_what_dockerd_would_refuse_is_an_error(body):
    with pytest.raises(GoJSONError):
        container_create(body)


def test_exec_and_volume_bodies_round_trip():
    e = gojson.decode(gojson.EXEC_CREATE, b'{"cmd": ["id"], "privileged": true, "Extra": 1}')
    assert json.loads(gojson.encode(gojson.EXEC_CREATE, e)) == {"Cmd": ["id"], "Privileged": True, "Extra": 1}
    v = gojson.decode(gojson.VOLUME_CREATE, b'{"driver": "local", "driveropts": {"type": "none"}}')
    assert json.loads(gojson.encode(gojson.VOLUME_CREATE, v)) == {"Driver": "local", "DriverOpts": {"type": "none"}}


def test_service_spec_reaches_container_spec_mounts():
    s = gojson.decode(gojson.SERVICE_SPEC, b'{"tasktemplate": {"containerspec": {"image": "x", '
                                           b'"mounts": [{"type": "bind", "source": "/etc", "target": "/e"}]}}}')
    m = s.get("TaskTemplate").get("ContainerSpec").get("Mounts").items[0]
    assert (m.get("Type"), m.get("Source")) == ("bind", "/etc")
