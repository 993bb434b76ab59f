"""What ``ipcd tail`` and ``ipcd stats`` see: recent sends and recent rates.

``History`` keeps, per queue, the last ``history`` messages *sent* (default
1000), capped at HISTORY_BYTES of body text per queue, in memory only (a
restart starts empty).  Entries get one daemon-wide sequence number, so a
follower asks "everything after seq S" and ``tail --all`` merges queues in
send order.  Followers long-poll: ``query`` waits on a Condition that every
commit notifies, so a watcher costs nothing while idle and never takes a
message from a consumer.

``Rates`` samples each queue's counters once a second (from the daemon's
main loop, via Hub.tick) and reports per-second rates over the last
RATE_WINDOW seconds: a few dict copies per second, nothing per message.
"""

from __future__ import annotations

import collections
import sys
import threading
import time

from . import errors

HISTORY_BYTES = 1 << 20  # per queue: sys.getsizeof() of the kept bodies
RATE_WINDOW = 10.0  # seconds
RATE_KEYS = ("sent", "received", "acked", "redelivered")


class History:
    def __init__(self, keep, max_bytes: int = HISTORY_BYTES, clock=time.monotonic):
        """*keep(name)* returns how many messages to keep for queue *name* (0 = none)."""
        self._keep = keep
        self.max_bytes = max_bytes
        self.clock = clock
        self._cond = threading.Condition()
        self._seq = 0
        self._rings: dict[str, collections.deque] = {}
        self._bytes: dict[str, int] = {}
        self._evicted: dict[str, int] = {}  # highest seq dropped per queue: followers detect gaps
        self._stopped = False

    # -- recording (store thread, in commit order) ---------------------------------

    def record(self, name: str, rows) -> None:
        """Hub watcher: remember committed *rows* of queue *name*."""
        keep = self._keep(name)
        with self._cond:
            if keep <= 0:
                self._seq += len(rows)  # still advance: followers of other queues stay ordered
                self._drop_all(name)
                return
            ring = self._rings.get(name)
            if ring is None:
                ring = self._rings[name] = collections.deque()
                self._bytes[name] = 0
            seq, added, sizeof = self._seq, 0, sys.getsizeof
            for r in rows:  # one tuple per message: this runs for every message sent
                seq += 1
                size = sizeof(r.body)
                ring.append((seq, r.id, r.body, r.enqueued_at, size))
                added += size
            self._seq = seq
            self._bytes[name] += added
            excess = len(ring) - keep
            if excess > 0:  # the usual case once the ring is full: one out per one in
                popleft, dropped = ring.popleft, 0
                for _ in range(excess):
                    entry = popleft()
                    dropped += entry[4]
                self._bytes[name] -= dropped
                self._evicted[name] = entry[0]
            # The newest entry is always kept, so one huge message can still be followed.
            while len(ring) > 1 and self._bytes[name] > self.max_bytes:
                seq, _id, _body, _at, size = ring.popleft()
                self._bytes[name] -= size
                self._evicted[name] = seq
            self._cond.notify_all()

    def _drop_all(self, name):
        ring = self._rings.pop(name, None)
        if ring:
            self._evicted[name] = ring[-1][0]
        self._bytes.pop(name, None)

    def stop(self) -> None:
        """Wake every follower with 'daemon is stopping' (shutdown)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # -- reading ---------------------------------------------------------------------

    def query(self, name: str | None, n: int, after: int | None, timeout: float | None) -> dict:
        """Entries ``(seq, queue, id, body, enqueued_at)`` of *name* (None = all), oldest first.

        ``after`` None: the last *n* entries, without waiting.  Else: up to *n*
        entries with seq > after, waiting up to *timeout* seconds (None =
        forever) for the first one.  Returns ``{"seq": S, "entries": [...],
        "gap": bool}``: pass S as the next ``after``; ``gap`` is True when
        entries after ``after`` were evicted before this call saw them (the
        follower fell more than ``history`` messages behind).
        """
        deadline = None if timeout is None else self.clock() + timeout
        with self._cond:
            if after is not None and after > self._seq:
                after = 0  # a seq from before a daemon restart: everything kept is new
            while True:
                if self._stopped:
                    raise errors.Unavailable("the daemon is stopping; retry when it is back")
                names = list(self._rings) if name is None else [name]
                if after is None:
                    entries = self._last(names, n)
                    return {"seq": self._seq, "entries": entries, "gap": False}
                entries = self._since(names, after)
                if entries:
                    gap = any(self._evicted.get(q, 0) > after for q in names)
                    if len(entries) > n:
                        entries = entries[:n]
                        return {"seq": entries[-1][0], "entries": entries, "gap": gap}
                    return {"seq": self._seq, "entries": entries, "gap": gap}
                left = None if deadline is None else deadline - self.clock()
                if left is not None and left <= 0:
                    gap = any(self._evicted.get(q, 0) > after for q in names)
                    return {"seq": self._seq, "entries": [], "gap": gap}
                self._cond.wait(left)

    def _last(self, names, n):
        out = []
        for q in names:
            ring = self._rings.get(q, ())
            for i in range(max(0, len(ring) - n), len(ring)):
                seq, rid, body, at, _size = ring[i]
                out.append((seq, q, rid, body, at))
        out.sort()
        return out[-n:]

    def _since(self, names, after):
        out = []
        for q in names:
            ring = self._rings.get(q)
            if not ring or ring[-1][0] <= after:
                continue
            picked = []
            for seq, rid, body, at, _size in reversed(ring):  # new entries sit at the right end
                if seq <= after:
                    break
                picked.append((seq, q, rid, body, at))
            out += reversed(picked)
        if len(names) > 1:
            out.sort()
        return out

    def size(self, name: str) -> tuple[int, int]:
        """(entries, bytes) kept for *name*."""
        with self._cond:
            return len(self._rings.get(name, ())), self._bytes.get(name, 0)


class Rates:
    """Per-second rates of RATE_KEYS over the last RATE_WINDOW seconds."""

    def __init__(self, clock=time.monotonic, window: float = RATE_WINDOW):
        self.clock, self.window = clock, window
        self._samples: dict[str, collections.deque] = {}
        self._last = None

    def sample(self, queues: dict) -> None:
        """Record every queue's totals; at most once a second (Hub.tick calls this)."""
        now = self.clock()
        prev = self._last
        if prev is not None and now - prev < 1.0:
            return
        self._last = now
        for name, q in list(queues.items()):
            ring = self._samples.get(name)
            if ring is None:
                ring = self._samples[name] = collections.deque()
                if prev is not None:  # the queue did not exist at the previous sample: all zero then
                    ring.append((prev, dict.fromkeys(RATE_KEYS, 0)))
            ring.append((now, {k: q.totals[k] for k in RATE_KEYS}))
            while len(ring) > 2 and now - ring[1][0] >= self.window:
                ring.popleft()

    def rates(self, name: str, totals: dict) -> dict:
        """Per-second rates from the oldest sample in the window to *totals* now."""
        ring = self._samples.get(name)
        now = self.clock()
        if ring:
            t0, base = ring[0]
        elif self._last is not None:  # created since the last sample: it had nothing then
            t0, base = self._last, dict.fromkeys(RATE_KEYS, 0)
        else:
            return dict.fromkeys(RATE_KEYS, 0.0)
        dt = now - t0
        if dt <= 0:
            return dict.fromkeys(RATE_KEYS, 0.0)
        return {k: round(max(0, totals[k] - base[k]) / dt, 3) for k in RATE_KEYS}
