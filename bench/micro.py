#!/usr/bin/env python3
"""Micro-costs behind the hot spots in bench/RESULTS.md (one process, no daemon).

    .venv/bin/python bench/micro.py

Each line: median of 5 repetitions, per operation, wall time (and CPU where
it differs).  These isolate the mechanisms the profiles point at: the store
thread's future hand-off, one SQLite transaction per operation, the per-call
json decoder, the restricted unpickler, namedtuple rebuilding, statvfs.
The first lines price the features every message pays for: history for
`ipcd tail`, leases, stats counters (time per message and memory).
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections import namedtuple
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import _dumps, make_body  # noqa: E402

BODY = _dumps(make_body(7))


def bench(fn, n, reps=5):
    """median seconds per op of fn(n) (fn runs n ops), wall and process CPU."""
    walls, cpus = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn(n)
        walls.append((time.perf_counter() - t0) / n)
        cpus.append((time.process_time() - c0) / n)
    return statistics.median(walls), statistics.median(cpus)


def show(name, res):
    wall, cpu = res
    print(f"{name:72} {wall * 1e6:8.2f} us wall {cpu * 1e6:8.2f} us CPU")


# -- thread hand-off: the store's _submit/_run pattern -------------------------------------


class Op:
    __slots__ = ("done", "result")

    def __init__(self):
        self.done = threading.Event()
        self.result = None


def handoff(n):
    q = queue.SimpleQueue()

    def worker():
        while True:
            op = q.get()
            if op is None:
                return
            op.result = 1
            op.done.set()
    t = threading.Thread(target=worker)
    t.start()
    for _ in range(n):
        op = Op()
        q.put(op)
        op.done.wait()
    q.put(None)
    t.join()


def direct_call(n):
    lock = threading.Lock()
    for _ in range(n):
        with lock:
            op = Op()
            op.result = 1


# -- SQLite: one transaction per op vs grouped ----------------------------------------------


def sqlite_conn(path):
    c = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=NORMAL")
    c.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, "
              "body TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, enqueued_at REAL NOT NULL, "
              "not_before REAL NOT NULL DEFAULT 0, reason TEXT)")
    c.execute("CREATE INDEX IF NOT EXISTS messages_queue_id ON messages (queue, id)")
    return c


INSERT = ("INSERT INTO messages (queue, body, attempts, enqueued_at, not_before, reason) "
          "VALUES (?, ?, ?, ?, ?, ?)")


def insert_then_delete(c, row):
    """One unbatched message as the first store did it: an INSERT txn, then a DELETE txn."""
    c.execute("BEGIN IMMEDIATE")
    rid = c.execute(INSERT, row).lastrowid
    c.execute("COMMIT")
    c.execute("BEGIN IMMEDIATE")
    c.execute("DELETE FROM messages WHERE id = ?", (rid,))
    c.execute("COMMIT")


def sqlite_suite(tmp: Path):
    c = sqlite_conn(str(tmp / "m.db"))
    row = ("q", BODY, 0, time.time(), 0.0, None)

    def insert_txn(n):
        for _ in range(n):
            c.execute("BEGIN IMMEDIATE")
            c.execute(INSERT, row)
            c.execute("COMMIT")

    def insert_delete_txn(n):  # what one unbatched message costs the store today: 2 transactions
        for _ in range(n):
            insert_then_delete(c, row)

    def insert_delete_one_txn(n):  # ack of the previous message rides in the next append's transaction
        prev = None
        for _ in range(n):
            c.execute("BEGIN IMMEDIATE")
            if prev is not None:
                c.execute("DELETE FROM messages WHERE id = ?", (prev,))
            prev = c.execute(INSERT, row).lastrowid
            c.execute("COMMIT")

    def batch100_execute_loop(n):  # per message; batches of 100, one execute() per row
        for _ in range(n // 100):
            c.execute("BEGIN IMMEDIATE")
            cur = c.cursor()
            for _ in range(100):
                cur.execute(INSERT, row)
                cur.lastrowid
            c.execute("COMMIT")

    def batch100_executemany(n):
        rows = [row] * 100
        for _ in range(n // 100):
            c.execute("BEGIN IMMEDIATE")
            cur = c.cursor()
            cur.executemany(INSERT, rows)
            cur.lastrowid  # ids are lastrowid-99 .. lastrowid: one writer, one transaction
            c.execute("COMMIT")

    show("sqlite: 1 row INSERT in its own transaction (WAL, synchronous=NORMAL)", bench(insert_txn, 3000))
    show("sqlite: INSERT txn + DELETE txn (one unbatched message today)", bench(insert_delete_txn, 2000))
    show("sqlite: INSERT + previous DELETE in one transaction", bench(insert_delete_one_txn, 2000))
    show("sqlite: batch of 100, execute() per row, per message", bench(batch100_execute_loop, 20000))
    show("sqlite: batch of 100, executemany, per message", bench(batch100_executemany, 20000))

    multi = INSERT.replace("VALUES (?, ?, ?, ?, ?, ?)", "VALUES " + ",".join(["(?, ?, ?, ?, ?, ?)"] * 100))

    def batch100_insert_delete(n, insert_multi, delete_range):
        """What the store does per batch today (multi-row INSERT, range DELETE) vs before."""
        cur = c.cursor()
        for _ in range(n // 100):
            c.execute("BEGIN IMMEDIATE")
            if insert_multi:
                cur.execute(multi, [v for _ in range(100) for v in row])
            else:
                cur.executemany(INSERT, [row] * 100)
            last = cur.execute("SELECT last_insert_rowid()").fetchone()[0]
            if delete_range:
                cur.execute("DELETE FROM messages WHERE id BETWEEN ? AND ?", (last - 99, last))
            else:
                cur.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in range(last - 99, last + 1)])
            c.execute("COMMIT")
    for ins, dele, what in ((False, False, "executemany INSERT + DELETE per id (before)"),
                            (True, False, "multi-row INSERT + DELETE per id"),
                            (True, True, "multi-row INSERT + range DELETE (store_file today)")):
        show(f"sqlite: batch of 100 inserted and deleted, {what}, per message",
             bench(lambda n, i=ins, d=dele: batch100_insert_delete(n, i, d), 20000))
    c.execute("PRAGMA synchronous=FULL")
    show("sqlite: 1 row INSERT in its own transaction, synchronous=FULL", bench(insert_txn, 1000))
    c.execute("PRAGMA synchronous=NORMAL")
    c.close()
    wal_amplification(tmp)
    checkpoint_tail(tmp)


def wal_amplification(tmp: Path):
    """WAL bytes appended per unbatched message (insert txn + delete txn), checkpoints off."""
    for autoinc in (True, False):
        path = tmp / f"w{int(autoinc)}.db"
        c = sqlite3.connect(str(path), isolation_level=None)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        c.execute("PRAGMA wal_autocheckpoint=0")
        c.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY" + (" AUTOINCREMENT" if autoinc else "")
                  + ", queue TEXT NOT NULL, body TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, "
                  "enqueued_at REAL NOT NULL, not_before REAL NOT NULL DEFAULT 0, reason TEXT)")
        c.execute("CREATE INDEX messages_queue_id ON messages (queue, id)")
        row = ("q", BODY, 0, time.time(), 0.0, None)
        wal = Path(str(path) + "-wal")
        before = wal.stat().st_size
        n = 2000
        for _ in range(n):
            insert_then_delete(c, row)
        per = (wal.stat().st_size - before) / n
        print(f"{'sqlite WAL bytes per unbatched message (insert txn + delete txn), ' + ('AUTOINCREMENT' if autoinc else 'plain INTEGER PRIMARY KEY'):72} "
              f"{per:8.0f} B   (~{per / 4120:.1f} pages of 4 KiB; body is 100 B)")
        c.close()


def checkpoint_tail(tmp: Path):
    """Latency tail of single-row transactions: automatic checkpoints land on some commits."""
    for auto in (1000, 0):
        c = sqlite_conn(str(tmp / f"ck{auto}.db"))
        c.execute(f"PRAGMA wal_autocheckpoint={auto}")
        row = ("q", BODY, 0, time.time(), 0.0, None)
        lat = []
        for _ in range(6000):
            t = time.perf_counter()
            insert_then_delete(c, row)
            lat.append(time.perf_counter() - t)
        lat.sort()
        q = lambda p: lat[int(p / 100 * (len(lat) - 1))] * 1e6  # noqa: E731
        print(f"{'sqlite insert+delete txns, wal_autocheckpoint=' + str(auto) + ': p50 / p99 / p99.9 / max':72} "
              f"{q(50):8.1f} / {q(99):.1f} / {q(99.9):.1f} / {lat[-1] * 1e6:.0f} us")
        c.close()


# -- per-message Python costs ----------------------------------------------------------------


def _reject(name):
    raise ValueError(name)


def json_kw(n):
    for _ in range(n):
        json.loads(BODY, parse_constant=_reject)


_DEC = json.JSONDecoder(parse_constant=_reject)


def json_prebuilt(n):
    for _ in range(n):
        _DEC.decode(BODY)


def json_plain(n):
    for _ in range(n):
        json.loads(BODY)


Row = namedtuple("Row", "id queue body attempts enqueued_at not_before reason")


def row_twice(n):  # _new_rows() then _replace(id=...), as store._w_append does
    for i in range(n):
        r = Row(0, "q", BODY, 0, 1.0, 0.0, None)
        r = r._replace(id=i)


def row_once(n):
    for i in range(n):
        Row(i, "q", BODY, 0, 1.0, 0.0, None)


def statvfs(n):
    for _ in range(n):
        os.statvfs("/tmp")


# -- what features cost per message and in memory (issue 7: "keep feature costs honest") ---


def _feature_hub(tmp: Path, history: int):
    from ipcd import config as configmod
    from ipcd.hub import Hub
    from ipcd.memstore import MemoryStore

    cfg = tmp / f"h{history}.toml"
    cfg.write_text(f'address = "{tmp}/s"\nstate_dir = "{tmp}/st"\n[defaults]\nhistory = {history}\n'
                   'max_messages = 10000000\n')
    mem = MemoryStore()
    mem.open()
    hub = Hub(configmod.load(str(cfg), env={}), {"os": mem, "fsync": mem, "memory": mem})
    hub.open()
    return hub


def _traced(fn):
    """Bytes still allocated after fn() returns (tracemalloc), and fn's result."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    result = fn()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before, result


def feature_costs(tmp: Path):
    from ipcd.store import Row
    from ipcd.watch import History, Rates

    # History for `ipcd tail`: one record() per committed message, ring full (default 1000).
    rows = [[Row(i, "q", BODY, 0, 0.0, 0.0, None)] for i in range(1000)]
    for keep in (1000, 0):
        hist = History(lambda name, keep=keep: keep)
        for r in rows:
            hist.record("q", r)
        show(f"tail history: History.record of one message, history = {keep}",
             bench(lambda n: [hist.record("q", rows[i % 1000]) for i in range(n)], 50000))
    hist = History(lambda name: 1000)
    fresh = [[Row(i, "q", BODY + " " * (i % 7), 0, 0.0, 0.0, None)] for i in range(1000)]
    size, _ = _traced(lambda: [hist.record("q", r) for r in fresh])
    print(f"{'tail history memory: 1000 kept messages, one queue (bodies shared with the rows)':72} "
          f"{size / 1000:8.0f} B/message {size / 1024:8.0f} KiB/queue")

    # Leases: deliver + ack through the Hub, memory store (no SQLite), one message each.
    hub = _feature_hub(tmp, 0)
    for _ in range(6):
        hub.put_many("L", [BODY] * 10000)

    def deliver_ack(n):
        for _ in range(n):
            d = hub.get_many("L", 1, timeout=0)[0]
            hub.ack("L", [(d[0], d[1])])
    show("lease: get_many(1) + ack through Hub (memory store: the whole receive path)", bench(deliver_ack, 10000))
    hub2 = _feature_hub(tmp, 0)
    hub2.put_many("N", [BODY] * 10000)

    def lease_all():
        while hub2.get_many("N", 10000, timeout=0):  # the ready window refills 512 at a time
            pass
    lease_bytes, _ = _traced(lease_all)
    leased = len(hub2.queue("N").leases)
    print(f"{'lease memory: an outstanding delivery (Lease, heap entry, its Row) less the ready entry':72} "
          f"{lease_bytes / leased:8.0f} B/lease  ({leased:,} leased; plus the body, held until the ack)")

    # Stats counters: a dict increment per op; Rates.sample once a second copies 4 counters per queue.
    hub3 = _feature_hub(tmp, 0)
    for i in range(1000):
        hub3.queue(f"q{i}")
    rates = Rates()

    def sample(n):
        for _ in range(n):
            rates._last = None  # force a sample each call
            rates.sample(hub3._queues)
    wall, cpu = bench(sample, 50)
    print(f"{'stats: Rates.sample of 1000 queues (runs once a second)':72} {wall * 1e3:8.2f} ms wall "
          f"{cpu * 1e3:8.2f} ms CPU  = {cpu * 1e6 / 1000:.2f} us per queue per second")


# -- the daemon's own work per batched message (issue 7, round 3) --------------------------


def batch_path(tmp: Path):
    """The session loop's work for batches of 100, minus sockets: decode the put_many request,
    validate and store 100 messages (commit included), then decode get_many with the previous
    batch's acks, settle them, lease 100 and encode the reply.  CPU per message, store thread
    included; memory and "os" queues."""
    from ipcd import config as configmod, wire
    from ipcd.hub import Hub
    from ipcd.memstore import MemoryStore
    from ipcd.store import SqliteStore

    (tmp / "st").mkdir()
    cfg = tmp / "bp.toml"
    cfg.write_text(f'address = "{tmp}/s"\nstate_dir = "{tmp}/st"\n[defaults]\nmax_messages = 10000000\n'
                   '[queues.m]\ndurability = "memory"\n[queues.o]\ndurability = "os"\n')
    sq = SqliteStore(str(tmp / "st" / "bp.db"))
    sq.open()
    mem = MemoryStore()
    mem.open()
    hub = Hub(configmod.load(str(cfg), env={}), {"os": sq, "fsync": sq, "memory": mem})
    hub.open()
    bodies = [_dumps(make_body(i)) for i in range(100)]
    try:
        for name, store in (("m", mem), ("o", sq)):
            q, prev, out = hub.queue(name), [], []
            put = wire.dumps(("put_many", {"queue": name, "bodies": bodies, "timeout": None}))

            def rounds(n):
                nonlocal prev
                for _ in range(n // 100):
                    b = wire.loads(put)[1]["bodies"]
                    k, total = q.admit(b)
                    q.try_reserve(k, total)
                    q.append_reserved(b, k, total, done=lambda ids, e: out.append(ids))
                    store.flush()
                    while not out:  # the store thread may have taken the group
                        time.sleep(0)
                    wire.dumps(("ok", out.pop()))
                    get = wire.dumps(("get_many", {"queue": name, "max_n": 100, "timeout": None, "lease": None,
                                                   "ack": [(d[0], d[1]) for d in prev]}))
                    acks = wire.loads(get)[1]["ack"]
                    if acks:
                        q.ack(acks)
                    prev = q.try_get(100, None)
                    store.flush()
                    wire.dumps(("ok", [tuple(d) for d in prev]))
            what = "memory" if name == "m" else '"os" (SQLite)'
            show(f"daemon work per message, batches of 100, {what} queue (no sockets)", bench(rounds, 30000, reps=9))
    finally:
        hub.stop()
        sq.close()


def main():
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPU")
    with tempfile.TemporaryDirectory(prefix="ipcd-m-", dir="/tmp") as tmp:
        batch_path(Path(tmp))
    with tempfile.TemporaryDirectory(prefix="ipcd-m-", dir="/tmp") as tmp:
        feature_costs(Path(tmp))
    show("thread hand-off: SimpleQueue.put + Event.wait, worker sets (store._submit)", bench(handoff, 5000))
    show("same work called directly under a lock (no thread)", bench(direct_call, 50000))
    with tempfile.TemporaryDirectory(prefix="ipcd-m-", dir="/tmp") as tmp:
        sqlite_suite(Path(tmp))
    show("json.loads(body, parse_constant=f): builds a JSONDecoder per call", bench(json_kw, 50000))
    show("prebuilt JSONDecoder(parse_constant=f).decode(body)", bench(json_prebuilt, 50000))
    show("json.loads(body) (cached default decoder)", bench(json_plain, 50000))
    from ipcd.queues import _SCAN, validate_bodies
    show("the C scanner under the decoder, called directly (queues._SCAN)",
         bench(lambda n: [_SCAN(BODY, 0) for _ in range(n)], 50000))
    batch = [BODY] * 100
    show("validate_bodies, batch of 100, per message (size + JSON checks)",
         bench(lambda n: [validate_bodies(batch, 1 << 20) for _ in range(n // 100)], 50000))
    req = ("put_many", {"queue": "q", "bodies": [BODY], "timeout": None})
    data = pickle.dumps(req, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        from ipcd import wire

        show("wire.loads (restricted unpickler) of a 1-message put_many request",
             bench(lambda n: [wire.loads(data) for _ in range(n)], 50000))
    except Exception as e:  # noqa: BLE001 - src changes under us
        print(f"wire.loads: skipped ({e})")
    show("pickle.loads of the same request", bench(lambda n: [pickle.loads(data) for _ in range(n)], 50000))
    show("Row built then _replace(id=...) (store._new_rows + _w_append)", bench(row_twice, 50000))
    show("Row built once with its id", bench(row_once, 50000))
    show("os.statvfs (per append in SqliteStore._disk_has_room)", bench(statvfs, 20000))


if __name__ == "__main__":
    main()
