"""The store's SQLite file: rows, error classes, the checks and schema at open, a corrupt
file moved aside, the SQL of every op, and the summary saved at a clean stop.

No threads and no queueing here: store.py decides when, in which transaction and from
which thread each of these runs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import time
import urllib.parse
from typing import Any, Callable, NamedTuple

from ipcd.errors import ConfigError, StorageFull, StoreCorrupt

SCHEMA_VERSION = 1
_MAGIC = b"SQLite format 3\x00"
_CORRUPT, _FULL, _NOTADB = 11, 13, 26  # primary result codes (sqlite_errorcode & 0xFF)
_CANT_OPEN = {3, 8, 14}  # SQLITE_PERM, SQLITE_READONLY, SQLITE_CANTOPEN
_CHUNK = 500  # ids per IN (...): under SQLITE_MAX_VARIABLE_NUMBER even before 3.32 (999)
_WAL_LIMIT = 16 << 20  # journal_size_limit: the WAL file is cut back to this after a checkpoint
_COLS = "id, queue, body, attempts, enqueued_at, not_before, reason"

Summary = dict[str, tuple[int, int, int]]  # queue -> (count, UTF-8 body bytes, highest id)


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


def is_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return isinstance(exc, sqlite3.Error) and (
        _code(exc) == _FULL or "database or disk is full" in str(exc))


def is_corrupt(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, sqlite3.DatabaseError) and (
        _code(exc) in (_CORRUPT, _NOTADB) or "malformed" in text or "not a database" in text)


def fsize(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def full_error(detail: object) -> StorageFull:
    return StorageFull(f"store is full: {detail}; messages already accepted are safe")


def body_size(body: str) -> int:
    """UTF-8 bytes of a JSON text, the unit of max_bytes and of queue depth in bytes.

    ASCII (most JSON) needs no encoding; this runs on every send, ack and dead letter.
    A lone surrogate raises UnicodeEncodeError, as encoding would.
    """
    return len(body) if body.isascii() else len(body.encode("utf-8"))


def new_rows(items: list[NewItem]) -> list[Row]:
    """Rows with id 0, normalised as they will read back (REAL columns return floats)."""
    return [Row(0, q, body, int(att), float(enq), float(nb), reason)
            for q, body, enq, att, nb, reason in items]


class StoreFile:
    """Opening one store file: checks, the schema, and moving a corrupt file aside."""

    def __init__(self, path: str, log: logging.Logger):
        self.path, self.log = path, log

    def check(self) -> None:
        """Refuse (StoreCorrupt, after moving it aside) a file that is not a sound store."""
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
            self.set_aside("not an SQLite database, or truncated inside its header")
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
        detail, conn = "", None
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None)
            rows = conn.execute("PRAGMA quick_check(5)").fetchall()
            if rows != [("ok",)]:
                detail = "quick_check: " + "; ".join(str(r[0]) for r in rows)
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise self.open_error(exc) from exc
            detail = str(exc)
        finally:
            if conn is not None:
                conn.close()
        if detail:
            self.set_aside(detail)

    def set_aside(self, detail: str) -> None:
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

    def open_error(self, exc: BaseException) -> BaseException:
        if is_full(exc):
            return full_error(exc)
        if _code(exc) in _CANT_OPEN:
            return ConfigError(f"cannot open store {self.path}: {exc} (does its directory exist "
                               "and is it writable by this user?)")
        return exc

    def connect(self) -> sqlite3.Connection:
        """Open read-write with the schema in place (created if new)."""
        # isolation_level=None: we issue BEGIN IMMEDIATE/COMMIT ourselves.
        # check_same_thread=False: opened here, then used by whichever thread leads.
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self.open_error(exc) from exc
        try:
            self._setup(conn)
        except BaseException as exc:
            conn.close()
            if is_corrupt(exc):
                self.set_aside(str(exc))
            err = self.open_error(exc)
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
                       "wal_autocheckpoint=0",  # checkpoints run between bursts (store.py)
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

    # -- the clean-stop summary -----------------------------------------------------------
    #
    # Start-up needs each queue's count, bytes and highest id; computing them reads every
    # body (4.4 s with 10 M stored).  A clean close stores them in meta as the last
    # transaction, and the first write transaction after the next open deletes them (in
    # the same transaction: store.py), so they are used only while they describe the file
    # exactly.  A crash, a failed op, or a file whose max(id) disagrees recounts.

    def read_summary(self, conn: sqlite3.Connection) -> tuple[Summary | None, bool]:
        """(the saved summary if it can be trusted, whether meta holds one at all)."""
        row = conn.execute("SELECT value FROM meta WHERE key = 'summary'").fetchone()
        if row is None:
            return None, False
        try:
            data = json.loads(row[0])
            queues = {str(q): (int(n), int(b), int(top)) for q, (n, b, top) in data["queues"].items()}
            top = conn.execute("SELECT max(id) FROM messages").fetchone()[0] or 0
            if int(data["max_id"]) != top:
                raise ValueError(f"max id {data['max_id']} != {top}")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self.log.info("store %s: stored summary unusable (%s); counting messages", self.path, exc)
            return None, True
        return queues, True

    def save_summary(self, conn: sqlite3.Connection, queues: Summary) -> None:
        try:
            top = conn.execute("SELECT max(id) FROM messages").fetchone()[0] or 0
            text = json.dumps({"max_id": top, "queues": queues})
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('summary', ?)", (text,))
            conn.execute("COMMIT")
        except (sqlite3.Error, ValueError, TypeError) as exc:  # costs the next start a count only
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self.log.warning("store %s: could not save the queue summary: %s", self.path, exc)


# -- the SQL of each op ----------------------------------------------------------------------
# Writers run inside a group transaction and return their op's result.

_INSERT = "INSERT INTO messages (queue, body, attempts, enqueued_at, not_before, reason) VALUES "
_ROW_SQL = "(?, ?, ?, ?, ?, ?)"
_INSERT_ROWS = 128  # rows per multi-row INSERT: 768 parameters, under the old limit of 999


def _insert_sizes(n: int):
    """Statement sizes covering *n* rows: 128s, then the rest in powers of two, so a
    handful of SQL texts serve every batch size (sqlite3 caches 128 statements)."""
    while n >= _INSERT_ROWS:
        yield _INSERT_ROWS
        n -= _INSERT_ROWS
    size = _INSERT_ROWS >> 1
    while n:
        if n >= size:
            yield size
            n -= size
        size >>= 1


def w_append(cur: sqlite3.Cursor, items: list[NewItem]) -> list[Row]:
    # Normalised as they will read back (REAL columns return floats); each Row is built
    # once, with its id (building it twice, via _replace, showed up in batched profiles).
    params = [(q, body, int(att), float(enq), float(nb), reason) for q, body, enq, att, nb, reason in items]
    if len(params) == 1:  # unbatched sends: lastrowid saves the extra SELECT
        cur.execute(_INSERT + _ROW_SQL, params[0])
        return [Row(cur.lastrowid, *params[0])]
    # Multi-row INSERTs, not executemany: one statement step and one sqlite_sequence
    # update per 128 rows instead of per row.  Measured 4.5 -> 2.7 us per message for
    # insert + delete of batches of 100 (bench/micro.py).
    at = 0
    for size in _insert_sizes(len(params)):
        cur.execute(_INSERT + ",".join([_ROW_SQL] * size),
                    [v for p in params[at:at + size] for v in p])
        at += size
    # One writer, inside one transaction, AUTOINCREMENT: the rows got consecutive ids, in
    # VALUES order, ending at last_insert_rowid().
    first = cur.execute("SELECT last_insert_rowid()").fetchone()[0] - len(params) + 1
    make = Row._make
    return [make((first + i, *p)) for i, p in enumerate(params)]


def id_runs(ids: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Split *ids* into runs of consecutive ids (lo, hi), two or more long, and singles."""
    runs, singles = [], []
    ordered = sorted(set(ids))
    i, n = 0, len(ordered)
    while i < n:
        j = i
        while j + 1 < n and ordered[j + 1] == ordered[j] + 1:
            j += 1
        if j > i:
            runs.append((ordered[i], ordered[j]))
        else:
            singles.append(ordered[i])
        i = j + 1
    return runs, singles


def w_delete(cur: sqlite3.Cursor, ids: list[int]) -> int:
    # A batch acked together is usually a run of consecutive ids: one range DELETE per run
    # (exactly those ids, as ids are the primary key) costs ~1 us per message less than a
    # DELETE per id.
    runs, singles = id_runs(ids)
    n = 0
    if runs:
        cur.executemany("DELETE FROM messages WHERE id BETWEEN ? AND ?", runs)
        n += cur.rowcount  # executemany sums the rows changed
    if singles:
        cur.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in singles])
        n += cur.rowcount
    return n


def w_update(cur: sqlite3.Cursor, changes: list[tuple[int, int, float]]) -> None:
    cur.executemany("UPDATE messages SET attempts = ?, not_before = ? WHERE id = ?",
                    [(att, nb, i) for i, att, nb in changes])


def w_move(cur: sqlite3.Cursor, ids: list[int], queue: str, reason: str | None,
           reset: bool) -> list[Row]:
    cur.executemany("UPDATE messages SET queue = ?, reason = ?, attempts = CASE WHEN ? THEN 0 "
                    "ELSE attempts END WHERE id = ?", [(queue, reason, reset, i) for i in ids])
    return r_get(cur, ids)


def w_purge(cur: sqlite3.Cursor, queue: str, max_id: int | None) -> int:
    if max_id is None:
        return cur.execute("DELETE FROM messages WHERE queue = ?", (queue,)).rowcount
    return cur.execute("DELETE FROM messages WHERE queue = ? AND id <= ?", (queue, max_id)).rowcount


WRITERS = {"append": w_append, "delete": w_delete, "update": w_update, "move": w_move,
           "purge": w_purge}


# Readers run between transactions.

def r_get(cur: sqlite3.Cursor, ids: list[int]) -> list[Row]:
    ids, out = sorted(set(ids)), []
    for k in range(0, len(ids), _CHUNK):
        part = ids[k:k + _CHUNK]
        out += map(Row._make, cur.execute(f"SELECT {_COLS} FROM messages WHERE id IN "
                                          f"({','.join('?' * len(part))}) ORDER BY id", part))
    return out


def r_fetch(conn: sqlite3.Connection, queue: str, after_id: int, limit: int) -> list[Row]:
    return list(map(Row._make, conn.execute(
        f"SELECT {_COLS} FROM messages WHERE queue = ? AND id > ? ORDER BY id LIMIT ?",
        (queue, after_id, limit))))


def r_count(conn: sqlite3.Connection) -> Summary:
    """The summary the slow way: reads every body."""
    return {q: (n, size or 0, top) for q, n, size, top in conn.execute(
        "SELECT queue, count(*), sum(length(CAST(body AS BLOB))), max(id) "
        "FROM messages GROUP BY queue")}
