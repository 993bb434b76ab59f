"""Queue/Hub logic on the in-memory store, with injected clocks (no daemon, no sockets)."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest
from hypothesis import given, settings, strategies as st

from ipcd import config as configmod, errors
from ipcd.hub import Hub
from ipcd.queues import PREFETCH, validate_bodies, validate_body
from ipcd.memstore import MemoryStore
from ipcd.store import SqliteStore


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make_hub(tmp_path, toml="", durable=False):
    p = tmp_path / "c.toml"
    p.write_text(f'address = "{tmp_path}/s"\nstate_dir = "{tmp_path}/st"\n{toml}\n')
    cfg = configmod.load(str(p), env={})
    mem = MemoryStore()
    mem.open()
    stores = {"os": mem, "fsync": mem, "memory": mem}
    if durable:
        sq = SqliteStore(str(tmp_path / "q.db"))
        sq.open()
        stores.update(os=sq, fsync=sq)
    clock, wall = Clock(), Clock()
    hub = Hub(cfg, stores, clock=clock, wall=wall)
    hub.open()
    return hub, clock, wall


def bodies(n, start=0):
    return [json.dumps({"n": i}) for i in range(start, start + n)]


def test_fifo_and_leases(tmp_path):
    hub, clock, wall = make_hub(tmp_path)
    hub.put_many("q", bodies(5))
    got = hub.get_many("q", 3, timeout=0)
    assert [json.loads(d[2])["n"] for d in got] == [0, 1, 2]
    assert all(d[3] == 1 for d in got)  # attempts
    hub.ack("q", [(got[0][0], got[0][1])])
    hub.nack("q", [(got[1][0], got[1][1])])
    # The nacked message goes back to the front, before 3 and 4.
    nxt = hub.get_many("q", 10, timeout=0)
    assert [json.loads(d[2])["n"] for d in nxt] == [1, 3, 4]
    assert nxt[0][3] == 2


def test_expired_lease_redelivers_and_stale_ack_is_refused(tmp_path):
    hub, clock, wall = make_hub(tmp_path, "[defaults]\nlease_seconds = 10\n")
    hub.put_many("q", bodies(1))
    first = hub.get_many("q", 1, timeout=0)[0]
    clock.t += 11
    hub.tick()
    second = hub.get_many("q", 1, timeout=0)[0]
    assert second[0] == first[0] and second[3] == 2 and second[1] != first[1]
    with pytest.raises(errors.LeaseExpired):
        hub.ack("q", [(first[0], first[1])])
    assert hub.ack("q", [(second[0], second[1])]) == 1


def test_touch_extends_lease(tmp_path):
    hub, clock, wall = make_hub(tmp_path, "[defaults]\nlease_seconds = 10\n")
    hub.put_many("q", bodies(1))
    d = hub.get_many("q", 1, timeout=0)[0]
    clock.t += 8
    hub.touch("q", [(d[0], d[1])], 10)
    clock.t += 8
    hub.tick()
    assert hub.get_many("q", 1, timeout=0) == []  # still leased
    assert hub.ack("q", [(d[0], d[1])]) == 1


def test_max_attempts_dead_letters_and_replay(tmp_path):
    hub, clock, wall = make_hub(tmp_path, "[defaults]\nmax_attempts = 2\n")
    hub.put_many("p", bodies(1))
    for _ in range(2):
        d = hub.get_many("p", 1, timeout=0)[0]
        hub.nack("p", [(d[0], d[1])], reason="boom")
    assert hub.get_many("p", 1, timeout=0) == []
    dead = hub.dead_list("p")
    assert len(dead) == 1 and "boom" in dead[0][4]
    assert hub.stats("p")[0]["ready"] == 0
    assert hub.dead_replay("p", all=True)["replayed"] == 1
    d = hub.get_many("p", 1, timeout=0)[0]
    assert d[3] == 1  # attempts reset


def test_nack_delay_holds_message_back(tmp_path):
    hub, clock, wall = make_hub(tmp_path)
    hub.put_many("q", bodies(1))
    d = hub.get_many("q", 1, timeout=0)[0]
    hub.nack("q", [(d[0], d[1])], delay=30)
    assert hub.get_many("q", 1, timeout=0) == []
    wall.t += 31
    clock.t += 31
    hub.tick()
    assert len(hub.get_many("q", 1, timeout=0)) == 1


def test_bounds_reject_and_block(tmp_path):
    hub, clock, wall = make_hub(tmp_path, '[queues.r]\nmax_messages = 2\noverflow = "reject"\n'
                                          '[queues.b]\nmax_messages = 1\n')
    hub.put_many("r", bodies(2))
    with pytest.raises(errors.QueueFull):
        hub.put_many("r", bodies(1))
    hub.put_many("b", bodies(1))
    with pytest.raises(errors.QueueFull):
        hub.put_many("b", bodies(1), timeout=0)
    done = []
    t = threading.Thread(target=lambda: done.append(hub.put_many("b", bodies(1), timeout=30)))
    t.start()
    d = hub.get_many("b", 1, timeout=0)[0]
    hub.ack("b", [(d[0], d[1])])
    t.join(10)
    assert done and len(done[0]) == 1


def test_validate_body():
    assert validate_body('{"a": "ü"}', 100) == len('{"a": "ü"}'.encode())
    for bad in ("{", "NaN", "[Infinity]", b"{}", "\ud800"):
        with pytest.raises(errors.DataError):
            validate_body(bad, 100)
    with pytest.raises(errors.DataError, match="max_message_bytes"):
        validate_body(json.dumps("x" * 200), 100)


def test_validate_body_refuses_deep_nesting_as_data():
    # json's decoder recurses per level: RecursionError used to escape as an internal error
    with pytest.raises(errors.DataError, match="nested too deeply"):
        validate_body("[" * 100_000 + "]" * 100_000, 1 << 20)


def _verdict(fn, *args):
    try:
        return fn(*args)
    except errors.DataError as e:
        return str(e)


JSONISH = st.text(alphabet=' \t\n{}[]",:0123456789.eE+-truefalsnNaIiy\\u\x7fü\ud800', max_size=24)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(JSONISH, st.from_regex(r'\A\{"k": ?"[a-z]{0,9}"\}\Z'), st.binary(max_size=4),
                          st.integers()), min_size=1, max_size=4),
       st.integers(min_value=1, max_value=20))
def test_validate_bodies_fast_path_agrees_with_validate_body(batch, limit):
    """The batch fast path accepts and refuses exactly what validate_body does, same error."""
    one = len(batch) == 1
    try:
        expected = sum(validate_body(b, limit, None if one else i) for i, b in enumerate(batch))
    except errors.DataError as e:
        expected = str(e)
    assert _verdict(validate_bodies, batch, limit) == expected


def test_depth_beyond_prefetch_window_is_served_from_the_store_in_order(tmp_path):
    hub, clock, wall = make_hub(tmp_path, durable=True)
    total = PREFETCH * 3 + 7
    for i in range(0, total, 500):
        hub.put_many("deep", bodies(min(500, total - i), i))
    q = hub.queue("deep")
    assert len(q.ready) <= PREFETCH  # only a window lives in memory
    seen = []
    while True:
        got = hub.get_many("deep", 1000, timeout=0)
        if not got:
            break
        seen += [json.loads(d[2])["n"] for d in got]
        hub.ack("deep", [(d[0], d[1]) for d in got])
    assert seen == list(range(total))
    for s in set(hub.stores.values()):
        s.close()


def test_stop_wakes_blocked_receivers(tmp_path):
    hub, clock, wall = make_hub(tmp_path)
    errs = []

    def waiter():
        try:
            hub.get_many("q", 1, timeout=60)
        except errors.Unavailable as e:
            errs.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    while hub.queue("q").waiting == 0:
        t.join(0.01)
    hub.stop()
    t.join(10)
    assert not t.is_alive() and errs and "stopping" in str(errs[0])


def test_server_side_validation_of_arguments(tmp_path):
    hub, clock, wall = make_hub(tmp_path)
    with pytest.raises(errors.DataError):
        hub.get_many("q", max_n=0)
    with pytest.raises(errors.DataError):
        hub.get_many("q", max_n=10**9)
    with pytest.raises(errors.DataError):
        hub.get_many("q", timeout=-1)
    with pytest.raises(errors.DataError):
        hub.put_many("bad name", bodies(1))
    with pytest.raises(errors.DataError):
        hub.put_many("q", "not a list")
    with pytest.raises(errors.DataError):
        hub.ack("q", [("x", "y", "z")])


def test_get_many_reply_stays_within_the_frame_budget(tmp_path):
    hub, clock, wall = make_hub(tmp_path, 'max_request_bytes = "64KiB"\n[defaults]\nmax_message_bytes = "16KiB"\n')
    hub.put_many("big", [json.dumps("x" * 5000)] * 20)
    got = hub.get_many("big", 100, timeout=0)
    assert 1 <= len(got) < 20
    assert sum(len(d[2]) for d in got) <= hub.reply_budget
    rest = hub.get_many("big", 100, timeout=0)
    assert len(got) + len(rest) <= 20 and rest  # the remainder comes in later replies


def test_settle_after_a_concurrent_purge_does_not_resurrect_the_message(tmp_path):
    # A lease expiry or nack takes its rows under the lock and settles them after releasing
    # it; a purge in that gap deleted the rows, so settling must not put them back.
    hub, clock, wall = make_hub(tmp_path)
    hub.put_many("q", bodies(1))
    hub.get_many("q", 1, timeout=0)
    q = hub.queue("q")
    with q.lock:
        epoch = q.purge_epoch
        row = next(iter(q.leases.values())).row
        del q.leases[row.id]
    assert hub.purge("q") == 1
    q._settle([row], 0.0, "lease expired", epoch)
    assert hub.get_many("q", 1, timeout=0) == []
    assert hub.stats("q")[0]["ready"] == 0


def _counts(hub):
    return {s["name"]: (s["ready"] + s["leased"] + s["delayed"], s["bytes"]) for s in hub.stats()}


def test_clean_close_saves_a_summary_the_next_open_uses_once(tmp_path):
    toml = "[queues.p]\nmax_attempts = 1\n"
    hub, clock, wall = make_hub(tmp_path, toml, durable=True)
    store = hub.stores["os"]
    hub.put_many("a", bodies(30))
    hub.put_many("b", [json.dumps("é" * 50)] * 3)  # bytes are UTF-8 bytes, not characters
    got = hub.get_many("a", 5, timeout=0)
    hub.ack("a", [(d[0], d[1]) for d in got[:2]])  # 3 stay leased
    hub.nack("a", [(got[2][0], got[2][1])], delay=60)  # 1 delayed
    hub.put_many("p", bodies(2))
    poison = hub.get_many("p", 1, timeout=0)[0]
    hub.nack("p", [(poison[0], poison[1])])  # dead-lettered to p.dead
    hub.put_many("gone", bodies(4))
    hub.purge("gone")
    before = {k: v for k, v in _counts(hub).items() if v[0]}
    scanned = store.load_summary()  # the full count, for comparison
    assert {k: v[:2] for k, v in scanned.items()} == before
    store.close()  # saves the summary

    reopened = SqliteStore(str(tmp_path / "q.db"))
    reopened.open()
    assert reopened._summary is not None and reopened._summary_in_db
    saved = reopened.load_summary()
    assert {k: v[:2] for k, v in saved.items()} == before
    assert all(saved[k][2] >= scanned[k][2] for k in saved)  # highest id: an upper bound is enough
    assert reopened._summary is None  # used once: the next call counts
    assert {k: v[:2] for k, v in reopened.load_summary().items()} == before
    reopened.append([("a", '"new"', 0.0, 0, 0.0, None)])
    assert not reopened._summary_in_db  # the first write removed it, in its own transaction
    reopened.close()  # no summary_source (no hub): nothing saved

    third = SqliteStore(str(tmp_path / "q.db"))
    third.open()
    assert third._summary is None  # as after a crash: counted from the messages
    third.close()


def test_a_failed_write_means_no_summary_at_close(tmp_path):
    hub, clock, wall = make_hub(tmp_path, durable=True)
    store = hub.stores["os"]
    hub.put_many("a", bodies(3))
    with pytest.raises(sqlite3.Error):  # a write that fails (here: an id SQLite cannot bind)
        store.delete([object()])
    store.close()
    again = SqliteStore(str(tmp_path / "q.db"))
    again.open()
    assert again._summary is None
    assert {k: v[0] for k, v in again.load_summary().items()} == {"a": 3}
    again.close()
