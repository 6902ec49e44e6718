"""`isobox install --gate` / `uninstall --gate`: move dockerd's socket to a root-only path and
let `isobox gate` serve the public /var/run/docker.sock; put an isobox-runc `runc` first on
dockerd's PATH for BuildKit.

Two mechanisms, chosen by whether systemd runs the host (/run/systemd/system, sd_booted()'s test):

- systemd: Debian's and upstream's docker.service start `dockerd -H fd://` with the socket of
  docker.socket. A drop-in for docker.socket moves that socket (ListenStream) into
  /run/isobox/engine (DirectoryMode=0700), so dockerd's command line is not touched; a drop-in
  for docker.service sets PATH; isobox-gate.service (enabled like `systemctl enable` does, by
  its multi-user.target.wants link) serves /var/run/docker.sock.
- no systemd (sysvinit's /etc/init.d/docker, or dockerd started by hand): daemon.json `hosts`
  names the engine socket, and a marked block in /etc/default/docker (which Debian's init script
  sources as shell before starting dockerd) creates /run/isobox/engine 0700 (dockerd 20.10 does
  not create a socket's directory) and prefixes PATH. dockerd refuses to start when `hosts` is in
  daemon.json and -H is on its command line, so install refuses when it finds -H on the running
  dockerd's command line or in DOCKER_OPTS, and says what to change. The gate is then started by
  the operator's supervisor with the command install prints.

The public socket keeps the owner, group and mode it had (read once, from the live socket or
docker.socket, and recorded). Everything install did is recorded in /etc/isobox/gate-install.json,
which uninstall follows; daemon.json and /etc/default/docker are backed up once (.isobox-backup).
ISOBOX_GATE_ROOT prefixes every host path (tests use a temporary root)."""
from __future__ import annotations

import grp
import json
import os
import re
import shlex
import shutil
import socket
import stat
import struct

from isobox.engines import common as c
from isobox.engines import docker
from isobox.errors import IsoboxError

ROOT_ENV = "ISOBOX_GATE_ROOT"
ENGINE_DIR = "/run/isobox/engine"              # under /run/isobox: the runtime policy denies binding it
ENGINE_SOCK = ENGINE_DIR + "/docker.sock"
PUBLIC_SOCK = "/var/run/docker.sock"
WRAPPER_DIR = "/usr/local/lib/isobox/buildkit-bin"
SYSTEMD_RUNNING = "/run/systemd/system"
UNIT_DIR = "/etc/systemd/system"
GATE_UNIT = UNIT_DIR + "/isobox-gate.service"
GATE_WANTS = UNIT_DIR + "/multi-user.target.wants/isobox-gate.service"
SOCKET_DROPIN = UNIT_DIR + "/docker.socket.d/isobox-gate.conf"
SERVICE_DROPIN = UNIT_DIR + "/docker.service.d/isobox-gate.conf"
SERVICE_UNITS = ("/etc/systemd/system/docker.service", "/lib/systemd/system/docker.service",
                 "/usr/lib/systemd/system/docker.service")
SOCKET_UNITS = ("/etc/systemd/system/docker.socket", "/lib/systemd/system/docker.socket",
                "/usr/lib/systemd/system/docker.socket")
DEFAULTS = "/etc/default/docker"
STATE = "/etc/isobox/gate-install.json"
MARK = "# isobox-gate"                           # every file or block install writes carries it
BEGIN, END = MARK + " begin", MARK + " end"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def host(path: str) -> str:
    return os.environ.get(ROOT_ENV, "").rstrip("/") + path


def daemon_json() -> str:
    return os.environ.get(docker.ENV) or host(docker.DEFAULT_PATH)


def isobox_cli() -> str:
    return shutil.which("isobox") or "/usr/local/bin/isobox"


# --- what to write ----------------------------------------------------------------------------------

def wrapper_text() -> str:
    # dockerd 20.10's BuildKit runs the first `runc` on dockerd's PATH (runcexecutor
    # CommandCandidates ["runc"]), ignoring daemon.json's runtimes; the gate's build.runtime rule
    # accepts a root-owned script whose exec line names isobox-runc.
    return (f"#!/bin/sh\n{MARK}: dockerd's BuildKit runs the first runc on its PATH; make it isobox's\n"
            f'exec {c.RUNC_BINARY} "$@"\n')


def gate_command(perms: dict) -> list[str]:
    return [isobox_cli(), "gate", "--listen", PUBLIC_SOCK, "--engine", ENGINE_SOCK,
            "--mode", f"{perms['mode']:o}", "--group", str(perms["gid"]), "--owner", str(perms["uid"])]


def gate_unit_text(perms: dict) -> str:
    return (f"{MARK}: written by `isobox install --gate`; `isobox uninstall --gate` removes it\n"
            "[Unit]\nDescription=isobox Docker API gate (serves /var/run/docker.sock for dockerd)\n"
            "Wants=docker.socket\nAfter=docker.socket docker.service\n\n"
            f"[Service]\nExecStart={shlex.join(gate_command(perms))}\nRestart=always\nRestartSec=1\n\n"
            "[Install]\nWantedBy=multi-user.target\n")


def socket_dropin_text() -> str:
    # dockerd keeps `-H fd://`: it gets this socket from systemd, now in a root-only directory
    return (f"{MARK}: dockerd's own socket moves to a root-only directory; isobox-gate.service serves "
            f"{PUBLIC_SOCK}\n[Socket]\nListenStream=\nListenStream={ENGINE_SOCK}\nDirectoryMode=0700\n")


def service_dropin_text() -> str:
    return (f"{MARK}: BuildKit in dockerd runs the first runc on PATH: isobox-runc's wrapper\n"
            f"[Service]\nEnvironment=PATH={WRAPPER_DIR}:{SYSTEM_PATH}\n")


def defaults_block() -> str:
    return (f"{BEGIN}: dockerd's socket lives in {ENGINE_DIR} (dockerd does not create it); BuildKit runs\n"
            f"# the first runc on dockerd's PATH: isobox-runc's wrapper\n"
            f"mkdir -p {ENGINE_DIR} && chmod 0700 {ENGINE_DIR}\n"
            f'export PATH="{WRAPPER_DIR}:$PATH"\n{END}\n')


# --- reading the host ---------------------------------------------------------------------------------

def systemd_host() -> bool:
    return os.path.isdir(host(SYSTEMD_RUNNING))


def _read(path: str) -> str | None:
    return c.read_text(path)


def _unit_lines(units: tuple[str, ...], dropin_dir: str, ours: str) -> list[str]:
    """The unit's lines, then its drop-ins' (not ours) in name order, as systemd applies them."""
    lines: list[str] = []
    for u in units:
        text = _read(host(u))
        if text is not None:
            lines += text.splitlines()
            break
    d = host(dropin_dir)
    if os.path.isdir(d):
        for name in sorted(os.listdir(d)):
            if name.endswith(".conf") and os.path.join(d, name) != host(ours):
                lines += (_read(os.path.join(d, name)) or "").splitlines()
    return lines


def _last(lines: list[str], key: str) -> str | None:
    val = None
    for line in lines:
        k, sep, v = line.strip().partition("=")
        if sep and k.strip() == key:
            val = v.strip()
    return val


def service_execstart() -> str | None:
    lines = _unit_lines(SERVICE_UNITS, UNIT_DIR + "/docker.service.d", SERVICE_DROPIN)
    if not lines:
        return None
    return _last(lines, "ExecStart") or ""


def _host_flags(args: list[str]) -> list[str]:
    out = []
    for i, a in enumerate(args):
        if a in ("-H", "--host") and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith(("--host=", "-H=")) or (a.startswith("-H") and len(a) > 2 and a[2] != "="):
            out.append(a.split("=", 1)[1] if "=" in a else a[2:])
    return out


def docker_opts_hosts() -> list[str]:
    text = _read(host(DEFAULTS)) or ""
    hosts: list[str] = []
    for line in text.splitlines():
        m = re.match(r"\s*(?:export\s+)?DOCKER_OPTS=(.*)$", line)
        if m:
            try:
                value = "".join(shlex.split(m.group(1)))
                hosts = _host_flags(shlex.split(value))
            except ValueError:
                hosts = ["(unparsable DOCKER_OPTS)"]
    return hosts


def running_dockerd_hosts() -> list[str]:
    """-H flags of the dockerd named by its pid file (what a restart would reuse)."""
    try:
        pid = int((_read(host(docker.PIDFILE)) or "").strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except (ValueError, OSError):
        return []
    return _host_flags(args[1:])


def _docker_gid() -> int:
    try:
        return grp.getgrnam("docker").gr_gid
    except KeyError:
        return 0


def socket_perms() -> dict:
    """The public socket's owner, group and mode as clients know them today."""
    try:
        st = os.stat(host(PUBLIC_SOCK))
        if stat.S_ISSOCK(st.st_mode):
            return {"uid": st.st_uid, "gid": st.st_gid, "mode": stat.S_IMODE(st.st_mode)}
    except OSError:
        pass
    lines = _unit_lines(SOCKET_UNITS, UNIT_DIR + "/docker.socket.d", SOCKET_DROPIN)
    mode = _last(lines, "SocketMode") or "0660"     # docker.socket's values, else dockerd's defaults
    group = _last(lines, "SocketGroup") or "docker"
    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        gid = 0
    return {"uid": 0, "gid": gid if lines else _docker_gid(), "mode": int(mode, 8)}


# --- writing -----------------------------------------------------------------------------------------------

def load_state() -> dict:
    text = _read(host(STATE))
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        raise IsoboxError(f"{host(STATE)} is not valid JSON; fix or remove it") from None
    return data if isinstance(data, dict) else {}


def _ensure_file(path: str, text: str, mode: int, created: list[str]) -> bool:
    """Write `text` at host(path) unless it is already there; refuse a file that is not ours."""
    p = host(path)
    old = _read(p)
    if old == text:
        return False
    if old is not None and MARK not in old:
        raise IsoboxError(f"{p} exists and was not written by isobox; move it away first")
    os.makedirs(os.path.dirname(p), mode=0o755, exist_ok=True)
    c.atomic_write(p, text, mode=mode)
    if path not in created:
        created.append(path)
    return True


def _ensure_link(path: str, target: str, created: list[str]) -> bool:
    p = host(path)
    if os.path.islink(p) and os.readlink(p) == target:
        return False
    if os.path.lexists(p):
        raise IsoboxError(f"{p} exists and is not isobox's link to {target}; remove it first")
    os.makedirs(os.path.dirname(p), mode=0o755, exist_ok=True)
    os.symlink(target, p)
    created.append(path)
    return True


def ensure_engine_dir() -> bool:
    d = host(ENGINE_DIR)
    st = os.stat(d) if os.path.isdir(d) else None
    if st is not None and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700:
        return False
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chown(d, 0, 0)
    os.chmod(d, 0o700)                            # only root may reach dockerd's own socket
    return True


def _strip_block(text: str) -> str:
    return re.sub(rf"(?ms)^{re.escape(BEGIN)}.*?^{re.escape(END)}\n?", "", text)


def _set_hosts(cfg: dict, state: dict) -> tuple[dict, list[str]]:
    """daemon.json `hosts` with the public unix socket replaced by the engine socket."""
    public = {"unix://" + PUBLIC_SOCK, "unix:///run/docker.sock", "fd://"}
    prev = cfg.get("hosts")
    if prev is not None and not (isinstance(prev, list) and all(isinstance(h, str) for h in prev)):
        raise IsoboxError(f"{daemon_json()}: `hosts` is not a list of strings; fix it first")
    state.setdefault("hosts", {"previous": prev})
    kept = [h for h in (prev or []) if h not in public and h != "unix://" + ENGINE_SOCK]
    notes = [f"daemon.json `hosts` keeps {h}: clients there bypass the gate; remove it" for h in kept
             if not h.startswith("unix://")]
    cfg = dict(cfg, hosts=["unix://" + ENGINE_SOCK, *kept])
    return cfg, notes


def _refuse_host_flags() -> None:
    found = running_dockerd_hosts()
    where = "the running dockerd's command line"
    if not found:
        found, where = docker_opts_hosts(), f"DOCKER_OPTS in {host(DEFAULTS)}"
    if found:
        raise IsoboxError(
            f"{where} has -H {' -H '.join(found)}; without systemd isobox moves dockerd's socket with "
            f"daemon.json `hosts`, and dockerd refuses to start when `hosts` is set both as a flag and in the "
            f"file: remove the -H flags (or replace them with -H unix://{ENGINE_SOCK}, mkdir -m 0700 "
            f"{ENGINE_DIR} before dockerd starts, and start the gate yourself), then rerun `isobox install --gate`")


def install_systemd(state: dict, created: list[str], notes: list[str]) -> bool:
    exec_start = service_execstart()
    if exec_start is None:
        raise IsoboxError(f"systemd runs this host but no docker.service was found in {', '.join(SERVICE_UNITS)}")
    if "fd://" not in exec_start:
        raise IsoboxError(f"docker.service starts `{exec_start}`, which does not take docker.socket's socket "
                          f"(-H fd://); isobox moves docker.socket's ListenStream, so use -H fd:// there "
                          f"(Debian's unit does), then rerun `isobox install --gate`")
    cfg = docker.parse(_read(daemon_json()), daemon_json())
    if "hosts" in cfg:
        raise IsoboxError(f"{daemon_json()} has `hosts` and docker.service passes -H fd://: dockerd refuses both; "
                          "remove `hosts` from daemon.json, then rerun `isobox install --gate`")
    if docker_opts_hosts():
        raise IsoboxError(f"DOCKER_OPTS in {host(DEFAULTS)} has -H {' -H '.join(docker_opts_hosts())}: dockerd "
                          "would listen there beside the gate; remove it, then rerun `isobox install --gate`")
    changed = _ensure_file(SOCKET_DROPIN, socket_dropin_text(), 0o644, created)
    changed |= _ensure_file(SERVICE_DROPIN, service_dropin_text(), 0o644, created)
    changed |= _ensure_file(GATE_UNIT, gate_unit_text(state["perms"]), 0o644, created)
    changed |= _ensure_link(GATE_WANTS, "../isobox-gate.service", created)
    return changed


def install_plain(state: dict, created: list[str], notes: list[str]) -> bool:
    _refuse_host_flags()
    where = daemon_json()
    text = _read(where)
    cfg = docker.parse(text, where)
    new, more = _set_hosts(cfg, state)
    notes += more
    changed = False
    if new != cfg or text is None:
        if text is None:
            state.setdefault("daemon_json_created", True)
        else:
            c.backup_once(where)
        os.makedirs(os.path.dirname(where), exist_ok=True)
        c.atomic_write(where, docker.dump(new))
        changed = True
    d = host(DEFAULTS)
    old = _read(d)
    want = _strip_block(old or "") + defaults_block()
    if old != want:
        if old is None:
            state.setdefault("defaults_created", True)
        else:
            c.backup_once(d)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        c.atomic_write(d, want, mode=0o644)
        changed = True
    return changed


def install() -> c.Outcome:
    state = load_state()
    mode = "systemd" if systemd_host() else "daemon.json"
    if state.get("mode") not in (None, mode):
        raise IsoboxError(f"{host(STATE)} records a {state['mode']} install; run `isobox uninstall --gate` first")
    state["mode"] = mode
    state.setdefault("perms", socket_perms())
    created: list[str] = list(state.get("created", []))
    notes: list[str] = []
    changed = _ensure_file(WRAPPER_DIR + "/runc", wrapper_text(), 0o755, created)
    changed |= ensure_engine_dir()
    changed |= (install_systemd if mode == "systemd" else install_plain)(state, created, notes)
    state["created"] = created
    if load_state() != state:
        os.makedirs(os.path.dirname(host(STATE)), mode=0o755, exist_ok=True)
        c.atomic_write(host(STATE), json.dumps(state, indent=2, sort_keys=True) + "\n", mode=0o600)
    p = state["perms"]
    what = (f"dockerd's socket -> {ENGINE_SOCK} (dir 0700), {PUBLIC_SOCK} served by isobox gate "
            f"(uid {p['uid']}, gid {p['gid']}, mode {p['mode']:o}), BuildKit's runc -> {WRAPPER_DIR}/runc")
    if not changed:
        return c.Outcome("gate", host(STATE), False, f"already installed ({what}); nothing changed")
    return c.Outcome("gate", host(STATE), True, f"installed ({mode}): {what}", restart_hint(mode, state), notes)


def restart_hint(mode: str, state: dict) -> str:
    if mode == "systemd":
        return ("restart: systemctl daemon-reload && systemctl stop docker.service docker.socket && "
                "systemctl start docker.socket docker.service isobox-gate.service "
                "(running containers stop unless daemon.json has \"live-restore\": true)")
    return (f"restart dockerd so it reads daemon.json `hosts` and its new PATH (`service docker restart`; "
            f"started another way: source {DEFAULTS} first or give it PATH={WRAPPER_DIR}:$PATH and create "
            f"{ENGINE_DIR} 0700), then run the gate under your supervisor whenever dockerd runs: "
            f"{shlex.join(gate_command(state['perms']))}")


def uninstall() -> c.Outcome:
    state = load_state()
    if not state:
        return c.Outcome("gate", host(STATE), False, f"{host(STATE)} does not exist; nothing changed")
    for path in reversed(state.get("created", [])):
        p = host(path)
        if os.path.islink(p) or MARK in (_read(p) or ""):
            os.unlink(p)
            _rmdir_empty(os.path.dirname(p))
    if state.get("mode") == "daemon.json":
        _uninstall_plain(state)
    os.unlink(host(STATE))
    if state.get("mode") == "systemd":
        hint = ("restart: systemctl stop isobox-gate.service docker.service docker.socket && "
                "systemctl daemon-reload && systemctl start docker.socket docker.service")
    else:
        hint = f"stop the gate first (it serves {PUBLIC_SOCK}), then restart dockerd (`service docker restart`)"
    return c.Outcome("gate", host(STATE), True, f"removed the gate install ({state.get('mode')})", hint)


def _rmdir_empty(d: str) -> None:
    # only the drop-in and wrapper directories install may have made; never /etc/systemd/system itself
    if d.endswith((".d", "buildkit-bin", ".wants")):
        try:
            os.rmdir(d)
        except OSError:
            pass


def _uninstall_plain(state: dict) -> None:
    where = daemon_json()
    text = _read(where)
    cfg = docker.parse(text, where) if text is not None else None
    if cfg is not None and "hosts" in state:
        prev = state["hosts"].get("previous")
        kept = [h for h in cfg.get("hosts") or [] if h != "unix://" + ENGINE_SOCK]
        if prev is not None:
            cfg["hosts"] = prev
        elif kept:
            cfg["hosts"] = kept
        else:
            cfg.pop("hosts", None)
        if not cfg and state.get("daemon_json_created"):
            os.unlink(where)
        else:
            c.atomic_write(where, docker.dump(cfg))
    d = host(DEFAULTS)
    old = _read(d)
    if old is not None:
        new = _strip_block(old)
        if not new.strip() and state.get("defaults_created"):
            os.unlink(d)
        elif new != old:
            c.atomic_write(d, new)


# --- doctor -----------------------------------------------------------------------------------------------

def _peer_pid(path: str) -> int | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(3)
            s.connect(path)
            pid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            return pid or None
    except OSError:
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _is_gate(args: list[str]) -> bool:
    return "gate" in args and _flag(args, "--listen") is not None and _flag(args, "--engine") is not None


def _buildkit_row(engine: str) -> tuple[str, str, str]:
    from isobox.gate.rules import _is_isobox_runc, _lookpath
    pid = _peer_pid(engine)
    if pid is None:
        return ("docker buildkit", "warn", f"dockerd does not answer on {engine}; cannot read its PATH")
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
    except OSError as e:
        return ("docker buildkit", "warn", f"cannot read dockerd's environment (pid {pid}): {e.strerror}")
    runc = _lookpath("runc", env.get(b"PATH", b"").decode(errors="replace"))
    if runc and _is_isobox_runc(runc, os.path.realpath(c.RUNC_BINARY)):
        return ("docker buildkit", "ok", f"BuildKit's runc on dockerd's PATH is isobox's ({runc})")
    return ("docker buildkit", "warn", f"BuildKit's runc on dockerd's PATH is {runc or 'missing'}, not isobox-runc; "
            "the gate refuses BuildKit builds: run `isobox install --gate` and restart dockerd")


def doctor_rows() -> list[tuple[str, str, str]]:
    """Is the public socket served by an isobox gate, in front of a root-only dockerd socket, and is
    the runc BuildKit finds on dockerd's PATH isobox's?"""
    public = host(PUBLIC_SOCK)
    pid = _peer_pid(public)
    if pid is None:
        return [("docker gate", "warn", f"nothing answers on {public}: start dockerd and the gate "
                 "(`isobox install --gate` says how)")]
    args = _cmdline(pid)
    if not _is_gate(args):
        who = os.path.basename(args[0]) if args else f"pid {pid}"
        return [("docker gate", "warn", f"{public} is served by {who} (pid {pid}), not an isobox gate: any client "
                 "there is root; run `isobox install --gate` and restart as it says")]
    engine = _flag(args, "--engine") or ""
    st = os.stat(os.path.dirname(engine)) if os.path.isdir(os.path.dirname(engine)) else None
    rows = []
    if st is None or st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o077:
        rows.append(("docker gate", "FAIL", f"{public} is served by isobox gate (pid {pid}) but dockerd's socket "
                     f"{engine} is reachable without it (its directory is not root-only 0700): "
                     "run `isobox install --gate`"))
    elif not _record_matches(public, pid):
        from isobox.policy.gatesock import state_path
        rows.append(("docker gate", "warn", f"{public} is served by isobox gate (pid {pid}), but its record "
                     f"{state_path(public)} is missing or names another process or socket: images allowed the "
                     "socket cannot mount it; restart the gate"))
    else:
        rows.append(("docker gate", "ok", f"{public} is served by isobox gate (pid {pid}) for dockerd at {engine}"))
    rows.append(_buildkit_row(engine))
    return rows


def _record_matches(public: str, pid: int) -> bool:
    """The gate's root-only record (policy/gatesock.py) is what the runtime trusts when a
    container of an allowed image binds the socket: it must name this pid and this socket."""
    from isobox.policy import gatesock
    st = gatesock._read(gatesock.state_path(public))
    try:
        sock = os.stat(public)
    except OSError:
        return False
    return (st is not None and st.pid == pid and st.start == gatesock.start_time(pid)
            and (st.dev, st.ino) == (sock.st_dev, sock.st_ino))
