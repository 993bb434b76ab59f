"""Shared fixtures: a real daemon subprocess per test, in its own temp dir.

Every daemon gets its own config file (address and state in a private temp
dir) and ``IPCD_CONFIG`` pointing at it, so no test can touch the root
defaults (/run/ipcd, /var/lib/ipcd, /etc/ipcd).  Readiness is the daemon's
own ``READY=1`` on a notify socket the fixture binds (what systemd would
see), and teardown always stops the process group: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
START_TIMEOUT = 20.0

# Variables that would leak the developer's or CI's environment into tests.
_SCRUB = ("IPCD_CONFIG", "IPCD_ADDRESS", "IPCD_STATE_DIR", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
          "JOURNAL_STREAM", "RUNTIME_DIRECTORY", "STATE_DIRECTORY", "LOGS_DIRECTORY", "LISTEN_FDS", "LISTEN_PID")


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Daemon:
    """One ``ipcd start`` subprocess with its own config, socket and state."""

    def __init__(self, root: Path, config_text: str = ""):
        self.root = root
        self.sock_path = root / "run" / "ipcd.sock"
        self.state_dir = root / "state"
        self.config_path = root / "config.toml"
        self.log_path = root / "daemon.stderr"
        self.proc: subprocess.Popen | None = None
        self.notify_path = root / "notify.sock"
        self.notify_sock: socket.socket | None = None
        self.notifications: list[str] = []
        self.write_config(config_text)

    def write_config(self, extra: str = ""):
        self.config_path.write_text(
            f'address = "{self.sock_path}"\nstate_dir = "{self.state_dir}"\n{extra}\n')

    @property
    def env(self) -> dict:
        return base_env(IPCD_CONFIG=str(self.config_path))

    def start(self, *args, env_extra: dict | None = None, wait: bool = True, notify: bool = True):
        env = self.env
        if notify:
            if self.notify_sock is None:
                self.notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self.notify_sock.bind(str(self.notify_path))
                self.notify_sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            env["NOTIFY_SOCKET"] = str(self.notify_path)
        env.update(env_extra or {})
        self.notifications = []
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "ipcd", "start", *args], env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                     process_group=0)
        if wait:
            self.wait_ready()
        return self

    def wait_notify(self, key: str, timeout: float = START_TIMEOUT) -> str:
        """Wait for a notify datagram containing *key* (e.g. 'READY=1')."""
        deadline = time.monotonic() + timeout
        for msg in self.notifications:
            if key in msg.split("\n"):
                self.notifications.remove(msg)
                return msg
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.stderr()}")
            self.notify_sock.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
            try:
                data = self.notify_sock.recv(4096).decode()
            except socket.timeout:
                continue
            if key in data.split("\n"):
                return data
            self.notifications.append(data)
        raise AssertionError(f"no {key} within {timeout} s:\n{self.stderr()}")

    def wait_ready(self, timeout: float = START_TIMEOUT):
        self.wait_notify("READY=1", timeout)

    def stderr(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig):
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise AssertionError(f"daemon ignored SIGTERM for {timeout} s:\n{self.stderr()}")

    def kill9(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        if self.notify_sock is not None:
            self.notify_sock.close()
        if getattr(self, "_log", None):
            self._log.close()

    # -- talking to it like users do -----------------------------------------

    def cli(self, *args, input: str | bytes | None = None, timeout: float = 30, env_extra=None,
            ) -> subprocess.CompletedProcess:
        env = self.env
        env.update(env_extra or {})
        return subprocess.run([sys.executable, "-m", "ipcd", *args], input=input, env=env,
                              capture_output=True, text=not isinstance(input, bytes), timeout=timeout)

    def authkey(self) -> bytes:
        return (self.state_dir / "authkey").read_bytes().strip()

    def client(self, **kw):
        from ipcd.client import Client

        kw.setdefault("reconnect_timeout", 0)
        return Client(str(self.sock_path), self.authkey(), **kw)


def wait_until(pred, what="", timeout=60.0, on_fail=None, every=0.02):
    """Poll *pred* until it returns something truthy (and return that), or fail after *timeout*.

    *what* (a string, or a callable for a late description) and *on_fail()* go into the
    failure message.  A no-hang bound, not a timing assertion.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            desc = what() if callable(what) else what
            extra = on_fail() if on_fail is not None else ""
            raise AssertionError(f"timed out waiting for {desc}" + (f"\n{extra}" if extra else ""))
        time.sleep(every)


def drain(c, queue, n=1000, attr="body"):
    """Receive and ack until the queue is empty; return each message's *attr* in delivery order."""
    out = []
    while True:
        msgs = c.recv_many(queue, n, timeout=0.2)
        if not msgs:
            st = c.stats(queue)[0]
            assert st["leased"] == 0 and st["delayed"] == 0, st
            return out
        out += [getattr(m, attr) for m in msgs]
        assert c.ack(msgs) == len(msgs)


@pytest.fixture
def short_tmp():
    """A short temp dir: Unix socket paths must stay under 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="ipcd-t-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_daemon(short_tmp):
    made = []

    def factory(config_text: str = "", name: str = "d") -> Daemon:
        root = short_tmp / f"{name}{len(made)}"
        root.mkdir()
        d = Daemon(root, config_text)
        made.append(d)
        return d

    yield factory
    for d in made:
        d.cleanup()


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    """A started daemon on defaults."""
    return make_daemon().start()


def pytest_configure(config):
    if SRC not in sys.path:
        sys.path.insert(0, SRC)
