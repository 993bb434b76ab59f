"""SessionLoop liveness, as the daemon's main loop and watchdog check it (no sockets)."""

from __future__ import annotations

import logging

import pytest

from ipcd import config as configmod
from ipcd.hub import Hub
from ipcd.memstore import MemoryStore
from ipcd.server import Limits, RateLimitedLog
from ipcd.sessions import SessionLoop


def make_loop(tmp_path) -> SessionLoop:
    p = tmp_path / "c.toml"
    p.write_text(f'address = "{tmp_path}/s"\nstate_dir = "{tmp_path}/st"\n')
    mem = MemoryStore()
    mem.open()
    hub = Hub(configmod.load(str(p), env={}), {"os": mem, "fsync": mem, "memory": mem})
    hub.open()
    return SessionLoop(hub, {}, Limits, RateLimitedLog(logging.getLogger("test")))


def test_a_running_loop_is_alive_and_responsive(tmp_path):
    loop = make_loop(tmp_path)
    assert not loop.alive()
    loop.start()
    assert loop.alive() and loop.responsive(10)
    loop.begin_stop()
    assert loop.wait_idle(10)
    loop.close(10)
    assert not loop.alive() and not loop.responsive(0.05)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_a_loop_that_died_is_reported_dead(tmp_path, caplog):
    loop = make_loop(tmp_path)
    loop.start()

    def bug():
        raise SystemExit("simulated: escapes the per-callback guard, as a BaseException would")

    loop._post(bug)
    loop._thread.join(10)
    assert not loop.alive()
    assert not loop.responsive(0.05)
    assert "session loop failed" in caplog.text
    loop.queue_changed(object())  # wake-ups after death are harmless (the pipe stays open)


def test_served_waits_do_not_pile_up_timers_or_waiters(tmp_path):
    # A consumer looping on recv(timeout=3600) parks and is served thousands of times a
    # second; each served wait leaves a heap entry that would otherwise live for an hour.
    import socket

    from ipcd.sessions import Session

    loop = make_loop(tmp_path)  # not started: the data structures only, in this thread
    q = loop.hub.queue("q")
    a, b = socket.socketpair()
    s, other = Session(a, "s"), Session(b, "other")
    loop._park(other, q, 3600.0, lambda s: False, lambda s: None, "get")  # one that stays parked
    for _ in range(10_000):
        loop._park(s, q, 3600.0, lambda s: False, lambda s: None, "get")
        loop._unpark(s)  # served
    assert len(loop._timers) <= 2 * 1 + 64 + 1
    assert list(loop._waiters[q]) == [other] and q.waiting == 1
    assert loop._timers[0][2] is other  # the live entry survived the rebuilds
    loop._unpark(other)
    assert q not in loop._waiters and q.waiting == 0
    a.close()
    b.close()


def test_unparking_twice_is_harmless(tmp_path):
    # An attempt that unparks its session and then fails (the store closed under it) is
    # unparked again by the retry's error path: that must not raise in the loop thread.
    import socket

    from ipcd.sessions import Session

    loop = make_loop(tmp_path)
    q = loop.hub.queue("q")
    a, b = socket.socketpair()
    s = Session(a, "s")
    loop._park(s, q, 10.0, lambda s: False, lambda s: None, "put")
    loop._unpark(s)
    loop._unpark(s)
    assert q.waiting == 0 and loop._timed == 0
    a.close()
    b.close()
