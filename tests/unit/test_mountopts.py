from isobox.linux import syscalls as k
from isobox.spec import mountopts


def test_flags_set_and_cleared_in_order():
    o = mountopts.parse(["ro", "nosuid", "rw", "nodev", "rbind", "rslave", "size=10m", "mode=755"])
    assert o.flags & k.MS_RDONLY == 0
    assert o.flags & k.MS_NOSUID and o.flags & k.MS_NODEV
    assert o.is_bind and o.recursive_bind
    assert o.propagation == k.MS_SLAVE | k.MS_REC
    assert o.data == ["size=10m", "mode=755"]


def test_idmap_and_ignored_options():
    o = mountopts.parse(["idmap", "tmpcopyup", "bind"])
    assert o.idmap == "idmap" and o.data == [] and o.is_bind and not o.recursive_bind


def test_attr_flags():
    assert mountopts.attr_flags(k.MS_RDONLY | k.MS_NOEXEC) == k.MOUNT_ATTR_RDONLY | k.MOUNT_ATTR_NOEXEC


def test_shift_id_options_translates_container_ids_to_host():
    assert mountopts.shift_id_options(["mode=755", "gid=5"], 200000, 300000) == \
        ["mode=755", "gid=300005", "uid=200000"]
    assert mountopts.shift_id_options([], 7, 9) == ["uid=7", "gid=9"]
