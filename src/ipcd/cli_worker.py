"""``ipcd worker``: the command-line front of worker.py (issue 6).

Registers itself on ``ipcd.cli.app`` when cli.py imports it; the worker
itself (and multiprocessing) is imported only when the command runs.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from .cli import AddressOpt, ConfigOpt, app, guarded

WORKER_HELP = """Run a command, or a Python function, for every message of QUEUE.

\b
  ipcd worker QUEUE [OPTIONS] -- CMD [ARGS...]
  ipcd worker QUEUE [OPTIONS] --call package.module:function

CMD gets the message body as JSON on stdin and IPCD_QUEUE, IPCD_MESSAGE_ID,
IPCD_ATTEMPT in its environment; exit status 0 acknowledges the message.
With --call, --concurrency forked processes import the module once and call
function(body) per message; returning acknowledges it.  A failure (non-zero
exit, signal, --timeout, exception) is retried after --retry-delay, doubling
per attempt (at most 300 s); after the queue's max_attempts the daemon
dead-letters it with the reason (exit status and stderr tail, or the
exception): see `ipcd dead ls QUEUE`.

Delivery is at-least-once: after a daemon restart or an expired lease a
message can run again, so make handlers idempotent (IPCD_MESSAGE_ID is
stable across redeliveries; --call: ipcd.worker.current_message()["id"]).

SIGTERM/SIGINT: finish running messages within --grace, release the rest
(not charged an attempt), exit 0; a second signal stops at once (exit
128+signal; leases expire and messages are redelivered).  SIGHUP is ignored.

Exit codes: 0 done; 2 usage (neither or both of CMD and --call); 65 bad
queue name; 69 daemon unreachable at start, or lost beyond
--reconnect-timeout; 77 permission denied; 78 bad configuration, CMD not
found, or a --call target that cannot be imported.
"""


@app.command(help=WORKER_HELP)
@guarded
def worker(queue: str = typer.Argument(..., help="Queue to consume."),
           command: Optional[List[str]] = typer.Argument(None, metavar="-- CMD [ARGS...]",
                                                         help="Command to run per message (after --)."),
           call: Optional[str] = typer.Option(None, "--call", metavar="MODULE:FUNCTION",
                                              help="Call this Python function per message in a fork pool."),
           concurrency: int = typer.Option(1, "--concurrency", "-j", min=1, max=1024,
                                           help="Messages handled at once. N>1 may finish (and so "
                                                "acknowledge) messages out of order."),
           timeout: Optional[float] = typer.Option(None, min=0.001,
                                                   help="Seconds a message may run; then it is killed "
                                                        "(its whole process group) and counts as failed."),
           retry_delay: float = typer.Option(1.0, min=0, help="Delay before the 2nd attempt; doubles per "
                                                              "attempt, at most 300 s."),
           lease: Optional[float] = typer.Option(None, min=0.1, max=86400,
                                                 help="Lease seconds (default: the queue's lease_seconds); "
                                                      "renewed every lease/3 while a message runs."),
           grace: float = typer.Option(10.0, min=0, help="On SIGTERM/SIGINT, seconds running messages get "
                                                         "to finish before they are stopped and released."),
           max_messages: Optional[int] = typer.Option(None, min=1, help="Take at most M messages, then "
                                                                        "exit 0 once they are done."),
           idle_exit: Optional[float] = typer.Option(None, min=0, help="Exit 0 after S seconds with nothing "
                                                                       "to do (cron-style drain)."),
           reconnect_timeout: float = typer.Option(60.0, min=0, help="Seconds to keep reconnecting when the "
                                                                     "daemon goes away; then exit 69."),
           log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR."),
           log_file: Optional[str] = typer.Option(None, help="Log to this file instead of stderr."),
           config: Optional[str] = ConfigOpt, address: Optional[str] = AddressOpt):
    from . import worker as workermod

    opts = workermod.Options(queue=queue, command=tuple(command or ()), call=call, concurrency=concurrency,
                             timeout=timeout, retry_delay=retry_delay, lease=lease, grace=grace,
                             max_messages=max_messages, idle_exit=idle_exit,
                             reconnect_timeout=reconnect_timeout)
    raise typer.Exit(workermod.main(opts, config_path=config, address=address, log_level=log_level,
                                    log_file=log_file))
