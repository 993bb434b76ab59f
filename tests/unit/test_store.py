"""Unit tests for ipcd.store: SqliteStore against real files in tmp_path, MemoryStore parity.

Anything that could hang (other threads, a child process) runs with a timeout; the store's
own threads are stalled deterministically (an on_commit that waits on an Event) rather than
raced, so the grouping tests assert exact numbers without timing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ipcd.errors import ConfigError, StorageFull, StoreCorrupt, Unavailable
from ipcd.memstore import MemoryStore
from ipcd.store import Row, SqliteStore

T = 10  # seconds: bound on anything that waits for another thread or process
SRC = Path(__file__).resolve().parents[2] / "src"


def item(queue="q", body='{"n": 1}', attempts=0, not_before=0.0, reason=None, at=1000.0):
    return (queue, body, at, attempts, not_before, reason)


def open_sqlite(path, **kw) -> SqliteStore:
    s = SqliteStore(str(path), **kw)
    s.open()
    return s


@pytest.fixture(params=["sqlite", "memory"])
def store(request, tmp_path):
    s = SqliteStore(str(tmp_path / "s.db")) if request.param == "sqlite" else MemoryStore()
    s.open()
    yield s
    s.close()


@pytest.fixture
def db(tmp_path):
    s = open_sqlite(tmp_path / "s.db")
    yield s
    s.close()


@pytest.fixture
def pool():
    with ThreadPoolExecutor(max_workers=16) as ex:
        yield ex


def wait_for(cond, what):
    deadline = time.monotonic() + T
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


@contextlib.contextmanager
def stalled(s: SqliteStore, pool, queued: int):
    """Hold the store thread inside an on_commit so ops submitted in the block queue up;
    on exit, wait until `queued` ops are waiting, then let the thread go."""
    gate, entered = threading.Event(), threading.Event()

    def hold(rows):
        entered.set()
        gate.wait(T)

    fut = pool.submit(s.append, [item("stall")], on_commit=hold)
    assert entered.wait(T)
    try:
        yield
        wait_for(lambda: s._q.qsize() >= queued, f"{queued} queued ops")
    finally:
        gate.set()
        fut.result(T)


# -- basic semantics, both stores ------------------------------------------------------------

def test_append_fetch_get_in_id_order(store):
    rows = store.append([item(body=f'{{"n": {i}}}') for i in range(5)] + [item("other")])
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert len({r.id for r in rows}) == 6
    assert rows[0] == Row(rows[0].id, "q", '{"n": 0}', 0, 1000.0, 0.0, None)
    assert store.fetch("q", 0, 100) == rows[:5]
    assert store.fetch("q", rows[1].id, 2) == rows[2:4]
    assert store.fetch("nope", 0, 10) == []
    assert store.get([rows[3].id, 999_999, rows[0].id]) == [rows[0], rows[3]]
    more = store.append([item()])
    assert more[0].id > rows[-1].id
    assert store.load_summary() == {"q": (6, 6 * len('{"n": 1}'), more[0].id),
                                    "other": (1, len('{"n": 1}'), rows[5].id)}


@pytest.mark.parametrize("n", [2, 3, 64, 100, 127, 128, 129, 300, 1000])
def test_batch_append_ids_match_bodies_and_ranges_delete_exactly(store, n):
    """Multi-row INSERTs in chunks: each Row's id is the row holding its body; deleting a
    mix of runs and single ids removes exactly those."""
    first = store.append([item(body=f'{{"n": -{i}}}') for i in range(3)])  # ids before the batch
    rows = store.append([item(body=f'{{"n": {i}}}', attempts=i % 3, reason=f"r{i}") for i in range(n)])
    assert [r.body for r in rows] == [f'{{"n": {i}}}' for i in range(n)]
    assert [r.id for r in rows] == list(range(rows[0].id, rows[0].id + n))
    assert store.get([r.id for r in rows]) == rows  # what reads back is what append returned
    doomed = [r.id for r in rows[: n // 2]] + [rows[-1].id, first[1].id, 10**9]
    assert store.delete(doomed) == n // 2 + 2
    left = {r.id for r in store.fetch("q", 0, 10 * n)}
    assert left == {first[0].id, first[2].id} | {r.id for r in rows[n // 2:-1]}


def test_id_runs():
    from ipcd.store_file import id_runs
    assert id_runs([]) == ([], [])
    assert id_runs([5]) == ([], [5])
    assert id_runs([9, 3, 4, 5, 7, 8, 3, 11]) == ([(3, 5), (7, 9)], [11])


def test_summary_counts_utf8_bytes(store):
    store.append([item(body='"héllo €"')])
    assert store.load_summary()["q"][1] == len('"héllo €"'.encode())


def test_delete_update_move_purge(store):
    a, b, c, d = store.append([item(), item(), item(), item("other")])
    assert store.delete([a.id, 424242]) == 1
    assert store.delete([a.id]) == 0
    assert store.get([a.id]) == []

    store.update([(b.id, 3, 2000.5), (424242, 1, 1.0)], wait=True)
    store.update([(c.id, 1, 0.0)])  # wait=False: must still be visible to the next read (FIFO)
    assert [(r.attempts, r.not_before) for r in store.fetch("q", 0, 10)] == [(3, 2000.5), (1, 0.0)]

    moved = store.move([b.id, 424242], "q.dead", reason="too many attempts", reset_attempts=False)
    assert moved == [b._replace(queue="q.dead", reason="too many attempts", attempts=3,
                                not_before=2000.5)]
    back = store.move([b.id], "q", reason=None, reset_attempts=True)
    assert back == [moved[0]._replace(queue="q", reason=None, attempts=0)]
    assert store.fetch("q", 0, 10)[0].id == b.id  # keeps its id, hence its place

    assert store.purge("q") == 2
    assert store.purge("q") == 0
    assert store.fetch("q", 0, 10) == [] and store.get([d.id]) == [d]
    assert store.load_summary() == {"other": (1, len(d.body), d.id)}


def test_delete_without_wait(store):
    (a,) = store.append([item()])
    assert store.delete([a.id], wait=False) == 0
    assert store.get([a.id]) == []


def test_empty_arguments_are_no_ops(store):
    assert store.append([]) == [] and store.get([]) == [] and store.delete([]) == 0
    assert store.move([], "x", reason=None, reset_attempts=False) == []
    store.update([])
    assert store.load_summary() == {}


def test_on_commit_runs_before_append_returns_in_commit_order(store, pool):
    seen: list[int] = []

    def sender():
        for i in range(100):
            rows = store.append([item(body=str(i))] * (1 + i % 3),
                                on_commit=lambda r: seen.extend(x.id for x in r))
            assert {r.id for r in rows} <= set(seen)  # the callback ran before we got here
        return sum(1 + i % 3 for i in range(100))

    total = sum(f.result(T * 3) for f in [pool.submit(sender) for _ in range(8)])
    assert seen == sorted(seen) and len(set(seen)) == len(seen) == total


def test_closed_store_refuses_calls(store):
    store.close()
    store.close()  # idempotent
    with pytest.raises(Unavailable):
        store.append([item()])
    with pytest.raises(Unavailable):
        store.fetch("q", 0, 1)


def test_memory_store_max_bytes():
    s = MemoryStore(max_bytes=100)
    s.open()
    (a,) = s.append([item(body="x" * 60)])
    with pytest.raises(StorageFull, match="already accepted are safe"):
        s.append([item(body="y" * 60)])
    assert s.get([a.id]) == [a]
    s.delete([a.id])
    s.append([item(body="y" * 60)])
    assert s.size_on_disk() == 0 and s.maybe_compact() is False


# -- SqliteStore: lifecycle, durability, ids ------------------------------------------------

def test_open_twice_is_refused_and_reopen_after_close_works(tmp_path):
    s = open_sqlite(tmp_path / "s.db")
    with pytest.raises(RuntimeError, match="already open"):
        s.open()
    (a,) = s.append([item()])
    s.close()
    s.open()
    assert s.get([a.id]) == [a]
    s.close()
    s.close()


def test_ids_monotonic_across_restart_even_after_deleting_the_highest(tmp_path):
    s = open_sqlite(tmp_path / "s.db")
    rows = s.append([item() for _ in range(5)])
    s.delete([rows[-1].id])
    s.close()
    assert not (tmp_path / "s.db-wal").exists() or (tmp_path / "s.db-wal").stat().st_size == 0
    s = open_sqlite(tmp_path / "s.db")
    assert s.fetch("q", 0, 10) == rows[:4]
    assert s.append([item()])[0].id > rows[-1].id
    s.delete([r.id for r in s.fetch("q", 0, 100)])
    s.close()
    s = open_sqlite(tmp_path / "s.db")
    assert s.append([item()])[0].id > rows[-1].id + 1
    s.close()


def test_sync_true_commits_and_mixes_with_normal(db, pool):
    (a,) = db.append([item()], sync=True)
    assert db._sync_full
    with stalled(db, pool, queued=3):
        futs = [pool.submit(db.append, [item()]), pool.submit(db.append, [item()], sync=True),
                pool.submit(db.delete, [a.id], sync=True)]
    assert len(futs[0].result(T)) == len(futs[1].result(T)) == futs[2].result(T) == 1
    db.append([item()])
    assert not db._sync_full  # back to NORMAL for a group without sync=True


def test_acknowledged_append_survives_sigkill(tmp_path):
    path = tmp_path / "s.db"
    code = (
        "import os, sys\n"
        "from ipcd.store import SqliteStore\n"
        "s = SqliteStore(sys.argv[1]); s.open()\n"
        "rows = s.append([('q', '{\"n\": %d}' % i, 1.0, 0, 0.0, None) for i in range(50)])\n"
        "rows += s.append([('q', '\"fsync\"', 1.0, 0, 0.0, None)], sync=True)\n"
        "rows += s.append([('q', '\"last\"', 1.0, 0, 0.0, None)])\n"
        "print(','.join(str(r.id) for r in rows), flush=True)\n"
        "os.kill(os.getpid(), 9)\n")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    ids = [int(x) for x in proc.stdout.strip().split(",")]
    assert len(ids) == 52
    assert (tmp_path / "s.db-wal").stat().st_size > 0  # nothing checkpointed: recovery from WAL
    s = open_sqlite(path)
    got = s.get(ids)
    assert [r.id for r in got] == ids and got[-1].body == '"last"'
    s.close()


# -- group commit ----------------------------------------------------------------------------

def test_queued_writes_share_one_transaction(db, pool):
    before = db.commits
    with stalled(db, pool, queued=9):
        futs = [pool.submit(db.append, [item(body=str(i))]) for i in range(8)]
        futs.append(pool.submit(db.delete, [123456]))
    results = [f.result(T) for f in futs]
    assert db.commits == before + 2  # the stalled append + one group for all nine
    assert results[-1] == 0
    assert sorted(r[0] for r in results[:-1]) == db.fetch("q", 0, 100)


def test_concurrent_appends_are_grouped(db, pool):
    before = db.commits

    def sender():
        for i in range(200):
            db.append([item(body=str(i))])

    for f in [pool.submit(sender) for _ in range(8)]:
        f.result(T * 6)
    commits = db.commits - before
    assert len(db.fetch("q", 0, 10_000)) == 1600
    assert commits < 1600 * 0.8, commits  # no timing: just that groups of >1 really form


def test_failed_op_fails_alone_and_thread_survives(db, pool, caplog):
    with stalled(db, pool, queued=3):
        good1 = pool.submit(db.append, [item(body="1")])
        bad = pool.submit(db.append, [item(body=object())])  # cannot be bound: a bug upstream
        good2 = pool.submit(db.append, [item(body="2")])
    with pytest.raises(sqlite3.Error):
        bad.result(T)
    assert good1.result(T)[0].id < good2.result(T)[0].id
    assert [r.body for r in db.fetch("q", 0, 10)] == ["1", "2"]
    assert "append failed" in caplog.text


def test_on_commit_that_calls_the_store_does_not_deadlock(db, caplog):
    rows = db.append([item()], on_commit=lambda r: db.get([r[0].id]))
    assert len(rows) == 1 and "on_commit callback failed" in caplog.text
    assert db.get([rows[0].id]) == rows


def test_close_finishes_queued_writes(tmp_path):
    s = open_sqlite(tmp_path / "s.db")
    a, b = s.append([item(), item()])
    s.delete([a.id], wait=False)
    s.update([(b.id, 7, 5.0)])
    s.close()
    s = open_sqlite(tmp_path / "s.db")
    assert s.fetch("q", 0, 10) == [b._replace(attempts=7, not_before=5.0)]
    s.close()


# -- size cap and compaction -----------------------------------------------------------------

def fill_until_full(s, body):
    rows = []
    for _ in range(10_000):
        try:
            rows += s.append([item(body=body)])
        except StorageFull:
            return rows
    raise AssertionError("max_bytes never reached")


def test_max_bytes_refuses_appends_but_deletes_free_space(tmp_path, pool):
    s = open_sqlite(tmp_path / "s.db", max_bytes=256 * 1024)
    rows = fill_until_full(s, "x" * 1000)
    assert 100 < len(rows) < 300
    with pytest.raises(StorageFull, match="^store is full: .*messages already accepted are safe"):
        s.append([item(body="y" * 1000)])
    assert s.fetch("q", 0, 1000) == rows  # nothing lost or half-written
    # Acks free whole pages when they are contiguous, as the oldest messages go first.
    # (Scattered deletes leave half-empty pages that only rows of nearby ids could reuse.)
    half = len(rows) // 2
    assert s.delete([r.id for r in rows[:half]]) == half  # works at the cap
    more = s.append([item(body="z" * 1000) for _ in range(20)])
    assert more[0].id > rows[-1].id

    # In one group, only the op that does not fit fails.
    with stalled(s, pool, queued=3):
        big = pool.submit(s.append, [item(body="b" * 2_000_000)])
        dele = pool.submit(s.delete, [r.id for r in rows[half:]])
        small = pool.submit(s.append, [item(body="small")])
    with pytest.raises(StorageFull):
        big.result(T)
    assert dele.result(T) == len(rows) - half and small.result(T)[0].body == "small"
    s.close()
    s = open_sqlite(tmp_path / "s.db", max_bytes=256 * 1024)  # stays usable across restarts
    assert len(s.fetch("q", 0, 1000)) == 20 + 1  # more + small
    s.close()


def test_compaction_shrinks_file_after_most_rows_are_deleted(tmp_path):
    s = open_sqlite(tmp_path / "s.db")
    body = '"' + "x" * 3000 + '"'
    rows = []
    for _ in range(30):
        rows += s.append([item(body=body) for _ in range(100)])
    assert s.maybe_compact() is False  # nothing free yet
    full = s.size_on_disk()
    assert full > 8 * 1024 * 1024
    s.delete([r.id for r in rows[: int(len(rows) * 0.9)]])
    assert s.maybe_compact() is True
    assert s.size_on_disk() < full / 4
    assert s.fetch("q", 0, 10_000) == rows[int(len(rows) * 0.9):]
    assert s.maybe_compact() is False
    s.close()


# -- corruption and refusal ------------------------------------------------------------------

def make_store_file(path) -> bytes:
    s = open_sqlite(path)
    for _ in range(5):
        s.append([item(body='"' + "x" * 300 + '"') for _ in range(100)])
    s.close()
    return path.read_bytes()


def xor_page(data: bytes, page_size=4096) -> bytes:
    mid = len(data) // page_size // 2 * page_size
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + page_size]) + data[mid + page_size:]


CORRUPTIONS = {
    "truncated": lambda d: d[: len(d) // 2],
    "truncated_in_header": lambda d: d[:1],
    "garbage": lambda d: b"\x00not sqlite\n" * 1000,
    "bit_flipped_page": xor_page,
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_file_is_moved_aside_never_overwritten(tmp_path, kind):
    path = tmp_path / "s.db"
    bad = CORRUPTIONS[kind](make_store_file(path))
    path.write_bytes(bad)
    (tmp_path / "s.db-wal").write_bytes(b"wal bytes")  # siblings travel with the main file
    s = SqliteStore(str(path))
    with pytest.raises(StoreCorrupt) as err:
        s.open()
    s.close()  # safe after a failed open
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("s.db.corrupt-") and
                not p.name.endswith(("-wal", "-shm"))]
    assert aside.read_bytes() == bad
    assert Path(str(aside) + "-wal").read_bytes() == b"wal bytes"
    msg = str(err.value)
    assert f"moved aside to {aside}" in msg and f"sqlite3 {aside} .recover" in msg
    assert not path.exists() and not (tmp_path / "s.db-wal").exists()

    s = open_sqlite(path)  # the next start begins empty, next to the saved copy
    assert s.load_summary() == {}
    s.close()
    assert aside.read_bytes() == bad


def test_second_corruption_does_not_replace_the_first_saved_copy(tmp_path):
    path = tmp_path / "s.db"
    for n in range(2):
        path.write_bytes(b"garbage %d" % n * 50)
        with pytest.raises(StoreCorrupt):
            SqliteStore(str(path)).open()
    saved = sorted(p.read_bytes() for p in tmp_path.iterdir() if ".corrupt-" in p.name)
    assert saved == [b"garbage 0" * 50, b"garbage 1" * 50]


def test_newer_schema_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "s.db"
    make_store_file(path)
    with contextlib.closing(sqlite3.connect(path)) as c, c:
        c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    before = path.read_bytes()
    with pytest.raises(StoreCorrupt, match="schema version 99, newer"):
        SqliteStore(str(path)).open()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name] == []


def test_foreign_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as c, c:
        c.execute("CREATE TABLE precious (x)")
    with pytest.raises(ConfigError, match="not an ipcd store"):
        SqliteStore(str(path)).open()
    with contextlib.closing(sqlite3.connect(path)) as c:
        assert [r[0] for r in c.execute("SELECT name FROM sqlite_master")] == ["precious"]


def test_unopenable_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot open store"):
        SqliteStore(str(tmp_path / "missing-dir" / "s.db")).open()


def test_logger_is_used(tmp_path, caplog):
    log = logging.getLogger("test.store")
    path = tmp_path / "s.db"
    path.write_bytes(b"junk" * 100)
    with caplog.at_level(logging.ERROR, logger="test.store"), pytest.raises(StoreCorrupt):
        SqliteStore(str(path), logger=log).open()
    assert any(r.name == "test.store" for r in caplog.records)
