"""The operations the session loop runs inline: send, receive, ack (and the plain ones).

A mixin of SessionLoop (sessions.py), split out to keep each module to one concern: the
loop owns sockets, framing, parking and timers; this module owns what a request means.
Rules (sessions.py): never wait; replies that depend on a commit are sent from the op's
``done`` callback, posted back to the loop; an empty or full queue parks the session.
"""

from __future__ import annotations

import logging

from . import errors
from .hub import MAX_BATCH, check_count, check_lease, check_timeout, span

oplog = logging.getLogger("ipcd.hub")  # per-message DEBUG lines, as Hub's threaded ops write them


class SessionOps:
    """put_many / get_many / ack inline in the loop thread; see SessionLoop for the rest."""

    def _inline_ops(self, hub) -> dict:
        return {"put_many": self._put_many, "get_many": self._get_many, "ack": self._ack,
                "nack": self._plain(hub.nack), "touch": self._plain(hub.touch),
                "release": self._plain(hub.release)}

    def _plain(self, func):
        """An operation that never waits: run it and reply."""
        def handler(s, **kwargs):
            self._reply(s, ("ok", func(**kwargs)))
        return handler

    def _put_many(self, s, queue, bodies, timeout=None):
        if isinstance(bodies, list) and len(bodies) > MAX_BATCH:
            raise errors.DataError(f"at most {MAX_BATCH} messages per request")
        timeout = check_timeout(timeout)
        q = self.hub.queue(queue)
        n, total = q.admit(bodies)

        def done(ids, error):
            if error is None and oplog.isEnabledFor(logging.DEBUG):
                oplog.debug("queue %s: sent %d message(s), id %s", q.name, len(ids), span(ids))
            self._post(lambda: self._result(s, ids, error))

        def attempt(s):
            if not q.try_reserve(n, total):  # raises QueueFull for overflow = "reject"
                self.hub.check_running()  # a sender parked on a full queue hears "stopping"
                return False
            if s.parked is not None:
                self._unpark(s)
            self._commit_due = True
            self._fsync_due |= q.settings.durability == "fsync"
            q.append_reserved(bodies, n, total, done=done)
            return True

        if not attempt(s):
            if timeout == 0:
                raise q.full_error(timeout)
            self._park(s, q, timeout, attempt, lambda s: self._result(s, None, q.full_error(timeout)), "put")

    def _get_many(self, s, queue, max_n=1, timeout=None, lease=None, ack=None):
        q = self.hub.queue(queue)
        max_n, timeout, lease = check_count(max_n, "max_n"), check_timeout(timeout), check_lease(lease)

        def attempt(s):
            got = q.try_get(max_n, lease)
            if not got:
                return False
            if s.parked is not None:
                self._unpark(s)
            if oplog.isEnabledFor(logging.DEBUG):
                oplog.debug("queue %s: delivered %d message(s), id %s", q.name, len(got), span([d[0] for d in got]))
            self._reply(s, ("ok", [tuple(d) for d in got]))
            return True

        def get(_n=0, error=None):
            if error is not None:
                self._result(s, None, error)
            elif s.closed:
                self._op_done(s)
            elif not attempt(s):
                if timeout == 0:
                    self._reply(s, ("ok", []))
                else:
                    self._park(s, q, timeout, attempt, lambda s: self._reply(s, ("ok", [])), "get")

        if ack:
            self._ack_then(s, q, ack, get)
        else:
            get()

    def _ack(self, s, queue, items):
        self._ack_then(s, self.hub.queue(queue), items, lambda n, error: self._result(s, n, error))

    def _ack_then(self, s, q, items, then):
        """Ack *items*, then run ``then(n, error)`` in this thread.

        An "fsync" queue's ack is durable before anything is replied: its delete joins
        this round's group commit and *then* runs after it, posted back to the loop (the
        completion may come from the store thread, which committed the group).  Other
        queues' deletes ride a later commit (see Queue.ack): *then* runs at once.
        """
        fsync = q.settings.durability == "fsync"
        if fsync:
            def done(error):
                self._post(lambda: self._guard(s, then, n, error))  # n is bound by the time this runs
            n = q.ack(items, done=done)
            self._commit_due = self._fsync_due = True
        else:
            n = q.ack(items)
        if n and oplog.isEnabledFor(logging.DEBUG):
            oplog.debug("queue %s: acked %d message(s), id %s", q.name, n, span([i[0] for i in items]))
        if not fsync:
            then(n, None)

    def _guard(self, s, fn, *args):
        """Run a continuation; an error it raises is the session's reply."""
        try:
            fn(*args)
        except Exception as e:
            self._result(s, None, e)
