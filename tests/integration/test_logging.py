"""Daemon logs: journald prefixes, log files across rotation, `ipcd logs` (issue 5)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import wait_until

SENT = re.compile(r"queue q: sent 1 message\(s\), id (\d+)$")


def sent_ids(path) -> list[int]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [int(m.group(1)) for line in text.splitlines() if (m := SENT.search(line))]


# -- journald -------------------------------------------------------------------------


def test_journal_prefixes_when_journal_stream_names_our_stderr(make_daemon):
    d = make_daemon()
    d.log_path.touch()
    st = os.stat(d.log_path)  # the fixture opens this file as the daemon's stderr
    d.start(env_extra={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert d.cli("send", "q", "1").returncode == 0
    d.config_path.write_text("broken [")
    d.signal(signal.SIGHUP)  # an ERROR line
    d.wait_notify("RELOADING=1")
    d.wait_notify("READY=1")
    assert d.stop() == 0
    lines = [x for x in d.stderr().splitlines() if x]
    assert lines and all(re.match(r"<[2-7]>ipcd\.", x) for x in lines), lines
    assert any(x.startswith("<6>ipcd.daemon: ipcd ") and "listening" in x for x in lines)
    assert any(x.startswith("<3>ipcd.daemon: reload failed") for x in lines)
    assert not any("sent 1 message" in x for x in lines)  # per-message lines are DEBUG only


def test_no_journal_prefixes_when_journal_stream_names_another_file(make_daemon, tmp_path):
    other = tmp_path / "elsewhere"
    other.write_text("")
    st = os.stat(other)
    d = make_daemon().start(env_extra={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert d.stop() == 0
    lines = [x for x in d.stderr().splitlines() if x]
    assert lines and not any(re.match(r"<\d>", x) for x in lines)
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) ipcd\.", x) for x in lines), lines


# -- log files and rotation ---------------------------------------------------------------------


def _rotation_run(make_daemon, signal_after_rename):
    d = make_daemon()
    log = d.root / "ipcd.log"
    d.write_config(f'log_file = "{log}"\nlog_level = "DEBUG"\n')
    d.start()
    with d.client() as c:
        for i in range(100):
            c.send("q", i)
        os.rename(log, log.with_suffix(".log.1"))
        if signal_after_rename:
            d.signal(signal_after_rename)
        for i in range(100, 200):
            c.send("q", i)
    assert d.stop() == 0
    old, new = sent_ids(log.with_suffix(".log.1")), sent_ids(log)
    assert sorted(old + new) == list(range(1, 201))  # none lost, none doubled
    assert old == list(range(1, 101)) and new == list(range(101, 201))  # later lines in the new file
    return d


def test_log_file_rename_then_sighup(make_daemon):
    d = _rotation_run(make_daemon, signal.SIGHUP)
    assert "reloaded configuration" in (d.root / "ipcd.log").read_text()


def test_log_file_rename_without_any_signal(make_daemon):
    _rotation_run(make_daemon, None)  # WatchedFileHandler notices the new inode by itself


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate not installed (apt-get install logrotate)")
def test_real_logrotate_with_create_and_usr1_loses_nothing(make_daemon):
    d = make_daemon()
    log = d.root / "ipcd.log"
    d.write_config(f'log_file = "{log}"\nlog_level = "DEBUG"\n')
    d.start()
    conf = d.root / "logrotate.conf"
    conf.write_text(f"{log} {{\n  rotate 3\n  create 0640\n  missingok\n  postrotate\n"
                    f"    kill -USR1 {d.proc.pid}\n  endscript\n}}\n")
    stop = threading.Event()
    count = [0]

    def sender():
        with d.client() as c:
            while not stop.is_set():
                c.send("q", count[0])
                count[0] += 1

    t = threading.Thread(target=sender)
    t.start()
    try:
        wait_until(lambda: count[0] >= 300, what="300 sends")
        r = subprocess.run(["logrotate", "-f", "-s", str(d.root / "lr.state"), str(conf)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        n_at_rotation = count[0]
        wait_until(lambda: count[0] >= n_at_rotation + 300, what="300 more sends")
    finally:
        stop.set()
        t.join(30)
    assert d.stop() == 0
    old, new = sent_ids(d.root / "ipcd.log.1"), sent_ids(log)
    assert sorted(old + new) == list(range(1, count[0] + 1)), (len(old), len(new), count[0])
    assert len(new) >= 300 and oct(os.stat(log).st_mode & 0o777) == "0o640"
    assert "reopened log and sink files" in log.read_text()


# -- ipcd logs -------------------------------------------------------------------------------------


def test_ipcd_logs_shows_last_lines_and_follows_across_rotation(make_daemon):
    d = make_daemon()
    log = d.root / "ipcd.log"
    d.write_config(f'log_file = "{log}"\n')
    d.start()
    for i in range(1, 4):  # one INFO line each (one at a time: pending signals coalesce)
        d.signal(signal.SIGUSR1)
        wait_until(lambda: log.read_text().count("reopened log") == i, what=f"{i} reopen lines")
    r = d.cli("logs", "-n", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == log.read_text().splitlines()[-2:]
    follower = subprocess.Popen([sys.executable, "-m", "ipcd", "logs", "-f", "-n", "0"], env=d.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # let it open the file
        os.rename(log, log.with_suffix(".log.1"))
        d.signal(signal.SIGUSR1)  # written to the new file: the follower must switch to it
        wait_until(lambda: log.exists() and "reopened log" in log.read_text(), what="new log file")
        assert d.cli("send", "q", "1").returncode == 0
        d.signal(signal.SIGHUP)
        d.wait_notify("READY=1")
        time.sleep(1.0)
    finally:
        follower.terminate()
        out, err = follower.communicate(timeout=10)
    assert "reopened log and sink files" in out and "reloaded configuration" in out, (out, err)


def test_ipcd_logs_without_a_log_file_points_at_journalctl(daemon):
    r = daemon.cli("logs")
    assert r.returncode == 69
    assert r.stderr.startswith("Error:") and "journalctl" in r.stderr and r.stderr.count("\n") == 1
