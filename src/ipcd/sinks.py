"""Queue sinks: ``[queues.NAME] sink = "/path/file.jsonl"`` appends every message to a file.

One daemon-side consumer thread per sink queue takes messages like any
consumer (``Queue.get_many`` with a lease), appends them as one JSON line
each, flushes (``os.write`` on an ``O_APPEND`` fd; ``fsync`` too when the
queue's durability is "fsync") and only then acks them.  So delivery to the
file is **at-least-once**: a crash between the write and the ack appends
those lines again after the restart, exactly like a consumer that dies
before acking.  Readers that care dedupe on the envelope ``id``.

* ``sink_format = "body"``: the body as sent, compact, one line.
  ``"envelope"``: ``{"id","queue","body","attempts","enqueued_at"}``.
* A failed write (disk full, permissions, missing directory) truncates the
  partial batch, hands the messages back without charging an attempt (they
  stay queued, in order), logs ONE error for the whole outage and retries
  with backoff; recovery is logged once too.  SIGHUP/SIGUSR1 retry at once.
* The file is reopened on SIGHUP/SIGUSR1 and also whenever the path no
  longer names the open file (logrotate's rename + create), so rotation
  loses nothing with or without ``postrotate``.
* The parent directory is never created: a typo should fail loudly.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from . import errors

log = logging.getLogger("ipcd.sinks")

BATCH = 500  # messages per write
POLL = 0.5  # seconds a consumer waits before re-checking stop/reopen
MIN_LEASE = 60.0  # a slow disk must not let leases expire mid-write (that would duplicate lines)
BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)


def format_line(name: str, d, fmt: str) -> str:
    """One JSON line for delivery *d* (Delivery fields: id, lease, body, attempts, enqueued_at, ...)."""
    body = d.body
    if "\n" in body or "\r" in body:  # pretty JSON from a stdlib client: newlines sit outside strings
        body = json.dumps(json.loads(body), ensure_ascii=False, separators=(",", ":"))
    if fmt == "envelope":
        return (f'{{"id":{d.id},"queue":{json.dumps(name, ensure_ascii=False)},"body":{body},'
                f'"attempts":{d.attempts},"enqueued_at":{json.dumps(d.enqueued_at)}}}\n')
    return body + "\n"


class Sink:
    """The consumer thread of one queue's sink file."""

    def __init__(self, hub, name: str, path: str, fmt: str):
        self.hub, self.name, self.path, self.format = hub, name, path, fmt
        self.fd = None
        self._ident = None  # (st_dev, st_ino) of the open file
        self._stop = threading.Event()
        self._wake = threading.Event()  # cuts a backoff sleep short (reopen, stop)
        self._reopen = False
        self._failures = 0
        self._failing_since = None
        self.written = 0
        self.thread = threading.Thread(target=self._run, name=f"ipcd-sink-{name}", daemon=True)

    @property
    def key(self):
        return (self.path, self.format)

    def start(self):
        self.thread.start()
        return self

    def reopen(self):
        """Close and reopen the file before the next write (log rotation; retry now if failing)."""
        self._reopen = True
        self._wake.set()

    def stop(self):
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    # -- the consumer loop ---------------------------------------------------------

    def _run(self):
        try:
            q = self.hub.queue(self.name)
            while not self._stop.is_set():
                try:
                    self._ensure_open()
                except OSError as e:
                    self._failed(e)
                    continue
                if self._stop.is_set():  # stopped while opening (a slow mount, a FIFO): take nothing
                    break
                try:
                    lease = max(MIN_LEASE, q.settings.lease_seconds)
                    got = q.get_many(BATCH, POLL, lease)
                except errors.Unavailable:  # the hub is stopping
                    break
                if got:
                    self._deliver(q, got)
        except Exception:  # a bug must not kill the thread silently
            log.exception("queue %s: sink %s stopped by an internal error", self.name, self.path)
        finally:
            self._close()

    def _deliver(self, q, got):
        items = [(d.id, d.lease) for d in got]
        try:
            self._ensure_open()  # again: a rotation or reopen may have come while we waited
            self._write("".join(format_line(self.name, d, self.format) for d in got),
                        q.settings.durability == "fsync")
        except OSError as e:
            try:
                q.release_for_shutdown(items)  # back at once, in order, attempt not charged
            except errors.IpcdError:
                pass  # leases expired meanwhile: the queue has them back already
            self._close()
            self._failed(e)
            return
        try:
            q.ack(items)
        except errors.LeaseExpired as e:  # the write outlived the lease: these will be written again
            log.warning("queue %s: sink %s: %s (duplicate lines will follow)", self.name, self.path, e)
        self.written += len(got)
        self._recovered()

    def _ensure_open(self):
        if self._reopen:
            self._reopen = False
            self._close()
        if self.fd is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._ident:
                    return
            except FileNotFoundError:
                pass
            self._close()  # renamed or removed (rotation): write to a new file at the path
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(fd)
        self.fd, self._ident = fd, (st.st_dev, st.st_ino)

    def _write(self, text: str, fsync: bool):
        data = text.encode("utf-8")
        start = os.fstat(self.fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
            if fsync:
                os.fsync(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, start)  # no half line: the whole batch is written again later
            except OSError:
                pass
            raise

    def _close(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = self._ident = None

    def _failed(self, e: OSError):
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error("queue %s: cannot write sink %s: %s; messages stay queued, retrying with "
                      "backoff (logged once; fix it and send SIGHUP to retry now)",
                      self.name, self.path, e.strerror or e)
        else:
            log.debug("queue %s: sink %s still failing: %s", self.name, self.path, e)
        delay = BACKOFF[min(self._failures, len(BACKOFF) - 1)]
        self._failures += 1
        self._wake.wait(delay)
        self._wake.clear()

    def _recovered(self):
        if self._failing_since is not None:
            log.info("queue %s: sink %s is writable again after %.1f s", self.name, self.path,
                     time.monotonic() - self._failing_since)
            self._failing_since = None
            self._failures = 0


class Sinks:
    """All sink threads of a daemon, kept in line with the configuration."""

    def __init__(self, hub):
        self.hub = hub
        self.running: dict[str, Sink] = {}

    def wanted(self, config) -> dict[str, tuple[str, str]]:
        """Queue name -> (path, format) for every configured or existing queue with a sink."""
        out = {}
        for name in set(config.queues) | set(self.hub.names()):
            s = config.queue(name)
            if s.sink:
                out[name] = (s.sink, s.sink_format)
        return out

    def apply(self, config) -> list[str]:
        """Start, stop or restart sinks to match *config*; return what changed."""
        want = self.wanted(config)
        changes = []
        for name, sink in list(self.running.items()):
            if want.get(name) != sink.key:
                sink.stop()
                sink.join(5.0)
                del self.running[name]
                if name not in want:
                    changes.append(f"sink of {name} removed")
                    log.info("queue %s: sink %s removed", name, sink.path)
        for name, (path, fmt) in sorted(want.items()):
            if name not in self.running:
                self.running[name] = Sink(self.hub, name, path, fmt).start()
                changes.append(f"sink of {name} -> {path} ({fmt})")
                log.info("queue %s: appending every message to %s (sink_format=%s)", name, path, fmt)
        return changes

    def reopen(self):
        for sink in self.running.values():
            sink.reopen()

    def stop(self, timeout: float) -> bool:
        """Stop every sink; wait up to *timeout* for in-progress writes to be acked."""
        for sink in self.running.values():
            sink.stop()
        deadline = time.monotonic() + timeout
        ok = all(s.join(max(0.0, deadline - time.monotonic())) for s in self.running.values())
        self.running.clear()
        return ok
