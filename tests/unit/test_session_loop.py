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
