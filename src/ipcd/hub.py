"""The Hub: every named queue of one daemon, and the operations clients call.

The server (server.py) maps wire operations to ``Hub.ops()``; the daemon
(daemon.py) owns the Hub's lifecycle and calls ``tick()`` from its main
loop.  Arguments arrive from the network, so every operation validates
them here, whatever the client library already checked.
"""

from __future__ import annotations

import logging
import queue as stdqueue
import random
import secrets
import threading
import time

from . import errors
from .config import validate_queue_name
from .queues import DEAD_SUFFIX, Queue
from .store_file import body_size
from .watch import History, Rates

log = logging.getLogger("ipcd.hub")

MAX_BATCH = 10_000  # messages per get/ack/nack request
MAX_TIMEOUT = 366 * 86400.0


def check_timeout(value, what="timeout"):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_TIMEOUT:
        raise errors.DataError(f"{what} must be a number of seconds between 0 and {MAX_TIMEOUT:g}")
    return float(value)


def check_count(value, what, lo=1, hi=MAX_BATCH):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise errors.DataError(f"{what} must be an integer from {lo} to {hi}")
    return value


def check_lease(value):
    lease = check_timeout(value, "lease")
    if lease is not None and not 0 < lease <= 86400:
        raise errors.DataError("lease must be between 0 and 86400 seconds")
    return lease


class Hub:
    def __init__(self, config, stores: dict, clock=time.monotonic, wall=time.time):
        self.config = config
        self.stores = stores  # durability mode ("os"/"fsync"/"memory") -> store
        self.clock, self.wall = clock, wall
        self._queues: dict[str, Queue] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._watchers = []  # callables(queue_name, rows): ipcd tail and sinks
        self.started = wall()
        self.rng = random.Random(secrets.randbits(128))  # lease tokens (see Queue._deliver_locked)
        # Bytes of bodies one get_many reply may carry (len() of str: <= UTF-8 bytes).
        self.reply_budget = config.max_request_bytes // 8
        # Recent sends for `ipcd tail` (bounded, memory only) and per-second rates for `ipcd stats`.
        self.history = History(lambda name: self._queues[name].settings.history, clock=clock)
        self.rates = Rates(clock)
        self.subscribe(self.history.record)
        # Called (under the queue's lock, from any thread) when a queue gains ready
        # messages or room: the session loop's wake-up (sessions.SessionLoop.queue_changed).
        self.on_change = None

    # -- registry ------------------------------------------------------------

    def _store_for(self, settings):
        return self.stores["memory" if settings.durability == "memory" else "os"]

    def open(self):
        """Rebuild the in-memory index from what the durable store holds."""
        for store in {id(s): s for s in self.stores.values()}.values():
            if hasattr(store, "summary_source"):  # saved at a clean close: a fast next start
                store.summary_source = lambda store=store: self.summary_of(store)
            for name, (count, nbytes, max_id) in store.load_summary().items():
                q = self.queue(name)
                with q.lock:
                    q.count, q.nbytes, q.high = count, nbytes, max(q.high, max_id)
                    q.cursor = 0 if count else q.high

    def summary_of(self, store) -> dict[str, tuple[int, int, int]] | None:
        """What store.load_summary() would compute for *store*'s queues, from memory: saved by
        the store at a clean close.  None while some counts are in flux (sends not yet
        committed, messages being re-homed), which makes the next start count instead."""
        out = {}
        for q in list(self._queues.values()):
            if q.store is not store:
                continue
            with q.lock:
                if q.reserved_n or q.moving:
                    return None
                if q.count:
                    out[q.name] = (q.count, q.nbytes, q.high)
        return out

    def queue(self, name, create: bool = True) -> Queue:
        q = self._queues.get(name)
        if q is not None:
            return q
        if not isinstance(name, str):
            raise errors.DataError("a queue name must be a string")
        validate_queue_name(name)
        if not create:
            raise errors.NotFound(f"no queue named '{name}'")
        with self._lock:
            q = self._queues.get(name)
            if q is None:
                settings = self.config.queue(name)
                q = Queue(self, name, settings, self._store_for(settings), self.clock, self.wall)
                self._queues[name] = q
            return q

    def names(self) -> list[str]:
        return sorted(self._queues)

    def reload(self, config) -> list[str]:
        """Apply new queue settings in place; return what could not change."""
        needs_restart = []
        self.config = config
        self.reply_budget = config.max_request_bytes // 8
        for name, q in list(self._queues.items()):
            new = config.queue(name)
            if new.durability != q.settings.durability and "memory" in (new.durability, q.settings.durability):
                needs_restart.append(f"queues.{name}.durability")
                new = type(new)(**{**new.__dict__, "durability": q.settings.durability})
            q.settings = new
            with q.lock:
                q._signal_room()
        return needs_restart

    # -- lifecycle -------------------------------------------------------------

    def changed(self, q: Queue):
        cb = self.on_change
        if cb is not None:
            cb(q)

    def check_running(self):
        if self._stopping:
            raise errors.Unavailable("the daemon is stopping; retry when it is back")

    def stop(self):
        """Wake every blocked sender and receiver with 'daemon is stopping'."""
        self._stopping = True
        self.history.stop()
        for q in list(self._queues.values()):
            with q.lock:
                q._signal_ready()
                q._signal_room()
                # Leased messages become ready at the next start; keep the attempt their
                # current delivery used, so max_attempts still counts it (queued writes
                # are flushed when the store closes).
                charged = [(lz.row.id, lz.row.attempts, 0.0) for lz in q.leases.values()]
            if charged:
                q.store.update(charged, wait=False)

    def tick(self) -> float:
        """Due work for every queue; returns seconds until the next due item."""
        now, wall_now = self.clock(), self.wall()
        nxt = now + 1.0
        for q in list(self._queues.values()):
            try:
                due = q.tick(now, wall_now)
            except errors.IpcdError as e:
                log.error("queue %s: %s", q.name, e)
                due = None
            if due is not None:
                nxt = min(nxt, due)
        self.rates.sample(self._queues)
        return max(0.0, nxt - self.clock())

    # -- watchers (tail, sinks) ------------------------------------------------

    def subscribe(self, fn):
        self._watchers.append(fn)

    def unsubscribe(self, fn):
        try:
            self._watchers.remove(fn)
        except ValueError:
            pass

    def publish(self, name, rows):
        for fn in list(self._watchers):
            try:
                fn(name, rows)
            except Exception:  # a watcher must never break a send
                log.exception("watcher failed")

    # -- dead letters ----------------------------------------------------------

    def dead_letter(self, q: Queue, rows, reason: str):
        dq = self.queue(q.name + DEAD_SUFFIX)
        self._move(q, dq, rows, reason=reason, reset_attempts=False)
        q.totals["dead"] += len(rows)
        log.warning("queue %s: dead-lettered message(s) %s to %s: %s", q.name,
                    ", ".join(str(r.id) for r in rows[:10]) + (" ..." if len(rows) > 10 else ""),
                    dq.name, reason)

    def _move(self, src: Queue, dst: Queue, rows, *, reason, reset_attempts):
        """Re-home *rows* (already detached from src's memory) into dst."""
        if src.store is dst.store:
            moved = dst.store.move([r.id for r in rows], dst.name, reason=reason,
                                   reset_attempts=reset_attempts,
                                   sync=dst.settings.durability == "fsync")
        else:  # a queue and its .dead configured with different stores
            items = [(dst.name, r.body, r.enqueued_at, 0 if reset_attempts else r.attempts, 0.0, reason)
                     for r in rows]
            moved = dst.store.append(items, sync=dst.settings.durability == "fsync")
            src.store.delete([r.id for r in rows])
        # Sizes from the moved rows themselves: store.move() need not keep the order of *rows*.
        dst.insert_moved(moved, [body_size(m.body) for m in moved])
        return moved

    def dead_list(self, queue, limit=100):
        q = self.queue(queue)
        dq = self.queue(q.name + DEAD_SUFFIX)
        limit = check_count(limit, "limit", 1, MAX_BATCH)
        rows = dq.store.fetch(dq.name, 0, limit)
        return [(r.id, r.body, r.attempts, r.enqueued_at, r.reason) for r in rows]

    def dead_replay(self, queue, ids=None, all=False):
        q = self.queue(queue)
        dq = self.queue(q.name + DEAD_SUFFIX)
        if all:
            wanted = [r.id for r in dq.store.fetch(dq.name, 0, MAX_BATCH)]
        else:
            if not isinstance(ids, list) or not ids or not all_ints(ids):
                raise errors.DataError("replay needs message ids (or all=True)")
            # Fix (test_security.py): ids outside SQLite's 64-bit range reached the store
            # (OverflowError, a logged traceback per request); and bound the request size.
            if len(ids) > MAX_BATCH or any(not 0 < i < 1 << 63 for i in ids):  # `all` is a parameter
                raise errors.DataError(f"replay takes 1 to {MAX_BATCH} message ids, each from 1 to 2**63-1")
            wanted = [r.id for r in dq.store.get(ids) if r.queue == dq.name]
            missing = sorted(set(ids) - set(wanted))
            if missing:
                raise errors.NotFound(f"no dead message with id {', '.join(map(str, missing))} in '{dq.name}'")
        taken, refused = dq.remove_for_move(wanted)
        rows = [r for r in dq.store.get(taken) if r.queue == dq.name]
        dq.forget_store_only(rows)
        moved = self._move(dq, q, rows, reason=None, reset_attempts=True) if rows else []
        return {"replayed": len(moved), "busy": refused}

    # -- operations exposed on the wire ---------------------------------------

    def put_many(self, queue, bodies, timeout=None):
        if isinstance(bodies, list) and len(bodies) > MAX_BATCH:
            raise errors.DataError(f"at most {MAX_BATCH} messages per request")
        ids = self.queue(queue).put_many(bodies, check_timeout(timeout))
        if log.isEnabledFor(logging.DEBUG):  # per-message lines: only when asked for (cheap otherwise)
            log.debug("queue %s: sent %d message(s), id %s", queue, len(ids), span(ids))
        return ids

    def get_many(self, queue, max_n=1, timeout=None, lease=None, ack=None):
        q = self.queue(queue)
        if ack:
            q.ack(ack)
        lease = check_lease(lease)
        got = [tuple(d) for d in q.get_many(check_count(max_n, "max_n"), check_timeout(timeout), lease)]
        if got and log.isEnabledFor(logging.DEBUG):
            log.debug("queue %s: delivered %d message(s), id %s", q.name, len(got), span([d[0] for d in got]))
        return got

    def ack(self, queue, items):
        n = self.queue(queue).ack(items)
        if n and log.isEnabledFor(logging.DEBUG):
            log.debug("queue %s: acked %d message(s), id %s", queue, n, span([i[0] for i in items]))
        return n

    def nack(self, queue, items, delay=0.0, reason=None):
        if reason is not None and not isinstance(reason, str):
            raise errors.DataError("reason must be a string")
        n = self.queue(queue).nack(items, delay, reason[:2000] if reason else None)
        if n and log.isEnabledFor(logging.DEBUG):
            log.debug("queue %s: nacked %d message(s), id %s", queue, n, span([i[0] for i in items]))
        return n

    def touch(self, queue, items, seconds=None):
        return self.queue(queue).touch(items, check_timeout(seconds, "seconds"))

    def release(self, queue, items):
        return self.queue(queue).release_for_shutdown(items)

    def peek(self, queue, n=10):
        return [tuple(d) for d in self.queue(queue).peek(check_count(n, "n"))]

    def purge(self, queue, dead=False):
        q = self.queue(queue)
        if dead:
            q = self.queue(q.name + DEAD_SUFFIX)
        n = q.purge()
        log.info("purged %d message(s) from %s", n, q.name)
        return n

    def stats(self, queue=None):
        qs = [self.queue(queue)] if queue is not None else [self._queues[n] for n in self.names()]
        out = []
        for q in qs:
            s = q.stats()
            dq = self._queues.get(q.name + DEAD_SUFFIX)
            s["dead_messages"] = dq.count if dq is not None else 0  # depth of NAME.dead
            s["rates"] = self.rates.rates(q.name, q.totals)
            s["history"] = self.history.size(q.name)[0]
            out.append(s)
        return out

    def tail(self, queue=None, n=10, after=None, timeout=0.0):
        """Recently sent messages, without consuming them (``ipcd tail``; see watch.History.query)."""
        if queue is not None:
            validate_queue_name(queue)
        if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 0):
            raise errors.DataError("after must be a sequence number >= 0")
        self.check_running()
        return self.history.query(queue, check_count(n, "n"), after, check_timeout(timeout))

    def ops(self) -> dict:
        return {
            "put_many": self.put_many, "get_many": self.get_many, "ack": self.ack,
            "nack": self.nack, "touch": self.touch, "release": self.release, "peek": self.peek,
            "purge": self.purge, "stats": self.stats, "dead_list": self.dead_list,
            "dead_replay": self.dead_replay, "tail": self.tail,
        }

    # -- the stdlib-only path ------------------------------------------------

    def stdlib_queue(self, name):
        """Factory for the ``queue`` typeid served to plain BaseManager clients."""
        return StdlibQueue(self, self.queue(name).name)


def span(ids) -> str:
    """'7' or '7..12' (first..last) for a DEBUG line: never the whole list."""
    return f"{ids[0]}" if len(ids) == 1 else f"{ids[0]}..{ids[-1]}" if ids else "-"


def all_ints(values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


class StdlibQueue:
    """``manager.queue(name)``: put(json_text) / get() -> json_text.

    ``get`` acknowledges on delivery, so this path is at-most-once: a client
    that dies after get() returned loses that message.  Use ipcd's client
    (leases and acks) when that matters.
    """

    def __init__(self, hub: Hub, name: str):
        self._hub, self._name = hub, name

    def put(self, obj, block=True, timeout=None):
        self._hub.put_many(self._name, [obj], timeout if block else 0)

    def get(self, block=True, timeout=None):
        q = self._hub.queue(self._name)
        got = q.get_many(1, check_timeout(timeout) if block else 0.0, None)
        if not got:
            raise stdqueue.Empty
        d = got[0]
        q.ack([(d.id, d.lease)])
        return d.body

    def qsize(self):
        return self._hub.queue(self._name).stats()["ready"]
