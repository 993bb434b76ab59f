"""Message persistence: SQLite owned by one thread, with group commit. No leases, no network.

* One store thread owns the connection and runs every op, reads included, from a FIFO queue;
  callers wait on a small future. FIFO is what lets a read see every write queued before it.
* Group commit: all pending writes run in one BEGIN IMMEDIATE ... COMMIT, so N concurrent
  senders cost one WAL write (one fsync with sync=True). on_commit callbacks run in the thread
  right after COMMIT, in commit order, before the callers are released.
* A failed group is rolled back and each op retried alone: only the op that does not fit
  (disk full, max_bytes) or is bad fails, and deletes in the group still free space.
* A corrupt file is never overwritten or deleted: it is renamed aside with its -wal/-shm.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue as queuelib
import sqlite3
import threading
import time
import urllib.parse
from typing import Any, Callable, NamedTuple

from ipcd.errors import ConfigError, StorageFull, StoreCorrupt, Unavailable

SCHEMA_VERSION = 1
_MAGIC = b"SQLite format 3\x00"
_CORRUPT, _FULL, _NOTADB = 11, 13, 26  # primary result codes (sqlite_errorcode & 0xFF)
_CANT_OPEN = {3, 8, 14}  # SQLITE_PERM, SQLITE_READONLY, SQLITE_CANTOPEN
_CHUNK = 500  # ids per IN (...): under SQLITE_MAX_VARIABLE_NUMBER even before 3.32 (999)
_WAL_CHECKPOINT = 4 << 20  # checkpoint early once about this much was written to the WAL
_MAX_BATCH = 4096  # ops taken per round: bounds how long one transaction holds every sender
_CAP_HEADROOM = 256  # pages beyond max_bytes granted to ops that add no message
_WAL_LIMIT = 16 << 20  # journal_size_limit: the WAL file is cut back to this after a checkpoint
_WAL_TRUNCATE_AT = 1 << 20  # maybe_compact() returns a WAL bigger than this to the filesystem
_COLS = "id, queue, body, attempts, enqueued_at, not_before, reason"
_WRITES = frozenset({"append", "delete", "update", "move", "purge"})


class Row(NamedTuple):
    id: int  # global, increasing in commit order, never reused (AUTOINCREMENT)
    queue: str
    body: str  # JSON text, stored as given
    attempts: int
    enqueued_at: float  # unix time
    not_before: float  # 0.0 = deliverable now
    reason: str | None  # dead-letter reason


# (queue, body, enqueued_at, attempts, not_before, reason)
NewItem = tuple[str, str, float, int, float, str | None]
OnCommit = Callable[[list[Row]], None]
Done = Callable[[Any, "BaseException | None"], None]  # (result, error): an op finished


def _code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None  # extended code -> primary


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return isinstance(exc, sqlite3.Error) and (
        _code(exc) == _FULL or "database or disk is full" in str(exc))


def _is_corrupt(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, sqlite3.DatabaseError) and (
        _code(exc) in (_CORRUPT, _NOTADB) or "malformed" in text or "not a database" in text)


def _fsize(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _full_error(detail: object) -> StorageFull:
    return StorageFull(f"store is full: {detail}; messages already accepted are safe")


def _incoming(ops) -> int:
    """Rough bytes a group of write ops adds to the WAL: bodies plus ~200 per row/op."""
    # Not len() blindly: a malformed body must fail its own op in the transaction, not here.
    return sum(sum((len(it[1]) if isinstance(it[1], str) else 0) + 200 for it in op.args[0])
               if op.kind == "append" else 200 for op in ops)


def body_size(body: str) -> int:
    """UTF-8 bytes of a JSON text, the unit of max_bytes and of queue depth in bytes.

    ASCII (most JSON) needs no encoding; this runs on every send, ack and dead letter.
    A lone surrogate raises UnicodeEncodeError, as encoding would.
    """
    return len(body) if body.isascii() else len(body.encode("utf-8"))


def _new_rows(items: list[NewItem]) -> list[Row]:
    """Rows with id 0, normalised as they will read back (REAL columns return floats)."""
    return [Row(0, q, body, int(att), float(enq), float(nb), reason)
            for q, body, enq, att, nb, reason in items]


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
        # Clean-shutdown summary (see _save_summary): who provides it, whether it can be
        # trusted this run, the one read at open, and whether meta still holds it.
        self.summary_source: Callable[[], dict[str, tuple[int, int, int]]] | None = None
        self._summary_ok = True
        self._summary: dict[str, tuple[int, int, int]] | None = None
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
        self._check_file()
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

    def _check_file(self) -> None:
        # Read-only: closing a read-write connection checkpoints the WAL into the main file,
        # which would alter the very bytes we promise to keep if it is corrupt.
        try:
            with open(self.path, "rb") as f:
                head = f.read(100)
        except FileNotFoundError:
            return
        if not head:
            return  # a new WAL database may hold everything in -wal until its first checkpoint
        if len(head) < 100 or not head.startswith(_MAGIC):
            # SQLite itself takes a 1..15-byte file for an empty database and would write over it.
            self._set_aside("not an SQLite database, or truncated inside its header")
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
        detail, conn = "", None
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None)
            rows = conn.execute("PRAGMA quick_check(5)").fetchall()
            if rows != [("ok",)]:
                detail = "quick_check: " + "; ".join(str(r[0]) for r in rows)
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                raise self._open_error(exc) from exc
            detail = str(exc)
        finally:
            if conn is not None:
                conn.close()
        if detail:
            self._set_aside(detail)

    def _set_aside(self, detail: str) -> None:
        # Fix (issue 3 tests): quick_check rows contain newlines ("*** in database main ***\n
        # Page 23: ..."), which turned the daemon's one "Error:" line into several.
        detail = "; ".join(part.strip() for part in detail.splitlines() if part.strip())
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside, n = f"{self.path}.corrupt-{stamp}", 0
        while any(os.path.lexists(aside + s) for s in ("", "-wal", "-shm")):
            n += 1  # rename() would silently replace an earlier saved copy
            aside = f"{self.path}.corrupt-{stamp}.{n}"
        # Siblings first: if we die half-way, the corrupt main file is still in place and is
        # found again at the next start, rather than a stale -wal meeting a new database.
        for suffix in ("-wal", "-shm", ""):
            if os.path.lexists(self.path + suffix):
                os.rename(self.path + suffix, aside + suffix)
        self.log.error("store %s is corrupt (%s); moved aside to %s", self.path, detail, aside)
        raise StoreCorrupt(
            f"store {self.path} is corrupt ({detail}); it was moved aside to {aside} and nothing "
            f"was deleted. Start again to begin with an empty store; recover messages from the "
            f"saved file with: sqlite3 {aside} .recover")

    def _open_error(self, exc: BaseException) -> BaseException:
        if _is_full(exc):
            return _full_error(exc)
        if _code(exc) in _CANT_OPEN:
            return ConfigError(f"cannot open store {self.path}: {exc} (does its directory exist "
                               "and is it writable by this user?)")
        return exc

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE/COMMIT ourselves.
        # check_same_thread=False: opened here, then used only by the store thread.
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._open_error(exc) from exc
        try:
            self._setup(conn)
        except BaseException as exc:
            conn.close()
            if _is_corrupt(exc):
                self._set_aside(str(exc))
            err = self._open_error(exc)
            if err is exc:
                raise
            raise err from exc
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        one = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
        # Exclusive locking, set before the first access to the WAL: SQLite then keeps the
        # WAL index in heap memory (no -shm file) and stops taking and dropping file locks
        # around every transaction (3 fcntl() calls each).  Measured: 38.6 -> 27.4 us of
        # CPU per one-message commit (bench/RESULTS.md).  Only the daemon (which holds the
        # instance lock anyway) opens the store; other processes get "database is locked".
        conn.execute("PRAGMA locking_mode=EXCLUSIVE").fetchall()
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            # Only possible before the first table exists (later it would need a full VACUUM);
            # every store with a meta table was therefore created incremental.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        elif "meta" not in tables:
            raise ConfigError(f"{self.path} is an SQLite database but not an ipcd store (it has "
                              "no meta table); refusing to use it")
        else:
            version = int(one("SELECT value FROM meta WHERE key='schema_version'"))
            if version > SCHEMA_VERSION:  # not corrupt, so not moved: a newer ipcd can use it
                raise StoreCorrupt(
                    f"store {self.path} has schema version {version}, newer than this ipcd "
                    f"supports ({SCHEMA_VERSION}); the file was left untouched: run a newer "
                    "ipcd, or point this one at another store")
        if one("PRAGMA journal_mode=WAL").lower() != "wal":
            raise ConfigError(f"store {self.path}: SQLite refused WAL mode (network filesystem?)")
        for pragma in ("synchronous=NORMAL", "foreign_keys=OFF", "cache_size=-16384",  # 16 MiB
                       "wal_autocheckpoint=0",  # checkpoints run between bursts: see _checkpoint
                       f"journal_size_limit={_WAL_LIMIT}"):
            conn.execute("PRAGMA " + pragma)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("""CREATE TABLE IF NOT EXISTS messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, body TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, enqueued_at REAL NOT NULL,
            not_before REAL NOT NULL DEFAULT 0, reason TEXT)""")
        conn.execute("CREATE INDEX IF NOT EXISTS messages_queue_id ON messages (queue, id)")
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                     (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
        self._summary, self._summary_ok = self._read_summary(conn), True
        self._summary_in_db = conn.execute("SELECT 1 FROM meta WHERE key = 'summary'").fetchone() is not None
        self._sync_full, self._cap, self._cap_set = False, 0, 0
        if self.max_bytes > 0:
            # Never below what is already there: an over-quota store must still open and drain.
            pages = max(self.max_bytes // one("PRAGMA page_size"), one("PRAGMA page_count") + 16)
            self._cap = pages
            self._set_cap(conn, self._cap)

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

    def _read_summary(self, conn: sqlite3.Connection) -> dict[str, tuple[int, int, int]] | None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'summary'").fetchone()
        if row is None:
            return None
        try:
            data = json.loads(row[0])
            queues = {str(q): (int(n), int(b), int(top)) for q, (n, b, top) in data["queues"].items()}
            top = conn.execute("SELECT max(id) FROM messages").fetchone()[0] or 0
            if int(data["max_id"]) != top:
                raise ValueError(f"max id {data['max_id']} != {top}")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self.log.info("store %s: stored summary unusable (%s); counting messages", self.path, exc)
            return None
        return queues

    def _save_summary(self, conn: sqlite3.Connection) -> None:
        """Under _owner, at close, after the last queued op: store the caller's summary."""
        if self.summary_source is None or not self._summary_ok:
            return
        try:
            queues = self.summary_source()
            if queues is None:  # the caller's counts are in flux: better no summary
                return
            top = conn.execute("SELECT max(id) FROM messages").fetchone()[0] or 0
            text = json.dumps({"max_id": top, "queues": queues})
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('summary', ?)", (text,))
            conn.execute("COMMIT")
        except (sqlite3.Error, ValueError, TypeError) as exc:  # costs the next start a scan only
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self.log.warning("store %s: could not save the queue summary: %s", self.path, exc)

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
        return _fsize(self.path) + _fsize(self.path + "-wal")

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
            spare = st.f_bavail * st.f_frsize - (reserve + _fsize(self.path + "-wal") + 2 * incoming)
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
            results = [getattr(self, "_w_" + op.kind)(cur, *op.args) for op in ops]
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
            # keeps the exclusive lock (see _setup) until the error is garbage-collected.
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
        if _is_full(exc):
            err: BaseException = _full_error(exc)
            if time.monotonic() - self._full_logged > 10:  # a full disk fails every send: no flood
                self._full_logged = time.monotonic()
                self.log.warning("store %s: %s failed: %s", self.path, op.kind, exc)
        elif _is_corrupt(exc):
            err = StoreCorrupt(f"store {self.path} is corrupt ({exc}); restart ipcd to check it "
                               "and move it aside")
            self.log.error("store %s: %s failed: %s", self.path, op.kind, exc)
        else:
            err = exc
            self.log.error("store %s: %s failed", self.path, op.kind, exc_info=exc)
        if err is not exc:
            err.__cause__ = exc
        op.finish(error=err)

    # Writers run inside the group transaction and return their op's result.

    def _w_append(self, cur: sqlite3.Cursor, items: list[NewItem]) -> list[Row]:
        # Normalised as they will read back (REAL columns return floats); each Row is built
        # once, with its id (building it twice, via _replace, showed up in batched profiles).
        params = [(q, body, int(att), float(enq), float(nb), reason) for q, body, enq, att, nb, reason in items]
        sql = ("INSERT INTO messages (queue, body, attempts, enqueued_at, not_before, reason) "
               "VALUES (?, ?, ?, ?, ?, ?)")
        if len(params) == 1:  # unbatched sends: lastrowid saves the extra SELECT
            cur.execute(sql, params[0])
            return [Row(cur.lastrowid, *params[0])]
        cur.executemany(sql, params)
        # One writer, inside one transaction, AUTOINCREMENT: the batch got consecutive ids
        # ending at last_insert_rowid() (executemany leaves cursor.lastrowid unset).
        first = cur.execute("SELECT last_insert_rowid()").fetchone()[0] - len(params) + 1
        make = Row._make
        return [make((first + i, *p)) for i, p in enumerate(params)]

    def _w_delete(self, cur: sqlite3.Cursor, ids: list[int]) -> int:
        cur.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in ids])
        return cur.rowcount  # executemany sums the rows changed

    def _w_update(self, cur: sqlite3.Cursor, changes: list[tuple[int, int, float]]) -> None:
        cur.executemany("UPDATE messages SET attempts = ?, not_before = ? WHERE id = ?",
                        [(att, nb, i) for i, att, nb in changes])

    def _w_move(self, cur: sqlite3.Cursor, ids: list[int], queue: str, reason: str | None,
                reset: bool) -> list[Row]:
        cur.executemany("UPDATE messages SET queue = ?, reason = ?, attempts = CASE WHEN ? THEN 0 "
                        "ELSE attempts END WHERE id = ?", [(queue, reason, reset, i) for i in ids])
        return self._r_get(ids, cur)

    def _w_purge(self, cur: sqlite3.Cursor, queue: str, max_id: int | None) -> int:
        if max_id is None:
            return cur.execute("DELETE FROM messages WHERE queue = ?", (queue,)).rowcount
        return cur.execute("DELETE FROM messages WHERE queue = ? AND id <= ?", (queue, max_id)).rowcount

    # Readers run between transactions.

    def _r_get(self, ids: list[int], cur: sqlite3.Cursor | None = None) -> list[Row]:
        cur, ids, out = cur or self._conn.cursor(), sorted(set(ids)), []
        for k in range(0, len(ids), _CHUNK):
            part = ids[k:k + _CHUNK]
            out += map(Row._make, cur.execute(f"SELECT {_COLS} FROM messages WHERE id IN "
                                              f"({','.join('?' * len(part))}) ORDER BY id", part))
        return out

    def _r_fetch(self, queue: str, after_id: int, limit: int) -> list[Row]:
        return list(map(Row._make, self._conn.execute(
            f"SELECT {_COLS} FROM messages WHERE queue = ? AND id > ? ORDER BY id LIMIT ?",
            (queue, after_id, limit))))

    def _r_summary(self) -> dict[str, tuple[int, int, int]]:
        if self._summary is not None:  # see _read_summary; good for the first call only
            summary, self._summary = self._summary, None
            self.log.info("store %s: queue counts taken from the summary saved at the last clean "
                          "stop (%d queue(s))", self.path, len(summary))
            return summary
        return {q: (n, size or 0, top) for q, n, size, top in self._conn.execute(
            "SELECT queue, count(*), sum(length(CAST(body AS BLOB))), max(id) "
            "FROM messages GROUP BY queue")}

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
        if did or _fsize(self.path + "-wal") > _WAL_TRUNCATE_AT:
            # In WAL mode the main file only shrinks when a checkpoint copies the vacuum back.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return did
