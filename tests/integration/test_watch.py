"""Watching queues: tail (non-consuming), stats, ls, peek (issue 5)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from conftest import wait_until


class Reader:
    """A long-running CLI command whose stdout lines are collected in a thread."""

    def __init__(self, d, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "ipcd", *args], env=d.env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._t.join(5)
        return self.proc.stderr.read()


def wait_following(d, queue=None):
    """Until a `tail -f` is parked in the daemon (its long-poll counts as an in-flight request)."""
    time.sleep(1.0)


def test_tail_follow_sees_what_recv_consumes(daemon):
    tail = Reader(daemon, "tail", "jobs", "-f", "-n", "0")
    recv = Reader(daemon, "recv", "jobs", "-f")
    try:
        wait_following(daemon)
        bodies = [json.dumps({"n": i}, separators=(",", ":")) for i in range(20)]
        with daemon.client() as c:
            for b in bodies:
                c.send("jobs", json.loads(b))
        wait_until(lambda: len(recv.lines) == 20 and len(tail.lines) == 20,
                   what=lambda: f"tail {tail.lines} recv {recv.lines}")
        assert tail.lines == bodies and recv.lines == bodies  # the receiver still got every message
    finally:
        tail.stop()
        recv.stop()
    with daemon.client() as c:
        assert c.stats("jobs")[0]["acked"] == 20


def test_tail_last_n_after_consumption_and_meta(daemon):
    with daemon.client() as c:
        ids = c.send_many("q", list(range(15)))
        while c.recv_many("q", 100, timeout=0.2, ack=None):
            pass
    r = daemon.cli("tail", "q", "-n", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["10", "11", "12", "13", "14"]
    r = daemon.cli("tail", "q", "-n", "1", "--meta")
    env = json.loads(r.stdout)
    assert set(env) == {"id", "queue", "body", "enqueued_at"}
    assert (env["id"], env["queue"], env["body"]) == (ids[-1], "q", 14)


def test_tail_all_prefixes_queue_names_and_json(daemon):
    plain = Reader(daemon, "tail", "--all", "-f", "-n", "0")
    as_json = Reader(daemon, "tail", "--all", "-f", "-n", "0", "--json")
    try:
        wait_following(daemon)
        with daemon.client() as c:
            for i in range(6):
                c.send("a" if i % 2 == 0 else "b", {"i": i})
        wait_until(lambda: len(plain.lines) == 6 and len(as_json.lines) == 6)
    finally:
        plain.stop()
        as_json.stop()
    assert plain.lines == [f"{'a' if i % 2 == 0 else 'b'}\t{{\"i\":{i}}}" for i in range(6)]
    assert [json.loads(x) for x in as_json.lines] == [{"queue": "a" if i % 2 == 0 else "b", "body": {"i": i}}
                                                      for i in range(6)]
    r = daemon.cli("tail", "--all", "-n", "2")
    assert r.stdout.splitlines() == ['a\t{"i":4}', 'b\t{"i":5}']


def test_history_setting_bounds_tail(make_daemon):
    d = make_daemon("[queues.small]\nhistory = 3\n[queues.none]\nhistory = 0\n").start()
    with d.client() as c:
        c.send_many("small", list(range(10)))
        c.send_many("none", [1, 2])
        assert c.stats("small")[0]["history"] == 3
    assert d.cli("tail", "small", "-n", "100").stdout.splitlines() == ["7", "8", "9"]
    assert d.cli("tail", "none", "-n", "100").stdout == ""


def test_tail_follow_ends_with_69_when_the_daemon_stops(daemon):
    tail = Reader(daemon, "tail", "q", "-f")
    wait_following(daemon)
    t0 = time.monotonic()
    assert daemon.stop() == 0
    assert tail.proc.wait(10) == 69
    assert time.monotonic() - t0 < 5
    err = tail.stop()
    # "stopping" is the daemon's reply to the blocked long-poll; if the follower was between
    # two requests when the daemon stopped, it sees the connection close instead: both exit 69.
    assert "stopping" in err or "lost the connection" in err, err


def test_tail_usage_errors(daemon):
    r = daemon.cli("tail")
    assert r.returncode == 2 and r.stderr.startswith("Error: give a QUEUE or --all")
    r = daemon.cli("tail", "bad name")
    assert r.returncode == 65 and r.stderr.startswith("Error: invalid queue name")


def test_stats_json_matches_a_scripted_workload_exactly(make_daemon):
    d = make_daemon("[queues.w]\nmax_attempts = 2\n").start()
    bodies = [{"n": i} for i in range(10)]
    with d.client() as c:
        c.send_many("w", bodies)  # send 10
        got = c.recv_many("w", 4, timeout=5)  # recv 4
        assert len(got) == 4
        c.ack(got[:3])  # ack 3
        c.nack(got[3:])  # nack 1: ready again, attempt 1 of 2
        def wait_on_idle():
            try:
                with d.client() as w:
                    w.recv("idle", timeout=3)
            except Exception:
                pass

        waiter = threading.Thread(target=wait_on_idle)
        waiter.start()
        wait_until(lambda: c.stats("idle")[0]["waiting"] == 1)
    r = d.cli("stats", "w", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == 1 and set(doc) == {"schema", "daemon", "queues"}
    dm = doc["daemon"]
    assert dm["pid"] == d.proc.pid and dm["version"] and dm["address"] == str(d.sock_path)
    assert dm["uptime"] > 0 and dm["connections"] >= 1 and dm["store_bytes"] > 0
    (q,) = doc["queues"]
    remaining = bodies[3:]  # 3 acked; the nacked one is ready again
    expect = {"name": "w", "ready": 7, "leased": 0, "delayed": 0, "dead": 0, "waiting": 0, "durability": "os",
              "bytes": sum(len(json.dumps(b, separators=(",", ":"))) for b in remaining), "history": 10,
              "totals": {"sent": 10, "received": 4, "acked": 3, "nacked": 1, "redelivered": 0,
                         "dead_lettered": 0}}
    assert {k: q[k] for k in expect} == expect
    assert q["oldest_age"] >= 0 and set(q["rates"]) == {"sent", "received", "acked", "redelivered"}
    assert q["rates"]["sent"] > 0

    with d.client() as c:  # the nacked message comes back first (lowest id), then dies
        (m,) = c.recv_many("w", 1, timeout=5)
        assert m.attempts == 2 and m.body == {"n": 3}
        c.nack([m])
    doc = json.loads(d.cli("stats", "--json").stdout)
    by_name = {x["name"]: x for x in doc["queues"]}
    w = by_name["w"]
    assert (w["ready"], w["leased"], w["dead"]) == (6, 0, 1)
    assert w["totals"] == {"sent": 10, "received": 5, "acked": 3, "nacked": 2, "redelivered": 1,
                           "dead_lettered": 1}
    assert by_name["w.dead"]["ready"] == 1 and by_name["idle"]["waiting"] in (0, 1)
    waiter.join(10)


def test_stats_table_ls_and_watch(daemon):
    with daemon.client() as c:
        c.send_many("alpha", [1, 2, 3])
        c.send("a-much-longer-queue-name", {"x": "y" * 2000})
    r = daemon.cli("stats")
    assert r.returncode == 0, r.stderr
    head, *table = r.stdout.splitlines()
    assert head.startswith("ipcd ") and f"pid {daemon.proc.pid}" in head
    assert table[0].split()[:4] == ["QUEUE", "READY", "LEASED", "DELAYED"]
    assert len({len(line) for line in table}) == 1  # aligned
    assert table[1].split()[:2] == ["a-much-longer-queue-name", "1"] and "2.0KiB" in table[1]
    assert table[2].split()[:2] == ["alpha", "3"]

    r = daemon.cli("ls")
    assert [line.split() for line in r.stdout.splitlines()] == [["a-much-longer-queue-name", "1"], ["alpha", "3"]]
    assert json.loads(daemon.cli("ls", "--json").stdout) == [{"name": "a-much-longer-queue-name", "depth": 1},
                                                            {"name": "alpha", "depth": 3}]
    watch = Reader(daemon, "stats", "alpha", "--json", "--watch", "0.2")
    try:
        wait_until(lambda: len(watch.lines) >= 3)
    finally:
        watch.stop()
    assert all(json.loads(x)["queues"][0]["name"] == "alpha" for x in watch.lines)


def test_peek_shows_without_consuming(daemon):
    with daemon.client() as c:
        c.send_many("p", ["a", "b", "c"])
    r = daemon.cli("peek", "p", "-n", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ['"a"', '"b"']
    assert daemon.cli("recv", "p", "--timeout", "5").stdout == '"a"\n'


def test_python_client_tail_sees_sends_without_consuming(daemon):
    with daemon.client() as c:
        start = c.tail("pyq", n=10)
        c.send("pyq", {"n": 1})
        got = c.tail("pyq", n=10, after=start["seq"], timeout=5)
        assert [(e[1], json.loads(e[3])) for e in got["entries"]] == [("pyq", {"n": 1})]
        assert c.recv("pyq", timeout=5).body == {"n": 1}  # still there for consumers
