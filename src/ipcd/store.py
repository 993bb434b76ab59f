"""Message persistence: SQLite owned by one thread, with group commit. No leases, no network.

* One store thread owns the connection and runs every op, reads included, from a FIFO queue;
  callers wait on a small future. FIFO is what lets a read see every write queued before it.
* Group commit: all pending writes run in one BEGIN IMMEDIATE ... COMMIT, so N concurrent
  senders cost one WAL write (one fsync with sync=True). on_commit callbacks run in the thread
  right after COMMIT, in commit order, before the callers are released.
* A failed group is rolled back and each op retried alone: only the op that does not fit
  (disk full, max_bytes) or is bad fails, and deletes in the group still free space.
* A corrupt file is never overwritten or deleted: it is renamed aside with its -wal/-shm.

The file itself (checks, schema, the SQL of each op, the clean-stop summary) is store_file.py.
"""

from __future__ import annotations

import errno
import logging
import os
import queue as queuelib
import sqlite3
import threading
import time
from typing import Any, Callable

from ipcd.errors import StoreCorrupt, Unavailable
from ipcd.store_file import (  # noqa: F401 - Row, body_size, ... are imported from here too
    SCHEMA_VERSION, WRITERS, Done, NewItem, OnCommit, Row, StoreFile, Summary, body_size,
    fsize, full_error, is_corrupt, is_full, new_rows, r_count, r_fetch, r_get)

_WAL_CHECKPOINT = 4 << 20  # checkpoint early once about this much was written to the WAL
_MAX_BATCH = 4096  # ops taken per round: bounds how long one transaction holds every sender
_CAP_HEADROOM = 256  # pages beyond max_bytes granted to ops that add no message
_WAL_TRUNCATE_AT = 1 << 20  # maybe_compact() returns a WAL bigger than this to the filesystem
_WRITES = frozenset({"append", "delete", "update", "move", "purge"})


def _incoming(ops) -> int:
    """Rough bytes a group of write ops adds to the WAL: bodies plus ~200 per row/op."""
    # Not len() blindly: a malformed body must fail its own op in the transaction, not here.
    return sum(sum((len(it[1]) if isinstance(it[1], str) else 0) + 200 for it in op.args[0])
               if op.kind == "append" else 200 for op in ops)


class _BeginFailed(Exception):
    """The transaction could not start (e.g. busy): no single op is to blame."""


class _Op:
    """One unit of work for the store thread, and the future its caller waits on."""

    __slots__ = ("kind", "args", "sync", "on_commit", "done", "_lock", "finished", "result", "error")

    def __init__(self, kind: str, args: tuple, sync: bool = False,
                 on_commit: OnCommit | None = None, done: Done | None = None):
        self.kind, self.args, self.sync, self.on_commit, self.done = kind, args, sync, on_commit, done
        # A pre-acquired lock, not an Event: an Event builds a Condition (two more locks)
        # per operation, and the leader usually finishes its own op without any wait.
        self._lock = threading.Lock()
        self._lock.acquire()
        self.finished = False
        self.result: Any = None
        self.error: BaseException | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.finished = True
        self._lock.release()
        if self.done is not None:
            try:
                self.done(result, error)
            except Exception:  # the op's outcome stands; a broken callback must not stop the group
                logging.getLogger("ipcd.store").exception("store completion callback failed")

    def wait(self, timeout: float) -> bool:
        return self.finished or self._lock.acquire(timeout=timeout) or self.finished


class SqliteStore:
    """Durable store in one SQLite file (WAL). All methods are thread-safe.

    ``on_commit`` callbacks run in the store thread: they must be quick and must not call
    the store (that would wait on the thread running them; it raises RuntimeError instead).
    """

    compact_min_pages = 1024  # below ~4 MiB a vacuum is not worth its I/O
    close_timeout = 10.0  # seconds close() waits for the thread to finish pending work
    disk_reserve = 8 << 20  # bytes appends leave free on the filesystem (at most 1/8 of it)

    def __init__(self, path: str, *, max_bytes: int = 0, logger: logging.Logger | None = None):
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.log = logger or logging.getLogger("ipcd.store")
        self.file = StoreFile(self.path, self.log)
        self.commits = 0  # write transactions committed (stats; shows group commit working)
        self._conn: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._q: queuelib.SimpleQueue[_Op] = queuelib.SimpleQueue()
        self._lock = threading.Lock()  # orders submissions against close()
        self._closed = True  # until open() succeeds
        self._sync_full = False  # PRAGMA synchronous is FULL right now
        self._cap = 0  # max_page_count for appends; 0 = no cap
        self._cap_set = 0  # the max_page_count last asked for
        self._full_logged = -1e9  # monotonic time of the last "full" warning
        # Whoever holds _owner may use the connection: a caller thread that finds the store
        # idle runs the work itself (leader), later arrivals queue and are committed by that
        # leader in one group.  A hand-off to a dedicated thread cost ~27 us of wake-ups per
        # operation against ~4 us done in the caller (bench/RESULTS.md, hot spot 1).
        self._owner = threading.Lock()
        self._wake = threading.Event()  # async (wait=False) work or a checkpoint is due
        self._tls = threading.local()  # .leading: this thread holds _owner (on_commit guard)
        self._stopping = False
        self._close_requested = False
        self._dirty = False  # commits since the last passive checkpoint
        self._last_checkpoint = time.monotonic()
        self._wal_estimate = 0  # bytes written to the WAL since the last checkpoint (rough)
        self._room_budget, self._room_until = 0, 0.0  # see _disk_has_room
        # Clean-stop summary (store_file.py): who provides it, whether it can be trusted
        # this run, the one read at open, and whether meta still holds it.
        self.summary_source: Callable[[], Summary | None] | None = None
        self._summary_ok = True
        self._summary: Summary | None = None
        self._summary_in_db = False

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Check the file, open or create it, start the store thread.

        Raises StoreCorrupt (file moved aside, or schema too new), StorageFull, ConfigError
        (cannot open, or not an ipcd store).
        """
        with self._lock:
            if not self._closed or (self._thread is not None and self._thread.is_alive()):
                raise RuntimeError(f"store {self.path} is already open")
        self.file.check()
        self._conn = self._connect()
        self._q = queuelib.SimpleQueue()
        self._stopping = self._close_requested = False
        self._thread = threading.Thread(target=self._run, name="ipcd-store", daemon=True)
        with self._lock:
            self._closed = False
        self._thread.start()

    def close(self) -> None:
        """Finish queued work, checkpoint, stop the thread. Idempotent; fine after a failed open."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # no new work from here on
        if getattr(self._tls, "leading", False):  # from an on_commit: the leader finishes it
            self._close_requested = True
            return
        with self._owner:
            self._drain()
            self._shutdown()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.close_timeout)

    def _set_cap(self, conn: sqlite3.Connection, pages: int) -> None:
        if pages != self._cap_set:
            conn.execute(f"PRAGMA max_page_count={int(pages)}").fetchall()
            self._cap_set = pages

    # -- the clean-shutdown summary -------------------------------------------------------------
    #
    # Start-up needs each queue's count, bytes and highest id; computing them reads every
    # body (4.4 s with 10 M stored).  A clean close stores them in meta as the last
    # transaction, and the first write transaction after the next open deletes them (in
    # the same transaction), so they are used only while they describe the file exactly.
    # A crash, a failed op, or a file whose max(id) disagrees falls back to the full scan.

    def _connect(self) -> sqlite3.Connection:
        conn = self.file.connect()
        self._summary, self._summary_in_db = self.file.read_summary(conn)
        self._summary_ok = True
        self._sync_full, self._cap, self._cap_set = False, 0, 0
        if self.max_bytes > 0:
            # Never below what is already there: an over-quota store must still open and drain.
            one = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
            self._cap = max(self.max_bytes // one("PRAGMA page_size"), one("PRAGMA page_count") + 16)
            self._set_cap(conn, self._cap)
        return conn

    def _save_summary(self, conn: sqlite3.Connection) -> None:
        """Under _owner, at close, after the last queued op: store the caller's summary."""
        if self.summary_source is None or not self._summary_ok:
            return
        try:
            queues = self.summary_source()
        except Exception:  # a bug in the caller; the next start counts instead
            self.log.exception("store %s: computing the queue summary failed", self.path)
            return
        if queues is not None:  # None: the caller's counts are in flux
            self.file.save_summary(conn, queues)

    # -- public API ------------------------------------------------------------------------

    def load_summary(self) -> dict[str, tuple[int, int, int]]:
        """queue -> (count, total UTF-8 body bytes, max id). Reads every body: startup only."""
        return self._submit("summary", ())

    def append(self, items: list[NewItem], *, sync: bool = False,
               on_commit: OnCommit | None = None, done: Done | None = None) -> list[Row] | None:
        """Store *items*; with *done*, return at once and report (rows, error) to it later.

        A *done* op is committed by the next flush() or group, or within ~0.25 s by the store
        thread; only a closed store raises here instead (Unavailable).
        """
        if not items:
            if done is not None:
                done([], None)
            return []
        return self._submit("append", (list(items),), sync=sync, on_commit=on_commit,
                            wait=done is None, done=done)

    def fetch(self, queue: str, after_id: int, limit: int) -> list[Row]:
        return self._submit("fetch", (queue, after_id, limit))

    def get(self, ids: list[int]) -> list[Row]:
        return self._submit("get", (list(ids),)) if ids else []

    def delete(self, ids: list[int], *, sync: bool = False, wait: bool = True,
               done: Done | None = None) -> int:
        """Delete rows; wait=False or *done* (as for append) returns 0 at once."""
        if not ids:
            if done is not None:
                done(0, None)
            return 0
        wait = wait and done is None
        n = self._submit("delete", (list(ids),), sync=sync, wait=wait, done=done)
        return n if wait else 0

    def update(self, changes: list[tuple[int, int, float]], *, wait: bool = False) -> None:
        if changes:
            self._submit("update", (list(changes),), wait=wait)

    def move(self, ids: list[int], queue: str, *, reason: str | None, reset_attempts: bool,
             sync: bool = False) -> list[Row]:
        """Re-home rows (dead-letter, replay) keeping their ids; not_before is left as is."""
        if not ids:
            return []
        return self._submit("move", (list(ids), queue, reason, reset_attempts), sync=sync)

    def purge(self, queue: str, *, max_id: int | None = None, sync: bool = False) -> int:
        """Delete the queue's rows (only ids <= max_id when given: a purge must not
        take messages committed after the caller's snapshot of the queue)."""
        return self._submit("purge", (queue, max_id), sync=sync)

    def size_on_disk(self) -> int:
        return fsize(self.path) + fsize(self.path + "-wal")

    def maybe_compact(self) -> bool:
        return self._submit("compact", ())

    def flush(self, background: bool = False) -> None:
        """Commit queued work now: in this thread, unless another thread is already at it
        (that one then commits it too: see _lead), or with *background* in the store thread.

        The session loop calls this once per round: inline for "os" work (a commit costs
        less than a thread hand-off), in the background when an fsync is due, so the loop
        keeps reading requests during the fsync and they form the next group.
        """
        if background:
            self._wake.set()
        elif not getattr(self._tls, "leading", False):
            self._lead()

    def _submit(self, kind: str, args: tuple, *, sync: bool = False,
                on_commit: OnCommit | None = None, wait: bool = True, done: Done | None = None) -> Any:
        if wait and getattr(self._tls, "leading", False):
            raise RuntimeError("store called from an on_commit callback (it would wait on itself)")
        op = _Op(kind, args, sync, on_commit, done)
        with self._lock:
            if self._closed:
                raise Unavailable(f"store {self.path} is closed")
            self._q.put(op)
        if not wait:
            # Ride along with the next caller's group commit; the store thread picks it up
            # within 0.25 s if nothing else comes (and at once when many are waiting).
            if self._q.qsize() > 256:
                self._wake.set()
            return None
        self._lead()
        while not op.wait(0.05):
            self._lead()  # the leader left while our op was queued: take over
            if self._conn is None and not op.finished:
                raise Unavailable(f"store {self.path} is closed")
        if op.error is not None:
            raise op.error
        return op.result

    # -- running the work ------------------------------------------------------------------

    def _lead(self) -> None:
        """Run queued work in this thread while nobody else does.

        Re-checking the queue after releasing the lock closes the race with a thread that
        queued its op while we held the lock (its own acquire failed): one of us sees it.
        """
        while not self._q.empty() and self._owner.acquire(blocking=False):
            self._tls.leading = True
            try:
                self._drain()
                if self._close_requested:
                    self._close_requested = False
                    self._shutdown()
            except BaseException:  # a bug: fail what is queued rather than hang its callers
                self.log.critical("store: unexpected error running queued work", exc_info=True)
                self._fail_queued()
            finally:
                self._tls.leading = False
                self._owner.release()

    def _run(self) -> None:
        """Background thread: commits wait=False work and checkpoints the WAL when idle."""
        while not self._stopping:
            self._wake.wait(0.25)
            self._wake.clear()
            if self._stopping:
                break
            with self._owner:
                if self._conn is None:
                    break
                self._tls.leading = True
                try:
                    self._drain()
                    self._checkpoint()
                except BaseException:
                    self.log.critical("store thread: unexpected error", exc_info=True)
                    self._fail_queued()
                finally:
                    self._tls.leading = False
            # Work queued while we held _owner (during a checkpoint's fsyncs, say) whose
            # submitter could not lead and does not wait (wait=False, done callbacks):
            # commit it now, not at the next wake-up 0.25 s later.
            self._lead()

    def _checkpoint(self) -> None:
        """Copy the WAL into the database between bursts, not inside a client's commit.

        wal_autocheckpoint is off: SQLite's automatic checkpoint ran inside every ~200th
        commit and made the p99 round trip 4-6 ms instead of ~1 ms (bench/RESULTS.md).
        """
        # At most once a second (unless the WAL grew past _WAL_CHECKPOINT): a checkpoint
        # fsyncs the WAL and the database file, which costs milliseconds; on every wake-up
        # it cost more than the commits themselves.
        if not self._dirty or self._conn is None:
            return
        if time.monotonic() - self._last_checkpoint < 1.0 and self._wal_estimate <= _WAL_CHECKPOINT:
            return
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self._dirty = False
            self._wal_estimate = 0
            self._last_checkpoint = time.monotonic()
        except sqlite3.Error as exc:
            self.log.warning("store %s: checkpoint failed: %s", self.path, exc)

    def _drain(self) -> None:
        """Run everything queued: consecutive writes in one transaction, reads in order."""
        while self._conn is not None:
            batch: list[_Op] = []
            try:
                while len(batch) < _MAX_BATCH:
                    batch.append(self._q.get_nowait())
            except queuelib.Empty:
                pass
            if not batch:
                return
            writes: list[_Op] = []
            for op in batch:
                if op.kind in _WRITES:
                    writes.append(op)
                    continue
                if writes:  # commit first: a read must see the writes queued before it
                    self._write_group_safely(writes)
                    writes = []
                try:
                    op.finish(getattr(self, "_r_" + op.kind)(*op.args))
                except Exception as exc:
                    self._fail(op, exc)
            if writes:
                self._write_group_safely(writes)

    def _fail_queued(self) -> None:
        while True:
            try:
                op = self._q.get_nowait()
            except queuelib.Empty:
                return
            if op.kind in _WRITES:
                self._summary_ok = False
            op.finish(error=Unavailable(f"store {self.path} is closed"))

    def _shutdown(self) -> None:
        """Under _owner: final checkpoint, close the connection, stop the thread."""
        self._stopping = True
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._save_summary(conn)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:  # the WAL stays and is replayed at the next open
            self.log.warning("store %s: final checkpoint failed: %s", self.path, exc)
        finally:
            conn.close()
            self._fail_queued()

    def _write_group_safely(self, ops: list[_Op]) -> None:
        """_write_group, but a bug in it fails these ops instead of leaving callers waiting."""
        try:
            self._write_group(ops)
        except Exception as exc:
            self.log.critical("store: unexpected error in a write group", exc_info=True)
            for op in ops:
                if not op.finished:
                    op.finish(error=exc)

    def _write_group(self, ops: list[_Op]) -> None:
        appends = [op for op in ops if op.kind == "append"]
        incoming = _incoming(ops)
        if appends and not self._disk_has_room(incoming + 4096):
            full = OSError(errno.ENOSPC, f"less than {self.disk_reserve >> 20} MiB (or 1/8 of the "
                           f"filesystem) would stay free next to {self.path}, kept for acks")
            for op in appends:
                self._fail(op, full)
            ops = [op for op in ops if op.kind != "append"]
            if not ops:
                return
            incoming = _incoming(ops)
        try:
            results = self._transaction(ops, incoming)
        except Exception as exc:
            if isinstance(exc, _BeginFailed) or len(ops) == 1:
                for op in ops:  # retrying each op alone would repeat the same failure N times
                    self._fail(op, exc)
                return
            self.log.debug("group of %d writes failed (%s); retrying one by one", len(ops), exc)
            for op in ops:
                try:
                    self._finish([op], self._transaction([op], _incoming([op])))
                except Exception as exc1:
                    self._fail(op, exc1)
            return
        self._finish(ops, results)

    def _disk_has_room(self, incoming: int) -> bool:
        """Whether appending about *incoming* bytes keeps ``disk_reserve`` free on the disk.

        Fix (issue 3 tests, real ENOSPC on a small tmpfs): appends used to run until the
        disk was full, with most new data still in the WAL; then a delete could neither
        write its WAL frames nor checkpoint the WAL into the main file (that needs the main
        file to grow), so acks failed with "disk full" too and a full store could never
        drain.  Appends now stop while the reserve plus room to checkpoint the WAL is left,
        and deletes/updates/moves (never checked here) use it.  Best effort: another
        process can still take that space.  Free space comes back when the filesystem gets
        room (a vacuum in maybe_compact, other files removed), not from acks alone.
        """
        # statvfs + a stat of the WAL on every append was ~5 % of the daemon's time: while
        # the disk has plenty of room, re-check only every second or every quarter of the
        # headroom seen last time (so a filling disk is still caught well before the reserve).
        now = time.monotonic()
        if incoming <= self._room_budget and now < self._room_until:
            self._room_budget -= incoming
            return True
        folder = os.path.dirname(os.path.abspath(self.path))
        for attempt in (0, 1):
            try:
                st = os.statvfs(folder)
            except OSError:
                return True  # cannot tell: let SQLite find out
            reserve = min(self.disk_reserve, st.f_blocks * st.f_frsize // 8)
            # x2: the WAL frames now, and the main-file pages a checkpoint copies them to.
            spare = st.f_bavail * st.f_frsize - (reserve + fsize(self.path + "-wal") + 2 * incoming)
            if spare >= 0:
                self._room_budget, self._room_until = spare // 8, now + 1.0
                return True
            self._room_budget = 0
            if attempt == 0:
                try:  # move the WAL into the main file and give its space back, then re-check
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                except sqlite3.Error:
                    return False
        return False

    def _transaction(self, ops: list[_Op], incoming: int) -> list[Any]:
        """Run *ops* in one transaction; *incoming* is _incoming(ops), for the WAL estimate."""
        conn = self._conn
        full = any(op.sync for op in ops)
        try:
            if full != self._sync_full:  # cannot change inside a transaction; only when needed
                conn.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
                self._sync_full = full
            if self._cap:
                # Only appends add messages; deletes, updates and moves may need a few pages
                # to rebalance and must keep working at the quota so that space can be freed.
                grows = any(op.kind == "append" for op in ops)
                self._set_cap(conn, self._cap if grows else self._cap + _CAP_HEADROOM)
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _BeginFailed() from exc
        cur = conn.cursor()
        try:
            if self._summary_in_db:  # this write makes the stored summary stale
                cur.execute("DELETE FROM meta WHERE key = 'summary'")
            results = [WRITERS[op.kind](cur, *op.args) for op in ops]
            conn.execute("COMMIT")
            self._summary_in_db = False
        except BaseException:
            if conn.in_transaction:  # SQLite may already have rolled back (e.g. on SQLITE_FULL)
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as exc:
                    self.log.error("store %s: rollback failed: %s", self.path, exc)
            raise
        finally:
            # The error travels to the caller with a traceback whose frames hold this
            # cursor: an unfinalized statement turns close() into a "zombie" close that
            # keeps the exclusive lock (store_file.StoreFile._setup) until the error is garbage-collected.
            cur.close()
        self.commits += 1
        self._dirty = True
        # Rough WAL growth (4 KiB pages: a row's leaf, its index entry, the sequence row):
        # past _WAL_CHECKPOINT bytes, ask the store thread for a checkpoint now rather than
        # at the next one-second mark, so the WAL stays a few MiB even at full speed.
        self._wal_estimate += 12288 + incoming
        if self._wal_estimate > _WAL_CHECKPOINT:
            self._wake.set()
        return results

    def _finish(self, ops: list[_Op], results: list[Any]) -> None:
        for op, result in zip(ops, results):
            if op.on_commit is not None:
                try:
                    op.on_commit(result)
                except Exception:  # the rows are committed: the send must still succeed
                    self.log.exception("on_commit callback failed")
            op.finish(result)

    def _fail(self, op: _Op, exc: BaseException) -> None:
        if op.kind in _WRITES:  # the caller's counts may no longer match the file
            self._summary_ok = False
        if isinstance(exc, _BeginFailed):
            exc = exc.__cause__
        if is_full(exc):
            err: BaseException = full_error(exc)
            if time.monotonic() - self._full_logged > 10:  # a full disk fails every send: no flood
                self._full_logged = time.monotonic()
                self.log.warning("store %s: %s failed: %s", self.path, op.kind, exc)
        elif is_corrupt(exc):
            err = StoreCorrupt(f"store {self.path} is corrupt ({exc}); restart ipcd to check it "
                               "and move it aside")
            self.log.error("store %s: %s failed: %s", self.path, op.kind, exc)
        else:
            err = exc
            self.log.error("store %s: %s failed", self.path, op.kind, exc_info=exc)
        if err is not exc:
            err.__cause__ = exc
        op.finish(error=err)

    # Readers run between transactions.

    def _r_get(self, ids: list[int]) -> list[Row]:
        return r_get(self._conn.cursor(), ids)

    def _r_fetch(self, queue: str, after_id: int, limit: int) -> list[Row]:
        return r_fetch(self._conn, queue, after_id, limit)

    def _r_summary(self) -> Summary:
        if self._summary is not None:  # saved at the last clean stop: good for the first call only
            summary, self._summary = self._summary, None
            self.log.info("store %s: queue counts taken from the summary saved at the last clean "
                          "stop (%d queue(s))", self.path, len(summary))
            return summary
        return r_count(self._conn)

    def _r_compact(self) -> bool:
        conn, did = self._conn, False
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        if pages > self.compact_min_pages and free * 2 > pages:
            # Each step of this pragma frees one page, and execute() stops after one step for
            # a statement without columns; executescript() steps it to the end.
            conn.executescript("PRAGMA incremental_vacuum")
            did = True
            self.log.info("store %s: compacted %d free pages of %d", self.path, free, pages)
        if did or fsize(self.path + "-wal") > _WAL_TRUNCATE_AT:
            # In WAL mode the main file only shrinks when a checkpoint copies the vacuum back.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return did
