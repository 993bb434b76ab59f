"""Operations commands: ``ipcd tail``, ``stats``, ``ls`` and ``logs``.

Registered on cli.app when cli.py imports this module.  None of them takes
a message from a queue: ``tail`` reads the daemon's in-memory history of
recent sends (watch.History), ``stats``/``ls`` read counters.

``stats --json`` prints one object (``--watch``: one per interval, one per
line) with this schema; fields are only ever added, never renamed:

    {"schema": 1,
     "daemon": {"pid", "version", "address", "uptime", "connections", "store_bytes"},
     "queues": [{"name", "ready", "leased", "delayed", "dead", "bytes", "oldest_age",
                 "waiting", "durability", "history",
                 "totals": {"sent", "received", "acked", "nacked", "redelivered", "dead_lettered"},
                 "rates": {"sent", "received", "acked", "redelivered"}}]}
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import typer

from . import errors
from .cli import AddressOpt, ConfigOpt, app, guarded, load_config, open_client
from .commands import one_line

FOLLOW_POLL = 30.0  # seconds one tail long-poll waits on the daemon
LOGS_POLL = 0.25  # seconds between checks of a followed log file
STATS_SCHEMA = 1


def _out(line: str):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# -- tail ----------------------------------------------------------------------------------


@app.command()
@guarded
def tail(queue: Optional[str] = typer.Argument(None, help="Queue name (or --all)."),
         n: int = typer.Option(10, "-n", min=0, max=10_000, help="Show the last N messages sent first."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing messages as they are sent."),
         all_: bool = typer.Option(False, "--all", help="Every queue; lines are 'QUEUE<TAB>BODY'."),
         as_json: bool = typer.Option(False, "--json", help='With --all: {"queue":..., "body":...} per line.'),
         meta: bool = typer.Option(False, "--meta", help='{"id", "queue", "body", "enqueued_at"} per line.'),
         config: Optional[str] = ConfigOpt, address: Optional[str] = AddressOpt):
    """Show messages recently SENT to QUEUE, without consuming them (-f: follow).

    Reads the daemon's in-memory history (the last `history` messages per
    queue, default 1000, at most 1 MiB): receivers still get every message.
    """
    if all_ == (queue is not None):
        raise errors.UsageError("give a QUEUE or --all")
    if queue is not None:
        from .config import validate_queue_name

        validate_queue_name(queue)

    def show(entries):
        for _seq, name, rid, body, at in entries:
            if meta:
                line = f'{{"id":{rid},"queue":{_dumps(name)},"body":{one_line(body)},"enqueued_at":{_dumps(at)}}}'
            elif all_ and as_json:
                line = f'{{"queue":{_dumps(name)},"body":{one_line(body)}}}'
            elif all_:
                line = f"{name}\t{one_line(body)}"
            else:
                line = one_line(body)
            _out(line)

    with open_client(config, address) as c:
        r = c.call("tail", queue=queue, n=max(n, 1), after=None, timeout=0)
        if n:
            show(r["entries"])
        seq = r["seq"]
        warned = False
        while follow:
            r = c.call("tail", FOLLOW_POLL, queue=queue, n=1000, after=seq, timeout=FOLLOW_POLL)
            if r["gap"] and not warned:
                typer.echo("ipcd: tail fell behind the history; some messages were not shown", err=True)
                warned = True
            show(r["entries"])
            seq = r["seq"]


# -- stats and ls ----------------------------------------------------------------------------


def stats_document(status: dict, queues: list[dict]) -> dict:
    """The stable ``stats --json`` object (schema in the module docstring)."""
    return {
        "schema": STATS_SCHEMA,
        "daemon": {k: status.get(k) for k in ("pid", "version", "address", "uptime", "connections",
                                              "store_bytes")},
        "queues": [{
            "name": q["name"], "ready": q["ready"], "leased": q["leased"], "delayed": q["delayed"],
            "dead": q.get("dead_messages", 0), "bytes": q["bytes"], "oldest_age": q["oldest_age"],
            "waiting": q["waiting"], "durability": q["durability"], "history": q.get("history", 0),
            "totals": {"sent": q["sent"], "received": q["received"], "acked": q["acked"],
                       "nacked": q["nacked"], "redelivered": q["redelivered"], "dead_lettered": q["dead"]},
            "rates": q.get("rates") or {"sent": 0.0, "received": 0.0, "acked": 0.0, "redelivered": 0.0},
        } for q in queues],
    }


def _size(n: int) -> str:
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f:
            return f"{n / f:.1f}{unit}"
    return f"{n}B"


def _age(seconds) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _table(rows: list[list[str]]) -> str:
    """Left-align the first column, right-align the rest."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def render_stats(doc: dict) -> str:
    d = doc["daemon"]
    up = int(d["uptime"] or 0)
    head = (f"ipcd {d['version']}  pid {d['pid']}  up {up // 3600:02d}:{up % 3600 // 60:02d}:{up % 60:02d}  "
            f"{d['connections']} connection(s)  store {_size(d['store_bytes'] or 0)}  {d['address']}")
    rows = [["QUEUE", "READY", "LEASED", "DELAYED", "DEAD", "BYTES", "OLDEST", "WAITING",
             "SENT", "RECEIVED", "ACKED", "REDELIV", "SENT/s", "RECV/s", "ACK/s"]]
    for q in doc["queues"]:
        t, r = q["totals"], q["rates"]
        rows.append([q["name"], str(q["ready"]), str(q["leased"]), str(q["delayed"]), str(q["dead"]),
                     _size(q["bytes"]), _age(q["oldest_age"]), str(q["waiting"]), str(t["sent"]),
                     str(t["received"]), str(t["acked"]), str(t["redelivered"]), f"{r['sent']:.1f}",
                     f"{r['received']:.1f}", f"{r['acked']:.1f}"])
    return head + "\n" + (_table(rows) if len(rows) > 1 else "(no queues)")


@app.command()
@guarded
def stats(queue: Optional[str] = typer.Argument(None, help="One queue (default: all)."),
          as_json: bool = typer.Option(False, "--json", help="The stable JSON document (see README)."),
          watch: Optional[float] = typer.Option(None, "--watch", min=0.1, help="Repeat every S seconds."),
          config: Optional[str] = ConfigOpt, address: Optional[str] = AddressOpt):
    """Per-queue depth, ages, totals and rates, and the daemon's pid/uptime/connections."""
    if queue is not None:
        from .config import validate_queue_name

        validate_queue_name(queue)
    tty = sys.stdout.isatty()
    with open_client(config, address) as c:
        while True:
            doc = stats_document(c.status(), c.stats(queue))
            if as_json:
                _out(_dumps(doc))
            else:
                _out(("\033[H\033[2J" if watch and tty else "") + render_stats(doc)
                     + ("\n" if watch and not tty else ""))
            if not watch:
                return
            time.sleep(watch)


@app.command("ls")
@guarded
def ls(as_json: bool = typer.Option(False, "--json", help='[{"name":..., "depth":...}, ...]'),
       config: Optional[str] = ConfigOpt, address: Optional[str] = AddressOpt):
    """List queues with their depth (ready + leased + delayed), one per line."""
    with open_client(config, address) as c:
        rows = [(q["name"], q["ready"] + q["leased"] + q["delayed"]) for q in c.stats(None)]
    if as_json:
        _out(_dumps([{"name": n, "depth": d} for n, d in rows]))
    elif rows:
        width = max(len(n) for n, _ in rows)
        for name, depth in rows:
            _out(f"{name.ljust(width)}  {depth}")


# -- logs ---------------------------------------------------------------------------------------


def _daemon_log_file(config, address):
    """The running daemon's log_file (it may differ from the config: --log-file); else the config's."""
    try:
        with open_client(config, address) as c:
            st = c.status()
        if "log_file" in st:
            return st["log_file"]
    except (errors.Unavailable, errors.PermissionDenied, errors.AuthError):
        pass
    return load_config(config, address).log_file


def _last_lines(f, n: int) -> bytes:
    """The last *n* lines of binary file *f*, reading backwards in blocks; leaves f at EOF."""
    end = f.seek(0, os.SEEK_END)
    if n <= 0:
        return b""
    pos, data = end, b""
    while pos > 0 and data.count(b"\n") <= n:
        step = min(1 << 16, pos)
        pos -= step
        f.seek(pos)
        data = f.read(step) + data
    f.seek(end)
    lines = data.splitlines(keepends=True)
    return b"".join(lines[-n:])


def follow_file(path: str, n: int, follow: bool, out=None, poll: float = LOGS_POLL, stop=None):
    """Print the last *n* lines, then follow *path* by name like ``tail -F``.

    Reopens when the path names another inode (logrotate's rename + create)
    after finishing the old file, and starts over when the file shrank
    (copytruncate).  *stop()* (tests) ends the loop.
    """
    out = out or sys.stdout.buffer
    f = open(path, "rb")
    try:
        out.write(_last_lines(f, n))
        out.flush()
        ident = os.fstat(f.fileno())[1:3]  # (st_ino, st_dev)
        while follow and not (stop and stop()):
            chunk = f.read(1 << 16)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            time.sleep(poll)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # between rename and create
            if (st.st_ino, st.st_dev) != ident:
                rest = f.read()
                if rest:
                    out.write(rest)
                    out.flush()
                f.close()
                f = open(path, "rb")
                ident = os.fstat(f.fileno())[1:3]
            elif st.st_size < f.tell():
                print("ipcd: log file truncated; reading from the start", file=sys.stderr)
                f.seek(0)
    finally:
        f.close()


@app.command()
@guarded
def logs(follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines (like tail -F)."),
         n: int = typer.Option(50, "-n", min=0, help="Show the last N lines first."),
         config: Optional[str] = ConfigOpt, address: Optional[str] = AddressOpt):
    """Show the daemon's log file (log_file); exit 69 when it logs to stderr/journald."""
    path = _daemon_log_file(config, address)
    if not path:
        unit = "-u ipcd" if os.geteuid() == 0 else "--user-unit ipcd"
        raise errors.Unavailable(
            f"the daemon logs to stderr (the journal when run by systemd), not to a file: "
            f"use 'journalctl {unit} -n {n}{' -f' if follow else ''}' (system service: -u ipcd, "
            f"per-user service: --user-unit ipcd), or set log_file in the config")
    try:
        follow_file(path, n, follow)
    except FileNotFoundError:
        raise errors.Unavailable(f"no log file at {path} (has the daemon started with this config?)") from None
    except PermissionError:
        raise errors.PermissionDenied(f"cannot read the log file {path}: permission denied") from None
