"""At-least-once delivery against a real daemon (issue 3): leases, redelivery, attempts,
dead letters, stale acks, bounds, FIFO, nack delays and touch.

Waits are bounded ("no hang" limits), never performance claims; the only time
comparison is nack's documented lower bound (not delivered before the delay).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import drain, wait_until as wait_for
from ipcd import errors

T = 15  # seconds: upper bound on any wait for the daemon or a child process

HOLD_LEASE = r"""
import sys, time
from ipcd.client import Client
addr, keyfile, queue, lease = sys.argv[1:5]
c = Client(addr, open(keyfile, "rb").read().strip(), reconnect_timeout=0)
m = c.recv(queue, timeout=15, lease=float(lease))
print("none" if m is None else "%d %d %s" % (m.id, m.attempts, m.text), flush=True)
time.sleep(600)  # hold the lease, never ack: the test kills us
"""


def depth(st):
    return st["ready"] + st["leased"] + st["delayed"]


# -- redelivery after a consumer dies ------------------------------------------------


def test_consumer_killed_without_ack_is_redelivered_with_attempts_2(make_daemon):
    d = make_daemon().start()
    assert d.cli("send", "jobs", '{"job": 7}').returncode == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LEASE, str(d.sock_path),
                               str(d.state_dir / "authkey"), "jobs", "1.0"],
                              env=d.env, stdout=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline().split(" ", 2)
        assert line[0] != "none" and line[1] == "1", line
        first_id = int(line[0])
    finally:
        holder.kill()  # SIGKILL while holding the lease: no ack, no release
        holder.wait(T)
    r = d.cli("recv", "jobs", "--meta", "--timeout", str(T))
    assert r.returncode == 0, r.stderr
    env = json.loads(r.stdout)
    assert set(env) == {"id", "queue", "body", "attempts", "enqueued_at"}
    assert env["id"] == first_id and env["queue"] == "jobs" and env["body"] == {"job": 7}
    assert env["attempts"] == 2
    assert isinstance(env["enqueued_at"], float) and abs(env["enqueued_at"] - time.time()) < 3600
    # `ipcd recv` acked it after printing it: gone for good.
    assert d.cli("recv", "jobs", "--timeout", "0.3").returncode == 75
    with d.client() as c:
        st = c.stats("jobs")[0]
        assert depth(st) == 0 and st["redelivered"] == 1 and st["acked"] == 1


# -- poison messages and the dead-letter queue ---------------------------------------

POISON = """
[queues.p]
max_attempts = 2
lease_seconds = 0.5
max_messages = 3
overflow = "reject"
"""


def _kill_twice(c, queue, body, how):
    """Deliver *body* max_attempts (2) times, failing each delivery; return its id."""
    m = c.recv(queue, timeout=T)
    assert m is not None and m.body == body and m.attempts == 1, m
    if how == "nack":
        m.nack(reason="boom")
    m2 = c.recv(queue, timeout=T)  # after the nack at once; else after lease expiry
    assert m2.id == m.id and m2.attempts == 2, m2
    dead_before = c.stats(queue)[0]["dead"]
    if how == "nack":
        m2.nack(reason="boom")
    wait_for(lambda: c.stats(queue)[0]["dead"] == dead_before + 1, f"{body} to be dead-lettered")
    with pytest.raises(errors.LeaseExpired):
        m2.ack()  # too late: it is in the dead-letter queue
    return m.id


def _dead(d):
    r = d.cli("dead", "ls", "p")
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_poison_message_is_dead_lettered_listed_replayed_and_purged(make_daemon):
    d = make_daemon(POISON).start()
    c = d.client()
    # a: failed by nack twice; b: by lease expiry twice; c: nack then expiry.
    ids = [c.send("p", "a")]
    assert _kill_twice(c, "p", "a", "nack") == ids[0]
    ids.append(c.send("p", "b"))
    assert _kill_twice(c, "p", "b", "expire") == ids[1]
    ids.append(c.send("p", "c"))
    m = c.recv("p", timeout=T)
    assert m.body == "c"
    m.nack(delay=0)
    m = c.recv("p", timeout=T)
    assert m.body == "c" and m.attempts == 2
    wait_for(lambda: c.stats("p.dead")[0]["ready"] == 3, "c to be dead-lettered after its lease")

    dead = _dead(d)
    assert [x["id"] for x in dead] == ids
    assert [x["body"] for x in dead] == ["a", "b", "c"]
    assert all(x["attempts"] == 2 and x["queue"] == "p" for x in dead), dead
    assert dead[0]["reason"] == "boom after 2 attempt(s)"
    assert dead[1]["reason"] == "lease expired after 2 attempt(s)"
    assert dead[2]["reason"] == "lease expired after 2 attempt(s)"
    assert "dead-lettered" in d.stderr()

    # p itself is empty, and its bound counts nothing that moved away (max_messages = 3).
    st = c.stats("p")[0]
    assert depth(st) == 0 and st["bytes"] == 0 and st["dead"] == 3, st
    assert c.recv("p", timeout=0.2) is None
    c.send_many("p", ["x1", "x2", "x3"])
    assert drain(c, "p") == ["x1", "x2", "x3"]

    # Replay one by id: back in p with its attempts reset and no reason.
    r = d.cli("dead", "replay", "p", "--id", str(ids[1]))
    assert r.returncode == 0 and "replayed 1" in r.stderr, r.stderr
    m = c.recv("p", timeout=T)
    assert (m.id, m.body, m.attempts, m.reason) == (ids[1], "b", 1, None)
    m.ack()
    assert [x["id"] for x in _dead(d)] == [ids[0], ids[2]]

    # Replay the rest with --all; they come back in id order, attempts reset.
    r = d.cli("dead", "replay", "p", "--all")
    assert r.returncode == 0 and "replayed 2" in r.stderr, r.stderr
    assert _dead(d) == []
    got = c.recv_many("p", 10, timeout=T)
    assert [(m.id, m.attempts) for m in got] == [(ids[0], 1), (ids[2], 1)]
    c.nack(got, reason="again")
    got = c.recv_many("p", 10, timeout=T)
    assert [m.attempts for m in got] == [2, 2]
    c.nack(got, reason="again")
    assert [x["reason"] for x in _dead(d)] == ["again after 2 attempt(s)"] * 2

    # The dead letters survive a restart, with their reason and attempts.
    c.close()
    assert d.stop() == 0
    d.start()
    dead = _dead(d)
    assert [(x["id"], x["attempts"], x["reason"]) for x in dead] == [
        (ids[0], 2, "again after 2 attempt(s)"), (ids[2], 2, "again after 2 attempt(s)")]

    r = d.cli("purge", "p", "--dead")
    assert r.returncode == 0 and "purged 2 message(s) from p.dead" in r.stderr, r.stderr
    assert _dead(d) == []
    with d.client() as c:
        assert depth(c.stats("p.dead")[0]) == 0 and depth(c.stats("p")[0]) == 0
        assert c.recv("p", timeout=0.2) is None
    assert d.cli("dead", "replay", "p", "--id", str(ids[0])).returncode == 65  # no such dead id
    assert d.cli("dead", "replay", "p").returncode == 2  # neither --id nor --all


def test_purge_removes_ready_delayed_and_leased(make_daemon):
    d = make_daemon().start()
    with d.client() as c:
        c.send_many("q", list(range(6)))
        held = c.recv_many("q", 2, timeout=T, lease=60)
        later = c.recv("q", timeout=T)
        later.nack(delay=3600)
        r = d.cli("purge", "q")
        assert r.returncode == 0 and "purged 6 message(s) from q" in r.stderr, r.stderr
        assert depth(c.stats("q")[0]) == 0
        with pytest.raises(errors.LeaseExpired):
            c.ack(held)
        c.send("q", "fresh")
        assert drain(c, "q") == ["fresh"]
    d.stop()
    d.start()
    with d.client() as c:
        assert c.recv("q", timeout=0.3) is None  # the purge was durable


# -- stale holders -----------------------------------------------------------------------


def test_stale_ack_fails_with_lease_expired_and_new_holder_acks(make_daemon):
    d = make_daemon().start()
    with d.client() as a, d.client() as b:
        a.send("q", {"n": 1})
        ma = a.recv("q", timeout=T, lease=0.5)
        assert ma.attempts == 1
        mb = b.recv("q", timeout=T)  # arrives once A's lease expired
        assert mb is not None and mb.id == ma.id and mb.attempts == 2
        for stale in (lambda: ma.ack(), lambda: ma.nack(), lambda: ma.touch(10)):
            with pytest.raises(errors.LeaseExpired) as e:
                stale()
            assert e.value.exit_code == 65 and f"message {ma.id}" in str(e.value)
        mb.ack()
        with pytest.raises(errors.LeaseExpired):
            mb.ack()  # settled already
        assert a.recv("q", timeout=0.3) is None
        assert depth(a.stats("q")[0]) == 0


def test_cli_recv_whose_lease_expired_before_its_ack_exits_65(make_daemon):
    """`ipcd recv` acks after the line is flushed: a reader too slow for the lease makes the
    ack stale, which is refused (exit 65) rather than deleting a message someone else holds."""
    d = make_daemon().start()
    big = "x" * (256 << 10)  # more than a pipe buffer: the write blocks until we read
    with d.client() as c:
        c.send("q", big)
        recv = subprocess.Popen([sys.executable, "-m", "ipcd", "recv", "q", "--lease", "0.5",
                                 "--timeout", str(T)], env=d.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            wait_for(lambda: c.stats("q")[0]["received"] == 1, "the CLI to take the message")
            again = c.recv("q", timeout=T)  # redelivered: the CLI's lease expired mid-write
            assert again is not None and again.attempts == 2
            out, err = recv.communicate(timeout=T)
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait(5)
        assert json.loads(out) == big  # the line was complete
        assert recv.returncode == 65, err
        assert err.decode().startswith("Error:") and b"not leased to you" in err
        again.ack()  # the current holder still can
        assert c.recv("q", timeout=0.2) is None


# -- bounds ----------------------------------------------------------------------------------

BOUNDED = """
[queues.b]
max_messages = 2
[queues.r]
max_messages = 2
overflow = "reject"
[queues.by]
max_bytes = 100
overflow = "reject"
[queues.sz]
max_message_bytes = 64
"""


def test_bounded_queue_block_timeout_and_reject(make_daemon):
    d = make_daemon(BOUNDED).start()
    c = d.client()
    c.send_many("b", [1, 2])

    # overflow = "block": the send waits until a consumer frees room.
    sender = subprocess.Popen([sys.executable, "-m", "ipcd", "send", "b", "3", "--timeout", str(T)],
                              env=d.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: c.status()["connections"] >= 2, "the blocked sender to connect")
        time.sleep(0.3)
        assert sender.poll() is None, sender.communicate()  # still blocked: the queue is full
        m = c.recv("b", timeout=T)
        assert m.body == 1
        m.ack()
        out, err = sender.communicate(timeout=T)
        assert sender.returncode == 0, err
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(5)

    # Full again ([2, 3]) and nobody consumes: --timeout gives up with 75.
    r = d.cli("send", "b", "4", "--timeout", "0.5")
    assert r.returncode == 75 and r.stderr.startswith("Error:") and "full" in r.stderr, r.stderr
    with pytest.raises(errors.QueueFull):
        c.send("b", 5, timeout=0.2)
    assert drain(c, "b") == [2, 3]  # the timed-out messages were never stored

    # overflow = "reject": 75 at once, even though no --timeout was given.
    c.send_many("r", [1, 2])
    r = d.cli("send", "r", "3", timeout=T)
    assert r.returncode == 75 and "full" in r.stderr and "reject" in r.stderr, r.stderr
    with pytest.raises(errors.QueueFull):
        c.send("r", 4)
    assert drain(c, "r") == [1, 2]
    c.send("r", 5)  # room again once consumed
    assert drain(c, "r") == [5]

    # max_bytes counts body bytes.
    c.send("by", "x" * 60)
    assert d.cli("send", "by", json.dumps("y" * 60)).returncode == 75
    assert drain(c, "by") == ["x" * 60]

    # A message over max_message_bytes is a data error, never stored.
    r = d.cli("send", "sz", json.dumps("z" * 100))
    assert r.returncode == 65 and "max_message_bytes" in r.stderr, r.stderr
    with pytest.raises(errors.DataError):
        c.send("sz", "z" * 100)
    assert c.recv("sz", timeout=0.2) is None
    c.close()


# -- ordering, delays, touch -----------------------------------------------------------------


def test_fifo_per_queue_across_prefetch_and_restart(make_daemon):
    d = make_daemon().start()
    with d.client() as c:
        for i in range(40):
            c.send("f", i)  # one by one
        c.send_many("f", list(range(40, 700)))  # > the 512-message prefetch window
        c.send_many("other", ["x"] * 10)
        got = []
        for _ in range(30):
            msgs = c.recv_many("f", 7, timeout=T)
            got += [m.body for m in msgs]
            c.ack(msgs)
    assert got == list(range(210))
    assert d.stop() == 0
    d.start()
    with d.client() as c:
        assert drain(c, "f", n=13) == list(range(210, 700))
        assert drain(c, "other") == ["x"] * 10


def test_nack_with_delay_is_not_delivered_before_the_delay(make_daemon):
    d = make_daemon().start()
    with d.client() as c:
        c.send_many("q", ["slow", "next"])
        m = c.recv("q", timeout=T)
        assert m.body == "slow"
        t0 = time.time()
        m.nack(delay=1.0)
        st = c.stats("q")[0]
        assert st["delayed"] == 1 and st["ready"] == 1, st
        assert [p.body for p in c.peek("q")] == ["next"]
        n = c.recv("q", timeout=T)
        assert n.body == "next"  # the delayed one does not block the queue
        n.ack()
        m2 = c.recv("q", timeout=T)
        assert time.time() >= t0 + 1.0  # the documented lower bound, not a speed claim
        assert (m2.id, m2.body, m2.attempts) == (m.id, "slow", 2)
        m2.nack(delay=3600)  # a long delay survives a restart
    d.stop()
    d.start()
    with d.client() as c:
        assert c.recv("q", timeout=0.5) is None
        assert c.stats("q")[0]["delayed"] == 1


def test_touch_extends_the_lease(make_daemon):
    d = make_daemon().start()
    with d.client() as a, d.client() as b:
        a.send("q", "long job")
        m = a.recv("q", timeout=T, lease=1.5)
        deadline = time.monotonic() + 3.5  # more than two lease lengths
        while time.monotonic() < deadline:
            assert m.touch(1.5) == 1.5
            assert b.recv("q", timeout=0.2) is None  # never redelivered while touched
        assert a.stats("q")[0]["leased"] == 1
        m.ack()  # still the holder
        assert b.recv("q", timeout=0.3) is None
        with pytest.raises(errors.DataError):
            a.touch([m], 0)
