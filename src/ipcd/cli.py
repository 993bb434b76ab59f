"""The ``ipcd`` command line (typer).

Contract for scripts: results on stdout only (one compact JSON value per
line), diagnostics on stderr, every user mistake one ``Error: ...`` line and
a sysexits code (see errors.ExitCode and the README), never a traceback.
Heavy modules (the daemon, the store, multiprocessing.managers) are imported
inside the commands that need them, so ``send``/``recv`` start fast.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import List, Optional

import typer

from . import commands, errors
from .commands import load_config, open_client  # noqa: F401  (used by cli_* modules too)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Named queues for one host: named pipes with structure and guarantees.")
config_app = typer.Typer(no_args_is_help=True, help="Show or validate the configuration.")
dead_app = typer.Typer(no_args_is_help=True, help="Inspect and replay dead-lettered messages.")
app.add_typer(config_app, name="config")
app.add_typer(dead_app, name="dead")

ConfigOpt = typer.Option(None, "--config", "-c", envvar="IPCD_CONFIG", show_envvar=False,
                         help="Config file (default: $IPCD_CONFIG, then the per-user/system path).")
AddressOpt = typer.Option(None, "--address", "-a", help="Socket path or host:port (overrides the config).")


def fail(err: errors.IpcdError):
    typer.echo(f"Error: {err}", err=True)
    raise typer.Exit(int(err.exit_code))


def guarded(fn):
    """Turn IpcdError into one Error: line + exit code; BrokenPipe into a quiet exit."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        code = commands.run(fn, *args, **kwargs)
        if code:
            raise typer.Exit(code)

    return wrapper


# -- daemon lifecycle ---------------------------------------------------------


@app.command()
@guarded
def start(config: Optional[str] = ConfigOpt, address: Optional[str] = AddressOpt,
          log_level: Optional[str] = typer.Option(None, help="DEBUG, INFO, WARNING or ERROR."),
          log_file: Optional[str] = typer.Option(None, help="Log to this file instead of stderr.")):
    """Run the daemon in the foreground (Ctrl-C or SIGTERM stops it cleanly)."""
    from . import config as configmod
    from .daemon import main as daemon_main

    overrides = {k: v for k, v in (("address", address), ("log_level", log_level), ("log_file", log_file)) if v}
    cfg = configmod.load(config, overrides=overrides)
    raise typer.Exit(daemon_main(cfg, reload_overrides=overrides))


@app.command()
@guarded
def stop(config: Optional[str] = ConfigOpt, address: Optional[str] = AddressOpt,
         timeout: float = typer.Option(30.0, help="Seconds to wait for the daemon to exit.")):
    """Stop the running daemon (SIGTERM) and wait until it is gone."""
    import fcntl

    cfg = load_config(config, address)
    path = cfg.lock_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        fail(errors.Unavailable(f"ipcd is not running on {cfg.address} (no lock file {path})"))
    except PermissionError:
        fail(errors.PermissionDenied(f"cannot read {path}: permission denied"))
    try:
        def held() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False

        if not held():
            fail(errors.Unavailable(f"ipcd is not running on {cfg.address}"))
        pid = int(os.pread(fd, 32, 0).decode().strip() or 0)
        if pid <= 0:
            fail(errors.Unavailable(f"the lock file {path} holds no pid"))
        try:
            os.kill(pid, signal.SIGTERM)
        except PermissionError:
            fail(errors.PermissionDenied(f"not allowed to signal the daemon (pid {pid})"))
        except ProcessLookupError:
            fail(errors.Unavailable(f"ipcd is not running (pid {pid} is gone)"))
        deadline = time.monotonic() + timeout
        while held():
            if time.monotonic() >= deadline:
                fail(errors.Timeout(f"the daemon (pid {pid}) did not stop within {timeout:g} s"))
            time.sleep(0.05)
        typer.echo(f"stopped ipcd (pid {pid})", err=True)
    finally:
        os.close(fd)


@app.command()
@guarded
def status(config: Optional[str] = ConfigOpt, address: Optional[str] = AddressOpt,
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Say whether the daemon runs (pid, address, uptime, queues); exit 69 if not."""
    try:
        with open_client(config, address) as c:
            st = c.status()
    except (errors.Unavailable, errors.PermissionDenied) as e:
        if as_json:
            typer.echo(json.dumps({"running": False, "error": str(e)}))
        fail(e if isinstance(e, errors.PermissionDenied) else errors.Unavailable(f"not running: {e}"))
    if as_json:
        typer.echo(json.dumps({"running": True, **st}))
        return
    typer.echo(f"ipcd {st['version']} running, pid {st['pid']}\n"
               f"address   {st['address']}\n"
               f"uptime    {_duration(st['uptime'])}\n"
               f"queues    {', '.join(st['queues']) or '(none)'}\n"
               f"clients   {st['connections']} connected\n"
               f"store     {st['store_bytes']} bytes")


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


# -- messages ------------------------------------------------------------------


@app.command()
@guarded
def send(queue: str = typer.Argument(..., help="Queue name (created on first use)."),
         message: Optional[str] = typer.Argument(None, help="A JSON value; omit or '-' to read stdin."),
         lines: bool = typer.Option(False, "--lines", "-l", help="Each non-empty stdin line is one message."),
         text: bool = typer.Option(False, "--text", "-t", help="Send the text as a JSON string."),
         timeout: Optional[float] = typer.Option(None, help="Seconds to wait when the queue is full (default: wait)."),
         config: Optional[str] = ConfigOpt, address: Optional[str] = AddressOpt):
    """Send a JSON message; exit 0 once the daemon has stored it."""
    raise typer.Exit(commands.send(queue, message, lines=lines, text=text, timeout=timeout,
                                   config=config, address=address))


_print_message = commands.print_message


@app.command()
@guarded
def recv(queue: str = typer.Argument(..., help="Queue name."),
         n: int = typer.Option(1, "-n", min=1, max=10_000, help="Take up to N messages."),
         timeout: Optional[float] = typer.Option(None, help="Seconds to wait; exit 75 if nothing arrived."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep consuming, one line per message."),
         meta: bool = typer.Option(False, "--meta", help="Print the envelope {id, queue, body, attempts, enqueued_at}."),
         lease: Optional[float] = typer.Option(None, help="Lease seconds (default: the queue's lease_seconds)."),
         config: Optional[str] = ConfigOpt, address: Optional[str] = AddressOpt):
    """Take messages and print each body as one line of compact JSON.

    Each message is acknowledged only after its line was written and flushed,
    so a crash or a closed pipe never loses one (it is redelivered).
    """
    raise typer.Exit(commands.recv(queue, n=n, timeout=timeout, follow=follow, meta=meta, lease=lease,
                                   config=config, address=address))


@app.command()
@guarded
def peek(queue: str, n: int = typer.Option(10, "-n", min=1, max=10_000),
         meta: bool = typer.Option(False, "--meta"),
         config: Optional[str] = ConfigOpt, address: Optional[str] = AddressOpt):
    """Show the next N ready messages without taking them."""
    with open_client(config, address) as c:
        for m in c.peek(queue, n):
            _print_message(m, meta)


@app.command()
@guarded
def purge(queue: str, dead: bool = typer.Option(False, "--dead", help="Purge QUEUE.dead instead."),
          config: Optional[str] = ConfigOpt, address: Optional[str] = AddressOpt):
    """Delete every message of QUEUE (including leased ones)."""
    with open_client(config, address) as c:
        n = c.purge(queue, dead=dead)
    typer.echo(f"purged {n} message(s) from {queue}{'.dead' if dead else ''}", err=True)


@dead_app.command("ls")
@guarded
def dead_ls(queue: str, limit: int = typer.Option(100, "--limit", min=1, max=10_000),
            config: Optional[str] = ConfigOpt, address: Optional[str] = AddressOpt):
    """List dead-lettered messages of QUEUE, one JSON envelope per line (with the reason)."""
    with open_client(config, address) as c:
        for d in c.dead_list(queue, limit):
            typer.echo(json.dumps({"queue": queue, **d}, ensure_ascii=False, separators=(",", ":")))


@dead_app.command("replay")
@guarded
def dead_replay(queue: str, ids: List[int] = typer.Option([], "--id", help="Message id (repeatable)."),
                all_: bool = typer.Option(False, "--all", help="Replay every dead message."),
                config: Optional[str] = ConfigOpt, address: Optional[str] = AddressOpt):
    """Move dead-lettered messages back to QUEUE with their attempts reset."""
    if bool(ids) == all_:
        raise errors.UsageError("give --id ID (repeatable) or --all")
    total, busy = 0, []
    with open_client(config, address) as c:
        if all_:
            while True:
                r = c.dead_replay(queue, all=True)
                total += r["replayed"]
                busy = r["busy"]
                if not r["replayed"]:
                    break
        else:
            r = c.dead_replay(queue, list(ids))
            total, busy = r["replayed"], r["busy"]
    typer.echo(f"replayed {total} message(s) to {queue}", err=True)
    if busy:
        raise errors.TempFail(f"{len(busy)} message(s) are leased by a consumer of {queue}.dead: "
                              f"{', '.join(map(str, busy[:10]))}")


# -- configuration ---------------------------------------------------------------


@config_app.command("show")
@guarded
def config_show(config: Optional[str] = ConfigOpt, address: Optional[str] = AddressOpt,
                as_json: bool = typer.Option(False, "--json")):
    """Print the effective configuration and where each value came from."""
    from . import config_show

    cfg = load_config(config, address)
    if as_json:
        typer.echo(json.dumps(config_show.to_dict(cfg), indent=2))
    else:
        typer.echo(config_show.render(cfg), nl=False)


@config_app.command("check")
@guarded
def config_check(file: Optional[str] = typer.Argument(None, help="File to check (default: the one in use).")):
    """Validate a config file; exit 78 naming the offending key."""
    from . import config as configmod

    if file is None:
        cfg = configmod.load(None)
        if cfg.path is None:
            typer.echo("OK: no config file; built-in defaults are in use")
            return
        file = cfg.path
    configmod.check_file(file)
    typer.echo(f"OK: {file}")


from . import cli_ops  # noqa: E402,F401  (registers tail/stats/ls/logs)
from . import cli_worker  # noqa: E402,F401  (registers worker)


def main(argv=None) -> int:
    """Run the typer app; usage errors become plain ``Error:`` lines (exit 2).

    Not typer's standalone mode: it draws usage errors in rich panels, which scripts
    grepping stderr for ``Error:`` would not expect.
    """
    import click

    try:
        rv = app(args=argv, prog_name="ipcd", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError:
        return 2  # typer has printed the help already
    except click.exceptions.UsageError as e:
        if e.ctx is not None:
            typer.echo(f"{e.ctx.get_usage()}\nTry '{e.ctx.command_path} --help' for help.\n", err=True)
        typer.echo(f"Error: {e.format_message()}", err=True)
        return 2
    except click.exceptions.Abort:
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return rv if isinstance(rv, int) else 0
