"""paths.py: default locations, address parsing, private directory checks.

The env is always an explicit dict and the system locations that are looked
at on disk (/run/user) are pointed into tmp_path, so nothing real is read.
"""

from __future__ import annotations

import os

import pytest

from ipcd import paths
from ipcd.errors import ConfigError, PermissionDenied


@pytest.fixture(autouse=True)
def no_real_run_user(monkeypatch, tmp_path):
    """default_address() checks whether /run/user/$UID exists: point it into tmp_path."""
    monkeypatch.setattr(paths, "USER_RUNTIME_BASE", str(tmp_path / "run-user"))


# --- is_root


def test_is_root():
    assert paths.is_root(0) is True
    assert paths.is_root(1000) is False
    assert paths.is_root() is (os.geteuid() == 0)


# --- default_address


def test_address_root_empty_env():
    assert paths.default_address({}, 0) == "/run/ipcd/ipcd.sock"


def test_address_runtime_directory_beats_root_default():
    env = {"RUNTIME_DIRECTORY": "/run/ipcd-x"}
    assert paths.default_address(env, 0) == "/run/ipcd-x/ipcd.sock"
    assert paths.default_address(env, 1000) == "/run/ipcd-x/ipcd.sock"


def test_address_runtime_directory_takes_first_of_several():
    env = {"RUNTIME_DIRECTORY": "/run/a:/run/b", "XDG_RUNTIME_DIR": "/x"}
    assert paths.default_address(env, 1000) == "/run/a/ipcd.sock"


def test_address_empty_runtime_directory_is_unset():
    assert paths.default_address({"RUNTIME_DIRECTORY": ""}, 0) == "/run/ipcd/ipcd.sock"


def test_address_user_xdg_runtime_dir():
    env = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert paths.default_address(env, 1000) == "/run/user/1000/ipcd/ipcd.sock"


def test_address_user_relative_xdg_is_ignored():
    # The XDG spec: relative paths in XDG_* are invalid and must be ignored.
    assert paths.default_address({"XDG_RUNTIME_DIR": "rel"}, 1000) == "/tmp/ipcd-1000/ipcd.sock"


def test_address_cron_falls_back_to_run_user_when_it_exists(tmp_path, monkeypatch):
    base = tmp_path / "ru"
    (base / "1000").mkdir(parents=True)
    monkeypatch.setattr(paths, "USER_RUNTIME_BASE", str(base))
    assert paths.default_address({}, 1000) == str(base / "1000" / "ipcd" / "ipcd.sock")
    # another uid has no /run/user dir: private /tmp dir
    assert paths.default_address({}, 1001) == "/tmp/ipcd-1001/ipcd.sock"


def test_address_last_resort_tmp():
    assert paths.default_address({"HOME": "/home/u"}, 1000) == "/tmp/ipcd-1000/ipcd.sock"


# --- default_state_dir / default_config_path


@pytest.mark.parametrize(
    "env, uid, expected",
    [
        ({}, 0, "/var/lib/ipcd"),
        ({"STATE_DIRECTORY": "/var/lib/private/ipcd:/other"}, 0, "/var/lib/private/ipcd"),
        ({"STATE_DIRECTORY": "/s", "XDG_STATE_HOME": "/x"}, 1000, "/s"),
        ({"XDG_STATE_HOME": "/x/state", "HOME": "/home/u"}, 1000, "/x/state/ipcd"),
        ({"XDG_STATE_HOME": "", "HOME": "/home/u"}, 1000, "/home/u/.local/state/ipcd"),
        ({"HOME": "/home/u"}, 1000, "/home/u/.local/state/ipcd"),
        ({"XDG_STATE_HOME": "/x", "HOME": "/home/u"}, 0, "/var/lib/ipcd"),
    ],
)
def test_default_state_dir(env, uid, expected):
    assert paths.default_state_dir(env, uid) == expected


@pytest.mark.parametrize(
    "env, uid, expected",
    [
        ({}, 0, "/etc/ipcd/config.toml"),
        ({"CONFIGURATION_DIRECTORY": "/etc/ipcd-x"}, 0, "/etc/ipcd-x/config.toml"),
        ({"XDG_CONFIG_HOME": "/x/cfg", "HOME": "/home/u"}, 1000, "/x/cfg/ipcd/config.toml"),
        ({"HOME": "/home/u"}, 1000, "/home/u/.config/ipcd/config.toml"),
        ({"XDG_CONFIG_HOME": "relative", "HOME": "/home/u"}, 1000,
         "/home/u/.config/ipcd/config.toml"),
    ],
)
def test_default_config_path(env, uid, expected):
    assert paths.default_config_path(env, uid) == expected


def test_no_home_uses_passwd_then_fails_clearly(monkeypatch):
    def missing(uid):
        raise KeyError(uid)

    monkeypatch.setattr(paths.pwd, "getpwuid", missing)
    with pytest.raises(ConfigError, match=r"home directory for uid 4242.*HOME"):
        paths.default_state_dir({}, 4242)


def test_systemd_dir():
    assert paths.systemd_dir({"LOGS_DIRECTORY": "/var/log/ipcd:/x"}, "LOGS_DIRECTORY") == "/var/log/ipcd"
    assert paths.systemd_dir({"LOGS_DIRECTORY": ""}, "LOGS_DIRECTORY") is None
    assert paths.systemd_dir({}, "LOGS_DIRECTORY") is None


# --- parse_address


@pytest.mark.parametrize(
    "address, expected",
    [
        ("/run/ipcd/ipcd.sock", ("unix", "/run/ipcd/ipcd.sock")),
        ("ipcd.sock", ("unix", "ipcd.sock")),
        ("./a:b/ipcd.sock", ("unix", "./a:b/ipcd.sock")),
        ("localhost:7000", ("tcp", ("localhost", 7000))),
        ("127.0.0.1:1", ("tcp", ("127.0.0.1", 1))),
        ("example.com:65535", ("tcp", ("example.com", 65535))),
        ("[::1]:7000", ("tcp", ("::1", 7000))),
        ("[fe80::1%eth0]:80", ("tcp", ("fe80::1%eth0", 80))),
        ("[127.0.0.1]:80", ("tcp", ("127.0.0.1", 80))),
    ],
)
def test_parse_address(address, expected):
    assert paths.parse_address(address) == expected


@pytest.mark.parametrize(
    "address, message",
    [
        ("localhost:0", r"bad port '0' in address 'localhost:0': use a number from 1 to 65535"),
        ("localhost:65536", r"bad port '65536'.*1 to 65535"),
        ("localhost:http", r"bad port 'http'"),
        ("localhost:", r"bad port ''"),
        ("[::1]:99999", r"bad port '99999'"),
        ("[nope]:80", r"bad IP address 'nope'"),
        ("::1:7000", r"bad address '::1:7000'.*\[ipv6\]:port"),
        (":7000", r"bad address ':7000'"),
        ("@ipcd", r"abstract socket address '@ipcd' refused: any local user can connect"),
        ("\0ipcd", r"abstract socket address"),
        ("", r"empty address"),
    ],
)
def test_parse_address_refuses(address, message):
    with pytest.raises(ConfigError, match=message):
        paths.parse_address(address)


def test_unix_path_length_limit_is_in_bytes():
    ok = "/" + "a" * 106
    assert paths.parse_address(ok) == ("unix", ok)
    with pytest.raises(ConfigError, match=r"is 108 bytes long: the maximum is 107"):
        paths.parse_address("/" + "a" * 107)
    # 54 characters but 109 bytes in UTF-8
    with pytest.raises(ConfigError, match=r"is 109 bytes long: the maximum is 107"):
        paths.parse_address("/" + "é" * 54)


# --- is_loopback_host


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST", "localhost.", "127.0.0.1", "127.8.9.10", "::1", "[::1]",
             "::ffff:127.0.0.1"],
)
def test_loopback(host):
    assert paths.is_loopback_host(host) is True


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "10.0.0.1", "192.168.1.1", "example.com", "localhost.example.com",
             "", "::ffff:10.0.0.1"],
)
def test_not_loopback(host):
    assert paths.is_loopback_host(host) is False


# --- ensure_private_dir


def test_ensure_private_dir_creates_0700(tmp_path):
    target = tmp_path / "a" / "ipcd-1000"
    old = os.umask(0o022)
    try:
        assert paths.ensure_private_dir(str(target)) == str(target)
    finally:
        os.umask(old)
    assert target.is_dir()
    assert target.stat().st_mode & 0o777 == 0o700
    # idempotent on its own result
    assert paths.ensure_private_dir(str(target)) == str(target)


def test_ensure_private_dir_refuses_0755(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    target.chmod(0o755)
    with pytest.raises(PermissionDenied, match=r"has mode 0755, more permissive than 0700"):
        paths.ensure_private_dir(str(target))
    assert target.stat().st_mode & 0o777 == 0o755  # refused, not silently fixed


def test_ensure_private_dir_mode_allows_group(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    target.chmod(0o750)
    assert paths.ensure_private_dir(str(target), mode=0o750) == str(target)
    target.chmod(0o770)
    with pytest.raises(PermissionDenied, match="0770"):
        paths.ensure_private_dir(str(target), mode=0o750)


def test_ensure_private_dir_refuses_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(PermissionDenied, match="is a symlink"):
        paths.ensure_private_dir(str(link))


def test_ensure_private_dir_refuses_dangling_symlink(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(PermissionDenied, match="is a symlink"):
        paths.ensure_private_dir(str(link))
    assert not (tmp_path / "nowhere").exists()


def test_ensure_private_dir_refuses_a_file(tmp_path):
    target = tmp_path / "f"
    target.write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        paths.ensure_private_dir(str(target))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_ensure_private_dir_refuses_other_owner(tmp_path):
    target = tmp_path / "d"
    target.mkdir(mode=0o700)
    os.chown(target, 12345, 12345)
    with pytest.raises(PermissionDenied, match=r"owned by uid 12345, not 0"):
        paths.ensure_private_dir(str(target))
