"""``ipcd worker`` against a real daemon (issue 6): exec and --call modes, retries,
timeouts, signals, a SIGKILLed pool child, a daemon restart, cron-style exits.

The worker always runs as a subprocess (``python -m ipcd worker ...``) in its
own process group, logging to a file the tests read.  No wall-clock
assertions: parallelism is shown by intersecting intervals, and every wait
has a generous no-hang bound.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_until

TESTS_DIR = str(Path(__file__).resolve().parents[1])
NO_HANG = 60.0  # bound for things that take a second or two


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie nobody has reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class WorkerProc:
    def __init__(self, d, args, root: Path, n: int):
        self.out = root / f"out{n}"
        self.out.mkdir()
        self.log_path = root / f"worker{n}.log"
        env = d.env
        env["PYTHONPATH"] = TESTS_DIR + os.pathsep + env["PYTHONPATH"]
        env["IPCD_TEST_OUT"] = str(self.out)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "ipcd", "worker", *args], env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                     process_group=0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, count: int = 1, timeout: float = NO_HANG):
        wait_until(lambda: self.log().count(needle) >= count, f"{count} x {needle!r} in the worker log",
                   timeout, self.tail)

    def tail(self) -> str:
        return "worker log (tail):\n" + self.log()[-6000:]

    def wait(self, timeout: float = NO_HANG) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker still running after {timeout} s\n{self.tail()}") from None

    def signal(self, sig):
        os.kill(self.proc.pid, sig)

    def cleanup(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def worker(short_tmp):
    made = []

    def start(d, *args) -> WorkerProc:
        w = WorkerProc(d, args, short_tmp, len(made))
        made.append(w)
        return w

    yield start
    for w in made:
        w.cleanup()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def worker_cli(d, *args):
    return d.cli("worker", *args, env_extra={"PYTHONPATH": TESTS_DIR + os.pathsep + d.env["PYTHONPATH"]})


# -- exec mode --------------------------------------------------------------------------


def test_exec_runs_a_command_per_message_with_body_on_stdin(make_daemon, worker):
    d = make_daemon().start()
    bodies = [{"n": i, "text": "ünï \"q\""} for i in range(40)]
    with d.client() as c:
        c.send_many("jobs", bodies)
    out = d.root / "out.txt"
    # One printf per message: a single O_APPEND write, so concurrent lines never mix.
    script = f'printf "%s %s %s %s\\n" "$IPCD_QUEUE" "$IPCD_MESSAGE_ID" "$IPCD_ATTEMPT" "$(cat)" >> {out}'
    w = worker(d, "jobs", "-j", "3", "--idle-exit", "1", "--", "sh", "-c", script)
    assert w.wait() == 0, w.tail()
    got = [line.split(" ", 3) for line in lines(out)]
    assert sorted((json.loads(body) for *_, body in got), key=lambda b: b["n"]) == bodies
    assert {q for q, *_ in got} == {"jobs"} and {a for _, _, a, _ in got} == {"1"}
    assert len({i for _, i, _, _ in got}) == 40
    with d.client() as c:
        st = c.stats("jobs")[0]
    assert st["ready"] == st["leased"] == 0 and st["acked"] == 40
    assert w.log().count("result=ok") == 40


def test_failing_command_is_retried_then_dead_lettered_with_its_reason(make_daemon, worker):
    d = make_daemon("[queues.flaky]\nmax_attempts = 2").start()
    with d.client() as c:
        c.send("flaky", {"n": 1})
    script = 'cat > /dev/null; echo "boom on attempt $IPCD_ATTEMPT" >&2; exit 3'
    w = worker(d, "flaky", "--retry-delay", "0.2", "--idle-exit", "2", "--", "sh", "-c", script)
    assert w.wait() == 0, w.tail()
    r = d.cli("dead", "ls", "flaky")
    dead = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(dead) == 1 and dead[0]["body"] == {"n": 1} and dead[0]["attempts"] == 2
    assert "exit status 3" in dead[0]["reason"] and "boom on attempt 2" in dead[0]["reason"]
    log = w.log()
    assert "attempt=1 result=failed" in log and "retry_in=0.2s" in log
    assert "attempt=2 result=dead" in log
    assert "boom on attempt 1" in log  # the command's stderr is passed on, too


def test_timeout_kills_the_command_and_everything_it_started(make_daemon, worker):
    d = make_daemon("[queues.slow]\nmax_attempts = 1").start()
    with d.client() as c:
        c.send("slow", {"n": 1})
    script = f'sleep 120 & echo $! > {d.root}/bg.pid; echo $$ > {d.root}/sh.pid; wait'
    w = worker(d, "slow", "--timeout", "1", "--idle-exit", "2", "--", "sh", "-c", script)
    assert w.wait() == 0, w.tail()
    for name in ("sh.pid", "bg.pid"):
        pid = int((d.root / name).read_text())
        wait_until(lambda: gone(pid), f"{name} ({pid}) to be killed", on_fail=w.tail)
    dead = [json.loads(x) for x in d.cli("dead", "ls", "slow").stdout.splitlines()]
    assert len(dead) == 1
    assert "timed out after 1 s" in dead[0]["reason"], dead
    assert "attempt=1 result=dead" in w.log()


# -- --call mode ---------------------------------------------------------------------


def test_call_pool_handles_messages_in_parallel(make_daemon, worker):
    d = make_daemon().start()
    with d.client() as c:
        c.send_many("calls", [{"n": i, "sleep": 1.5} for i in range(3)])
    w = worker(d, "calls", "-j", "3", "--call", "fixtures.handlers:record")
    recs = wait_until(lambda: len(list(w.out.glob("rec-*.json"))) == 3 and list(w.out.glob("rec-*.json")),
                      "three records", on_fail=w.tail)
    w.wait_log("result=ok", 3)
    w.signal(signal.SIGTERM)
    assert w.wait() == 0, w.tail()
    rs = [json.loads(p.read_text()) for p in recs]
    # Every interval intersects every other: all three ran at the same time.
    assert max(r["start"] for r in rs) < min(r["end"] for r in rs), rs
    assert len({r["pid"] for r in rs}) == 3 and w.proc.pid not in {r["pid"] for r in rs}


def test_call_exception_is_retried_then_dead_lettered(make_daemon, worker):
    d = make_daemon("[queues.calls]\nmax_attempts = 2").start()
    with d.client() as c:
        c.send("calls", {"n": 5})
    w = worker(d, "calls", "--call", "fixtures.handlers:fail", "--retry-delay", "0", "--idle-exit", "1.5")
    assert w.wait() == 0, w.tail()
    dead = [json.loads(x) for x in d.cli("dead", "ls", "calls").stdout.splitlines()]
    assert len(dead) == 1 and dead[0]["attempts"] == 2
    assert "ValueError: bad input 5" in dead[0]["reason"]
    log = w.log()
    assert "attempt=1 result=failed" in log and "attempt=2 result=dead" in log
    assert "Traceback" in log and "in fail" in log


def test_call_timeout_kills_the_child_and_a_new_one_takes_over(make_daemon, worker):
    d = make_daemon("[queues.calls]\nmax_attempts = 1").start()
    with d.client() as c:
        c.send_many("calls", [{"n": 1, "sleep": 120}, {"n": 2}])
    w = worker(d, "calls", "--call", "fixtures.handlers:record", "--timeout", "1", "--idle-exit", "2")
    assert w.wait() == 0, w.tail()
    dead = [json.loads(x) for x in d.cli("dead", "ls", "calls").stdout.splitlines()]
    assert [x["body"]["n"] for x in dead] == [1]
    assert "timed out after 1 s" in dead[0]["reason"] and "killed by SIGKILL" in dead[0]["reason"]
    assert [json.loads(p.read_text())["n"] for p in w.out.glob("rec-*.json")] == [2]


def test_sigkilled_child_neither_silences_logging_nor_hangs_the_worker(make_daemon, worker):
    d = make_daemon().start()
    w = worker(d, "mix", "-j", "3", "--call", "fixtures.handlers:dispatch", "--retry-delay", "0")
    with d.client() as c:
        # One child takes its log queue's write lock (as a feeder thread mid-send
        # does) and waits; one logs big records nonstop.  Then both get SIGKILL.
        c.send_many("mix", [{"do": "hold_log_lock"}, {"do": "flood"}])
        pids = [wait_until(lambda p=p: (w.out / p).exists() and json.loads((w.out / p).read_text()),
                           p, on_fail=w.tail) for p in ("hold.pid", "flood.pid")]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        c.send_many("mix", [{"do": "chatty", "n": i} for i in range(10)])
    w.wait_log("died: killed by SIGKILL", 2)
    for i in range(10):
        w.wait_log(f"chatty handled {i}")  # logged by the (new) children, through multiprocessing-logging
    w.wait_log("hold_log_lock retried")
    w.wait_log("flood retried")
    w.wait_log("result=ok", 12)
    w.signal(signal.SIGTERM)
    assert w.wait() == 0, w.tail()
    assert "worker stopped" in w.log()
    with d.client() as c:
        st = c.stats("mix")[0]
    assert st["ready"] == st["leased"] == st["delayed"] == 0


# -- signals ------------------------------------------------------------------------------


def test_sigterm_mid_batch_loses_nothing_and_duplicates_nothing(make_daemon, worker):
    d = make_daemon().start()
    with d.client() as c:
        ids = c.send_many("batch", [{"n": i} for i in range(20)])
    out = d.root / "out.txt"
    w = worker(d, "batch", "-j", "2", "--grace", "30", "--", "sh", "-c",
               f'sleep 0.3; printf "%s\\n" "$IPCD_MESSAGE_ID" >> {out}')
    wait_until(lambda: len(lines(out)) >= 4, "4 processed messages", on_fail=w.tail)
    w.signal(signal.SIGHUP)  # ignored
    w.wait_log("SIGHUP ignored")
    w.signal(signal.SIGTERM)
    assert w.wait() == 0, w.tail()
    done = [int(x) for x in lines(out)]
    with d.client() as c:
        assert c.stats("batch")[0]["leased"] == 0  # the worker released what it held
        rest = c.recv_many("batch", 100, timeout=1)
    assert len(done) == len(set(done)), "a graceful stop runs nothing twice"
    assert set(done).isdisjoint(m.id for m in rest)
    assert set(done) | {m.id for m in rest} == set(ids)
    assert all(m.attempts == 1 for m in rest), "released messages are not charged an attempt"
    assert "worker stopped (SIGTERM)" in w.log()


def test_grace_expiry_stops_the_command_and_releases_its_message(make_daemon, worker):
    d = make_daemon().start()
    with d.client() as c:
        c.send("slow", {"n": 1})
    w = worker(d, "slow", "--grace", "1", "--", "sh", "-c", f"echo $$ > {d.root}/sh.pid; sleep 120")
    pid = int(wait_until(lambda: (d.root / "sh.pid").exists() and (d.root / "sh.pid").read_text().strip(),
                         "the command to start", on_fail=w.tail))
    w.signal(signal.SIGTERM)
    assert w.wait() == 0, w.tail()
    wait_until(lambda: gone(pid), "the command to be gone")
    assert "result=released" in w.log()
    with d.client() as c:
        m = c.recv("slow", timeout=5)
    assert m is not None and m.body == {"n": 1} and m.attempts == 1


def test_second_signal_stops_at_once(make_daemon, worker):
    d = make_daemon().start()
    with d.client() as c:
        c.send("slow", {"n": 1})
    w = worker(d, "slow", "--grace", "300", "--", "sh", "-c", f"echo $$ > {d.root}/sh.pid; sleep 120")
    pid = int(wait_until(lambda: (d.root / "sh.pid").exists() and (d.root / "sh.pid").read_text().strip(),
                         "the command to start", on_fail=w.tail))
    w.signal(signal.SIGINT)
    w.wait_log("stopping (SIGINT)")
    w.signal(signal.SIGINT)
    assert w.wait() == 128 + signal.SIGINT, w.tail()
    wait_until(lambda: gone(pid), "the command to be gone")


# -- daemon restart, cron-style runs, errors ------------------------------------------------


def test_worker_carries_on_across_a_daemon_restart(make_daemon, worker):
    d = make_daemon().start()
    with d.client() as c:
        ids = c.send_many("jobs", [{"n": i} for i in range(30)])
    out = d.root / "out.txt"
    w = worker(d, "jobs", "-j", "2", "--reconnect-timeout", "60", "--", "sh", "-c",
               f'sleep 0.1; printf "%s\\n" "$IPCD_MESSAGE_ID" >> {out}')
    wait_until(lambda: len(lines(out)) >= 5, "5 processed messages", on_fail=w.tail)
    assert d.stop() == 0
    d.start()
    # At-least-once: an ack lost in the restart means that message runs again.
    wait_until(lambda: {int(x) for x in lines(out)} >= set(ids), "every message processed", on_fail=w.tail)
    wait_until(lambda: d.client().stats("jobs")[0]["ready"] + d.client().stats("jobs")[0]["leased"] == 0,
               "the queue to drain", on_fail=w.tail)
    w.signal(signal.SIGTERM)
    assert w.wait() == 0, w.tail()
    assert w.proc.returncode == 0


def test_daemon_gone_past_the_reconnect_timeout_exits_69(make_daemon, worker):
    d = make_daemon().start()
    with d.client() as c:
        c.send("slow", {"n": 1})
    w = worker(d, "slow", "--reconnect-timeout", "1", "--", "sh", "-c", f"echo $$ > {d.root}/sh.pid; sleep 120")
    pid = int(wait_until(lambda: (d.root / "sh.pid").exists() and (d.root / "sh.pid").read_text().strip(),
                         "the command to start", on_fail=w.tail))
    d.kill9()
    assert w.wait() == 69, w.tail()
    assert w.log().splitlines()[-1].startswith("Error:") and "Traceback" not in w.log(), w.tail()
    wait_until(lambda: gone(pid), "the command to be killed")


def test_max_messages_and_idle_exit_end_a_run_with_0(make_daemon, worker):
    d = make_daemon().start()
    with d.client() as c:
        c.send_many("cron", [{"n": i} for i in range(5)])
    out = d.root / "out.txt"
    w = worker(d, "cron", "--max-messages", "3", "--", "sh", "-c", f"cat >> {out}")
    assert w.wait() == 0, w.tail()
    assert len(lines(out)) == 3
    with d.client() as c:
        assert c.stats("cron")[0]["ready"] == 2
    w2 = worker(d, "empty", "--idle-exit", "0.5", "--call", "fixtures.handlers:noop")
    assert w2.wait() == 0, w2.tail()
    assert "idle for 0.5 s" in w2.log()


def test_usage_and_startup_errors_are_one_line_with_the_documented_code(make_daemon):
    d = make_daemon().start()
    for args, code, needle in [
        (("q",), 2, "give either a command"),
        (("q", "--call", "fixtures.handlers:noop", "--", "true"), 2, "not both"),
        (("q", "--call", "nocolon"), 2, "package.module:function"),
        (("q", "--call", "fixtures.no_such_module:f"), 78, "cannot import fixtures.no_such_module"),
        (("q", "--call", "fixtures.handlers:nope"), 78, "has no attribute 'nope'"),
        (("q", "--", "no-such-command-ipcd-test"), 78, "not found on PATH"),
        (("bad name!", "--", "true"), 65, "invalid queue name"),
    ]:
        r = worker_cli(d, *args)
        assert r.returncode == code, (args, r.stderr)
        assert r.stderr.startswith("Error:") and needle in r.stderr, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (args, r.stderr)
    stopped = make_daemon()  # configured, never started
    r = worker_cli(stopped, "q", "--", "true")
    assert r.returncode == 69 and r.stderr.startswith("Error:") and "Traceback" not in r.stderr, r.stderr


# -- the systemd template ---------------------------------------------------------------------

WORKER_UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "ipcd-worker@.service"


def _unit_keys() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in WORKER_UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_worker_unit_template_verifies_silently(tmp_path):
    # verify exits 0 on unknown keys, so any output at all fails (as in test_units.py).
    text = WORKER_UNIT.read_text()
    assert "ExecStart=/usr/local/bin/ipcd worker %i $IPCD_WORKER_ARGS" in text
    instance = tmp_path / "ipcd-worker@jobs.service"
    instance.write_text(text.replace("/usr/local/bin/ipcd", sys.executable))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(instance)], capture_output=True,
                       text=True, timeout=60)
    assert (r.stdout + r.stderr).strip() == "" and r.returncode == 0, r.stdout + r.stderr


def test_worker_unit_settings():
    k = _unit_keys()
    assert k["KillMode"] == ["mixed"]  # SIGTERM to the worker only: it runs the grace period
    assert float(k["TimeoutStopSec"][0]) > 10 + 5  # above the default --grace
    assert k["RestartPreventExitStatus"] == ["2 65 78"]
    assert k["EnvironmentFile"] == ["/etc/ipcd/worker-%i.env"]
    assert "Requires" not in k and "BindsTo" not in k  # a daemon restart must not stop workers
    assert "RuntimeDirectory" not in k and "StateDirectory" not in k  # would delete the daemon's
    assert k["NoNewPrivileges"] == ["yes"] and k["User"] == ["ipcd"]


def test_unit_environment_leads_the_worker_to_the_daemon(make_daemon, tmp_path):
    """The unit sets RUNTIME_DIRECTORY/STATE_DIRECTORY/CONFIGURATION_DIRECTORY, no config path."""
    d = make_daemon().start()
    with d.client() as c:
        c.send("viaenv", {"n": 1})
    (tmp_path / "etc").mkdir()
    r = subprocess.run([sys.executable, "-m", "ipcd", "worker", "viaenv", "--max-messages", "1", "--", "true"],
                       env={k: v for k, v in d.env.items() if k != "IPCD_CONFIG"}
                       | {"RUNTIME_DIRECTORY": str(d.sock_path.parent), "STATE_DIRECTORY": str(d.state_dir),
                          "CONFIGURATION_DIRECTORY": str(tmp_path / "etc")},
                       capture_output=True, text=True, timeout=NO_HANG)
    assert r.returncode == 0, r.stderr
    assert "result=ok" in r.stderr
