"""sd_notify as systemd sees it, without systemd: a SO_PASSCRED datagram socket (issue 5).

The kernel attaches SCM_CREDENTIALS to every datagram, so each test can
check the sender is the daemon's main PID (NotifyAccess=main ignores others).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

_UCRED = struct.Struct("3i")


def recv_notify(sock: socket.socket, timeout: float):
    """One datagram as (fields dict, sender pid), or (None, None) on timeout."""
    sock.settimeout(max(0.001, timeout))
    try:
        data, anc, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
    except socket.timeout:
        return None, None
    pid = None
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = _UCRED.unpack(cdata[:_UCRED.size])[0]
    fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
    return fields, pid


def wait_for(sock, key, timeout=20.0, proc=None):
    """Read datagrams until one has *key*; return (fields, pid, every datagram seen)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}")
        fields, pid = recv_notify(sock, min(0.2, deadline - time.monotonic()))
        if fields is None:
            continue
        seen.append((fields, pid))
        if key in fields:
            return fields, pid, seen
    raise AssertionError(f"no {key} within {timeout} s; got {seen}")


def collect(sock, seconds):
    """Every datagram for *seconds*: list of (arrival monotonic time, fields, pid)."""
    out = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        fields, pid = recv_notify(sock, left)
        if fields is not None:
            out.append((time.monotonic(), fields, pid))
    return out


def test_ready_only_once_the_socket_accepts_and_from_the_main_pid(make_daemon):
    d = make_daemon().start(wait=False)
    fields, pid, seen = wait_for(d.notify_sock, "READY", proc=d.proc)
    with d.client(connect_timeout=2) as c:  # right after READY: must connect at once
        assert c.status()["pid"] == d.proc.pid
    assert fields["READY"] == "1" and pid == d.proc.pid
    assert fields["STATUS"] == "0 queue(s), 0 message(s)"
    assert all(p == d.proc.pid for _f, p in seen)


def test_sighup_sends_reloading_with_monotonic_usec_then_ready(daemon):
    daemon.signal(signal.SIGHUP)
    fields, pid, _ = wait_for(daemon.notify_sock, "RELOADING", proc=daemon.proc)
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert pid == daemon.proc.pid
    assert abs(now_usec - int(fields["MONOTONIC_USEC"])) < 5_000_000  # same clock as systemd's
    fields, pid, _ = wait_for(daemon.notify_sock, "READY", proc=daemon.proc)
    assert pid == daemon.proc.pid and not fields.get("STATUS", "").startswith("reload failed")


def test_sigterm_sends_stopping_and_exits_0(daemon):
    daemon.signal(signal.SIGTERM)
    _fields, pid, _ = wait_for(daemon.notify_sock, "STOPPING")
    assert pid == daemon.proc.pid
    assert daemon.proc.wait(10) == 0


def test_watchdog_pings_at_half_the_timeout(make_daemon):
    d = make_daemon().start(env_extra={"WATCHDOG_USEC": "400000"}, wait=False)
    wait_for(d.notify_sock, "READY", proc=d.proc)
    got = [(t, pid) for t, f, pid in collect(d.notify_sock, 2.0) if f.get("WATCHDOG") == "1"]
    assert 6 <= len(got) <= 14, got  # every 0.2 s: ~10 in 2 s; a range, not exact timing
    assert all(pid == d.proc.pid for _t, pid in got)
    gaps = [b[0] - a[0] for a, b in zip(got, got[1:])]
    assert max(gaps) < 0.4, gaps  # never near WATCHDOG_USEC, or systemd would SIGABRT us


def test_no_watchdog_pings_when_watchdog_pid_is_another_process(make_daemon):
    d = make_daemon().start(env_extra={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, wait=False)
    wait_for(d.notify_sock, "READY", proc=d.proc)
    pings = [f for _t, f, _p in collect(d.notify_sock, 1.2) if "WATCHDOG" in f]
    assert pings == []


def test_abstract_notify_socket(make_daemon):
    d = make_daemon()
    name = f"ipcd-test-{uuid.uuid4().hex[:12]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    d.notify_sock = sock  # the fixture closes it at teardown
    d.start(env_extra={"NOTIFY_SOCKET": "@" + name}, wait=False)
    fields, pid, _ = wait_for(sock, "READY", proc=d.proc)
    assert pid == d.proc.pid
    d.signal(signal.SIGTERM)
    wait_for(sock, "STOPPING")
    assert d.proc.wait(10) == 0


def test_failed_start_reports_status_and_errno(daemon, tmp_path):
    """A second instance exits 69 and tells systemd why (STATUS=failed: ..., ERRNO=69)."""
    path = tmp_path / "n2.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(path))
        env = {**daemon.env, "NOTIFY_SOCKET": str(path)}
        r = subprocess.run([sys.executable, "-m", "ipcd", "start"], env=env, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 69
        fields, _pid = recv_notify(sock, 5)
        assert fields["STATUS"].startswith("failed:") and "already running" in fields["STATUS"]
        assert fields["ERRNO"] == "69"
    finally:
        sock.close()
        os.unlink(path)
