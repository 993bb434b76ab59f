"""Durability against a real daemon (issue 3): kill -9, SIGTERM, corrupt stores, a full
store/disk, durability modes, and storage that shrinks back.

Waits are bounded ("no hang" limits), never performance claims.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import drain as _drain
from ipcd import errors
from ipcd.store import SqliteStore

T = 15  # seconds: upper bound on any wait for the daemon or a child process
BENCH = Path(__file__).resolve().parents[2] / "bench" / "soak_kill9.py"


def _soak():
    """bench/soak_kill9.py as a module (bench/ is not a package)."""
    mod = sys.modules.get("soak_kill9")
    if mod is None:
        spec = importlib.util.spec_from_file_location("soak_kill9", BENCH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["soak_kill9"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return mod


def drain(c, queue, n=1000):
    return _drain(c, queue, n, attr="text")  # these tests compare the JSON texts


# -- 1. kill -9 while senders stream ----------------------------------------------------


def test_kill9_during_streaming_never_loses_an_acknowledged_message(make_daemon, tmp_path):
    """The bench/soak_kill9.py loop, 22 rounds: see its docstring for what a round checks."""
    soak = _soak()
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    d = make_daemon().start()
    total = soak.Tally()
    deadline = time.monotonic() + 50  # keep the test near a minute even on a slow machine
    for r in range(22):
        total.add(soak.run_round(d, r, tmp_path / f"r{r}", rng, senders=3, consumer=r % 2 == 0))
        assert not total.problems, f"seed={seed}: {total.problems}"
        if time.monotonic() > deadline and r >= 19:
            break
    assert total.rounds >= 20
    assert total.lost == 0 and total.invented == 0, f"seed={seed} {total.line()}"
    assert total.acked > 0 and total.delivered >= total.acked
    assert d.stderr().count("removing stale socket") >= total.rounds  # it really was killed


# -- 6. SIGTERM with messages queued and leased ------------------------------------------------


def test_sigterm_keeps_queued_and_leased_messages(make_daemon):
    d = make_daemon().start()
    c = d.client()
    ids = c.send_many("q", list(range(10)))
    held = c.recv_many("q", 4, timeout=T, lease=300)
    assert [m.body for m in held] == [0, 1, 2, 3]
    late = c.recv("q", timeout=T)
    late.nack(delay=0.5)
    st = c.stats("q")[0]
    assert (st["ready"], st["leased"], st["delayed"]) == (5, 4, 1), st
    d.signal(signal.SIGTERM)
    assert d.proc.wait(T) == 0
    c.close()

    d.start()
    with d.client() as c:
        st = c.stats("q")[0]
        assert st["leased"] == 0 and st["ready"] + st["delayed"] == 10, st
        got = c.recv_many("q", 100, timeout=T)
        assert [m.id for m in got][:4] == ids[:4]  # the once-leased ones are ready again
        rest = []
        while len(got) + len(rest) < 10:
            rest += c.recv_many("q", 100, timeout=T)
        assert sorted(m.body for m in got + rest) == list(range(10))
        # Leases live in memory: a delivery that was in flight at the stop is not counted.
        assert all(m.attempts >= 1 for m in got)
        c.ack(got + rest)
        assert c.recv("q", timeout=0.2) is None


def test_restart_after_a_clean_stop_uses_the_saved_counts_and_a_crash_recounts(make_daemon):
    d = make_daemon().start()
    with d.client() as c:
        c.send_many("q", [{"n": i, "pad": "é" * i} for i in range(40)])
        c.send_many("r", list(range(7)))
        held = c.recv_many("q", 6, timeout=T, lease=300)
        c.ack(held[:2])
        before = {s["name"]: (s["ready"] + s["leased"] + s["delayed"], s["bytes"]) for s in c.stats()}
    assert before == {"q": (38, before["q"][1]), "r": (7, before["r"][1])}
    assert d.stop() == 0
    summary_line = "queue counts taken from the summary saved at the last clean stop"

    d.start()
    assert d.stderr().count(summary_line) == 1
    with d.client() as c:
        after = {s["name"]: (s["ready"] + s["leased"] + s["delayed"], s["bytes"]) for s in c.stats()}
        assert after == before
        c.send("q", {"n": "late"})  # a write: the saved counts are stale from here on
    d.kill9()

    d.start()
    assert d.stderr().count(summary_line) == 1  # not used again: counted from the messages
    with d.client() as c:
        st = c.stats("q")[0]
        assert st["ready"] + st["leased"] + st["delayed"] == 39
        assert len(_drain(c, "q")) == 39


# -- 7. corrupt store ------------------------------------------------------------------------


def _fill(d, n=300, size=400):
    with d.client() as c:
        c.send_many("q", [f"{i}-" + "x" * size for i in range(n)])


def _aside_files(state_dir: Path) -> list[Path]:
    return sorted(p for p in state_dir.iterdir() if ".corrupt-" in p.name)


@pytest.mark.parametrize("damage", ["garbage_in_middle", "truncated", "header_only", "middle_with_wal"])
def test_corrupt_store_is_refused_moved_aside_and_preserved(make_daemon, damage):
    d = make_daemon().start()
    _fill(d)
    assert d.stop() == 0
    db = d.state_dir / "ipcd.db"
    wal = d.state_dir / "ipcd.db-wal"
    if damage == "middle_with_wal":  # crash with committed messages still only in the WAL
        d.start()
        with d.client() as c:
            c.send_many("q", ["after-%d" % i for i in range(50)])
        d.kill9()
        assert wal.exists() and wal.stat().st_size > 0
    data = bytearray(db.read_bytes())
    assert len(data) > 64 * 1024
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "header_only":
        data = data[:60]
    else:
        mid = (len(data) // 2) & ~4095
        data[mid: mid + 8192] = random.Random(1).randbytes(8192)
    db.write_bytes(bytes(data))
    wal_bytes = wal.read_bytes() if wal.exists() else None

    r = subprocess.run([sys.executable, "-m", "ipcd", "start"], env=d.env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0
    errs = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errs) == 1, r.stderr
    assert str(db) in errs[0] and "corrupt" in errs[0] and "Traceback" not in r.stderr
    asides = _aside_files(d.state_dir)
    main = [p for p in asides if not p.name.endswith(("-wal", "-shm"))]
    assert len(main) == 1 and str(main[0]) in errs[0], (asides, errs)
    assert main[0].read_bytes() == bytes(data)  # exactly the bytes we left, not "repaired"
    if wal_bytes is not None:
        assert Path(str(main[0]) + "-wal").read_bytes() == wal_bytes  # the WAL went aside too
    assert not db.exists()  # nothing written in its place by the failed start

    # The next start begins with an empty store and leaves the saved copy alone.
    d.start()
    with d.client() as c:
        assert c.recv("q", timeout=0.2) is None
        c.send("q", "new")
        assert drain(c, "q") == ['"new"']
    assert d.stop() == 0
    assert main[0].read_bytes() == bytes(data)
    assert _aside_files(d.state_dir) == asides


# -- 8. full store (max_store_bytes) and full disk (tmpfs) -------------------------------------------


def _body(i, size=2000):
    return json.dumps(f"{i:05d}-" + "x" * size)


def _fill_until_full(c, queue, size, limit=5000):
    """Send until StorageFull; return {id: text} of every send that was acknowledged."""
    acked = {}
    for i in range(limit):
        text = _body(i, size)
        try:
            (mid,) = c.send_json_many(queue, [text])
        except errors.StorageFull as e:
            assert "full" in str(e)
            return acked
        acked[mid] = text
    raise AssertionError(f"the store never filled up after {limit} messages")


def _check_full_store_behaviour(d, c, size, free_space=None):
    acked = _fill_until_full(c, "q", size)
    assert len(acked) >= 5

    # CLI: exit 75, one Error: line; and the refused message was not stored.
    r = d.cli("send", "q", _body(99_999, size))
    assert r.returncode == 75, r.stderr
    assert r.stderr.startswith("Error:") and "full" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(errors.StorageFull):
        c.send_json_many("q", [_body(99_998, size)])

    # Receiving, nacking and acking keep working at the limit.
    got = c.recv_many("q", 3, timeout=T)
    assert [m.id for m in got] == sorted(acked)[:3]
    assert c.nack(got[2:]) == 1
    assert c.ack(got[:2]) == 2
    consumed = [m.text for m in got[:2]]
    more = c.recv_many("q", 10, timeout=T)
    assert c.ack(more) == len(more) == 10
    consumed += [m.text for m in more]
    if free_space is not None:
        free_space()

    # With room again, sends work again.
    again = c.send_json_many("q", [_body(50_000 + k, size) for k in range(3)])
    assert len(again) == 3
    acked.update({i: _body(50_000 + k, size) for k, i in enumerate(again)})
    return acked, consumed


def test_store_size_limit_fails_sends_with_75_but_keeps_everything_acknowledged(make_daemon):
    d = make_daemon('max_store_bytes = "128KiB"').start()
    c = d.client()
    acked, consumed = _check_full_store_behaviour(d, c, 2000)
    c.close()
    # An over-quota store still opens after a restart, and nothing acknowledged is lost.
    assert d.stop() == 0
    d.start()
    with d.client() as c:
        rest = drain(c, "q")
    assert sorted(consumed + rest) == sorted(acked.values())  # all delivered, none invented
    assert len(set(consumed + rest)) == len(consumed + rest)
    assert "append failed" in d.stderr() or "full" in d.stderr()


def _mount_tmpfs(where: Path, size: str):
    where.mkdir(mode=0o700, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")


def _umount(where: Path):
    r = subprocess.run(["umount", str(where)], capture_output=True, timeout=30)
    if r.returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def test_real_disk_full_on_a_small_tmpfs(make_daemon):
    d = make_daemon()
    _mount_tmpfs(d.state_dir, "2m")  # the whole state dir (store, WAL, authkey) on 2 MiB
    try:
        d.start()
        c = d.client()

        def grow():  # "free space": give the filesystem room again
            subprocess.run(["mount", "-o", "remount,size=8m", str(d.state_dir)], check=True, timeout=30)

        acked, consumed = _check_full_store_behaviour(d, c, 4000, free_space=grow)
        c.close()
        assert d.stop() == 0
        d.start()
        with d.client() as c:
            rest = drain(c, "q")
        assert sorted(consumed + rest) == sorted(acked.values())
    finally:
        d.cleanup()
        _umount(d.state_dir)


def test_store_keeps_a_disk_reserve_for_acks(tmp_path, monkeypatch):
    """Store level, so it runs without root: the tmpfs test above is the real thing."""
    import ipcd.store as storemod

    real = os.statvfs
    free = {"bytes": None}  # None: the real filesystem

    def fake_statvfs(path):
        st = real(path)
        if free["bytes"] is None:
            return st
        return os.statvfs_result((st.f_bsize, 4096, 1 << 20, 0, free["bytes"] // 4096, *st[5:]))

    monkeypatch.setattr(storemod.os, "statvfs", fake_statvfs)
    s = SqliteStore(str(tmp_path / "s.db"))
    s.open()
    try:
        rows = s.append([("q", '"a"', time.time(), 0, 0.0, None)] * 3)
        free["bytes"] = s.disk_reserve + 4096  # 4 GiB filesystem, just over the reserve free
        s._room_until = 0.0  # the store re-checks free space at most once a second: now
        with pytest.raises(errors.StorageFull, match="kept for acks"):
            s.append([("q", json.dumps("x" * 10_000), time.time(), 0, 0.0, None)])
        assert s.delete([rows[0].id]) == 1  # deletes, updates and moves are never refused
        s.update([(rows[1].id, 2, 0.0)], wait=True)
        assert [r.id for r in s.move([rows[1].id], "q.dead", reason="r", reset_attempts=False)] == [rows[1].id]
        free["bytes"] = None
        s.append([("q", '"b"', time.time(), 0, 0.0, None)])
        assert [r.body for r in s.fetch("q", 0, 10)] == ['"a"', '"b"']
    finally:
        s.close()


# -- 10. durability modes ----------------------------------------------------------------------

MODES = """
[queues.f]
durability = "fsync"
[queues.m]
durability = "memory"
"""


def test_fsync_durability_round_trip_survives_kill9(make_daemon):
    d = make_daemon(MODES).start()
    with d.client() as c:
        c.send_many("f", [f"f{i}" for i in range(20)])
        got = c.recv_many("f", 5, timeout=T)
        assert c.ack(got) == 5
        assert c.stats("f")[0]["durability"] == "fsync"
    d.kill9()
    d.start()
    with d.client() as c:
        assert drain(c, "f") == [json.dumps(f"f{i}") for i in range(5, 20)]


def test_memory_durability_is_lossy_across_restart_while_os_keeps(make_daemon):
    d = make_daemon(MODES).start()
    with d.client() as c:
        c.send_many("m", ["m1", "m2", "m3"])
        c.send_many("o", ["o1", "o2", "o3"])
        m = c.recv("m", timeout=T)
        assert m.body == "m1" and c.stats("m")[0]["durability"] == "memory"
        m.ack()  # a memory queue works like any other while the daemon runs
    assert d.stop() == 0
    d.start()
    with d.client() as c:
        assert c.recv("m", timeout=0.3) is None  # documented: memory queues are lost on restart
        assert drain(c, "o") == ['"o1"', '"o2"', '"o3"']
    assert d.cli("recv", "m", "--timeout", "0.2").returncode == 75


# -- 11. storage stays proportional to what is queued -----------------------------------------------


def test_acked_space_is_reused_by_the_daemon(make_daemon):
    d = make_daemon().start()
    body = "x" * 1000
    sizes = []
    with d.client() as c:
        for _cycle in range(2):
            for _ in range(10):
                c.send_many("q", [body] * 1000)
            while True:
                msgs = c.recv_many("q", 5000, timeout=0.2)
                if not msgs:
                    break
                c.ack(msgs)
            assert c.stats("q")[0]["ready"] == 0
            sizes.append(c.status()["store_bytes"])
    # Without reuse the second 10k messages would double the file; allow WAL jitter.
    assert sizes[1] < sizes[0] * 1.5 + (4 << 20), sizes


def test_store_shrinks_after_acked_messages_are_compacted(tmp_path):
    """Compaction is SqliteStore.maybe_compact(); the daemon calls it from its main loop
    once a minute, so this tests it at the store level rather than waiting that long."""
    s = SqliteStore(str(tmp_path / "s.db"))
    s.open()
    try:
        body = json.dumps("x" * 1000)
        ids = []
        for _ in range(40):
            ids += [r.id for r in s.append([("q", body, time.time(), 0, 0.0, None)] * 500)]
        assert len(ids) == 20_000
        full = s.size_on_disk()
        assert full > 20_000 * 1000
        keep = ids[-10:]
        for k in range(0, len(ids) - 10, 1000):
            s.delete(ids[k: min(k + 1000, len(ids) - 10)])
        assert s.maybe_compact() is True
        small = s.size_on_disk()
        assert small < full // 10, (full, small)
        assert s.maybe_compact() is False  # nothing left to reclaim
        assert [r.id for r in s.fetch("q", 0, 100)] == keep
        s.append([("q", body, time.time(), 0, 0.0, None)] * 10)
    finally:
        s.close()
    s = SqliteStore(str(tmp_path / "s.db"))
    s.open()
    try:
        assert len(s.fetch("q", 0, 100)) == 20
        assert s.size_on_disk() < full // 10
    finally:
        s.close()
