"""The session loop (sessions.py): one thread serving every ipcd session.

What one thread must not get wrong: a slow or silent peer must not hold up the
others, pipelined requests are answered in order, a consumer that leaves while
waiting is not handed a message, and waiting consumers each get their own.
Every test runs against a real daemon subprocess over its Unix socket.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from multiprocessing import connection as mpc

from conftest import wait_until


def session(d) -> mpc.Connection:
    """An authenticated ipcd session at the wire level (what ipcd.Client does)."""
    c = mpc.Client(str(d.sock_path), authkey=d.authkey())
    c.send((None, "session", (), {}))
    assert c.recv() == ("#RETURN", None)
    return c


def recv_reply(c: mpc.Connection, timeout: float = 10.0):
    assert c.poll(timeout), "no reply from the daemon"
    return c.recv()


def frame(obj) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return struct.pack("!i", len(data)) + data


def waiting(d, queue) -> int:
    with d.client() as c:
        return c.stats(queue)[0]["waiting"]


def test_a_peer_sending_half_a_request_does_not_hold_up_others(daemon):
    slow = session(daemon)
    data = frame(("put_many", {"queue": "q", "bodies": ['{"slow": 1}']}))
    os.write(slow.fileno(), data[:7])  # header and a few bytes, then silence
    with daemon.client() as c:  # meanwhile everyone else is served
        for i in range(20):
            c.send("other", {"i": i})
        assert [m.body["i"] for m in c.recv_many("other", 20, timeout=5)] == list(range(20))
    for b in data[7:]:  # the rest, a byte at a time
        os.write(slow.fileno(), bytes([b]))
    kind, ids = recv_reply(slow)
    assert kind == "ok" and len(ids) == 1
    with daemon.client() as c:
        assert c.recv("q", timeout=5).body == {"slow": 1}
    slow.close()


def test_pipelined_requests_are_answered_in_order(daemon):
    c = session(daemon)
    reqs = [("put_many", {"queue": "p", "bodies": ['"a"']}),
            ("put_many", {"queue": "p", "bodies": ['"b"', '"c"']}),
            ("no_such_op", {}),
            ("get_many", {"queue": "p", "max_n": 10, "timeout": 5})]
    os.write(c.fileno(), b"".join(frame(r) for r in reqs))  # one write: all four at once
    replies = [recv_reply(c) for _ in reqs]
    assert replies[0][0] == "ok" and len(replies[0][1]) == 1
    assert replies[1][0] == "ok" and len(replies[1][1]) == 2
    assert replies[2][:2] == ("err", "usage")
    assert replies[3][0] == "ok" and [m[2] for m in replies[3][1]] == ['"a"', '"b"', '"c"']
    c.close()


def test_consumer_that_leaves_while_waiting_is_not_handed_a_message(daemon):
    # A consumer blocked in recv is killed; the next message must go to a live consumer at
    # once with attempts 1, not be leased to the dead one (and redelivered only after its lease).
    p = subprocess.Popen([sys.executable, "-m", "ipcd", "recv", "w", "--lease", "3600"], env=daemon.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: waiting(daemon, "w") == 1, "the receiver to block in the daemon", timeout=30)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    wait_until(lambda: waiting(daemon, "w") == 0, "the daemon to notice the receiver left", timeout=10)
    with daemon.client() as c:
        c.send("w", {"n": 1})
        m = c.recv("w", timeout=5)
        assert m is not None and m.body == {"n": 1} and m.attempts == 1
        m.ack()


def test_each_waiting_consumer_gets_its_own_message(daemon):
    results, errors = [], []

    def consume():
        try:
            with daemon.client() as c:
                m = c.recv("fan", timeout=20)
                results.append(m.body["i"] if m else None)
                if m:
                    m.ack()
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=consume) for _ in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: waiting(daemon, "fan") == 6, "six consumers to wait", timeout=30)
    with daemon.client() as c:
        for i in range(6):
            c.send("fan", {"i": i})
    for t in threads:
        t.join(30)
    assert not errors and sorted(results) == list(range(6))
    with daemon.client() as c:
        st = c.stats("fan")[0]
        assert (st["waiting"], st["ready"], st["leased"]) == (0, 0, 0)


def test_recv_timeout_and_blocked_send_are_timed_by_the_loop(make_daemon):
    d = make_daemon('[queues.small]\nmax_messages = 1\noverflow = "block"\n').start()
    with d.client() as c:
        assert c.recv("empty", timeout=0.3) is None
        c.send("small", 1)
    r = d.cli("send", "small", "2", "--timeout", "0.3")
    assert r.returncode == 75 and r.stderr.startswith("Error:") and "full" in r.stderr
    # A blocked send completes as soon as a consumer frees room.
    sender = subprocess.Popen([sys.executable, "-m", "ipcd", "send", "small", "3"], env=d.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        assert sender.poll() is None  # still waiting for room
        with d.client() as c:
            m = c.recv("small", timeout=5)
            assert m.body == 1
            m.ack()
            assert sender.wait(10) == 0
            assert c.recv("small", timeout=5).body == 3
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)


def test_one_thread_serves_every_session(daemon):
    # The point of the loop: sessions do not cost a thread each.
    clients = [daemon.client() for _ in range(20)]
    try:
        for i, c in enumerate(clients):
            c.send("t", i)
        threads = os.listdir(f"/proc/{daemon.proc.pid}/task")
        print(f"\n20 sessions open: daemon has {len(threads)} threads")
        assert len(threads) < 12
        with daemon.client() as c:
            assert c.status()["connections"] >= 20
    finally:
        for c in clients:
            c.close()


def test_megabyte_requests_and_replies_cross_the_loop_intact(daemon):
    # Frames far larger than a socket buffer: the loop reads a request in many pieces and
    # writes a reply over many writable events, while other sessions keep being served.
    bodies = [{"i": i, "blob": chr(ord("a") + i) * (900 << 10)} for i in range(6)]
    with daemon.client() as c:
        ids = c.send_many("big", bodies)
        assert len(ids) == 6
    slow = session(daemon)
    os.write(slow.fileno(), frame(("get_many", {"queue": "big", "max_n": 6, "timeout": 5})))
    time.sleep(0.3)  # the reply (~5.4 MB) sits half-written: the peer is not reading yet
    with daemon.client() as other:
        other.send("small", 1)
        assert other.recv("small", timeout=5).body == 1
    kind, got = recv_reply(slow, timeout=30)
    assert kind == "ok" and [json.loads(d[2]) for d in got] == bodies
    slow.close()


def test_sigterm_wakes_a_sender_blocked_on_a_full_queue(make_daemon):
    d = make_daemon('[queues.full]\nmax_messages = 1\noverflow = "block"\n').start()
    with d.client() as c:
        c.send("full", 1)
    sender = subprocess.Popen([sys.executable, "-m", "ipcd", "send", "full", "2"], env=d.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert sender.poll() is None  # parked on the full queue
        d.signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
        out, err = sender.communicate(timeout=10)
        assert sender.returncode == 69, err
        assert err.startswith("Error:") and "stopping" in err and "Traceback" not in err
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)
