"""ipcd configuration: a frozen, validated Config built from defaults, file, env and flags.

Discovery and precedence: command-line `--config FILE` > env `IPCD_CONFIG` >
default config path (only if it exists) > no file (built-in defaults). Then for
values: command-line overrides (`overrides` dict, e.g. {"address": ...}) > env
`IPCD_ADDRESS`, `IPCD_STATE_DIR` > config file > systemd-provided dirs
($RUNTIME_DIRECTORY/$STATE_DIRECTORY, via paths.py defaults) > built-in defaults.
An explicitly named file (--config or IPCD_CONFIG) that does not exist is a
ConfigError; a missing default file is fine.

File layout (TOML): the top-level keys of Config, a ``[defaults]`` table with
QueueSettings keys, and one ``[queues.NAME]`` table per queue that needs
different settings (it may set only some keys; the rest come from
``[defaults]``). Queue names containing '.' must be quoted:
``[queues."jobs.dead"]``.

Relative paths in the file (address, state_dir, authkey_file, log_file,
sink) resolve against the file's directory, except that a relative log_file
resolves against ``$LOGS_DIRECTORY`` when systemd sets it. Relative paths
given on the command line or in env resolve against the working directory
(address stays as given: client and daemon resolve it the same way).

Every problem raises errors.ConfigError naming where (file, env var or
"command line"), the key, the bad value and what is allowed. config.py
never reads the authkey file, only its path.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from ipcd import paths
from ipcd.errors import ConfigError, DataError

DURABILITY = ("os", "fsync", "memory")
OVERFLOW = ("block", "reject")
SINK_FORMATS = ("body", "envelope")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MIN_REQUEST_BYTES = 64 << 10
# Room for the envelope (queue name, ids, pickle framing) around a body, so a
# maximal message still fits in one request.
REQUEST_OVERHEAD = 4096

_QUEUE_NAME = re.compile(r"[A-Za-z0-9._:-]{1,200}")
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
_SIZE_UNITS = MappingProxyType({
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
})
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def validate_queue_name(name: object) -> str:
    """Return ``name`` if it is 1-200 characters of ``[A-Za-z0-9._:-]``, else raise DataError."""
    if isinstance(name, str) and _QUEUE_NAME.fullmatch(name):
        return name
    shown = repr(name)
    if len(shown) > 60:  # a runaway name must not flood the log line
        shown = shown[:50] + "..."
    raise DataError(f"invalid queue name {shown}: use 1-200 characters from A-Z a-z 0-9 . _ : -")


def parse_size(value: int | str) -> int:
    """Bytes from an int (>= 0) or a string such as "512", "64KiB", "1.5MiB", "10MB".

    Units (case-insensitive): B, KiB/MiB/GiB/TiB (powers of 1024), KB/MB/GB/TB
    (powers of 1000). Raises ValueError (callers add context: config.py turns
    it into ConfigError, a CLI into a usage error).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 0:
            return value
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match and match[2].lower() in _SIZE_UNITS:
            exact = Decimal(match[1]) * _SIZE_UNITS[match[2].lower()]
            if exact == exact.to_integral_value():
                return int(exact)
            raise ValueError(f"size {value!r} is not a whole number of bytes")
    raise ValueError(
        f"invalid size {value!r}: use a number of bytes >= 0 or a string like "
        "'64KiB', '1MiB', '2GiB', '10MB'"
    )


def format_size(size: int) -> str:
    """The shortest exact binary-unit spelling of ``size`` ("64MiB"), else the plain number."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


@dataclass(frozen=True)
class QueueSettings:
    max_messages: int = 1_000_000  # >= 1
    max_bytes: int = 1 << 30  # total body bytes, >= 1
    max_message_bytes: int = 1 << 20  # >= 1, <= Config.max_request_bytes - 4096
    overflow: str = "block"
    durability: str = "os"
    lease_seconds: float = 30.0  # > 0
    max_attempts: int = 5  # >= 1
    history: int = 1000  # >= 0, messages kept for `ipcd tail`
    sink: str | None = None  # absolute path of a .jsonl file every message is appended to
    sink_format: str = "body"


@dataclass(frozen=True)
class Config:
    """The effective configuration. Build it with load(); it is never mutated.

    ``queues`` maps each configured queue name to its complete, merged
    settings; ``sources`` maps every dotted key ("address",
    "defaults.max_messages", "queues.jobs.durability", and "path" for the
    file choice) to where its value came from: "default", "file <path>",
    "env <VAR>" or "command line".
    """

    address: str  # unix socket path, or host:port for TCP (see paths.parse_address)
    state_dir: str
    authkey_file: str  # default <state_dir>/authkey
    log_file: str | None = None  # None = stderr
    log_level: str = "INFO"
    socket_group: str | None = None  # group name or numeric gid, as a string
    allow_uids: tuple[int, ...] = ()  # empty = no uid restriction
    allow_gids: tuple[int, ...] = ()
    handshake_timeout: float = 5.0
    max_connections: int = 256
    max_request_bytes: int = 64 << 20
    max_store_bytes: int = 0  # 0 = unlimited
    shutdown_timeout: float = 10.0
    defaults: QueueSettings = QueueSettings()
    # hash=False: mapping proxies are unhashable, and the other fields identify a Config.
    queues: Mapping[str, QueueSettings] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    path: str | None = None
    sources: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), hash=False, compare=False
    )

    def queue(self, name: str) -> QueueSettings:
        """Settings for queue ``name`` (raises DataError for an invalid name).

        ``[queues.NAME]`` merged over ``[defaults]``. A dead-letter queue
        ``X.dead`` without a table of its own takes X's settings (so it keeps
        X's durability) with ``max_messages``/``max_bytes`` of ``[defaults]``
        and no sink: its messages were already written to a sink when first sent.
        """
        validate_queue_name(name)
        own = self.queues.get(name)
        if own is not None:
            return own
        if name.endswith(".dead") and len(name) > len(".dead"):
            return dataclasses.replace(
                self.queue(name[: -len(".dead")]),
                max_messages=self.defaults.max_messages,
                max_bytes=self.defaults.max_bytes,
                sink=None,
            )
        return self.defaults

    def store_path(self) -> str:
        return os.path.join(self.state_dir, "ipcd.db")

    def lock_path(self) -> str:
        """The instance lock: next to a unix socket (one daemon per socket), else in state_dir."""
        kind, where = paths.parse_address(self.address)
        if kind == "unix":
            return os.path.join(os.path.dirname(str(where)), "ipcd.lock")
        return os.path.join(self.state_dir, "ipcd.lock")


# --- value checkers: take the raw value, return the stored one or raise ValueError(problem)

Checker = Callable[[Any], Any]


def _rule(problem: str, ok: Callable[[Any], bool], convert: Callable[[Any], Any] = lambda v: v
          ) -> Checker:
    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError(problem)
        return convert(value)
    return check


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # `true` for a count is a typo


def _int(minimum: int) -> Checker:
    return _rule(f"must be an integer >= {minimum}", lambda v: _is_int(v) and v >= minimum)


def _choice(options: tuple[str, ...]) -> Checker:
    return _rule("must be one of " + ", ".join(map(repr, options)), lambda v: v in options)


def _size(minimum: int) -> Checker:
    def check(value: Any) -> int:
        try:
            size = parse_size(value)
        except ValueError:
            size = -1
        if size < minimum:
            raise ValueError(
                f"must be a size >= {minimum} ({format_size(minimum)}): an integer number "
                "of bytes or a string like '64KiB', '1MiB', '2GiB', '10MB'"
            )
        return size
    return check


def _address(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a socket path string or 'host:port'")
    try:
        paths.parse_address(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return value


_seconds = _rule("must be a number of seconds > 0", lambda v: (_is_int(v) or isinstance(v, float))
                 and math.isfinite(v) and v > 0, float)
_path = _rule("must be a non-empty path, absolute or relative to the config file ('~' is not "
              "expanded)", lambda v: isinstance(v, str) and v != "" and v[0] != "~" and "\0" not in v)
_log_level = _rule("must be one of " + ", ".join(map(repr, LOG_LEVELS)) + " (any case)",
                   lambda v: isinstance(v, str) and v.upper() in LOG_LEVELS, str.upper)
_group = _rule("must be a group name or a numeric gid >= 0",
               lambda v: (_is_int(v) and v >= 0) or (isinstance(v, str) and v.strip() != ""), str)
_ids = _rule("must be an array of integers >= 0, e.g. [1000, 1001]",
             lambda v: isinstance(v, (list, tuple)) and all(_is_int(i) and i >= 0 for i in v), tuple)


def _log_file(value: Any) -> str | None:
    return None if value == "-" else _path(value)  # "-" = stderr, to undo a file's setting


TOP_KEYS: Mapping[str, Checker] = MappingProxyType({
    "address": _address,
    "state_dir": _path,
    "authkey_file": _path,
    "log_file": _log_file,
    "log_level": _log_level,
    "socket_group": _group,
    "allow_uids": _ids,
    "allow_gids": _ids,
    "handshake_timeout": _seconds,
    "max_connections": _int(1),
    "max_request_bytes": _size(MIN_REQUEST_BYTES),
    "max_store_bytes": _size(0),
    "shutdown_timeout": _seconds,
})
QUEUE_KEYS: Mapping[str, Checker] = MappingProxyType({
    "max_messages": _int(1),
    "max_bytes": _size(1),
    "max_message_bytes": _size(1),
    "overflow": _choice(OVERFLOW),
    "durability": _choice(DURABILITY),
    "lease_seconds": _seconds,
    "max_attempts": _int(1),
    "history": _int(0),
    "sink": _path,
    "sink_format": _choice(SINK_FORMATS),
})
_FILE_PATH_KEYS = ("state_dir", "authkey_file", "log_file", "sink")


def _where(source: str) -> str:
    """Error prefix for a source: the file path itself, else "env X" / "command line"."""
    return source[len("file "):] if source.startswith("file ") else source


def _bad(where: str, key: str, value: Any, problem: str) -> ConfigError:
    return ConfigError(f"{where}: {key} = {value!r}: {problem}")


def _unknown(where: str, dotted: str, key: str, known: Any) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}: unknown key {dotted!r}{hint}")


def _check(where: str, dotted: str, checker: Checker, value: Any) -> Any:
    try:
        return checker(value)
    except ValueError as exc:
        raise _bad(where, dotted, value, str(exc)) from None


def _resolve(key: str, value: Any, source: str, base_dir: str, env: Mapping[str, str]) -> Any:
    """Make a relative path absolute (see the module docstring for the rule)."""
    if key == "address":
        if source.startswith("file ") and paths.parse_address(value)[0] == "unix":
            resolved = os.path.join(base_dir, value)
            return _check(_where(source), key, _address, resolved)  # re-check the length
        return value
    if key not in _FILE_PATH_KEYS or value is None or os.path.isabs(value):
        return value
    logs = paths.systemd_dir(env, "LOGS_DIRECTORY") if key == "log_file" else None
    if logs:
        return os.path.join(logs, value)
    if source.startswith("file "):
        return os.path.normpath(os.path.join(base_dir, value))
    return os.path.abspath(value)


# --- reading the file

def _discover(config_path: str | None, env: Mapping[str, str], uid: int) -> tuple[str | None, str]:
    """Return (absolute file path or None, where the choice came from)."""
    if config_path is not None:
        path, source = config_path, "command line"
    elif env.get("IPCD_CONFIG"):
        path, source = env["IPCD_CONFIG"], "env IPCD_CONFIG"
    else:
        try:
            path = paths.default_config_path(env, uid)
        except ConfigError:  # no HOME: there is no default file to find, which is fine
            return None, "default"
        return (os.path.abspath(path), "default") if os.path.exists(path) else (None, "default")
    if not path or not os.path.exists(path):
        raise ConfigError(f"config file {path!r} (from {source}) does not exist")
    return os.path.abspath(path), source


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fp:
            return tomllib.load(fp)
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line L, column C)"
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses per nesting level of arrays and inline tables
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def _queue_table(path: str, dotted: str, table: Any) -> dict[str, Any]:
    """Validate the keys and values of a [defaults] / [queues.NAME] table."""
    if not isinstance(table, dict):
        raise _bad(path, dotted, table, f"must be a table [{dotted}]")
    out = {}
    for key, value in table.items():
        if key not in QUEUE_KEYS:
            if isinstance(value, dict) and dotted.startswith("queues."):
                # [queues.jobs.dead] parses as queue "jobs" with a sub-table "dead".
                raise ConfigError(
                    f"{path}: {dotted}.{key} is a table: a queue name containing '.' "
                    f'must be quoted, e.g. [queues."{dotted[len("queues."):]}.{key}"]'
                )
            raise _unknown(path, f"{dotted}.{key}", key, QUEUE_KEYS)
        out[key] = _check(path, f"{dotted}.{key}", QUEUE_KEYS[key], value)
    return out


def _split_file(path: str, data: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Check the file's structure; return (top-level values, [defaults], {queue: table})."""
    top: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    queues: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if key == "defaults":
            defaults = _queue_table(path, "defaults", value)
        elif key == "queues":
            if not isinstance(value, dict):
                raise _bad(path, "queues", value, "must be tables [queues.NAME]")
            for name, table in value.items():
                try:
                    validate_queue_name(name)
                except DataError as exc:
                    raise ConfigError(f"{path}: [queues.{_toml_key(name)}]: {exc}") from None
                queues[name] = _queue_table(path, f"queues.{name}", table)
        elif key in TOP_KEYS:
            top[key] = _check(path, key, TOP_KEYS[key], value)
        elif key in QUEUE_KEYS:
            raise ConfigError(
                f"{path}: unknown top-level key {key!r}: queue settings go under "
                "[defaults] or [queues.NAME]"
            )
        else:
            raise _unknown(path, key, key, [*TOP_KEYS, "defaults", "queues"])
    return top, defaults, queues


# --- building a Config

def load(config_path: str | None = None, *, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, object] | None = None, uid: int | None = None) -> Config:
    """Find, read and validate the configuration (precedence: module docstring).

    ``overrides`` holds command-line values for top-level keys; a None value
    means "not given". ``env`` defaults to os.environ, ``uid`` to the
    effective uid (it decides the root vs per-user default locations).
    Raises ConfigError.
    """
    env = os.environ if env is None else env
    uid = os.geteuid() if uid is None else uid
    path, path_source = _discover(config_path, env, uid)
    data = _read_toml(path) if path else {}
    return _build(data, path, path_source, env, overrides or {}, uid)


def check_file(path: str, *, env: Mapping[str, str] | None = None, uid: int | None = None) -> Config:
    """Parse and validate one explicit file, ignoring IPCD_* variables (for `config check`)."""
    env = os.environ if env is None else env
    return load(path, env={k: v for k, v in env.items() if not k.startswith("IPCD_")}, uid=uid)


def _build(data: dict[str, Any], path: str | None, path_source: str, env: Mapping[str, str],
           overrides: Mapping[str, object], uid: int) -> Config:
    file_source = f"file {path}"
    base_dir = os.path.dirname(path) if path else os.getcwd()
    file_top, file_defaults, file_queues = _split_file(path, data) if path else ({}, {}, {})

    # Layers in precedence order; every given value is checked, even a shadowed one.
    layers: list[tuple[str, dict[str, Any]]] = []
    given = {k: v for k, v in overrides.items() if v is not None}
    for key in given:
        if key not in TOP_KEYS:
            raise _unknown("command line", key, key, TOP_KEYS)
    layers.append(("command line", {k: _check("command line", k, TOP_KEYS[k], v)
                                    for k, v in given.items()}))
    for key, var in (("address", "IPCD_ADDRESS"), ("state_dir", "IPCD_STATE_DIR")):
        if env.get(var):
            layers.append((f"env {var}", {key: _check(f"env {var}", key, TOP_KEYS[key], env[var])}))
    layers.append((file_source, file_top))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {"path": path_source}
    for key in TOP_KEYS:
        for source, layer in layers:
            if key in layer:
                values[key] = _resolve(key, layer[key], source, base_dir, env)
                sources[key] = source
                break
        else:
            values[key], sources[key] = _default(key, values, env, uid)

    defaults = _merge(QueueSettings(), file_defaults, file_source, base_dir, env)
    for key in QUEUE_KEYS:
        sources[f"defaults.{key}"] = file_source if key in file_defaults else "default"
    queues = {}
    for name, table in file_queues.items():
        queues[name] = _merge(defaults, table, file_source, base_dir, env)
        for key in QUEUE_KEYS:
            sources[f"queues.{name}.{key}"] = (
                file_source if key in table else sources[f"defaults.{key}"])

    config = Config(**values, defaults=defaults, queues=MappingProxyType(queues), path=path,
                    sources=MappingProxyType(sources))
    _check_limits(config)
    return config


def _default(key: str, values: dict[str, Any], env: Mapping[str, str], uid: int) -> tuple[Any, str]:
    """Built-in default for a top-level key, and its source string."""
    if key == "address":
        var = "RUNTIME_DIRECTORY"
        source = f"env {var}" if paths.systemd_dir(env, var) else "default"
        return _check(source, key, _address, paths.default_address(env, uid)), source
    if key == "state_dir":
        var = "STATE_DIRECTORY"
        source = f"env {var}" if paths.systemd_dir(env, var) else "default"
        return paths.default_state_dir(env, uid), source
    if key == "authkey_file":  # state_dir comes first in TOP_KEYS
        return os.path.join(values["state_dir"], "authkey"), "default"
    return Config.__dataclass_fields__[key].default, "default"


def _merge(base: QueueSettings, table: dict[str, Any], source: str, base_dir: str,
           env: Mapping[str, str]) -> QueueSettings:
    resolved = {k: _resolve(k, v, source, base_dir, env) for k, v in table.items()}
    return dataclasses.replace(base, **resolved)


def _check_limits(config: Config) -> None:
    """Cross-field rules: a maximal message must fit in one request."""
    limit = config.max_request_bytes - REQUEST_OVERHEAD
    named = [("defaults", config.defaults)] + [(f"queues.{n}", q) for n, q in config.queues.items()]
    for prefix, settings in named:
        if settings.max_message_bytes > limit:
            key = f"{prefix}.max_message_bytes"
            raise _bad(
                _where(config.sources[key]), key, settings.max_message_bytes,
                f"must be <= max_request_bytes - {REQUEST_OVERHEAD} = {limit} "
                f"(max_request_bytes = {config.max_request_bytes}, "
                f"from {config.sources['max_request_bytes']})",
            )


# --- output

_SIZE_KEYS = frozenset({"max_bytes", "max_message_bytes", "max_request_bytes", "max_store_bytes"})


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_str(key)


def _toml_str(text: str) -> str:
    # JSON string escapes are a subset of TOML's; TOML also forbids a raw DEL.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
