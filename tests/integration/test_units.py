"""Shipped systemd units and the systemd directory variables (issue 5).

``systemd-analyze verify`` exits 0 even for unknown keys ("Unknown key ...,
ignoring"), so any output at all fails the test (shared/notes/systemd.md §9).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
SYSTEM_UNIT = CONTRIB / "systemd" / "ipcd.service"
USER_UNIT = CONTRIB / "systemd" / "user" / "ipcd.service"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (apt-get install systemd)")


def _keys(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def _verify(unit: Path, tmp_path: Path, *extra_args, env=None) -> str:
    """Copy *unit* with ExecStart pointing at an existing executable; return verify's output."""
    copy = tmp_path / unit.name
    text = unit.read_text()
    assert "ExecStart=/usr/local/bin/ipcd start" in text
    copy.write_text(text.replace("/usr/local/bin/ipcd", sys.executable))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *extra_args, str(copy)],
                       capture_output=True, text=True, timeout=60, env=env)
    return (r.stdout + r.stderr).strip() + ("" if r.returncode == 0 else f"\n(exit {r.returncode})")


@needs_analyze
def test_system_unit_verifies_silently(tmp_path):
    out = _verify(SYSTEM_UNIT, tmp_path)
    assert out == "", out


@needs_analyze
def test_user_unit_verifies_silently(tmp_path):
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    out = _verify(USER_UNIT, tmp_path, "--user", env=env)
    assert out == "", out


@pytest.mark.parametrize("unit", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_units_have_the_operational_settings(unit):
    k = _keys(unit)
    expect = {"Type": "notify", "ExecReload": "/bin/kill -HUP $MAINPID", "KillMode": "mixed",
              "TimeoutStopSec": "30", "Restart": "on-failure", "RestartPreventExitStatus": "65 78",
              "WatchdogSec": "30", "SyslogIdentifier": "ipcd", "UMask": "0077", "RuntimeDirectory": "ipcd",
              "RuntimeDirectoryMode": "0700", "StateDirectory": "ipcd", "StateDirectoryMode": "0700",
              "RestrictAddressFamilies": "AF_UNIX"}
    for key, value in expect.items():
        assert k.get(key) == [value], (key, k.get(key))
    if unit == SYSTEM_UNIT:
        assert k["User"] == ["ipcd"] and k["Group"] == ["ipcd"]
        assert k["ProtectSystem"] == ["strict"] and k["NoNewPrivileges"] == ["yes"]


def test_logrotate_snippet_reopens_with_usr1():
    text = (CONTRIB / "logrotate" / "ipcd").read_text()
    assert "create 0640" in text
    assert "systemctl kill -s USR1 --kill-whom=main ipcd.service" in text


def test_systemd_directory_variables_place_socket_state_and_log(make_daemon):
    """What systemd exports for RuntimeDirectory=/StateDirectory=/LogsDirectory= is used as is."""
    d = make_daemon()
    run, logs = d.root / "run", d.root / "logs"
    run.mkdir(mode=0o700)  # systemd creates these before ExecStart
    logs.mkdir(mode=0o750)
    d.state_dir.mkdir(mode=0o700)
    d.config_path.write_text('log_file = "ipcd.log"\n')  # relative: resolves in $LOGS_DIRECTORY
    env = {"RUNTIME_DIRECTORY": str(run), "STATE_DIRECTORY": str(d.state_dir), "LOGS_DIRECTORY": str(logs)}
    d.start(env_extra=env)
    assert (run / "ipcd.sock").exists() and d.sock_path == run / "ipcd.sock"
    assert (d.state_dir / "ipcd.db").exists() and (d.state_dir / "authkey").exists()
    assert "listening on " + str(run / "ipcd.sock") in (logs / "ipcd.log").read_text()
    r = d.cli("status", "--json", env_extra=env)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["address"] == str(run / "ipcd.sock") and st["log_file"] == str(logs / "ipcd.log")
    r = d.cli("config", "show", "--json", env_extra=env)
    sources = json.loads(r.stdout)["sources"]
    assert sources["address"] == "env RUNTIME_DIRECTORY" and sources["state_dir"] == "env STATE_DIRECTORY"
    assert d.stop() == 0
