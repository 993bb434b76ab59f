"""``ipcd config show``: the effective configuration as TOML or JSON, with sources.

Kept apart from config.py (which builds and validates a Config) because it is
only needed by one command.  The authkey's contents are never read here:
only its path is shown.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .config import _toml_key, _toml_str, _SIZE_KEYS, format_size, TOP_KEYS, QUEUE_KEYS, Config


def _toml_value(key: str, value: Any) -> str:
    if key in _SIZE_KEYS:
        spelled = format_size(value)
        return _toml_str(spelled) if not spelled.isdigit() else spelled
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return repr(value)  # int, float: repr is valid TOML for finite values


def _render_lines(obj: Any, keys: Any, sources: Mapping[str, str], prefix: str) -> list[str]:
    lines = []
    for key in keys:
        value = getattr(obj, key)
        source = sources.get(prefix + key, "default")
        if value is None:  # TOML has no null: show the unset key as a comment
            lines.append(f"# {key} is not set  # from {source}")
        else:
            lines.append(f"{key} = {_toml_value(key, value)}  # from {source}")
    return lines


def render(config: Config) -> str:
    """Every effective value as TOML with ``# from <source>`` comments.

    The output parses with tomllib and, saved as a file, loads back to the
    same settings (unset optional keys appear only as comments).
    """
    shown = config.path or "none (built-in defaults)"
    lines = [f"# config file: {shown}  # from {config.sources.get('path', 'default')}"]
    lines += _render_lines(config, TOP_KEYS, config.sources, "")
    lines += ["", "[defaults]"]
    lines += _render_lines(config.defaults, QUEUE_KEYS, config.sources, "defaults.")
    for name in sorted(config.queues):
        lines += ["", f"[queues.{_toml_key(name)}]"]
        lines += _render_lines(config.queues[name], QUEUE_KEYS, config.sources, f"queues.{name}.")
    return "\n".join(lines) + "\n"


def to_dict(config: Config) -> dict[str, Any]:
    """Plain JSON-able data: every effective value plus "sources" (for `config show --json`)."""
    out: dict[str, Any] = {"path": config.path}
    for key in TOP_KEYS:
        value = getattr(config, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    out["defaults"] = dataclasses.asdict(config.defaults)
    out["queues"] = {name: dataclasses.asdict(q) for name, q in sorted(config.queues.items())}
    out["sources"] = dict(config.sources)
    return out
