"""Console-script entry: a lean path for ``send``/``recv``, typer for the rest.

Importing typer + click costs ~40 ms, more than the rest of an ``ipcd send``
put together (see bench/RESULTS.md), and cron jobs and shell loops call
``send`` and ``recv`` far more than anything else.  So the plain forms of
those two are parsed here by hand and run the same code as the typer
commands (commands.py).  Anything this parser does not fully understand —
``--help``, unknown options, odd spellings — falls through to the typer app,
which owns usage errors and help text.
"""

from __future__ import annotations

import sys

_SEND_FLAGS = {"--lines": "lines", "-l": "lines", "--text": "text", "-t": "text"}
_RECV_FLAGS = {"--follow": "follow", "-f": "follow", "--meta": "meta"}
_VALUES = {"--timeout": ("timeout", float), "--config": ("config", str), "-c": ("config", str),
           "--address": ("address", str), "-a": ("address", str)}
_RECV_VALUES = {"-n": ("n", int), "--lease": ("lease", float)}


def _parse(argv):
    """Return (command, positionals, options) or None to let typer handle argv."""
    if not argv or argv[0] not in ("send", "recv"):
        return None
    cmd, rest = argv[0], argv[1:]
    flags = _SEND_FLAGS if cmd == "send" else _RECV_FLAGS
    values = dict(_VALUES, **(_RECV_VALUES if cmd == "recv" else {}))
    pos, opts = [], {}
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in flags:
            opts[flags[arg]] = True
        elif arg.split("=", 1)[0] in values:
            name, _, inline = arg.partition("=")
            key, conv = values[name]
            if not inline:
                i += 1
                if i >= len(rest):
                    return None
                inline = rest[i]
            try:
                opts[key] = conv(inline)
            except ValueError:
                return None
        elif arg.startswith("-") and arg != "-":
            return None  # --help, --, combined flags, negative numbers...: typer decides
        else:
            pos.append(arg)
        i += 1
    if not 1 <= len(pos) <= (2 if cmd == "send" else 1):
        return None
    if cmd == "recv" and not 1 <= opts.get("n", 1) <= 10_000:
        return None
    return cmd, pos, opts


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parsed = _parse(argv)
    if parsed is None:
        from .cli import main as typer_main

        return typer_main(argv)
    from . import commands

    cmd, pos, opts = parsed
    if cmd == "send":
        return commands.run(commands.send, pos[0], pos[1] if len(pos) > 1 else None, **opts)
    return commands.run(commands.recv, pos[0], **opts)


if __name__ == "__main__":
    raise SystemExit(main())
