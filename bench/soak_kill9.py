#!/usr/bin/env python3
"""kill -9 soak for issue 3: an acknowledged send is never lost.

Each round: a few sender processes stream uniquely-named messages into one queue
(single sends and batches) while a consumer process takes and acks some of them;
after a random moment the daemon's process group gets SIGKILL.  The daemon is
restarted, the queue drained, and the round is checked:

* lost      = bodies a sender got an id back for, but nobody ever received -> must be 0
* invented  = bodies received that no sender ever tried to send             -> must be 0
* duplicates = bodies received twice (the consumer's ack died with the daemon:
  at-least-once allows it, it is only counted)

Every process records what it did in a file, flushed after each step, *before*
it tells the daemon (sender: "tried" before the send, "acked" after the reply;
consumer: "got" before its ack), so the files are the ground truth.

Usage:  python bench/soak_kill9.py [--rounds 100] [--senders 3] [--no-consumer]
                                  [--durability os|fsync] [--seed N] [--keep]
Exit status 1 if any round lost or invented a message.

``run_round`` is also what tests/integration/test_durability.py runs (20+ rounds),
with the test fixture's Daemon (anything with start/kill9/client/env/state_dir/sock_path).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
QUEUE = "soak"
STEP_TIMEOUT = 20.0  # "no hang" bound on any single wait below, never a performance claim

SENDER = r"""
import random, sys
from ipcd import errors
from ipcd.client import Client
addr, keyfile, queue, prefix, out, seed = sys.argv[1:7]
rng = random.Random(int(seed))
key = open(keyfile, "rb").read().strip()
tried = open(out + ".tried", "a")
acked = open(out + ".acked", "a")
i = 0
try:
    c = Client(addr, key, reconnect_timeout=0, connect_timeout=5)
    while True:
        n = rng.choice((1, 1, 1, 2, 5, 20))
        bodies = ['"%s-%d"' % (prefix, i + k) for k in range(n)]  # JSON strings, unique
        i += n
        tried.write("".join(b + "\n" for b in bodies)); tried.flush()
        ids = c.send_json_many(queue, bodies, timeout=10)
        assert len(ids) == n, ids
        acked.write("".join(b + "\n" for b in bodies)); acked.flush()
except (errors.IpcdError, OSError, EOFError):
    pass  # the daemon died under us: that is the point
"""

CONSUMER = r"""
import random, sys
from ipcd import errors
from ipcd.client import Client
addr, keyfile, queue, out, seed = sys.argv[1:6]
rng = random.Random(int(seed))
key = open(keyfile, "rb").read().strip()
got = open(out + ".got", "a")
try:
    c = Client(addr, key, reconnect_timeout=0, connect_timeout=5)
    pending = []
    while True:
        msgs = c.recv_many(queue, rng.choice((1, 3, 10, 50)), timeout=1.0, lease=60, ack=pending)
        got.write("".join(m.text + "\n" for m in msgs)); got.flush()
        pending = msgs
except (errors.IpcdError, OSError, EOFError):
    pass
"""


@dataclasses.dataclass
class Tally:
    rounds: int = 0
    acked: int = 0
    delivered: int = 0  # distinct bodies received
    lost: int = 0
    invented: int = 0
    duplicates: int = 0
    problems: list = dataclasses.field(default_factory=list)

    def add(self, other: "Tally"):
        for f in ("rounds", "acked", "delivered", "lost", "invented", "duplicates"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.problems += other.problems

    def line(self) -> str:
        return (f"rounds={self.rounds} acked={self.acked} delivered={self.delivered} "
                f"lost={self.lost} invented={self.invented} duplicates={self.duplicates}")


def _lines(path: Path) -> list[str]:
    try:
        return [ln for ln in path.read_text().split("\n") if ln]
    except FileNotFoundError:
        return []


def _wait_until(pred, what: str, timeout: float = STEP_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"soak: no {what} within {timeout} s")
        time.sleep(0.01)


def drain(d, queue: str = QUEUE) -> list[str]:
    """Receive and ack everything; return the JSON texts in delivery order."""
    out = []
    with d.client() as c:
        pending = []
        deadline = time.monotonic() + 4 * STEP_TIMEOUT
        while time.monotonic() < deadline:
            msgs = c.recv_many(queue, 1000, timeout=0.2, ack=pending)
            out += [m.text for m in msgs]
            pending = msgs
            if not msgs:
                st = c.stats(queue)[0]
                if st["ready"] + st["leased"] + st["delayed"] == 0:
                    return out
        raise AssertionError(f"soak: queue {queue} did not drain")


def run_round(d, rno: int, workdir: Path, rng: random.Random, *, senders: int = 3,
              consumer: bool = True, max_kill_delay: float = 0.3) -> Tally:
    """One kill -9 round against a running daemon *d*; leaves it restarted and drained."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(d.env)
    keyfile = str(d.state_dir / "authkey")
    addr = str(d.sock_path)
    procs = []
    try:
        for s in range(senders):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", SENDER, addr, keyfile, QUEUE, f"r{rno}s{s}",
                 str(workdir / f"s{s}"), str(rng.randrange(1 << 30))],
                env=env, stdin=subprocess.DEVNULL))
        if consumer:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", CONSUMER, addr, keyfile, QUEUE, str(workdir / "c"),
                 str(rng.randrange(1 << 30))], env=env, stdin=subprocess.DEVNULL))
        # Kill only once every sender is streaming, then at a random point.
        _wait_until(lambda: all(_lines(workdir / f"s{s}.acked") for s in range(senders)),
                    "acknowledged send from every sender")
        time.sleep(rng.uniform(0.0, max_kill_delay))
        d.kill9()
        for p in procs:
            p.wait(STEP_TIMEOUT)  # they must notice the dead daemon, not hang
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    d.start()
    drained = drain(d)

    tried, acked = set(), set()
    for s in range(senders):
        tried.update(_lines(workdir / f"s{s}.tried"))
        acked.update(_lines(workdir / f"s{s}.acked"))
    received = _lines(workdir / "c.got") + drained
    counts = collections.Counter(received)
    t = Tally(rounds=1, acked=len(acked), delivered=len(counts))
    lost = acked - counts.keys()
    invented = counts.keys() - tried
    t.lost, t.invented = len(lost), len(invented)
    t.duplicates = sum(n - 1 for n in counts.values() if n > 1)
    if lost:
        t.problems.append(f"round {rno}: lost {len(lost)}: {sorted(lost)[:10]}")
    if invented:
        t.problems.append(f"round {rno}: invented {len(invented)}: {sorted(invented)[:10]}")
    return t


# -- standalone daemon controller (the tests use tests/conftest.py's instead) ------------


class Daemon:
    def __init__(self, root: Path, config_extra: str = ""):
        self.root = root
        (root / "run").mkdir(mode=0o700, parents=True)
        self.sock_path = root / "run" / "ipcd.sock"
        self.state_dir = root / "state"
        self.config_path = root / "config.toml"
        self.config_path.write_text(f'address = "{self.sock_path}"\nstate_dir = "{self.state_dir}"\n'
                                    f"{config_extra}\n")
        self.log_path = root / "daemon.log"
        self.proc = None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IPCD_", "NOTIFY_", "WATCHDOG_"))}
        env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["IPCD_CONFIG"] = str(self.config_path)
        self.env = env

    def start(self):
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "ipcd", "start"], env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         process_group=0)
        from ipcd import errors

        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                self.client().close()
                return self
            except (errors.IpcdError, OSError):
                if time.monotonic() > deadline:
                    raise SystemExit(f"daemon not ready within {STEP_TIMEOUT} s")
                time.sleep(0.05)

    def client(self):
        from ipcd.client import Client

        return Client(str(self.sock_path), (self.state_dir / "authkey").read_bytes().strip(),
                      reconnect_timeout=0)

    def kill9(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--senders", type=int, default=3)
    ap.add_argument("--no-consumer", action="store_true", help="only senders, no concurrent consumer")
    ap.add_argument("--max-kill-delay", type=float, default=0.3, help="seconds of streaming before the kill, at most")
    ap.add_argument("--durability", choices=("os", "fsync"), default="os", help="of the soak queue")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (daemon log, per-round files)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(SRC))
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="ipcd-soak-", dir="/tmp"))  # short: socket path limit
    d = Daemon(root, f'[queues.{QUEUE}]\ndurability = "{args.durability}"')
    total = Tally()
    t0 = time.monotonic()
    try:
        d.start()
        for r in range(args.rounds):
            t = run_round(d, r, root / f"round{r}", rng, senders=args.senders,
                          consumer=not args.no_consumer, max_kill_delay=args.max_kill_delay)
            total.add(t)
            if t.problems or (r + 1) % 10 == 0:
                print(f"[{r + 1}/{args.rounds}] {total.line()}", file=sys.stderr, flush=True)
            for p in t.problems:
                print("  " + p, file=sys.stderr, flush=True)
    finally:
        d.stop()
        if not args.keep and not total.problems:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}", file=sys.stderr)
    print(f"seed={seed} durability={args.durability} {total.line()} "
          f"elapsed={time.monotonic() - t0:.1f}s", flush=True)
    return 1 if total.lost or total.invented else 0


if __name__ == "__main__":
    sys.exit(main())
