"""The command line against a real daemon, as scripts use it (issue 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import base_env

from ipcd import errors


def test_send_then_recv_from_another_process_roundtrips_unicode_and_nesting(daemon):
    body = {"id": 7, "name": "ünï", "nested": {"list": [1, 2.5, None, True, "\u2603"], "empty": {}},
            "emoji": "\U0001F600", "quote": "a\"b\\c\nd"}
    r = daemon.cli("send", "jobs", json.dumps(body, ensure_ascii=False))
    assert r.returncode == 0, r.stderr
    r = daemon.cli("recv", "jobs", "--timeout", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1
    assert json.loads(r.stdout) == body


def test_stdin_message_and_dash(daemon):
    assert daemon.cli("send", "q", input='{"a":1}\n').returncode == 0
    assert daemon.cli("send", "q", "-", input='[1, 2]').returncode == 0
    r = daemon.cli("recv", "q", "-n", "5", "--timeout", "5")
    assert r.stdout.splitlines() == ['{"a":1}', "[1,2]"]


def test_invalid_json_exits_65_and_queues_nothing(daemon):
    r = daemon.cli("send", "q", "{not json")
    assert r.returncode == 65
    assert r.stderr.startswith("Error: invalid JSON")
    assert "Traceback" not in r.stderr
    assert daemon.cli("send", "q", "NaN").returncode == 65
    r = daemon.cli("recv", "q", "--timeout", "0.3")
    assert r.returncode == 75 and r.stdout == ""


def test_deeply_nested_json_is_a_data_error_not_a_traceback(daemon):
    deep = "[" * 100_000 + "]" * 100_000  # json's decoder recurses per level
    r = daemon.cli("send", "q", "--lines", input=deep + "\n[1]\n")
    assert r.returncode == 65, r.stderr
    assert r.stderr.startswith("Error: line 1: invalid JSON: nested too deeply"), r.stderr
    assert "Traceback" not in r.stderr
    with daemon.client() as c:  # the daemon refuses it too (another client, no local check)
        with pytest.raises(errors.DataError, match="nested too deeply"):
            c.send_json_many("q", [deep])
    r = daemon.cli("recv", "q", "-n", "5", "--timeout", "2")
    assert r.stdout.splitlines() == ["[1]"]


def test_text_mode_sends_json_strings(daemon):
    assert daemon.cli("send", "logs", "--text", "disk almost full").returncode == 0
    assert daemon.cli("send", "logs", "--lines", "--text", input="line one\n\nline \"two\"\n").returncode == 0
    r = daemon.cli("recv", "logs", "-n", "10", "--timeout", "5")
    assert [json.loads(x) for x in r.stdout.splitlines()] == ["disk almost full", "line one", 'line "two"']


def test_lines_reports_bad_line_numbers_but_sends_good_ones(daemon, tmp_path):
    f = tmp_path / "in.jsonl"
    lines = [json.dumps({"n": i}) for i in range(250)]
    lines.insert(3, "{broken")
    lines.insert(100, "")
    f.write_text("\n".join(lines) + "\n")
    with open(f) as stdin:
        r = subprocess.run([sys.executable, "-m", "ipcd", "send", "jobs", "--lines"], stdin=stdin,
                           env=daemon.env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 65
    assert "line 4" in r.stderr and "invalid JSON" in r.stderr
    got = daemon.cli("recv", "jobs", "-n", "1000", "--timeout", "5").stdout.splitlines()
    assert [json.loads(x)["n"] for x in got] == list(range(250))


def test_lines_streams_without_waiting_for_a_full_batch(daemon):
    sender = subprocess.Popen([sys.executable, "-m", "ipcd", "send", "logs", "--lines", "--text"],
                              stdin=subprocess.PIPE, env=daemon.env, text=True)
    try:
        sender.stdin.write("first\n")
        sender.stdin.flush()
        # The sender is still running with its stdin open: the line must arrive anyway.
        r = daemon.cli("recv", "logs", "--timeout", "10")
        assert r.returncode == 0 and json.loads(r.stdout) == "first"
    finally:
        sender.stdin.close()
        assert sender.wait(10) == 0


def test_recv_n_timeout_and_follow(daemon):
    for i in range(5):
        daemon.cli("send", "q", str(i))
    r = daemon.cli("recv", "q", "-n", "3", "--timeout", "5")
    assert r.stdout.splitlines() == ["0", "1", "2"]
    follower = subprocess.Popen([sys.executable, "-m", "ipcd", "recv", "q", "-f"], stdout=subprocess.PIPE,
                                env=daemon.env, text=True)
    try:
        assert follower.stdout.readline() == "3\n"
        assert follower.stdout.readline() == "4\n"
        daemon.cli("send", "q", '"later"')
        assert follower.stdout.readline() == '"later"\n'  # flushed per line, while still running
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(10)
    assert daemon.cli("recv", "q", "--timeout", "0.2").returncode == 75


def test_bad_queue_names_are_rejected(daemon):
    for name in ("has space", "x" * 201, "semi;colon", ""):
        r = daemon.cli("send", name, "1")
        assert r.returncode == 65, (name, r.stderr)
        assert r.stderr.startswith("Error: invalid queue name")


def test_oversize_message_is_refused_with_65(make_daemon):
    d = make_daemon("[defaults]\nmax_message_bytes = 1024\n").start()
    r = d.cli("send", "q", json.dumps("x" * 2000))
    assert r.returncode == 65 and "max_message_bytes" in r.stderr
    assert d.cli("send", "q", json.dumps("x" * 100)).returncode == 0


def test_status_and_stop(daemon):
    r = daemon.cli("status")
    assert r.returncode == 0, r.stderr
    assert f"pid {daemon.proc.pid}" in r.stdout and str(daemon.sock_path) in r.stdout
    st = json.loads(daemon.cli("status", "--json").stdout)
    assert st["running"] and st["pid"] == daemon.proc.pid
    r = daemon.cli("stop")
    assert r.returncode == 0, r.stderr
    assert daemon.proc.poll() == 0  # `stop` returns only once the daemon is gone
    assert not daemon.sock_path.exists()
    r = daemon.cli("status")
    assert r.returncode == 69 and r.stderr.startswith("Error:")
    assert daemon.cli("stop").returncode == 69


def test_daemon_down_fails_fast_with_69(make_daemon):
    d = make_daemon().start()
    d.stop()
    t = time.monotonic()
    r = d.cli("send", "q", "1")
    assert r.returncode == 69 and r.stderr.startswith("Error: no daemon is listening")
    assert time.monotonic() - t < 20  # generous: this is "no hang", not a benchmark


def test_listening_but_never_accepting_socket_does_not_hang(make_daemon):
    import socket as s

    d = make_daemon()
    d.sock_path.parent.mkdir(mode=0o700)
    (d.state_dir).mkdir(mode=0o700)
    (d.state_dir / "authkey").write_text("00" * 32)
    os.chmod(d.state_dir / "authkey", 0o600)
    blackhole = s.socket(s.AF_UNIX, s.SOCK_STREAM)
    blackhole.bind(str(d.sock_path))
    blackhole.listen(1)  # never accepts: the handshake never starts
    try:
        r = d.cli("send", "q", "1", timeout=30)
        assert r.returncode == 69 and "did not answer" in r.stderr
    finally:
        blackhole.close()


def test_wrong_authkey_exits_77_and_daemon_keeps_serving(daemon, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'address = "{daemon.sock_path}"\nstate_dir = "{daemon.state_dir}"\n'
                   f'authkey_file = "{tmp_path / "key"}"\n')
    (tmp_path / "key").write_text("not-the-key")
    os.chmod(tmp_path / "key", 0o600)
    r = daemon.cli("send", "q", "1", env_extra={"IPCD_CONFIG": str(bad)})
    assert r.returncode == 77 and "authkey" in r.stderr
    assert daemon.cli("send", "q", "2").returncode == 0
    assert daemon.cli("recv", "q", "--timeout", "5").stdout == "2\n"
    deadline = time.monotonic() + 5
    while "authentication failed" not in daemon.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.stderr().count("authentication failed") == 1


def test_config_show_and_check(daemon, tmp_path):
    r = daemon.cli("config", "show")
    assert r.returncode == 0
    assert str(daemon.sock_path) in r.stdout and "from file" in r.stdout
    good = tmp_path / "good.toml"
    good.write_text('[queues.jobs]\nmax_attempts = 3\n')
    r = daemon.cli("config", "check", str(good))
    assert r.returncode == 0 and "OK" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[defaults]\nmax_mesages = 5\n')
    r = daemon.cli("config", "check", str(bad))
    assert r.returncode == 78
    assert "max_mesages" in r.stderr and "max_messages" in r.stderr  # names it, suggests the fix
    bad.write_text('[defaults]\noverflow = "drop"\n')
    r = daemon.cli("config", "check", str(bad))
    assert r.returncode == 78 and "overflow" in r.stderr and "'drop'" in r.stderr
    bad.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")  # tomllib recurses per level
    r = daemon.cli("config", "check", str(bad))
    assert r.returncode == 78 and "nested too deeply" in r.stderr and "Traceback" not in r.stderr


def test_usage_errors_exit_2():
    r = subprocess.run([sys.executable, "-m", "ipcd", "recv"], env=base_env(), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2
    r = subprocess.run([sys.executable, "-m", "ipcd", "recv", "q", "--timeout", "abc"], env=base_env(),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "Error: Invalid value for '--timeout'" in r.stderr and "Traceback" not in r.stderr
