"""The [gate] table of /etc/isobox/policy.toml (read by the Docker API gate; the runtime ignores it)."""
import pytest

from isobox.errors import IsoboxError
from isobox.policy import model
from isobox.policy.model import Policy, SocketImage, parse

ID = "sha256:" + "a" * 64
DIGEST = "docker.io/library/tools@sha256:" + "b" * 64


def test_defaults():
    p = Policy(path="/p")
    assert (p.gate_runtime, p.gate_allow_swarm, p.gate_allow_plugins, p.gate_socket_images) == ("isobox", False, False, ())


def test_default_file_carries_the_gate_table_and_round_trips():
    text = model.default_toml()
    assert "[gate]" in text and "socket_images = []" in text
    assert parse(text) == Policy(path=model.DEFAULT_PATH)


def test_keys_are_read():
    p = parse(f'[gate]\nruntime = "isobox-2"\nallow_swarm = true\nallow_plugins = true\n'
              f'socket_images = ["{ID}", {{ image = "{DIGEST}", api = ["GET /containers/json", "* /volumes/**"] }}]\n')
    assert p.gate_runtime == "isobox-2" and p.gate_allow_swarm and p.gate_allow_plugins
    assert p.gate_socket_images == (SocketImage(ID), SocketImage(DIGEST, ("GET /containers/json", "* /volumes/**")))


def test_array_of_tables_form():
    p = parse(f'[[gate.socket_images]]\nimage = "{ID}"\napi = []\n')
    assert p.gate_socket_images == (SocketImage(ID, ()),)       # an empty list: no call allowed (but /_ping)


def test_gate_keys_leave_the_runtime_keys_alone():
    p = parse('[gate]\nallow_swarm = true\n[mounts]\ndeny_extra = ["/srv"]\n')
    assert p.deny == model.DEFAULT_DENY and p.deny_extra == ("/srv",) and p.devices == model.DEFAULT_DEVICES


@pytest.mark.parametrize("text, words", [
    ('[gate]\nallow_swarm = "yes"\n', "gate.allow_swarm must be true or false"),
    ('[gate]\nallow_plugin = true\n', "unknown key gate.allow_plugin"),
    ('[gate]\nruntime = "a b"\n', "gate.runtime must be a runtime name"),
    ('[gate]\nsocket_images = "sha256:x"\n', "gate.socket_images must be a list"),
    ('[gate]\nsocket_images = ["tools:latest"]\n', "tags are not accepted"),
    ('[gate]\nsocket_images = ["sha256:abc"]\n', "is not an image ID"),
    (f'[gate]\nsocket_images = [{{ image = "{ID}", api = ["containers/json"] }}]\n', '"METHOD /path"'),
    (f'[gate]\nsocket_images = [{{ image = "{ID}", apis = [] }}]\n', "unknown key gate.socket_images.apis"),
    ('gate = 1\n', "gate must be a table"),
])
def test_bad_gate_keys_give_one_line_naming_the_key(text, words):
    with pytest.raises(IsoboxError) as e:
        parse(text, "/p.toml")
    msg = str(e.value)
    assert words in msg and "\n" not in msg and "/p.toml" in msg


def test_loaded_from_a_root_owned_file(tmp_path):
    f = tmp_path / "policy.toml"
    f.write_text(f'[gate]\nsocket_images = ["{ID}"]\n')
    f.chmod(0o644)
    assert model.load(str(f)).gate_socket_images == (SocketImage(ID),)
