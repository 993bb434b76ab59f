"""SIGHUP reload, SIGUSR1 reopen, and the shutdown_timeout bound (issue 5)."""

from __future__ import annotations

import os
import signal
import time

QUEUE_CONF = '[queues.q]\nmax_messages = {n}\noverflow = "reject"\nlease_seconds = {lease}\n'


def reload(d, expect_failure=False) -> dict:
    """SIGHUP and wait for RELOADING=1 then READY=1; return READY's fields."""
    d.signal(signal.SIGHUP)
    d.wait_notify("RELOADING=1")
    msg = d.wait_notify("READY=1")
    fields = dict(x.split("=", 1) for x in msg.split("\n") if "=" in x)
    assert fields.get("STATUS", "").startswith("reload failed") == expect_failure, fields
    return fields


def sends(d, n) -> list[int]:
    """Exit-code-like results of n sends (the Python client: the file on disk may be invalid)."""
    from ipcd import errors

    out = []
    with d.client() as c:
        for i in range(n):
            try:
                c.send("q", i)
                out.append(0)
            except errors.IpcdError as e:
                out.append(int(e.exit_code))
    return out


def test_valid_reload_applies_queue_settings_and_log_level(make_daemon):
    d = make_daemon(QUEUE_CONF.format(n=2, lease=30)).start()
    assert sends(d, 3) == [0, 0, 75]  # max_messages = 2, overflow = reject
    d.write_config('log_level = "DEBUG"\nmax_store_bytes = "1GiB"\n' + QUEUE_CONF.format(n=5, lease=7.5))
    reload(d)
    assert sends(d, 4) == [0, 0, 0, 75]  # now 5
    log = d.stderr()
    assert "reloaded configuration from " + str(d.config_path) in log
    assert "queues.q.max_messages: 2 -> 5" in log and "queues.q.lease_seconds: 30.0 -> 7.5" in log
    assert "log_level: 'INFO' -> 'DEBUG'" in log
    assert "need a restart to take effect: max_store_bytes" in log
    assert "DEBUG ipcd.hub: queue q: sent 1 message(s)" in log  # the new level is live
    with d.client() as c:
        m = c.recv("q", timeout=5)
        assert 5 < c.touch([m]) <= 7.5  # default lease is the reloaded one


def test_invalid_reload_keeps_the_running_config(make_daemon):
    d = make_daemon(QUEUE_CONF.format(n=2, lease=30)).start()
    d.config_path.write_text(d.config_path.read_text().replace("max_messages = 2", "max_messages = 0"))
    fields = reload(d, expect_failure=True)
    assert "max_messages" in fields["STATUS"]
    d.config_path.write_text("this is [not toml")
    reload(d, expect_failure=True)
    assert sends(d, 3) == [0, 0, 75]  # still max_messages = 2
    log = d.stderr()
    assert log.count("ERROR ipcd.daemon: reload failed, keeping the running configuration") == 2
    assert "invalid TOML" in log
    d.write_config(QUEUE_CONF.format(n=3, lease=30))  # fixed: the next reload applies
    reload(d)
    assert sends(d, 2) == [0, 75]


def test_reload_with_an_unopenable_log_file_is_refused(make_daemon, tmp_path):
    d = make_daemon(QUEUE_CONF.format(n=2, lease=30)).start()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    d.write_config(f'log_file = "{blocker}/sub/ipcd.log"\n' + QUEUE_CONF.format(n=9, lease=30))
    fields = reload(d, expect_failure=True)
    assert "Not a directory" in fields["STATUS"] or "File exists" in fields["STATUS"]
    assert sends(d, 3) == [0, 0, 75]  # the queue change was not applied either


def test_sigusr1_reopens_logs_but_does_not_reload(make_daemon):
    d = make_daemon(QUEUE_CONF.format(n=2, lease=30)).start()
    d.write_config(QUEUE_CONF.format(n=5, lease=30))
    d.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while "reopened log and sink files" not in d.stderr():
        assert time.monotonic() < deadline, d.stderr()
        time.sleep(0.05)
    assert sends(d, 3) == [0, 0, 75]
    assert "reloaded configuration" not in d.stderr()


def test_shutdown_timeout_bounds_a_stuck_sink(make_daemon, short_tmp):
    """A sink blocked opening a FIFO nobody reads must not hold SIGTERM beyond shutdown_timeout."""
    fifo = short_tmp / "fifo"
    os.mkfifo(fifo)
    d = make_daemon(f'shutdown_timeout = 1\n[queues.s]\nsink = "{fifo}"\n').start()
    assert d.cli("send", "s", "1").returncode == 0
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    assert time.monotonic() - t0 < 4
    assert "did not finish its write within shutdown_timeout" in d.stderr()
