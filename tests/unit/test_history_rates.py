"""watch.History (ipcd tail) and watch.Rates (ipcd stats), without a daemon."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from ipcd import errors
from ipcd.watch import History, Rates


class Row(SimpleNamespace):
    pass


def rows(*ids, body="{}"):
    return [Row(id=i, body=body, enqueued_at=1000.0 + i) for i in ids]


def bodies(result):
    return [(q, rid) for _seq, q, rid, _body, _at in result["entries"]]


def make(keep=None, **kw):
    keep = keep or {}
    return History(lambda name: keep.get(name, 1000), **kw)


def test_last_n_across_queues_in_send_order():
    h = make()
    h.record("a", rows(1, 2))
    h.record("b", rows(3))
    h.record("a", rows(4))
    r = h.query(None, 3, None, 0)
    assert bodies(r) == [("a", 2), ("b", 3), ("a", 4)] and r["seq"] == 4 and not r["gap"]
    assert bodies(h.query("a", 10, None, 0)) == [("a", 1), ("a", 2), ("a", 4)]
    assert bodies(h.query("zzz", 10, None, 0)) == []


def test_count_bound_and_gap_detection():
    h = make({"q": 3})
    h.record("q", rows(*range(1, 11)))
    assert bodies(h.query("q", 100, None, 0)) == [("q", 8), ("q", 9), ("q", 10)]
    r = h.query("q", 100, 2, 0)  # a follower that last saw seq 2 missed 3..7
    assert r["gap"] and bodies(r) == [("q", 8), ("q", 9), ("q", 10)]
    assert not h.query("q", 100, 7, 0)["gap"]
    assert h.size("q")[0] == 3


def test_byte_bound_keeps_at_least_the_newest():
    h = make(max_bytes=1000)
    h.record("q", rows(*range(1, 21), body="x" * 100))  # ~150 bytes each with the str header
    n, size = h.size("q")
    assert 1 <= n < 20 and size <= 1000
    h.record("q", rows(21, body="y" * 5000))  # bigger than the cap on its own
    assert bodies(h.query("q", 100, None, 0)) == [("q", 21)]


def test_history_zero_keeps_nothing_but_seq_moves_on():
    h = make({"off": 0})
    h.record("off", rows(1, 2))
    h.record("on", rows(3))
    assert bodies(h.query("off", 10, None, 0)) == []
    assert [e[0] for e in h.query("on", 10, None, 0)["entries"]] == [3]


def test_follow_waits_for_new_entries_and_pages_by_n():
    h = make()
    h.record("q", rows(1))
    seq = h.query("q", 10, None, 0)["seq"]
    got = {}

    def follower():
        got["r"] = h.query("q", 2, seq, 5.0)

    t = threading.Thread(target=follower)
    t.start()
    time.sleep(0.1)
    assert t.is_alive()  # parked: nothing new yet
    h.record("q", rows(2, 3, 4))
    t.join(5)
    r = got["r"]
    assert bodies(r) == [("q", 2), ("q", 3)] and r["seq"] == 3  # paged: the rest comes next
    r = h.query("q", 2, r["seq"], 0)
    assert bodies(r) == [("q", 4)] and r["seq"] == 4


def test_timeout_returns_empty_and_stop_wakes_followers():
    h = make()
    t0 = time.monotonic()
    r = h.query("q", 10, 0, 0.2)
    assert r["entries"] == [] and time.monotonic() - t0 >= 0.19
    err = {}

    def follower():
        try:
            h.query(None, 10, 0, 30)
        except errors.Unavailable as e:
            err["e"] = e

    t = threading.Thread(target=follower)
    t.start()
    time.sleep(0.1)
    h.stop()
    t.join(5)
    assert "stopping" in str(err["e"])
    with pytest.raises(errors.Unavailable):
        h.query("q", 1, None, 0)


def test_a_seq_from_before_a_restart_starts_over():
    h = make()
    h.record("q", rows(1, 2))
    assert bodies(h.query("q", 10, 5000, 0)) == [("q", 1), ("q", 2)]


def test_rates_over_the_window():
    now = [100.0]
    r = Rates(clock=lambda: now[0], window=10.0)
    q = SimpleNamespace(totals=dict(sent=0, received=0, acked=0, redelivered=0))
    queues = {"q": q}
    r.sample(queues)
    for _ in range(20):  # 20 s at 5 sends/s, 2 acks/s
        now[0] += 1.0
        q.totals["sent"] += 5
        q.totals["acked"] += 2
        r.sample(queues)
    assert r.rates("q", q.totals) == {"sent": 5.0, "received": 0.0, "acked": 2.0, "redelivered": 0.0}
    now[0] += 0.5
    r.sample(queues)  # less than a second later: ignored
    assert len(r._samples["q"]) <= 12
    assert r.rates("new", {"sent": 3, "received": 0, "acked": 0, "redelivered": 0})["sent"] == pytest.approx(6.0)
