"""No set-uid root file reaches storage host users can run it from (the review's findings 2-4).

Each test is an attack from a privileged container (container root holds every capability of
its user namespace) on a host directory that an unprivileged host user can reach: the
container gets it as a writable bind, or as its very rootfs. After the attack, the host file
is checked from the host (owner and mode), and run as an unprivileged host user: it must not
give uid 0. The probe /euid prints the uid and euid it runs with.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile

import pytest

from conftest import make_rootfs
from integration.test_isolation import privileged
from probes import build, install, rootfs_with

USER = 4242              # an unprivileged host user for running what was planted


@pytest.fixture(scope="module")
def suid_rootfs(tmp_path_factory) -> str:
    """A rootfs no host user can reach (below pytest's 0700 base) holding /euid, a set-uid
    root copy of it (/lower/suid, as an image ships su or ping) and a tar of that file."""
    root = rootfs_with(tmp_path_factory, "euid")
    os.makedirs(f"{root}/lower")
    shutil.copy2(build("euid"), f"{root}/lower/suid")
    os.chmod(f"{root}/lower/suid", 0o4755)
    with tarfile.open(f"{root}/suid.tar", "w") as t:
        info = t.gettarinfo(f"{root}/lower/suid", arcname="suid")
        info.uid = info.gid = 0
        info.mode = 0o4755
        with open(f"{root}/lower/suid", "rb") as f:
            t.addfile(info, f)
    return root


def _run(runtime, rootfs: str, script: str, bind: str | None = None) -> str:
    def edit(spec: dict) -> None:
        privileged(spec)
        if bind:
            spec["mounts"].append({"destination": "/data", "type": "bind", "source": bind,
                                   "options": ["rbind", "rw"]})
    r = runtime.run(runtime.bundle(rootfs, ["sh", "-c", script], edit=edit), timeout=120)
    return r.stdout + r.stderr


def _as_user(path: str) -> str:
    r = subprocess.run([path], capture_output=True, text=True, timeout=30,
                       preexec_fn=lambda: (os.setgroups([]), os.setresgid(USER, USER, USER),
                                           os.setresuid(USER, USER, USER)))
    return r.stdout + r.stderr


def assert_no_root_from(path: str, base: int | None = None) -> None:
    """path (if it exists) gives no host user uid 0: not set-id, or owned by the container's
    range, and running it as USER does not report euid=0."""
    if not os.path.lexists(path):
        return
    st = os.lstat(path)
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        assert base is not None and base <= st.st_uid < base + 65536, \
            f"{path}: mode {oct(st.st_mode)} owner {st.st_uid}: a set-id file outside the container's range"
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
        out = _as_user(path)
        assert "euid=0" not in out, f"{path} gave uid 0 to host user {USER}: {out}"


def test_euid_probe_would_show_a_planted_root_shell(suid_rootfs, reachable):
    """The check itself: a set-uid root copy on the host gives USER euid 0."""
    p = os.path.join(reachable, "planted")
    shutil.copy2(build("euid"), p)
    os.chmod(p, 0o4755)
    assert "euid=0" in _as_user(p)
    with pytest.raises(AssertionError):
        assert_no_root_from(p)


# ---------------------------------------------------------------- finding 2: the container decides "/"

def test_pivot_root_into_a_host_bind_cannot_plant(isoboxd, runtime, suid_rootfs, reachable):
    script = ("unshare -m sh -c 'mkdir -p /tmp/nr && mount --bind /data /tmp/nr && cd /tmp/nr && mkdir -p old "
              "&& pivot_root . old && cp /old/euid /planted && chmod 4755 /planted; "
              "echo chmod-rc=$?; ls -l /planted'")
    out = _run(runtime, suid_rootfs, script, bind=reachable)
    assert "chmod-rc=0" not in out, out
    assert os.path.exists(os.path.join(reachable, "planted")), out        # the copy itself worked
    assert_no_root_from(os.path.join(reachable, "planted"))


def test_chroot_and_nested_namespaces_cannot_plant(isoboxd, runtime, suid_rootfs, reachable):
    script = ("cp /euid /data/a /data/b /data/c 2>/dev/null; cp /euid /data/a; cp /euid /data/b; cp /euid /data/c; "
              "chroot /data /a >/dev/null 2>&1; "
              "chroot /data /bin/sh -c 'chmod 4755 /a' 2>/dev/null; "
              "unshare -U -r -m sh -c 'chmod 4755 /data/b'; echo nested-rc=$?; "
              "unshare -m sh -c 'mount --bind /data /mnt && chmod 6755 /mnt/c'; echo bind-rc=$?")
    out = _run(runtime, suid_rootfs, script, bind=reachable)
    assert "nested-rc=0" not in out and "bind-rc=0" not in out, out
    for name in ("a", "b", "c"):
        assert_no_root_from(os.path.join(reachable, name))


def test_tar_cp_link_and_rename_cannot_bring_a_setuid_file(isoboxd, runtime, suid_rootfs, reachable):
    """The ways inner Docker and package tools carry set-id files: an archive extracted with
    its modes, cp -p, and moving an existing set-uid file (of the private rootfs) over."""
    script = ("mkdir -p /data/x && tar -xpf /suid.tar -C /data/x; echo tar-rc=$?; "
              "cp -p /lower/suid /data/cp; echo cp-rc=$?; "
              "ln /lower/suid /data/ln; echo ln-rc=$?; "
              "mv /lower/suid /data/mv; echo mv-rc=$?; ls -l /data /data/x")
    out = _run(runtime, suid_rootfs, script, bind=reachable)
    assert "ln-rc=0" not in out, out                       # EXDEV: a link cannot cross mounts
    for name in ("x/suid", "cp", "ln", "mv"):
        assert_no_root_from(os.path.join(reachable, name))


# ---------------------------------------------------------------- finding 3: a rootfs host users reach

def test_a_rootfs_host_users_reach_holds_no_setuid_file(isoboxd, runtime, reachable):
    root = make_rootfs(os.path.join(reachable, "rootfs"))
    install(root, "euid")
    out = _run(runtime, root, "cp /euid /planted && chmod 4755 /planted; echo chmod-rc=$?; "
                              "cp /euid /g && chmod 2755 /g; echo chmodg-rc=$?")
    assert "chmod-rc=0" not in out and "chmodg-rc=0" not in out, out
    assert_no_root_from(os.path.join(root, "planted"))
    assert_no_root_from(os.path.join(root, "g"))


def test_isobox_run_rootfs_dir_host_users_reach(isoboxd, reachable):
    root = make_rootfs(os.path.join(reachable, "rootfs"))
    install(root, "euid")
    r = subprocess.run(["/usr/local/bin/isobox", "run", "--privileged", "--rootfs", root, "sh", "-c",
                        "cp /euid /planted && chmod 4755 /planted; echo chmod-rc=$?"],
                       capture_output=True, text=True, timeout=120)
    assert "chmod-rc=0" not in r.stdout, r.stdout + r.stderr
    assert_no_root_from(os.path.join(root, "planted"))


def test_a_private_rootfs_keeps_setuid_files(isoboxd, runtime, suid_rootfs):
    """What must keep working: set-uid files in the container's own storage (package
    installs, inner Docker's image layers)."""
    out = _run(runtime, suid_rootfs, "cp /euid /tmp/own && chmod 4755 /tmp/own && stat -c %a /tmp/own; "
                                     "tar -xpf /suid.tar -C /tmp && stat -c %a /tmp/suid; rm -f /tmp/own /tmp/suid")
    assert out.split().count("4755") == 2, out


# ---------------------------------------------------------------- finding 4: overlay copy-up

def test_overlay_upper_on_a_host_bind_is_refused(isoboxd, runtime, suid_rootfs, reachable):
    """lowerdir holds the image's set-uid root file; with the upper dir on the host bind, a
    touch would copy it up there with its mode. The mount itself is refused."""
    script = ("mkdir -p /data/u /data/w /tmp/m; "
              "mount -t overlay overlay -o lowerdir=/lower,upperdir=/data/u,workdir=/data/w /tmp/m; "
              "echo mount-rc=$?; touch /tmp/m/suid; chmod u+s /tmp/m/suid; ls -l /data/u")
    out = _run(runtime, suid_rootfs, script, bind=reachable)
    assert "mount-rc=0" not in out, out
    assert_no_root_from(os.path.join(reachable, "u", "suid"))


def test_overlay_upper_on_a_host_bind_refused_through_every_path(isoboxd, runtime, suid_rootfs, reachable):
    """The same through a nested user and mount namespace, through a relative path and a
    symlink to the bind: what counts is the directory the upper path resolves to."""
    script = ("mkdir -p /data/u /data/w /tmp/m /tmp/m2; ln -s /data /tmp/lnk; cd /data; "
              "unshare -U -r -m sh -c 'mount -t overlay o -o lowerdir=/lower,upperdir=/data/u,workdir=/data/w /tmp/m'; "
              "echo nested-rc=$?; "
              "mount -t overlay o -o lowerdir=/lower,upperdir=u,workdir=w /tmp/m; echo relative-rc=$?; "
              "mount -t overlay o -o lowerdir=/lower,upperdir=/tmp/lnk/u,workdir=/tmp/lnk/w /tmp/m2; "
              "echo symlink-rc=$?; touch /tmp/m/suid /tmp/m2/suid")
    out = _run(runtime, suid_rootfs, script, bind=reachable)
    for what in ("nested", "relative", "symlink"):
        assert f"{what}-rc=0" not in out, out
    assert_no_root_from(os.path.join(reachable, "u", "suid"))


def test_overlay_on_the_containers_own_storage_works(isoboxd, runtime, suid_rootfs):
    """Inner Docker's overlay2 and plain overlays inside keep working: upper on the rootfs."""
    script = ("mkdir -p /tmp/u /tmp/w /tmp/m && "
              "mount -t overlay overlay -o lowerdir=/lower,upperdir=/tmp/u,workdir=/tmp/w /tmp/m && "
              "echo new > /tmp/m/file && touch /tmp/m/suid && stat -c %a /tmp/u/suid && cat /tmp/u/file && "
              "umount /tmp/m && echo done")
    out = _run(runtime, suid_rootfs, script)
    assert "4755" in out and "new" in out and "done" in out, out
