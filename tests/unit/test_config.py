"""config.py: discovery, precedence, validation, queue settings, render/to_dict.

Every test passes env and uid explicitly; the system config dir and
/run/user are pointed into tmp_path so no real /etc, /run or /var path is read.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib

import pytest
from hypothesis import given, strategies as st

from ipcd import config, config_show, paths
from ipcd.config import Config, QueueSettings, load, parse_size, validate_queue_name
from ipcd.errors import ConfigError, DataError

USER = 1000


@pytest.fixture(autouse=True)
def isolated_system_paths(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "SYSTEM_CONFIG_DIR", str(tmp_path / "etc-ipcd"))
    monkeypatch.setattr(paths, "USER_RUNTIME_BASE", str(tmp_path / "run-user"))


@pytest.fixture
def home(tmp_path):
    return str(tmp_path / "home")


@pytest.fixture
def write(tmp_path):
    """write(text, name="config.toml") -> absolute path of a new config file in tmp_path/cfg."""

    def _write(text: str, name: str = "config.toml") -> str:
        path = tmp_path / "cfg" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return str(path)

    return _write


def load_text(write, text, **kw):
    path = write(text)
    return path, load(path, env=kw.pop("env", {}), uid=kw.pop("uid", USER), **kw)


# --- defaults


def test_root_defaults_on_empty_env():
    c = load(env={}, uid=0)
    assert c.path is None
    assert c.address == "/run/ipcd/ipcd.sock"
    assert c.state_dir == "/var/lib/ipcd"
    assert c.authkey_file == "/var/lib/ipcd/authkey"
    assert c.store_path() == "/var/lib/ipcd/ipcd.db"
    assert c.lock_path() == "/run/ipcd/ipcd.lock"
    assert (c.log_file, c.log_level, c.socket_group) == (None, "INFO", None)
    assert (c.allow_uids, c.allow_gids) == ((), ())
    assert (c.handshake_timeout, c.max_connections, c.shutdown_timeout) == (5.0, 256, 10.0)
    assert (c.max_request_bytes, c.max_store_bytes) == (64 << 20, 0)
    assert c.defaults == QueueSettings()
    assert dict(c.queues) == {}
    assert set(c.sources.values()) == {"default"}


def test_user_defaults_without_xdg(home):
    c = load(env={"HOME": home}, uid=USER)
    assert c.address == "/tmp/ipcd-1000/ipcd.sock"
    assert c.state_dir == f"{home}/.local/state/ipcd"
    assert c.authkey_file == f"{home}/.local/state/ipcd/authkey"
    assert c.lock_path() == "/tmp/ipcd-1000/ipcd.lock"


def test_user_defaults_with_xdg(tmp_path):
    env = {"HOME": "/nonexistent", "XDG_RUNTIME_DIR": "/x/run", "XDG_STATE_HOME": "/x/state",
           "XDG_CONFIG_HOME": str(tmp_path / "xdgcfg")}
    c = load(env=env, uid=USER)
    assert (c.address, c.state_dir, c.path) == ("/x/run/ipcd/ipcd.sock", "/x/state/ipcd", None)


def test_systemd_dirs_are_used_and_named_as_sources():
    env = {"RUNTIME_DIRECTORY": "/run/ipcd-unit", "STATE_DIRECTORY": "/var/lib/ipcd-unit"}
    c = load(env=env, uid=0)
    assert c.address == "/run/ipcd-unit/ipcd.sock"
    assert c.state_dir == "/var/lib/ipcd-unit"
    assert c.sources["address"] == "env RUNTIME_DIRECTORY"
    assert c.sources["state_dir"] == "env STATE_DIRECTORY"
    assert c.sources["authkey_file"] == "default"


# --- which file


def test_default_file_is_read_when_it_exists(tmp_path, home):
    cfg = tmp_path / "xdg" / "ipcd" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('log_level = "debug"\n')
    c = load(env={"HOME": home, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}, uid=USER)
    assert c.path == str(cfg)
    assert c.log_level == "DEBUG"
    assert c.sources["log_level"] == f"file {cfg}"
    assert c.sources["path"] == "default"


def test_root_default_file(tmp_path):
    cfg = tmp_path / "etc-ipcd" / "config.toml"  # the patched SYSTEM_CONFIG_DIR
    cfg.parent.mkdir()
    cfg.write_text("max_connections = 3\n")
    c = load(env={}, uid=0)
    assert (c.path, c.max_connections) == (str(cfg), 3)


def test_file_choice_precedence(tmp_path, write):
    cli = write('log_level = "error"\n', "cli.toml")
    envf = write('log_level = "warning"\n', "env.toml")
    xdg = tmp_path / "xdg"
    (xdg / "ipcd").mkdir(parents=True)
    (xdg / "ipcd" / "config.toml").write_text('log_level = "debug"\n')
    env = {"HOME": "/h", "XDG_CONFIG_HOME": str(xdg), "IPCD_CONFIG": envf}

    c = load(cli, env=env, uid=USER)
    assert (c.path, c.log_level, c.sources["path"]) == (cli, "ERROR", "command line")
    c = load(env=env, uid=USER)
    assert (c.path, c.log_level, c.sources["path"]) == (envf, "WARNING", "env IPCD_CONFIG")
    del env["IPCD_CONFIG"]
    c = load(env=env, uid=USER)
    assert (c.log_level, c.sources["path"]) == ("DEBUG", "default")


def test_explicit_missing_file_is_an_error(tmp_path):
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"nope.toml' \(from command line\) does not exist"):
        load(missing, env={}, uid=0)
    with pytest.raises(ConfigError, match=r"nope.toml' \(from env IPCD_CONFIG\) does not exist"):
        load(env={"IPCD_CONFIG": missing}, uid=0)


# --- value precedence


def test_address_precedence_each_level_beats_the_next(write):
    path = write('address = "/from/file.sock"\n')
    env = {"IPCD_CONFIG": path, "IPCD_ADDRESS": "/from/env.sock",
           "RUNTIME_DIRECTORY": "/from/systemd"}
    cases = [
        ({"address": "/from/cli.sock"}, env, "/from/cli.sock", "command line"),
        ({}, env, "/from/env.sock", "env IPCD_ADDRESS"),
        ({}, {**env, "IPCD_ADDRESS": ""}, "/from/file.sock", f"file {path}"),
        ({}, {"RUNTIME_DIRECTORY": "/from/systemd"}, "/from/systemd/ipcd.sock",
         "env RUNTIME_DIRECTORY"),
        ({}, {}, "/run/ipcd/ipcd.sock", "default"),
    ]
    for overrides, e, expected, source in cases:
        c = load(env=e, uid=0, overrides=overrides)
        assert (c.address, c.sources["address"]) == (expected, source)


def test_state_dir_precedence_each_level_beats_the_next(write):
    path = write('state_dir = "/from/file"\n')
    env = {"IPCD_CONFIG": path, "IPCD_STATE_DIR": "/from/env", "STATE_DIRECTORY": "/from/systemd"}
    cases = [
        ({"state_dir": "/from/cli"}, env, "/from/cli", "command line"),
        ({}, env, "/from/env", "env IPCD_STATE_DIR"),
        ({}, {k: v for k, v in env.items() if k != "IPCD_STATE_DIR"}, "/from/file", f"file {path}"),
        ({}, {"STATE_DIRECTORY": "/from/systemd"}, "/from/systemd", "env STATE_DIRECTORY"),
        ({}, {}, "/var/lib/ipcd", "default"),
    ]
    for overrides, e, expected, source in cases:
        c = load(env=e, uid=0, overrides=overrides)
        assert (c.state_dir, c.sources["state_dir"]) == (expected, source)
        assert c.authkey_file == f"{expected}/authkey"  # the default follows state_dir


def test_overrides_none_means_not_given_and_values_are_validated(write):
    path = write('log_level = "warning"\n')
    c = load(path, env={}, uid=0, overrides={"log_level": None, "address": None})
    assert (c.log_level, c.address) == ("WARNING", "/run/ipcd/ipcd.sock")
    c = load(path, env={}, uid=0, overrides={"log_level": "debug"})
    assert (c.log_level, c.sources["log_level"]) == ("DEBUG", "command line")
    with pytest.raises(ConfigError, match=r"^command line: max_connections = '10': must be an integer >= 1$"):
        load(env={}, uid=0, overrides={"max_connections": "10"})
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'adress'; did you mean 'address'\?$"):
        load(env={}, uid=0, overrides={"adress": "/x.sock"})


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match=r"^env IPCD_ADDRESS: address = '@x': abstract"):
        load(env={"IPCD_ADDRESS": "@x"}, uid=0)


def test_check_file_ignores_ipcd_env(write):
    path = write('address = "/from/file.sock"\n')
    c = config.check_file(path, env={"IPCD_ADDRESS": "/from/env.sock", "IPCD_CONFIG": "/nope"}, uid=0)
    assert (c.path, c.address) == (path, "/from/file.sock")


# --- unknown keys and bad values


@pytest.mark.parametrize(
    "text, message",
    [
        ('adress = "/x"', "unknown key 'adress'; did you mean 'address'?"),
        ("[defaults]\nmax_mesages = 5", "unknown key 'defaults.max_mesages'; did you mean 'max_messages'?"),
        ("[queues.jobs]\nduribility = 'os'", "unknown key 'queues.jobs.duribility'; did you mean 'durability'?"),
        ("[defualts]\nhistory = 1", "unknown key 'defualts'; did you mean 'defaults'?"),
        ("zzzzzz = 1", "unknown key 'zzzzzz'"),
        ("max_messages = 5", "unknown top-level key 'max_messages': queue settings go under [defaults] or [queues.NAME]"),
        ("[queues.jobs.dead]\nhistory = 1", 'queues.jobs.dead is a table: a queue name containing '
                                           "'.' must be quoted, e.g. [queues.\"jobs.dead\"]"),
    ],
)
def test_unknown_keys(write, text, message):
    path = write(text + "\n")
    with pytest.raises(ConfigError) as err:
        load(path, env={}, uid=0)
    assert str(err.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("max_connections = true", "max_connections = True: must be an integer >= 1"),
        ("max_connections = 2.0", "max_connections = 2.0: must be an integer >= 1"),
        ("max_connections = 0", "max_connections = 0: must be an integer >= 1"),
        ("handshake_timeout = 0", "handshake_timeout = 0: must be a number of seconds > 0"),
        ('handshake_timeout = "5"', "handshake_timeout = '5': must be a number of seconds > 0"),
        ("shutdown_timeout = inf", "shutdown_timeout = inf: must be a number of seconds > 0"),
        ('log_level = "loud"', "log_level = 'loud': must be one of 'DEBUG', 'INFO', 'WARNING', 'ERROR'"),
        ('max_request_bytes = "1KiB"', "max_request_bytes = '1KiB': must be a size >= 65536 (64KiB)"),
        ('max_request_bytes = "9 bananas"', "max_request_bytes = '9 bananas': must be a size >= 65536"),
        ("max_store_bytes = -1", "max_store_bytes = -1: must be a size >= 0"),
        ('allow_uids = [1, "x"]', "allow_uids = [1, 'x']: must be an array of integers >= 0"),
        ("allow_gids = 5", "allow_gids = 5: must be an array of integers >= 0"),
        ("socket_group = true", "socket_group = True: must be a group name or a numeric gid >= 0"),
        ('socket_group = ""', "socket_group = '': must be a group name or a numeric gid >= 0"),
        ('address = "@ipcd"', "address = '@ipcd': abstract socket address '@ipcd' refused"),
        ('address = "localhost:99999"', "address = 'localhost:99999': bad port '99999'"),
        ("address = 7", "address = 7: must be a socket path string or 'host:port'"),
        ("state_dir = 5", "state_dir = 5: must be a non-empty path"),
        ('authkey_file = "~/key"', "authkey_file = '~/key': must be a non-empty path"),
        ('log_file = ""', "log_file = '': must be a non-empty path"),
        ('[defaults]\noverflow = "drop"', "defaults.overflow = 'drop': must be one of 'block', 'reject'"),
        ('[queues.jobs]\noverflow = "drop"', "queues.jobs.overflow = 'drop': must be one of 'block', 'reject'"),
        ('[queues.jobs]\ndurability = "disk"',
         "queues.jobs.durability = 'disk': must be one of 'os', 'fsync', 'memory'"),
        ("[queues.jobs]\nmax_attempts = 0", "queues.jobs.max_attempts = 0: must be an integer >= 1"),
        ("[defaults]\nhistory = -1", "defaults.history = -1: must be an integer >= 0"),
        ("[defaults]\nmax_messages = 0", "defaults.max_messages = 0: must be an integer >= 1"),
        ('[defaults]\nmax_bytes = "0B"', "defaults.max_bytes = '0B': must be a size >= 1"),
        ('[defaults]\nsink_format = "raw"', "defaults.sink_format = 'raw': must be one of 'body', 'envelope'"),
        ("[defaults]\nlease_seconds = -1.5", "defaults.lease_seconds = -1.5: must be a number of seconds > 0"),
        ("[defaults]\nsink = 3", "defaults.sink = 3: must be a non-empty path"),
        ("defaults = 5", "defaults = 5: must be a table [defaults]"),
        ("queues = 5", "queues = 5: must be tables [queues.NAME]"),
        ("[queues]\njobs = 5", "queues.jobs = 5: must be a table [queues.jobs]"),
    ],
)
def test_bad_values_name_file_key_value_and_rule(write, text, expected):
    path = write(text + "\n")
    with pytest.raises(ConfigError) as err:
        load(path, env={}, uid=0)
    assert str(err.value).startswith(f"{path}: {expected}")


def test_bad_queue_name_in_file(write):
    path = write('[queues."x y"]\nhistory = 1\n')
    with pytest.raises(ConfigError) as err:
        load(path, env={}, uid=0)
    assert str(err.value) == (
        f'{path}: [queues."x y"]: invalid queue name \'x y\': use 1-200 characters from '
        "A-Z a-z 0-9 . _ : -"
    )


def test_toml_syntax_error_names_file_and_line(write):
    path = write('log_level = "info"\nmax_connections = = 3\n')
    with pytest.raises(ConfigError, match=r"invalid TOML: .*line 2, column") as err:
        load(path, env={}, uid=0)
    assert str(err.value).startswith(f"{path}: ")


def test_deeply_nested_toml_is_a_config_error(write):
    path = write("a = " + "[" * 5000 + "]" * 5000 + "\n")  # tomllib recurses per level
    with pytest.raises(ConfigError, match="invalid TOML: nested too deeply"):
        load(path, env={}, uid=0)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'log_level = "\xff"\n')
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load(str(path), env={}, uid=0)


def test_cross_field_message_must_fit_in_request(write):
    path = write('max_request_bytes = "64KiB"\n')
    with pytest.raises(ConfigError) as err:
        load(path, env={}, uid=0)
    assert str(err.value) == (
        "default: defaults.max_message_bytes = 1048576: must be <= max_request_bytes - 4096 = "
        f"61440 (max_request_bytes = 65536, from file {path})"
    )
    path = write('max_request_bytes = "1MiB"\n[defaults]\nmax_message_bytes = "16KiB"\n'
                 '[queues.big]\nmax_message_bytes = 1048576\n')
    with pytest.raises(ConfigError, match=r"queues.big.max_message_bytes = 1048576: must be <= .* 1044480") as err:
        load(path, env={}, uid=0)
    assert str(err.value).startswith(f"{path}: ")
    # exactly at the limit is fine
    path = write('max_request_bytes = "1MiB"\n[defaults]\nmax_message_bytes = 1044480\n')
    assert load(path, env={}, uid=0).defaults.max_message_bytes == 1044480


# --- types and sizes


@pytest.mark.parametrize(
    "value, expected",
    [(0, 0), (512, 512), ("512", 512), ("0", 0), ("64KiB", 65536), ("1MiB", 1 << 20),
     ("2GiB", 2 << 30), ("1TiB", 1 << 40), ("10MB", 10_000_000), ("1kb", 1000), ("3 mib", 3 << 20),
     (" 7B ", 7), ("1.5KiB", 1536), ("0.5MB", 500_000)],
)
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", [-1, True, 1.5, "", "K", "KiB", "-5MiB", "1.5B", "10 bananas",
                                   "1e6", None, [1]])
def test_parse_size_refuses(value):
    with pytest.raises(ValueError):
        parse_size(value)


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_round_trips(n):
    assert parse_size(config.format_size(n)) == n


def test_typed_values_from_file(write):
    _, c = load_text(write, """
        log_level = "Warning"
        socket_group = 100
        allow_uids = [1000, 1001]
        allow_gids = []
        handshake_timeout = 2
        max_request_bytes = "1GiB"
        max_store_bytes = "10MB"
        [defaults]
        lease_seconds = 1
        max_bytes = 4096
    """.replace("\n        ", "\n"))
    assert c.log_level == "WARNING"
    assert c.socket_group == "100"
    assert c.allow_uids == (1000, 1001) and c.allow_gids == ()
    assert c.handshake_timeout == 2.0 and isinstance(c.handshake_timeout, float)
    assert (c.max_request_bytes, c.max_store_bytes) == (1 << 30, 10_000_000)
    assert c.defaults.lease_seconds == 1.0 and isinstance(c.defaults.lease_seconds, float)
    assert c.defaults.max_bytes == 4096


def test_log_file_dash_means_stderr(write):
    path = write('log_file = "/var/log/x.log"\n')
    c = load(path, env={}, uid=0, overrides={"log_file": "-"})
    assert (c.log_file, c.sources["log_file"]) == (None, "command line")


# --- queue settings


QUEUES = """\
[defaults]
durability = "fsync"
max_attempts = 3
max_messages = 100
max_bytes = "1MiB"

[queues.jobs]
max_attempts = 9
durability = "memory"
max_messages = 5
max_bytes = "1KiB"
sink = "jobs.jsonl"
sink_format = "envelope"

[queues.mail]
overflow = "reject"

[queues."mail.dead"]
history = 7
"""


def test_queue_table_merges_over_defaults(write):
    path, c = load_text(write, QUEUES)
    mail = c.queue("mail")
    assert mail == dataclasses.replace(c.defaults, overflow="reject")
    assert (mail.durability, mail.max_attempts, mail.history) == ("fsync", 3, 1000)
    assert c.queue("jobs").max_attempts == 9
    assert c.queue("unconfigured") == c.defaults
    assert c.defaults == QueueSettings(durability="fsync", max_attempts=3, max_messages=100,
                                       max_bytes=1 << 20)
    assert set(c.queues) == {"jobs", "mail", "mail.dead"}


def test_dead_letter_queue_inherits_its_queue(write):
    path, c = load_text(write, QUEUES)
    dead = c.queue("jobs.dead")
    assert dead.durability == "memory"  # from jobs
    assert dead.max_attempts == 9 and dead.sink_format == "envelope"
    assert (dead.max_messages, dead.max_bytes) == (100, 1 << 20)  # from [defaults]
    assert dead.sink is None  # already written to jobs' sink when first sent
    # an explicit table wins: merged over [defaults], not over mail
    assert c.queue("mail.dead") == dataclasses.replace(c.defaults, history=7)
    assert c.queue("nothing.dead") == c.defaults
    assert c.queue("jobs.dead.dead").durability == "memory"


def test_queue_rejects_bad_names():
    c = load(env={}, uid=0)
    with pytest.raises(DataError, match="invalid queue name 'a b'"):
        c.queue("a b")


@pytest.mark.parametrize("name", ["a", "jobs", "jobs.dead", "a:b-c_d.e", "Z9", "x" * 200])
def test_valid_queue_names(name):
    assert validate_queue_name(name) == name


@pytest.mark.parametrize("name", ["", "x y", "x" * 201, "é", "a/b", "a\n", "tab\t", None, 5])
def test_invalid_queue_names(name):
    with pytest.raises(DataError, match="invalid queue name"):
        validate_queue_name(name)


def test_invalid_queue_name_message():
    with pytest.raises(DataError) as err:
        validate_queue_name("x y")
    assert str(err.value) == "invalid queue name 'x y': use 1-200 characters from A-Z a-z 0-9 . _ : -"
    with pytest.raises(DataError) as err:
        validate_queue_name("!" * 5000)
    assert len(str(err.value)) < 150


# --- relative paths


def test_relative_paths_resolve_against_the_file(write, tmp_path):
    path, c = load_text(write, """\
address = "sock/ipcd.sock"
state_dir = "state"
authkey_file = "keys/../keys/k"
log_file = "log/ipcd.log"
[defaults]
sink = "all.jsonl"
[queues.jobs]
sink = "/abs/jobs.jsonl"
""")
    d = str(tmp_path / "cfg")
    assert c.address == f"{d}/sock/ipcd.sock"
    assert c.state_dir == f"{d}/state"
    assert c.authkey_file == f"{d}/keys/k"
    assert c.log_file == f"{d}/log/ipcd.log"
    assert c.defaults.sink == f"{d}/all.jsonl"
    assert c.queue("jobs").sink == "/abs/jobs.jsonl"
    assert c.lock_path() == f"{d}/sock/ipcd.lock"


def test_relative_log_file_uses_logs_directory(write):
    path = write('log_file = "ipcd.log"\n')
    c = load(path, env={"LOGS_DIRECTORY": "/var/log/ipcd"}, uid=0)
    assert c.log_file == "/var/log/ipcd/ipcd.log"


def test_relative_command_line_paths_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = load(env={"IPCD_STATE_DIR": "st"}, uid=0, overrides={"address": "rel.sock"})
    assert c.state_dir == str(tmp_path / "st")
    assert c.address == "rel.sock"  # kept as typed: client and daemon resolve it alike


def test_tcp_address_lock_lives_in_state_dir(write):
    _, c = load_text(write, 'address = "[::1]:7000"\nstate_dir = "/srv/ipcd"\n')
    assert c.address == "[::1]:7000"
    assert c.lock_path() == "/srv/ipcd/ipcd.lock"


# --- sources, render, to_dict


def test_sources_cover_every_key(write):
    path, c = load_text(write, QUEUES)
    src = f"file {path}"
    expected_keys = {"path", *config.TOP_KEYS}
    expected_keys |= {f"defaults.{k}" for k in config.QUEUE_KEYS}
    expected_keys |= {f"queues.{q}.{k}" for q in ("jobs", "mail", "mail.dead") for k in config.QUEUE_KEYS}
    assert set(c.sources) == expected_keys
    assert c.sources["path"] == "command line"
    assert c.sources["address"] == "default"
    assert c.sources["defaults.durability"] == src
    assert c.sources["defaults.history"] == "default"
    assert c.sources["queues.jobs.durability"] == src  # set in the table
    assert c.sources["queues.mail.durability"] == src  # inherited from [defaults] in the file
    assert c.sources["queues.mail.history"] == "default"
    assert c.sources["queues.mail.dead.history"] == src


def test_render_is_valid_toml_and_loads_back_to_the_same_config(write, tmp_path):
    odd_dir = tmp_path / 'we"ird\\dir'
    odd_sink = json.dumps(str(odd_dir / "s.jsonl"))  # a JSON string is a valid TOML string
    path, c = load_text(write, QUEUES + f'\n[queues."a:b"]\nsink = {odd_sink}\n',
                        env={"HOME": str(tmp_path)})
    text = config_show.render(c)
    parsed = tomllib.loads(text)
    assert parsed["defaults"]["durability"] == "fsync"
    assert parsed["queues"]["jobs"]["max_bytes"] == "1KiB"
    assert parsed["queues"]["a:b"]["sink"] == str(odd_dir / "s.jsonl")
    assert set(parsed["queues"]) == {"jobs", "mail", "mail.dead", "a:b"}
    for name, table in parsed["queues"].items():  # every setting shown; an unset sink as a comment
        unset = set() if name in ("jobs", "a:b") else {"sink"}
        assert set(table) == set(config.QUEUE_KEYS) - unset, name
    assert f'durability = "fsync"  # from file {path}' in text.splitlines()
    assert "# log_file is not set  # from default" in text.splitlines()

    again = config.check_file(write(text, "rendered.toml"), env={"HOME": str(tmp_path)}, uid=USER)
    a, b = config_show.to_dict(c), config_show.to_dict(again)
    for d in (a, b):
        del d["path"], d["sources"]
    assert a == b


def test_to_dict_is_json_and_complete(write):
    path, c = load_text(write, "allow_uids = [5, 6]\n" + QUEUES)
    data = json.loads(json.dumps(config_show.to_dict(c)))
    assert data["path"] == path
    assert data["allow_uids"] == [5, 6]
    assert data["defaults"]["max_bytes"] == 1 << 20
    assert data["queues"]["jobs"]["durability"] == "memory"
    assert data["sources"]["queues.jobs.durability"] == f"file {path}"
    assert set(data) == {"path", "defaults", "queues", "sources", *config.TOP_KEYS}


def test_config_is_frozen_and_read_only():
    c = load(env={}, uid=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.address = "/x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.queues["x"] = QueueSettings()  # type: ignore[index]
    with pytest.raises(TypeError):
        c.sources["address"] = "x"  # type: ignore[index]
    assert hash(c) == hash(load(env={}, uid=0))


def test_direct_construction_has_defaults():
    c = Config(address="/s/ipcd.sock", state_dir="/st", authkey_file="/st/authkey")
    assert c.queue("q") == QueueSettings()
    assert (c.store_path(), c.lock_path()) == ("/st/ipcd.db", "/s/ipcd.lock")


def test_config_never_reads_the_authkey(write, tmp_path):
    key = tmp_path / "authkey"
    key.write_text("secret")
    _, c = load_text(write, f'authkey_file = "{key}"\n')
    assert c.authkey_file == str(key)
    assert "secret" not in config_show.render(c) and "secret" not in json.dumps(config_show.to_dict(c))
