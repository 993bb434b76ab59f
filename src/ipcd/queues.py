"""Named queues: ordering, leases, acks, bounds and dead letters.

No I/O of its own and no signals: persistence is the store's (store.py),
the network is the server's.  A ``Queue`` keeps in memory only what it needs
to serve quickly — a window of ready messages prefetched from the store, the
leased ones, the delayed ones — so depth is bounded by disk, not RAM.

Index invariant (per queue): every live message with ``id <= cursor`` is in
memory (ready, leased or delayed); messages with ``id > cursor`` are in the
store only.  ``high`` is the highest id ever committed to the queue, so the
store has nothing left to fetch when ``cursor >= high``.

Locking rule: never call the store while holding a queue's lock.  The store
thread calls ``_on_commit`` (which takes the lock) right after each commit,
in commit order; a thread that waited on the store under the lock would
deadlock against it.
"""

from __future__ import annotations

import heapq
import json
import json.scanner
import threading
import time
from typing import NamedTuple

from . import errors
from .store_file import body_size

PREFETCH = 512  # ready messages kept in memory per queue
DEAD_SUFFIX = ".dead"


class Delivery(NamedTuple):
    """What a consumer receives (a plain tuple on the wire)."""

    id: int
    lease: int  # token: only the current holder can ack/nack/touch
    body: str
    attempts: int
    enqueued_at: float
    reason: str | None


class Lease:
    __slots__ = ("row", "token", "expires")

    def __init__(self, row, token, expires):
        self.row, self.token, self.expires = row, token, expires


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # built once: ~3 us per message saved
# The C scanner under _DECODER.decode, called directly by validate_bodies: decode() adds two
# regex whitespace matches and a Python frame, ~0.7 of its ~1.1 us per 100-byte message.
_SCAN = getattr(json.scanner, "c_make_scanner", json.scanner.py_make_scanner)(_DECODER)


def validate_body(text, max_bytes: int, index: int | None = None) -> int:
    """Check one message is JSON text within the size limit; return its size."""
    where = "" if index is None else f"message {index + 1}: "
    if not isinstance(text, str):
        raise errors.DataError(f"{where}a message must be JSON text (str), not {type(text).__name__}")
    try:
        size = body_size(text)
    except UnicodeEncodeError:
        raise errors.DataError(f"{where}message is not valid UTF-8 text") from None
    if size > max_bytes:
        raise errors.DataError(f"{where}message of {size} bytes exceeds max_message_bytes={max_bytes}")
    try:
        _DECODER.decode(text)
    except ValueError as e:
        raise errors.DataError(f"{where}invalid JSON: {e}") from None
    except RecursionError:  # json's decoder recurses per nesting level
        raise errors.DataError(f"{where}invalid JSON: nested too deeply") from None
    return size


def validate_bodies(bodies: list, max_bytes: int) -> int:
    """validate_body for a batch; return the total size.

    The common message (ASCII, no surrounding whitespace, valid) takes the fast path:
    one C scan that must consume the whole text.  Anything else goes through
    validate_body, which accepts it or raises the precise error.
    """
    total, scan, one = 0, _SCAN, len(bodies) == 1
    for i, b in enumerate(bodies):
        if type(b) is str and b.isascii() and len(b) <= max_bytes:
            try:
                if scan(b, 0)[1] == len(b):
                    total += len(b)
                    continue
            except (StopIteration, ValueError, RecursionError):
                pass
        total += validate_body(b, max_bytes, None if one else i)
    return total


class Queue:
    def __init__(self, hub, name: str, settings, store, clock=time.monotonic, wall=time.time):
        self.hub, self.name, self.settings, self.store = hub, name, settings, store
        self.clock, self.wall = clock, wall
        self.lock = threading.Lock()
        self.not_empty = threading.Condition(self.lock)
        self.not_full = threading.Condition(self.lock)
        self.count = 0  # committed live messages (ready + leased + delayed)
        self.nbytes = 0
        self.reserved_n = 0  # sends admitted but not yet committed
        self.reserved_b = 0
        self.cursor = 0
        self.high = 0
        self.refilling = False
        self.ready: dict[int, object] = {}  # id -> Row
        self.ready_heap: list[int] = []  # ids; stale entries skipped lazily
        self.delayed: list[tuple[float, int]] = []  # (not_before wall time, id)
        self.delayed_rows: dict[int, object] = {}
        self.leases: dict[int, Lease] = {}
        self.lease_heap: list[tuple[float, int, int]] = []  # (expires, id, token)
        self.purge_epoch = 0  # see _settle
        self.moving: set[int] = set()  # ids being re-homed: refills must skip them
        self.waiting = 0  # consumers waiting (threads and parked sessions): for stats
        self._blocked = 0  # threads in not_empty.wait / not_full.wait (stdlib path)
        self.totals = dict(sent=0, received=0, acked=0, nacked=0, redelivered=0, dead=0)

    @property
    def is_dead_queue(self) -> bool:
        return self.name.endswith(DEAD_SUFFIX)

    # -- sending -----------------------------------------------------------

    def put_many(self, bodies: list, timeout: float | None) -> list[int]:
        """Store a batch, waiting up to *timeout* for room (blocking: threaded callers)."""
        n, total = self.admit(bodies)
        deadline = None if timeout is None else self.clock() + timeout
        with self.lock:
            while not self._reserve_locked(n, total):
                self.hub.check_running()
                left = None if deadline is None else deadline - self.clock()
                if left is not None and left <= 0:
                    raise self.full_error(timeout)
                self._blocked += 1
                try:
                    self.not_full.wait(left if left is not None else 1.0)
                finally:
                    self._blocked -= 1
        return self.append_reserved(bodies, n, total)

    def admit(self, bodies) -> tuple[int, int]:
        """Validate a batch; return (messages, bytes).  QueueFull if it can never fit."""
        s = self.settings
        if not isinstance(bodies, list) or not bodies:
            raise errors.DataError("put_many needs a non-empty list of messages")
        n, total = len(bodies), validate_bodies(bodies, s.max_message_bytes)
        if n > s.max_messages or total > s.max_bytes:
            raise errors.QueueFull(f"a batch of {n} messages / {total} bytes can never fit queue "
                                   f"'{self.name}' (max_messages={s.max_messages}, max_bytes={s.max_bytes})")
        return n, total

    def try_reserve(self, n: int, total: int) -> bool:
        """Reserve room without waiting: False when full and overflow = "block"."""
        with self.lock:
            return self._reserve_locked(n, total)

    def _reserve_locked(self, n, total) -> bool:
        s = self.settings
        if (self.count + self.reserved_n + n > s.max_messages
                or self.nbytes + self.reserved_b + total > s.max_bytes):
            if s.overflow == "reject":
                raise self.full_error(None)
            return False
        self.reserved_n += n
        self.reserved_b += total
        return True

    def full_error(self, timeout: float | None) -> errors.QueueFull:
        s = self.settings
        waited = "" if s.overflow == "reject" or timeout is None else f" after waiting {timeout:g} s"
        return errors.QueueFull(f"queue '{self.name}' is full{waited} (max_messages={s.max_messages}, "
                                f"max_bytes={s.max_bytes}, overflow={s.overflow})")

    def _unreserve(self, n, total):
        with self.lock:
            self.reserved_n -= n
            self.reserved_b -= total
            self._signal_room()

    def append_reserved(self, bodies: list, n: int, total: int, done=None) -> list[int] | None:
        """Store a batch whose room was reserved; return its ids, or with *done* report
        ``(ids, error)`` to it once committed (the session loop; see store.append)."""
        now = self.wall()
        items = [(self.name, b, now, 0, 0.0, None) for b in bodies]
        sync = self.settings.durability == "fsync"
        on_commit = lambda rows: self._on_commit(rows, total)  # noqa: E731
        if done is None:
            try:
                rows = self.store.append(items, sync=sync, on_commit=on_commit)
            except BaseException:
                self._unreserve(n, total)
                raise
            self.totals["sent"] += n
            return [r.id for r in rows]

        def finished(rows, error):
            if error is not None:
                self._unreserve(n, total)
                done(None, error)
            else:
                self.totals["sent"] += n
                done([r.id for r in rows], None)
        try:
            self.store.append(items, sync=sync, on_commit=on_commit, done=finished)
        except BaseException:
            self._unreserve(n, total)
            raise
        return None

    def _on_commit(self, rows, total):
        """Store thread, right after the commit that made *rows* durable."""
        if not rows:
            return
        with self.lock:
            self.reserved_n -= len(rows)
            self.reserved_b -= total
            self.count += len(rows)
            self.nbytes += total
            # Rows come in id order.  While the store holds nothing beyond the cursor, they
            # join the ready window (up to PREFETCH); the rest stay in the store, fetched later.
            if self.cursor >= self.high and not self.refilling:
                room = PREFETCH - len(self.ready)
                if room > 0:
                    ready, heap, push = self.ready, self.ready_heap, heapq.heappush
                    for row in rows[:room]:
                        rid = row[0]
                        if rid not in ready:
                            ready[rid] = row
                            push(heap, rid)
                    self.cursor = rows[min(room, len(rows)) - 1][0]
            self.high = max(self.high, rows[-1][0])
            self._signal_ready(len(rows))
        self.hub.publish(self.name, rows)

    def insert_moved(self, rows, sizes):
        """Take in rows re-homed to this queue (dead-lettered or replayed)."""
        with self.lock:
            for row, size in zip(rows, sizes):
                self.count += 1
                self.nbytes += size
                if row.id <= self.cursor:
                    self._make_ready(row)
                else:
                    self.high = max(self.high, row.id)
                self.moving.discard(row.id)
            self._signal_ready(len(rows))

    # -- receiving ---------------------------------------------------------

    def get_many(self, max_n: int, timeout: float | None, lease_seconds: float | None) -> list[Delivery]:
        """Deliver up to *max_n*, waiting up to *timeout* for the first (threaded callers)."""
        lease_s = self.settings.lease_seconds if lease_seconds is None else lease_seconds
        deadline = None if timeout is None else self.clock() + timeout
        with self.lock:
            self.waiting += 1
            try:
                while True:
                    got = self._take_locked(max_n, lease_s)
                    if got:
                        return got
                    left = None if deadline is None else deadline - self.clock()
                    if left is not None and left <= 0:
                        return []
                    self._blocked += 1
                    try:
                        self.not_empty.wait(1.0 if left is None else min(left, 1.0))
                    finally:
                        self._blocked -= 1
            finally:
                self.waiting -= 1

    def try_get(self, max_n: int, lease_seconds: float | None) -> list[Delivery]:
        """Deliver what is ready now, without waiting (the session loop parks on [])."""
        lease_s = self.settings.lease_seconds if lease_seconds is None else lease_seconds
        with self.lock:
            return self._take_locked(max_n, lease_s)

    def _take_locked(self, max_n, lease_s) -> list[Delivery]:
        self.hub.check_running()
        while not self.ready and self.cursor < self.high and not self.refilling:
            self._refill_locked()
        return self._deliver_locked(max_n, lease_s) if self.ready else []

    def _refill_locked(self):
        self.refilling = True
        after, snapshot = self.cursor, self.high
        self.lock.release()
        try:
            rows = self.store.fetch(self.name, after, PREFETCH)
        finally:
            self.lock.acquire()
            self.refilling = False
        now = self.wall()
        for row in rows:
            if row.id in self.moving or row.id in self.leases or row.id in self.delayed_rows:
                continue
            if row.not_before > now:
                self._delay(row)
            else:
                self._make_ready(row)
        if rows:
            self.cursor = max(self.cursor, rows[-1].id)
        if len(rows) < PREFETCH:
            self.cursor = max(self.cursor, snapshot)
        self._signal_ready()

    def _signal_ready(self, n: int | None = None):
        """Under the lock: messages became ready.  Wakes threaded waiters, and tells the
        hub (the session loop retries the sessions parked on this queue)."""
        if self._blocked:  # Condition.notify costs ~1 us even with nobody waiting
            if n is None:
                self.not_empty.notify_all()
            else:
                self.not_empty.notify(n)
        self.hub.changed(self)

    def _signal_room(self):
        """Under the lock: room was freed (or settings changed)."""
        if self._blocked:
            self.not_full.notify_all()
        self.hub.changed(self)

    def _make_ready(self, row):
        if row.id not in self.ready:
            self.ready[row.id] = row
            heapq.heappush(self.ready_heap, row.id)

    def _delay(self, row):
        self.delayed_rows[row.id] = row
        heapq.heappush(self.delayed, (row.not_before, row.id))

    def _deliver_locked(self, max_n, lease_s) -> list[Delivery]:
        # The per-message loop of every receive, with batches of 100 the daemon's largest
        # own cost after SQLite: hence local aliases and tuple.__new__ for the Row and the
        # Delivery (namedtuple _replace and __new__ are Python functions, ~1 us each).
        out = []
        expires = self.clock() + lease_s
        # The reply must fit the client's frame limit: stop adding messages once half
        # of max_request_bytes is used (a single message always fits; see config checks).
        budget, used = self.hub.reply_budget, 0
        ready, heap, leases, lease_heap = self.ready, self.ready_heap, self.leases, self.lease_heap
        # Fix (tests/integration/test_security.py): the token was a per-queue counter
        # from 1, so any client of the queue could guess another consumer's lease and
        # ack/nack it.  Random and non-zero (peek reports lease 0).
        # Drawn from the hub's PRNG (seeded from secrets): a system call per delivery
        # showed up in profiles, and tokens guard against stale and mistaken acks, not
        # against authkey holders (who may purge the queue anyway).
        bits = self.hub.rng.getrandbits
        pop, push, new = heapq.heappop, heapq.heappush, tuple.__new__
        redelivered = 0
        while ready and len(out) < max_n:
            rid = heap[0]
            row = ready.get(rid)
            if row is None:
                pop(heap)
                continue  # stale heap entry (purged or moved)
            used += len(row[2]) + 64
            if out and used > budget:
                break
            pop(heap)
            del ready[rid]
            _id, queue, body, attempts, enqueued_at, not_before, reason = row
            attempts += 1
            row = new(type(row), (rid, queue, body, attempts, enqueued_at, not_before, reason))
            token = bits(63) | 1
            leases[rid] = Lease(row, token, expires)
            push(lease_heap, (expires, rid, token))
            if attempts > 1:
                redelivered += 1
            out.append(new(Delivery, (rid, token, body, attempts, enqueued_at, reason)))
        self.totals["received"] += len(out)
        self.totals["redelivered"] += redelivered
        return out

    # -- settling ----------------------------------------------------------

    def _take_leases_locked(self, items, what):
        """Validate (id, token) pairs and detach their leases; all or nothing."""
        if not isinstance(items, list):
            raise errors.DataError(f"{what} needs a list of (id, lease) pairs")
        leases, seen = [], set()
        for item in items:
            try:
                rid, token = item
            except (TypeError, ValueError):
                raise errors.DataError(f"{what} needs (id, lease) pairs, got {item!r:.60}") from None
            if type(rid) is not int:  # an unhashable id made leases.get() an internal error
                raise errors.DataError(f"{what}: a message id must be an integer, got {rid!r:.60}")
            lease = self.leases.get(rid)
            if lease is None or lease.token != token:
                raise errors.LeaseExpired(
                    f"message {rid} of queue '{self.name}' is not leased to you: its lease expired "
                    "(it will be or was redelivered), it was settled already, or it was purged")
            if rid in seen:
                # Fix (test_security.py): a pair listed twice was detached twice (KeyError after
                # the first del), leaving the message neither leased nor ready until a restart.
                continue
            seen.add(rid)
            leases.append(lease)
        for lease in leases:
            del self.leases[lease.row.id]
        return leases

    def ack(self, items, done=None) -> int:
        """Settle deliveries; return how many.  With *done*, a durable delete ("fsync"
        queues) is not waited for but reported to ``done(error)``; done is called once."""
        with self.lock:
            leases = self._take_leases_locked(items, "ack")
            self._forget_locked([lz.row for lz in leases])
        self.totals["acked"] += len(leases)
        # With "os" durability the delete is not waited for: it is committed with the
        # next group (or by the store thread within ~0.25 s), and a crash before that
        # redelivers the message, which at-least-once allows; waiting cost a second
        # transaction per message (bench/RESULTS.md).  "fsync" queues keep acks durable.
        fsync = self.settings.durability == "fsync"
        ids = [lz.row.id for lz in leases]
        if done is None:
            if ids:
                self.store.delete(ids, sync=fsync, wait=fsync)
        elif fsync and ids:
            self.store.delete(ids, sync=True, done=lambda _n, error: done(error))
        else:
            if ids:
                self.store.delete(ids, wait=False)
            done(None)
        return len(leases)

    def _forget_locked(self, rows):
        self.count -= len(rows)
        self.nbytes -= sum(body_size(r.body) for r in rows)
        self._signal_room()

    def nack(self, items, delay: float = 0.0, reason: str | None = None) -> int:
        if not isinstance(delay, (int, float)) or not 0 <= delay <= 366 * 86400:
            raise errors.DataError("nack delay must be between 0 and one year, in seconds")
        with self.lock:
            leases = self._take_leases_locked(items, "nack")
            epoch = self.purge_epoch
        self.totals["nacked"] += len(leases)
        self._settle([lz.row for lz in leases], delay, reason or "nacked", epoch)
        return len(leases)

    def touch(self, items, seconds: float | None = None) -> float:
        lease_s = self.settings.lease_seconds if seconds is None else seconds
        if not isinstance(lease_s, (int, float)) or not 0 < lease_s <= 86400:
            raise errors.DataError("a lease must be between 0 and 86400 seconds")
        with self.lock:
            leases = self._take_leases_locked(items, "touch")
            expires = self.clock() + lease_s
            for lz in leases:
                lz.expires = expires
                self.leases[lz.row.id] = lz
                heapq.heappush(self.lease_heap, (expires, lz.row.id, lz.token))
        return lease_s

    def release_for_shutdown(self, items) -> int:
        """Return messages without charging the attempt (worker shutdown)."""
        with self.lock:
            leases = self._take_leases_locked(items, "release")
            for lz in leases:
                self._make_ready(lz.row._replace(attempts=lz.row.attempts - 1))
            self._signal_ready(len(leases))
        return len(leases)

    def _settle(self, rows, delay, reason, epoch):
        """Return failed deliveries to the queue, or dead-letter the exhausted.

        *epoch* is ``purge_epoch`` when the rows' leases were taken: a purge in between
        deleted them, and putting them back would serve messages that no longer exist.
        """
        with self.lock:
            if self.purge_epoch != epoch:
                return
        limit = self.settings.max_attempts
        dead = [r for r in rows if r.attempts >= limit and not self.is_dead_queue]
        back = [r for r in rows if not (r.attempts >= limit and not self.is_dead_queue)]
        if back:
            not_before = self.wall() + delay if delay else 0.0
            with self.lock:
                for row in back:
                    if delay:
                        self._delay(row._replace(not_before=not_before))
                    else:
                        self._make_ready(row)
                self._signal_ready(len(back))
            self.store.update([(r.id, r.attempts, not_before) for r in back], wait=False)
        if dead:
            # Fix (issue 3 tests): the attempts of the last delivery lived only in memory, so
            # the dead letter was stored (and listed) with one attempt too few; queued before
            # the move (store FIFO), the update lands first.  And the rows must leave this
            # queue's count/nbytes: they used to stay, so stats showed phantom ready messages
            # and max_messages/max_bytes filled up with messages that had moved to .dead.
            self.store.update([(r.id, r.attempts, 0.0) for r in dead], wait=False)
            with self.lock:
                self._forget_locked(dead)
            try:
                self.hub.dead_letter(self, dead, f"{reason} after {limit} attempt(s)")
            except BaseException:
                with self.lock:  # still stored under this queue: keep serving them
                    self.count += len(dead)
                    self.nbytes += sum(body_size(r.body) for r in dead)
                    for row in dead:
                        self._make_ready(row)
                    self._signal_ready(len(dead))
                raise

    def tick(self, now: float, wall_now: float) -> float | None:
        """Expire leases and release due delayed messages; return the next due time."""
        expired = []
        with self.lock:
            epoch = self.purge_epoch
            while self.lease_heap and self.lease_heap[0][0] <= now:
                _exp, rid, token = heapq.heappop(self.lease_heap)
                lease = self.leases.get(rid)
                if lease is not None and lease.token == token and lease.expires <= now:
                    del self.leases[rid]
                    expired.append(lease.row)
            promoted = 0
            while self.delayed and self.delayed[0][0] <= wall_now:
                _nb, rid = heapq.heappop(self.delayed)
                row = self.delayed_rows.pop(rid, None)
                if row is not None:
                    self._make_ready(row._replace(not_before=0.0))
                    promoted += 1
            if promoted:
                self._signal_ready(promoted)
            if len(self.lease_heap) > 2 * len(self.leases) + 64:
                # Acked leases leave stale heap entries that would wake the main loop once
                # each when they "expire": drop them in one pass.
                self.lease_heap = [(lz.expires, rid, lz.token) for rid, lz in self.leases.items()]
                heapq.heapify(self.lease_heap)
            due = [self.lease_heap[0][0]] if self.lease_heap else []
            if self.delayed:
                due.append(now + (self.delayed[0][0] - wall_now))
        if expired:
            self._settle(expired, 0.0, "lease expired", epoch)
        return min(due) if due else None

    # -- inspection and maintenance ---------------------------------------

    def remove_for_move(self, ids) -> tuple[list[int], list[int]]:
        """Detach *ids* (not leased) for re-homing; return (taken, refused)."""
        taken, refused = [], []
        with self.lock:
            for rid in ids:
                if rid in self.leases:
                    refused.append(rid)
                    continue
                row = self.ready.pop(rid, None) or self.delayed_rows.pop(rid, None)
                if row is not None:
                    self._forget_locked([row])
                elif rid > self.cursor:
                    self.moving.add(rid)  # in the store only; the mover fixes counts
                else:
                    refused.append(rid)
                    continue
                taken.append(rid)
        return taken, refused

    def forget_store_only(self, rows):
        """Counts for rows moved away that were never in memory."""
        with self.lock:
            for row in rows:
                if row.id in self.moving:
                    self.moving.discard(row.id)
                    self._forget_locked([row])

    def purge(self) -> int:
        with self.lock:
            self.purge_epoch += 1
            removed = self.count
            self.ready.clear()
            self.ready_heap.clear()
            self.delayed.clear()
            self.delayed_rows.clear()
            self.leases.clear()
            self.lease_heap.clear()
            self.count = self.nbytes = 0
            floor = self.high
            self.cursor = self.high
            self._signal_room()
        self.store.purge(self.name, max_id=floor, sync=self.settings.durability == "fsync")
        return removed

    def peek(self, n: int) -> list[Delivery]:
        with self.lock:
            ids = sorted(self.ready)[:n]
            rows = [self.ready[i] for i in ids]
            short = n - len(rows)
            after = self.cursor if short > 0 and self.cursor < self.high else None
        if after is not None:
            rows += [r for r in self.store.fetch(self.name, after, short) if r.not_before <= self.wall()]
        return [Delivery(r.id, 0, r.body, r.attempts, r.enqueued_at, r.reason) for r in rows[:n]]

    def stats(self) -> dict:
        with self.lock:
            leased = len(self.leases)
            delayed = len(self.delayed_rows)
            oldest = min((r.enqueued_at for r in self.ready.values()), default=None)
            return {
                "name": self.name,
                "ready": self.count - leased - delayed,
                "leased": leased,
                "delayed": delayed,
                "bytes": self.nbytes,
                "waiting": self.waiting,
                "oldest_age": None if oldest is None else max(0.0, self.wall() - oldest),
                "durability": self.settings.durability,
                **self.totals,
            }
