"""MemoryStore: the store of queues with ``durability = "memory"``.

Same interface as store.SqliteStore (the queue layer cannot tell them apart),
nothing on disk: everything is lost when the daemon stops.  Documented as
lossy; useful for high-rate, disposable traffic.
"""

from __future__ import annotations

import heapq
import logging
import threading
from typing import Iterable

from ipcd.errors import Unavailable
from ipcd.store_file import Done, NewItem, OnCommit, Row, body_size, full_error, new_rows


class MemoryStore:
    """Same interface without a file, for durability="memory": nothing survives a restart."""

    def __init__(self, path: str = "", *, max_bytes: int = 0, logger: logging.Logger | None = None):
        self.path, self.max_bytes = path, max_bytes
        self.log = logger or logging.getLogger("ipcd.store")
        self.commits = 0
        self._rows: dict[int, Row] = {}
        self._by_queue: dict[str, dict[int, Row]] = {}
        self._bytes = self._last_id = 0
        self._lock = threading.Lock()  # held across on_commit so callbacks see commit order
        self._open = False

    def open(self) -> None:
        self._open = True

    def close(self) -> None:
        self._open = False

    def _locked(self) -> threading.Lock:
        if not self._open:
            raise Unavailable("store is closed")
        return self._lock

    def _put(self, row: Row) -> Row:
        self._rows[row.id] = self._by_queue.setdefault(row.queue, {})[row.id] = row
        return row

    def _pop(self, i: int) -> Row | None:
        row = self._rows.pop(i, None)
        if row is not None:
            del self._by_queue[row.queue][i]
        return row

    def load_summary(self) -> dict[str, tuple[int, int, int]]:
        with self._locked():
            return {q: (len(d), sum(body_size(r.body) for r in d.values()), max(d))
                    for q, d in self._by_queue.items() if d}

    def append(self, items: list[NewItem], *, sync: bool = False,
               on_commit: OnCommit | None = None, done: Done | None = None) -> list[Row] | None:
        """As SqliteStore.append; *done* is called before this returns (nothing to wait for)."""
        if done is None:
            return self._append(items, on_commit)
        self._locked()  # a closed store raises, as SqliteStore's does
        try:
            rows = self._append(items, on_commit)
        except Exception as exc:
            done(None, exc)
        else:
            done(rows, None)
        return None

    def _append(self, items: list[NewItem], on_commit: OnCommit | None) -> list[Row]:
        if not items:
            return []
        with self._locked():
            size = sum(body_size(item[1]) for item in items)
            if self.max_bytes and self._bytes + size > self.max_bytes:
                raise full_error(f"{self._bytes + size} bytes would exceed "
                                  f"max_bytes={self.max_bytes}")
            rows = []
            for row in new_rows(items):
                self._last_id += 1
                rows.append(self._put(row._replace(id=self._last_id)))
            self._bytes += size
            self.commits += 1
            if on_commit is not None:
                try:
                    on_commit(rows)
                except Exception:
                    self.log.exception("on_commit callback failed")
        return rows

    def fetch(self, queue: str, after_id: int, limit: int) -> list[Row]:
        with self._locked():
            d = self._by_queue.get(queue, {})
            return [d[i] for i in heapq.nsmallest(limit, (i for i in d if i > after_id))]

    def get(self, ids: list[int]) -> list[Row]:
        with self._locked():
            return [self._rows[i] for i in sorted(set(ids)) if i in self._rows]

    def delete(self, ids: list[int], *, sync: bool = False, wait: bool = True,
               done: Done | None = None) -> int:
        with self._locked():
            n = self._delete(set(ids))
        if done is not None:
            done(n, None)
            return 0
        return n if wait else 0

    def _delete(self, ids: Iterable[int]) -> int:
        gone = [r for r in map(self._pop, ids) if r is not None]
        self._bytes -= sum(body_size(r.body) for r in gone)
        return len(gone)

    def update(self, changes: list[tuple[int, int, float]], *, wait: bool = False) -> None:
        with self._locked():
            for i, attempts, not_before in changes:
                if i in self._rows:
                    self._put(self._rows[i]._replace(attempts=attempts, not_before=not_before))

    def move(self, ids: list[int], queue: str, *, reason: str | None, reset_attempts: bool,
             sync: bool = False) -> list[Row]:
        with self._locked():
            return [self._put(r._replace(queue=queue, reason=reason,
                                         attempts=0 if reset_attempts else r.attempts))
                    for r in map(self._pop, sorted(set(ids))) if r is not None]

    def purge(self, queue: str, *, max_id: int | None = None, sync: bool = False) -> int:
        with self._locked():
            ids = list(self._by_queue.get(queue, ()))
            return self._delete([i for i in ids if max_id is None or i <= max_id])

    def flush(self, background: bool = False) -> None:
        """Nothing is ever queued here."""

    def size_on_disk(self) -> int:
        return 0

    def maybe_compact(self) -> bool:
        return False
