"""``ipcd worker QUEUE -- CMD`` / ``--call module:function``: run something per message (issue 6).

One process, one loop
---------------------
The main thread owns every decision and waits on one event queue (a
SimpleQueue) with a timeout equal to the time to its next due work (a lease
touch, a --timeout, the end of --grace, --idle-exit).  What feeds the queue:

* the signal handlers: they only ``put_nowait`` the signal (notes §5);
* the receiver thread: it owns one Client and asks the daemon for at most as
  many messages as there are free slots, so no message waits leased here;
* exec mode: one waiter thread per running command (``Popen.wait``);
* --call mode: one reader thread per pool child.

Acks, nacks, touches and releases go through a second Client that only the
main thread uses, so they never queue behind the receiver's blocking get;
the acks of one pass of the loop go in one request.

Outcomes
--------
Exit status 0 / a return -> ack.  A non-zero status, a signal, a --timeout
kill, an exception or a dead child -> ``nack(delay=min(retry_delay *
2**(attempt-1), 300), reason=...)``; the daemon dead-letters after the
queue's max_attempts and keeps the reason for ``ipcd dead ls``.  While a
message runs its lease is touched every lease/3.  One log line per outcome::

    jobs id=17 attempt=2 result=failed duration=0.031s retry_in=2s reason="exit status 3: boom"

Exec mode and --call mode are the two runners in worker_pool.py (process
groups, stdin/stderr handling, the fork pool and its logging).

Stopping
--------
SIGTERM/SIGINT: take no more messages; running ones get --grace seconds, then
are killed; unfinished messages are released (back at once, attempt not
charged); exit 0.  A second signal kills everything at once and exits
128+signal without settling anything (leases expire, messages are
redelivered).  SIGHUP is ignored (logged): there is nothing to reload, and a
--log-file follows logrotate by itself.  --max-messages and --idle-exit end
a run the same graceful way, exit 0.

Delivery is at-least-once
-------------------------
If the daemon restarts under a worker, both Clients reconnect (within
--reconnect-timeout) and the loop carries on; an ack that cannot be
delivered (the lease died with the old daemon, or expired) is logged as
``ack=lost`` and the message comes again, possibly while its first run is
still going.  Handlers must be idempotent; IPCD_MESSAGE_ID (in --call mode
``ipcd.worker.current_message()["id"]``) is stable across redeliveries, for
deduplication.  While the daemon is away, an ack or touch holds the main
loop in its reconnect, so signals and --timeout kills wait for it; past
the reconnect timeout the worker kills what runs and exits 69.
"""

from __future__ import annotations

import json
import logging
import os
import queue as stdqueue
import signal
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

from . import errors

log = logging.getLogger("ipcd.worker")

POLL = 1.0  # longest single get_many wait, so a stop is noticed by the receiver within it
MAX_RETRY_DELAY = 300.0
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_FATAL = (errors.Unavailable, errors.PermissionDenied, errors.TempFail)

_current: dict = {}  # set in a --call child around each call


def current_message() -> dict:
    """In a --call handler: ``{"id", "queue", "attempt"}`` of the message being handled.

    ``id`` is stable across redeliveries: use it to deduplicate (at-least-once).
    """
    return dict(_current)


@dataclass(frozen=True)
class Options:
    queue: str
    command: tuple = ()
    call: str | None = None
    concurrency: int = 1
    timeout: float | None = None
    retry_delay: float = 1.0
    lease: float | None = None
    grace: float = 10.0
    max_messages: int | None = None
    idle_exit: float | None = None
    reconnect_timeout: float = 60.0


class Outcome(NamedTuple):
    ok: bool
    reason: str | None = None
    detail: str | None = None  # a traceback (--call)
    seconds: float | None = None  # measured by the child (--call)


class Job:
    """One message being handled; ``stop`` says why we killed it, if we did."""

    __slots__ = ("msg", "started", "deadline", "touch_at", "handle", "stop", "kill_at", "lease_lost")

    def __init__(self, msg, now: float, lease_s: float, timeout: float | None):
        self.msg, self.started = msg, now
        self.deadline = None if timeout is None else now + timeout
        self.touch_at = now + max(lease_s / 3, 0.05)
        self.handle = None  # the runner's: (Popen, stderr file) or a pool Child
        self.stop = None  # None, "timeout" or "stop" (grace expired)
        self.kill_at = None  # when to escalate SIGTERM -> SIGKILL
        self.lease_lost = False

    def label(self) -> str:
        return f"{self.msg.queue} id={self.msg.id} attempt={self.msg.attempts}"


class Worker:
    def __init__(self, opts: Options, settings, ctl, rx, make_runner, clock=time.monotonic):
        self.opts, self.ctl, self.rx, self.clock = opts, ctl, rx, clock
        self.max_attempts = settings.max_attempts
        self.lease_s = opts.lease or settings.lease_seconds
        self.events = stdqueue.SimpleQueue()
        self.runner = make_runner(self.events.put)
        self.running: set[Job] = set()
        self.taken = 0
        self.counts = dict(ok=0, failed=0, released=0, lost=0)
        self.draining: str | None = None
        self.signalled = False
        self.grace_deadline = 0.0
        self.forced: int | None = None
        self.fatal: errors.IpcdError | None = None
        self.rx_req = stdqueue.SimpleQueue()
        self.rx_stop = threading.Event()
        self.rx_pending = False
        self.to_ack: list = []  # (job, "duration=...") settled OK in this pass of the loop
        self.last_busy = clock()

    # -- lifecycle ------------------------------------------------------------

    def run(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        rx_thread = threading.Thread(target=self._receive_loop, name="ipcd-worker-rx", daemon=True)
        try:
            self.runner.start()
            rx_thread.start()
            o = self.opts
            log.info("worker started: queue=%s %s concurrency=%d pid=%d", o.queue,
                     f"call={o.call}" if o.call else f"command={json.dumps(list(o.command))}",
                     o.concurrency, os.getpid())
            self._loop()
        finally:
            self._shutdown(rx_thread)
            for s, h in old.items():
                signal.signal(s, h)
        if self.fatal is not None:
            raise self.fatal
        return 128 + self.forced if self.forced else 0

    def _on_signal(self, signum, frame):
        self.events.put_nowait(("signal", signum))  # no logging, no locks: notes §5

    def _done(self) -> bool:
        return bool(self.forced or self.fatal or (self.draining and not self.running))

    def _loop(self):
        while not self._done():
            self._want_messages()
            wait = self._tick(self.clock())
            if self._done():
                break
            try:
                ev = self.events.get(timeout=wait)
            except stdqueue.Empty:
                continue
            while True:
                self._handle(*ev)
                if self.forced or self.fatal:
                    return
                try:
                    ev = self.events.get_nowait()
                except stdqueue.Empty:
                    break
            self._flush_acks()

    def _handle(self, kind, payload):
        if kind == "signal":
            self._on_signal_event(payload)
        elif kind == "msgs":
            self.rx_pending = False
            self._start(payload)
        elif kind == "runner":
            for job, outcome in self.runner.on_event(payload):
                self._finish(job, outcome)
        elif kind == "rx-error":
            self.rx_pending = False
            self._fail(payload)

    def _on_signal_event(self, signum):
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            log.info("SIGHUP ignored: a worker has nothing to reload (a --log-file follows logrotate by itself)")
        elif not self.signalled:
            self.signalled = True
            self._drain(name)
            if self.running:
                log.info("stopping (%s): %d message(s) running, waiting up to %g s; send %s again to "
                         "stop at once", name, len(self.running), self.opts.grace, name)
        else:
            log.warning("%s again: stopping at once; %d running message(s) will be redelivered when "
                        "their leases expire", name, len(self.running))
            self.forced = signum
            self._kill_all()

    def _drain(self, why: str):
        if self.draining is None:
            self.draining = why
            self.grace_deadline = self.clock() + self.opts.grace
            self.rx_stop.set()
            self.rx_req.put(None)

    def _fail(self, err: errors.IpcdError):
        if self.fatal is None:
            self.fatal = err
            log.error("giving up: %s", err)
            self._kill_all()

    def _kill_all(self):
        for job in list(self.running):
            self.runner.kill(job, hard=True)

    def _shutdown(self, rx_thread):
        self._flush_acks()
        if self.running:  # forced, fatal or a bug: nothing is settled, leases expire
            self._kill_all()
        self.runner.close()
        self.rx_stop.set()
        self.rx_req.put(None)
        if rx_thread.ident is not None and not self.forced:
            rx_thread.join(POLL + 5.0)  # its last get_many; it releases what that returns
        self.ctl.close()
        if not rx_thread.is_alive():
            self.rx.close()
        c = self.counts
        log.info("worker stopped (%s): ok=%d failed=%d released=%d ack_lost=%d", self.draining or "error",
                 c["ok"], c["failed"], c["released"], c["lost"])

    # -- receiving --------------------------------------------------------------

    def _receive_loop(self):
        """Receiver thread: one get_many per request from the main loop."""
        while True:
            n = self.rx_req.get()
            if n is None or self.rx_stop.is_set():
                return
            try:
                msgs = self.rx.recv_many(self.opts.queue, n, timeout=POLL, lease=self.opts.lease)
            except errors.IpcdError as e:
                self.events.put(("rx-error", e))
                return
            except Exception as e:  # a bug: say so rather than wait forever
                log.exception("receiver thread failed")
                self.events.put(("rx-error", errors.IpcdError(f"receiver failed: {e!r}")))
                return
            if self.rx_stop.is_set():  # stopped while we waited: give them back untouched
                try:
                    if msgs:
                        self.rx.release(msgs)
                except errors.IpcdError:
                    pass  # their leases expire and they come back anyway
                return
            self.events.put(("msgs", msgs))

    def _want_messages(self):
        if self.draining or self.rx_pending:
            return
        free = self.runner.capacity(len(self.running))
        if self.opts.max_messages is not None:
            free = min(free, self.opts.max_messages - self.taken)
        if free > 0:
            self.rx_pending = True
            self.rx_req.put(free)

    def _start(self, msgs):
        now = self.clock()
        if msgs:
            self.last_busy = now
        free = 0 if self.draining else self.runner.capacity(len(self.running))
        if len(msgs) > free:  # a stop, or a child that could not be re-forked
            self._release(msgs[free:])
            msgs = msgs[:free]
        self.taken += len(msgs)
        for m in msgs:
            job = Job(m, now, self.lease_s, self.opts.timeout)
            try:
                self.runner.launch(job)
            except OSError as e:
                self._finish(job, Outcome(False, f"cannot start: {e}"))
                continue
            self.running.add(job)

    def _release(self, msgs):
        try:
            self.ctl.release(msgs)
            self.counts["released"] += len(msgs)
        except errors.IpcdError as e:  # they come back when their leases expire
            log.warning("could not release %d message(s): %s", len(msgs), e)

    # -- due work -----------------------------------------------------------------

    def _tick(self, now: float) -> float:
        """Timeouts, kills, touches, grace, idle/max exits; returns seconds to the next."""
        due = now + POLL
        for job in list(self.running):
            if job.stop is None and job.deadline is not None:
                if now >= job.deadline:
                    job.stop = "timeout"
                    job.kill_at = self.runner.kill(job, hard=False)
                else:
                    due = min(due, job.deadline)
            if job.kill_at is not None:
                if now >= job.kill_at:
                    job.kill_at = self.runner.kill(job, hard=True)
                else:
                    due = min(due, job.kill_at)
            if not job.lease_lost:
                if now >= job.touch_at:
                    self._touch(job, now)
                    if self.fatal:
                        return 0.0
                due = min(due, job.touch_at)
        self.runner.tick()  # --call: re-fork a slot whose fork failed
        if self.draining:
            if now >= self.grace_deadline:
                for job in self.running:
                    if job.stop is None:
                        log.warning("%s grace period over: stopping it", job.label())
                        job.stop = "stop"
                        job.kill_at = self.runner.kill(job, hard=False)
            else:
                due = min(due, self.grace_deadline)
        elif not self.running and self.opts.max_messages is not None and self.taken >= self.opts.max_messages:
            self._drain(f"--max-messages {self.opts.max_messages} reached")
        elif self.opts.idle_exit is not None and not self.running:
            if now - self.last_busy >= self.opts.idle_exit:
                self._drain(f"idle for {self.opts.idle_exit:g} s")
            else:
                due = min(due, self.last_busy + self.opts.idle_exit)
        return max(0.0, due - self.clock())

    def _touch(self, job: Job, now: float):
        try:
            granted = self.ctl.touch([job.msg], self.opts.lease)
        except (errors.LeaseExpired, errors.NotFound):
            job.lease_lost = True
            log.warning("%s lease lost while running (expired, or the daemon restarted): "
                        "it will be delivered again", job.label())
        except _FATAL as e:
            self._fail(e)
        except errors.IpcdError as e:
            log.warning("%s could not extend its lease: %s", job.label(), e)
            job.touch_at = now + max(self.lease_s / 3, 0.05)
        else:
            job.touch_at = now + max(granted / 3, 0.05)

    # -- settling -------------------------------------------------------------------

    def _finish(self, job: Job, outcome: Outcome):
        self.running.discard(job)
        self.last_busy = self.clock()
        if self.forced or self.fatal:
            return
        m, label = job.msg, job.label()
        took = f"duration={outcome.seconds if outcome.seconds is not None else self.clock() - job.started:.3f}s"
        if outcome.ok:
            self.to_ack.append((job, took))
            return
        try:
            if job.stop == "stop":
                self.ctl.release([m])
                self.counts["released"] += 1
                log.info("%s result=released %s (stopped at the end of the grace period)", label, took)
            else:
                reason = outcome.reason or "failed"
                if job.stop == "timeout":
                    reason = f"timed out after {self.opts.timeout:g} s ({reason})"
                final = m.attempts >= self.max_attempts
                delay = 0.0 if final else min(self.opts.retry_delay * 2 ** (m.attempts - 1), MAX_RETRY_DELAY)
                self.ctl.nack([m], delay=delay, reason=reason)
                self.counts["failed"] += 1
                shown = json.dumps(reason, ensure_ascii=False)
                if final:
                    log.warning("%s result=dead %s reason=%s", label, took, shown)
                else:
                    log.warning("%s result=%s %s retry_in=%gs reason=%s", label,
                                "timeout" if job.stop == "timeout" else "failed", took, delay, shown)
                if outcome.detail:
                    log.warning("%s traceback:\n%s", label, outcome.detail.rstrip())
        except (errors.LeaseExpired, errors.NotFound):
            self._lost(job, "failed", took)
        except _FATAL as e:
            self._fail(e)
        except errors.IpcdError as e:
            log.error("%s could not be settled: %s", label, e)

    def _flush_acks(self):
        """Ack what finished in this pass in one request (one by one if a lease was lost)."""
        batch, self.to_ack = self.to_ack, []
        if not batch or self.forced or self.fatal:
            return
        try:
            self.ctl.ack([job.msg for job, _ in batch])
            acked = batch
        except (errors.LeaseExpired, errors.NotFound):  # all or nothing: find the lost ones
            acked = []
            for job, took in batch:
                try:
                    self.ctl.ack([job.msg])
                    acked.append((job, took))
                except (errors.LeaseExpired, errors.NotFound):
                    self._lost(job, "ok", took)
                except _FATAL as e:
                    return self._fail(e)
        except _FATAL as e:
            return self._fail(e)
        self.counts["ok"] += len(acked)
        for job, took in acked:
            log.info("%s result=ok %s", job.label(), took)

    def _lost(self, job, result, took):
        self.counts["lost"] += 1
        log.warning("%s result=%s %s ack=lost: the lease expired or the daemon restarted; "
                    "it will be delivered again", job.label(), result, took)


def main(opts: Options, *, config_path=None, address=None, log_level="INFO", log_file=None) -> int:
    """``ipcd worker``: check everything, connect, run; returns the exit code."""
    from . import config as configmod, logs, paths, worker_pool  # worker_pool imports this module
    from .client import client_for

    if bool(opts.command) == bool(opts.call):
        raise errors.UsageError("give either a command after -- (ipcd worker QUEUE -- CMD [ARGS...]) "
                                "or --call package.module:function" + (", not both" if opts.call else ""))
    level = log_level.upper()
    if level not in LEVELS:
        raise errors.UsageError(f"--log-level must be one of {', '.join(LEVELS)}, got {log_level!r}")
    cfg = configmod.load(config_path, overrides={"address": address} if address else None)
    settings = cfg.queue(opts.queue)  # validates the name: exit 65
    setup = logs.LogSetup(log_file, level)
    root = logging.getLogger()  # handler code may log anywhere: same stream
    root.addHandler(setup.handler)
    root.setLevel(level)
    if opts.call:
        fn = worker_pool.load_target(opts.call)
    else:
        argv = worker_pool.resolve_command(opts.command)
    _kind, addr = paths.parse_address(cfg.address)

    def client():
        return client_for(cfg, reconnect_timeout=opts.reconnect_timeout)

    ctl = client()
    try:
        rx = client()
    except BaseException:
        ctl.close()
        raise
    if opts.call:
        def make_runner(post):
            return worker_pool.CallPool(fn, opts.concurrency, post, setup.handler, level, addr)
    else:
        def make_runner(post):
            return worker_pool.ExecRunner(argv, opts.concurrency, post)
    return Worker(opts, settings, ctl, rx, make_runner).run()
