"""`isobox install` / `isobox uninstall` across engines, and the engine rows of `isobox doctor`."""
from __future__ import annotations

import json
import os
import shutil

from isobox.engines import common as c
from isobox.errors import IsoboxError

# engine name -> (flag, daemon binary looked up on PATH, module name)
ENGINES = {
    "docker": ("--docker", "dockerd", "docker"),
    "containerd": ("--containerd", "containerd", "containerd"),
    "podman": ("--podman", "podman", "podman"),
}

USAGE = ("usage: isobox {install|uninstall} [--docker] [--containerd] [--podman] [--default] [--gate]\n"
         "  no engine flag: every engine found on PATH (dockerd, containerd, podman)\n"
         "  --gate: dockerd's socket moves to a root-only path and `isobox gate` serves /var/run/docker.sock;\n"
         "          BuildKit's runc becomes isobox-runc (install --gate also registers the docker runtime)\n")


def _module(name: str):
    import importlib
    return importlib.import_module(f"isobox.engines.{ENGINES[name][2]}")


def parse_args(argv: list[str], uninstall: bool) -> tuple[list[str], bool]:
    chosen: list[str] = []
    default = False
    flags = {v[0]: k for k, v in ENGINES.items()}
    gate = "--gate" in argv
    argv = [a for a in argv if a != "--gate"]
    if gate and not uninstall and "--docker" not in argv:
        chosen.append("docker")    # the gate rewrites every create to the isobox runtime: register it
    for a in argv:
        if a in flags:
            if flags[a] not in chosen:
                chosen.append(flags[a])
        elif a == "--default" and not uninstall:
            default = True
        elif a == "--default":
            pass   # uninstall always restores the default it changed
        else:
            raise IsoboxError(f"unknown argument {a!r} (usage: isobox {'un' if uninstall else ''}install "
                              "[--docker] [--containerd] [--podman]" + ("" if uninstall else " [--default]")
                              + " [--gate])")
    if not chosen and gate:
        return [], default         # `uninstall --gate` reverts the gate only
    if not chosen:
        chosen = [k for k, v in ENGINES.items() if shutil.which(v[1])]
        if not chosen:
            raise IsoboxError("no engine found on PATH (dockerd, containerd, podman); name one with "
                              "--docker, --containerd or --podman")
    return chosen, default


def run(argv: list[str], uninstall: bool = False) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    engines, default = parse_args(argv, uninstall)
    gate = "--gate" in argv
    if not uninstall and not os.path.exists(c.RUNC_BINARY):
        print(f"isobox: warning: {c.RUNC_BINARY} does not exist yet (run scripts/setup.sh); "
              "the engines will fail to start isobox containers until it does")
    failed = 0
    for name in engines:
        mod = _module(name)
        try:
            out = mod.uninstall() if uninstall else mod.install(default=default)
        except IsoboxError as e:
            print(f"{name}: {e}")
            failed += 1
            continue
        for line in out.lines():
            print(line)
    if gate:
        failed += _run_gate(uninstall)
    return 1 if failed else 0


def _run_gate(uninstall: bool) -> int:
    from isobox.engines import gate_install
    try:
        out = gate_install.uninstall() if uninstall else gate_install.install()
    except IsoboxError as e:
        print(f"gate: {e}")
        return 1
    for line in out.lines():
        print(line)
    return 0


def _status(name: str) -> tuple[bool, bool, str, str, str]:
    """(registered, default, problems, info, path), reading the real config read-only (stdlib parsers)."""
    mod = _module(name)
    where = mod.path()
    text = c.read_text(where)
    if text is None:
        return False, False, "", f"{where} does not exist", where
    if name == "docker":
        data = mod.parse(text, where)
    else:
        import tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise IsoboxError(f"{where} is not valid TOML ({e})") from None
    registered, default, problems = mod.status_of(data)
    info = mod.info_of(data) if name == "containerd" else ""
    return registered, default, problems, info, where


def doctor_rows() -> list[tuple[str, str, str]]:
    """One row per engine: found or not, isobox registered or not, default or not, what to run."""
    rows = []
    for name, (flag, binary, _) in ENGINES.items():
        found = shutil.which(binary)
        if not found:
            rows.append((name, "warn", f"{binary} not installed"))
            continue
        try:
            registered, default, problems, info, where = _status(name)
        except IsoboxError as e:
            rows.append((name, "FAIL", f"{binary} at {found}; {e}: fix it, then `isobox install {flag}`"))
            continue
        if not registered:
            rows.append((name, "warn", f"{binary} at {found}; isobox not registered in {where}"
                         + (f" ({info})" if info else "")
                         + f": run `isobox install {flag}` (add --default to make it the default runtime)"))
            continue
        msg = f"{binary} at {found}; isobox registered in {where}" + (f" ({info})" if info else "")
        msg += ", default runtime" if default else f", not the default (`isobox install {flag} --default` for that)"
        status = "ok"
        if problems:
            msg += f"; {problems}: run `isobox install {flag}`"
            status = "warn"
        rows.append((name, status, msg))
    return rows


def describe(name: str) -> str:
    """Machine-readable status, for tests: JSON of registered/default."""
    registered, default, problems, info, where = _status(name)
    return json.dumps({"registered": registered, "default": default, "problems": problems, "info": info,
                       "path": where})
