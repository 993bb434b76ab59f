"""Daemon lifecycle: signals, locks, stale sockets, reconnects (issue 2)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

from conftest import base_env


def test_files_are_private_and_authkey_generated(daemon):
    run_dir = daemon.sock_path.parent
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(daemon.sock_path).st_mode) == 0o600
    key_path = daemon.state_dir / "authkey"
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    key = key_path.read_text().strip()
    assert len(key) == 64 and int(key, 16) >= 0  # 32 random bytes, hex


def test_sigterm_stops_cleanly_and_wakes_blocked_receiver(daemon):
    receiver = subprocess.Popen([sys.executable, "-m", "ipcd", "recv", "jobs"], env=daemon.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    waiting = 0
    while time.monotonic() < deadline and waiting != 1:  # until the receiver is blocked in the daemon
        time.sleep(0.05)
        with daemon.client() as c:
            waiting = c.stats("jobs")[0]["waiting"]
    assert waiting == 1, "the receiver never blocked in the daemon"
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(5) == 0
    out, err = receiver.communicate(timeout=5)
    assert receiver.returncode == 69
    assert err.startswith("Error:") and "stopping" in err and "Traceback" not in err
    assert not daemon.sock_path.exists()


def test_sigint_also_stops_with_0(daemon):
    daemon.signal(signal.SIGINT)
    assert daemon.proc.wait(5) == 0


def test_second_start_is_refused(daemon):
    r = subprocess.run([sys.executable, "-m", "ipcd", "start"], env=daemon.env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 69
    assert "already running" in r.stderr and str(daemon.proc.pid) in r.stderr
    assert daemon.cli("send", "q", "1").returncode == 0  # the first one is unharmed


def test_stale_socket_after_kill9_is_replaced(make_daemon):
    d = make_daemon().start()
    assert d.cli("send", "q", '"kept"').returncode == 0
    d.kill9()
    assert d.sock_path.exists()  # left behind by the crash
    d.start()
    r = d.cli("recv", "q", "--timeout", "5")
    assert r.returncode == 0 and r.stdout == '"kept"\n'
    assert "stale socket" in d.stderr()


def test_python_client_reconnects_across_restart(make_daemon):
    d = make_daemon().start()
    c = d.client(reconnect_timeout=20)
    c.send("q", {"n": 1})
    assert d.stop() == 0
    d.start()
    c.send("q", {"n": 2})  # the same client object, after the restart
    got = [m.body for m in c.recv_many("q", 10, timeout=5)]
    assert got == [{"n": 1}, {"n": 2}]
    assert c.reconnects >= 1
    c.close()


def test_python_api(daemon):
    import ipcd

    c = ipcd.connect(str(daemon.config_path))
    try:
        mid = c.send("jobs", {"id": 7})
        ids = c.send_many("jobs", [{"id": 8}, {"id": 9}])
        assert ids == [mid + 1, mid + 2]
        m = c.recv("jobs", timeout=5)
        assert m.body == {"id": 7} and m.id == mid and m.attempts == 1
        m.ack()
        ms = c.recv_many("jobs", 100, timeout=5)
        assert [x.body for x in ms] == [{"id": 8}, {"id": 9}]
        c.ack(ms)
        assert c.recv("jobs", timeout=0.2) is None
    finally:
        c.close()


STDLIB_CLIENT = r"""
import json, sys
from multiprocessing.managers import BaseManager
class M(BaseManager):
    pass
M.register("queue")
m = M(address=sys.argv[1], authkey=open(sys.argv[2], "rb").read().strip())
m.connect()
q = m.queue("jobs")
q.put(json.dumps({"from": "stdlib", "n": 1}))
print(q.get(timeout=5))
try:
    q.get(timeout=0.2)
except Exception as e:
    print(type(e).__name__)
try:
    q.put("{not json")
except ValueError as e:
    print("ValueError")
"""


def test_stdlib_only_client_without_ipcd(daemon, tmp_path):
    script = tmp_path / "plain.py"
    script.write_text(STDLIB_CLIENT)
    env = {k: v for k, v in base_env().items() if k != "PYTHONPATH"}
    # -I: isolated mode, cannot import ipcd from the source tree or site-packages of the cwd.
    r = subprocess.run([sys.executable, "-I", str(script), str(daemon.sock_path),
                        str(daemon.state_dir / "authkey")], env=env, capture_output=True, text=True,
                       timeout=30, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == '{"from": "stdlib", "n": 1}'
    assert lines[1] == "Empty"
    assert lines[2] == "ValueError"
    # And the ipcd CLI sees what stdlib clients send.
    daemon.cli("send", "jobs", "1")
    assert daemon.cli("recv", "jobs", "--timeout", "5").stdout == "1\n"


def test_cron_like_environment_finds_the_daemon(daemon):
    env = {"HOME": str(daemon.root), "PATH": "/usr/bin:/bin", "IPCD_CONFIG": str(daemon.config_path),
           "PYTHONPATH": base_env()["PYTHONPATH"]}
    r = subprocess.run([sys.executable, "-m", "ipcd", "send", "q", "1"], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
