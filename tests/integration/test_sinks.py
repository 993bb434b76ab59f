"""Queue sinks: every message appended to a JSON-lines file, then acked (issue 5)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from conftest import wait_until


def lines(path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def qstats(d, name) -> dict:
    with d.client() as c:
        return c.stats(name)[0]


def test_envelope_sink_appends_in_order_and_acks(make_daemon):
    d = make_daemon()
    out = d.root / "audit.jsonl"
    d.write_config(f'[queues.audit]\nsink = "{out}"\nsink_format = "envelope"\n'
                   f'[queues.plain]\nsink = "{d.root / "plain.jsonl"}"\ndurability = "fsync"\n')
    d.start()
    with d.client() as c:
        ids = [c.send("audit", {"n": i, "s": "ünï"}) for i in range(50)]
        c.send("plain", {"a": [1, 2]})
    wait_until(lambda: len(lines(out)) == 50, what="50 lines")
    got = [json.loads(x) for x in lines(out)]
    assert [g["id"] for g in got] == ids and [g["body"]["n"] for g in got] == list(range(50))
    assert set(got[0]) == {"id", "queue", "body", "attempts", "enqueued_at"}
    assert got[0]["queue"] == "audit" and got[0]["attempts"] == 1 and got[0]["body"]["s"] == "ünï"
    wait_until(lambda: lines(d.root / "plain.jsonl") == ['{"a":[1,2]}'], what="plain line")
    wait_until(lambda: qstats(d, "audit")["acked"] == 50, what="acks")
    s = qstats(d, "audit")
    assert (s["ready"], s["leased"]) == (0, 0)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1, None], ids=["hup", "usr1", "no-signal"])
def test_rotation_moves_later_lines_to_the_new_file_and_loses_none(make_daemon, sig):
    d = make_daemon()
    out = d.root / "s.jsonl"
    d.write_config(f'[queues.s]\nsink = "{out}"\n')
    d.start()
    with d.client() as c:
        for i in range(50):
            c.send("s", i)
        wait_until(lambda: len(lines(out)) == 50, what="first 50")
        os.rename(out, d.root / "s.jsonl.1")
        if sig is not None:
            d.signal(sig)
            if sig == signal.SIGHUP:
                d.wait_notify("READY=1")
        for i in range(50, 100):
            c.send("s", i)
    wait_until(lambda: len(lines(out)) == 50,
               what=lambda: f"50 in the new file: {lines(out)} {lines(d.root / 's.jsonl.1')} {d.stderr()}")
    assert [int(x) for x in lines(d.root / "s.jsonl.1")] == list(range(50))
    assert [int(x) for x in lines(out)] == list(range(50, 100))


def test_missing_directory_keeps_messages_queued_logs_once_then_drains(make_daemon):
    d = make_daemon()
    out = d.root / "later" / "s.jsonl"
    d.write_config(f'[queues.s]\nsink = "{out}"\n')
    d.start()
    with d.client() as c:
        for i in range(5):
            c.send("s", i)
        time.sleep(1.5)  # several retries happen meanwhile
        for i in range(5, 10):
            c.send("s", i)
        s = c.stats("s")[0]
    assert (s["ready"], s["leased"], s["acked"]) == (10, 0, 0)
    assert d.stderr().count("cannot write sink") == 1
    assert "No such file or directory" in d.stderr()
    (d.root / "later").mkdir()  # fixed: the backoff retry drains it, no signal needed
    wait_until(lambda: len(lines(out)) == 10, what="drain after the fix")
    assert [int(x) for x in lines(out)] == list(range(10))
    wait_until(lambda: qstats(d, "s")["acked"] == 10, what="acks")
    assert d.stderr().count("cannot write sink") == 1 and "is writable again" in d.stderr()


def test_write_errors_release_messages_and_reload_can_redirect_the_sink(make_daemon):
    """/dev/full opens fine but every write fails with ENOSPC: nothing is lost or charged."""
    d = make_daemon('[queues.s]\nsink = "/dev/full"\n').start()
    with d.client() as c:
        for i in range(20):
            c.send("s", i)
    wait_until(lambda: "cannot write sink /dev/full" in d.stderr(), what="the error line")
    time.sleep(1.0)
    s = qstats(d, "s")
    assert s["ready"] + s["leased"] == 20 and s["acked"] == 0 and s["dead"] == 0
    assert d.stderr().count("cannot write sink") == 1 and "No space left on device" in d.stderr()
    out = d.root / "s.jsonl"
    d.write_config(f'[queues.s]\nsink = "{out}"\n')
    d.signal(signal.SIGHUP)
    wait_until(lambda: len(lines(out)) == 20, what="redirected sink")
    assert [int(x) for x in lines(out)] == list(range(20))  # order kept, attempts not charged
    with d.client() as c:
        c.send("s", 99)
    wait_until(lambda: lines(out)[-1:] == ["99"], what="new message")


def test_reload_adds_and_removes_sinks(make_daemon):
    d = make_daemon().start()
    out = d.root / "q.jsonl"
    with d.client() as c:
        c.send_many("q", [1, 2, 3])
    d.write_config(f'[queues.q]\nsink = "{out}"\n')
    d.signal(signal.SIGHUP)
    wait_until(lambda: lines(out) == ["1", "2", "3"], what="sink added by reload")
    d.write_config("")
    d.signal(signal.SIGHUP)
    wait_until(lambda: "sink " + str(out) + " removed" in d.stderr(), what="removal")
    with d.client() as c:
        c.send_many("q", [4, 5])
        time.sleep(1.0)
        assert c.stats("q")[0]["ready"] == 2
        assert [m.body for m in c.peek("q")] == [4, 5]
    assert lines(out) == ["1", "2", "3"]


def test_defaults_sink_reaches_queues_created_later(make_daemon):
    d = make_daemon()
    out = d.root / "all.jsonl"
    d.write_config(f'[defaults]\nsink = "{out}"\nsink_format = "envelope"\n')
    d.start()
    with d.client() as c:
        c.send("a", 1)
        c.send("b", 2)
    wait_until(lambda: len(lines(out)) == 2, timeout=15, what="both queues")  # picked up within ~5 s
    assert sorted(json.loads(x)["queue"] for x in lines(out)) == ["a", "b"]
