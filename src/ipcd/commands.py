"""What ``send`` and ``recv`` do, without typer.

The typer commands in cli.py and the fast path in entry.py both call these,
so the hot commands behave identically whichever parser ran.  Everything
here raises IpcdError for user-facing problems; the callers print the one
``Error:`` line and exit with its code.
"""

from __future__ import annotations

import json
import os
import sys

from . import errors

SEND_BATCH = 100


def load_config(config_path, address=None):
    from . import config as configmod

    return configmod.load(config_path, overrides={"address": address} if address else None)


def open_client(config_path, address, *, reconnect_timeout=0.0):
    from .client import connect

    return connect(config_path, address=address, reconnect_timeout=reconnect_timeout)


def _no_constants(name):
    raise ValueError(f"{name} is not valid JSON")


def encode(raw: str, as_text: bool) -> str:
    """Validate one message locally (the daemon checks again) and return its JSON text."""
    from .client import dumps

    if as_text:
        return dumps(raw)
    try:
        return dumps(json.loads(raw, parse_constant=_no_constants))
    except ValueError as e:
        raise errors.DataError(f"invalid JSON: {e}") from None
    except RecursionError:  # json recurses per nesting level
        raise errors.DataError("invalid JSON: nested too deeply") from None


def one_line(text: str) -> str:
    """A stored body on one line (a stdlib client may have sent pretty JSON): compacted, or,
    if it is too deep to decode here, with its line breaks made spaces (in valid JSON text
    a raw CR or LF can only be whitespace between tokens)."""
    if "\n" not in text and "\r" not in text:
        return text
    from .client import dumps, loads

    try:
        return dumps(loads(text))
    except errors.DataError:
        return text.replace("\r", " ").replace("\n", " ")


def validate_name(queue: str):
    from .config import validate_queue_name

    validate_queue_name(queue)


def send(queue, message, *, lines=False, text=False, timeout=None, config=None, address=None) -> int:
    """``ipcd send``; returns the exit code (65 if --lines met a bad line)."""
    validate_name(queue)
    if lines:
        if message not in (None, "-"):
            raise errors.UsageError("--lines reads stdin: give no MESSAGE")
        return send_lines(queue, text, timeout, config, address)
    raw = sys.stdin.read() if message in (None, "-") else message
    if text and message in (None, "-") and raw.endswith("\n"):
        raw = raw[:-1]
    body = encode(raw, text)
    with open_client(config, address) as c:
        c.send_json_many(queue, [body], timeout=timeout)
    return 0


def send_lines(queue, as_text, timeout, config, address) -> int:
    """Stream stdin: send what has arrived without waiting for a full batch.

    Reads the fd directly (not the buffered TextIO) so a line from
    ``tail -F`` is sent as soon as it arrives, while a file on stdin is
    sent in batches of SEND_BATCH.
    """
    fd = sys.stdin.fileno()
    code = 0
    lineno = 0
    pending = b""
    with open_client(config, address) as c:
        while True:
            chunk = os.read(fd, 1 << 16)
            if chunk:
                pending += chunk
                *complete, pending = pending.split(b"\n")
            else:
                complete, pending = ([pending] if pending else []), b""
            batch = []
            for raw in complete:
                lineno += 1
                line = raw.decode("utf-8", errors="replace").rstrip("\r")
                if not line.strip():
                    continue
                try:
                    batch.append(encode(line, as_text))
                except errors.DataError as e:
                    print(f"Error: line {lineno}: {e}", file=sys.stderr, flush=True)
                    code = int(errors.ExitCode.DATAERR)
                if len(batch) >= SEND_BATCH:
                    c.send_json_many(queue, batch, timeout=timeout)
                    batch = []
            if batch:
                c.send_json_many(queue, batch, timeout=timeout)
            if not chunk:
                return code


def print_message(m, meta: bool):
    if meta:
        line = json.dumps(m.envelope(), ensure_ascii=False, separators=(",", ":"))
    else:
        line = one_line(m.text)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def recv(queue, *, n=1, timeout=None, follow=False, meta=False, lease=None, config=None, address=None) -> int:
    """``ipcd recv``: print, flush, then ack (piggybacked on the next request in -f)."""
    validate_name(queue)
    with open_client(config, address) as c:
        to_ack = []
        while True:
            msgs = c.recv_many(queue, n, timeout=timeout, lease=lease, ack=to_ack)
            to_ack = []
            if not msgs:
                if follow:
                    continue
                raise errors.Timeout(f"no message arrived on '{queue}' within {timeout:g} s")
            for i, m in enumerate(msgs):
                try:
                    print_message(m, meta)
                except BrokenPipeError:
                    c.release(msgs[i:])  # back to the queue at once, attempt not charged
                    c.ack(to_ack)
                    raise
                to_ack.append(m)
            if not follow:
                c.ack(to_ack)
                return 0


def run(fn, *args, **kwargs) -> int:
    """Call a command; user-facing failures become one ``Error:`` line and an exit code.

    Shared by the fast path (entry.py) and every typer command (cli.guarded).
    """
    try:
        return fn(*args, **kwargs) or 0
    except errors.IpcdError as e:
        print(f"Error: {e}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        silence_stdout()
        return 0


def silence_stdout():
    """The reader went away: stop Python from complaining at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
