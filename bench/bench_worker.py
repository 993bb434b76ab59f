"""``ipcd worker``: exec mode (a ``true`` per message) vs --call (a no-op function).

    .venv/bin/python bench/bench_worker.py [-n 500] [-r 3] [-j 1 4] [--memory]

Starts its own daemon (temp dir, default config; ``--memory`` makes the queue
durability="memory" to leave the store out), then per mode and concurrency,
``-r`` times: send N messages, run ``python -m ipcd worker Q --max-messages N``
until it exits, and read two figures:

* steady msgs/s: N / (last outcome line - "worker started" line), from the
  worker's --log-file (millisecond timestamps): the per-message cost only;
* wall msgs/s: N / (process start -> exit), interpreter and typer start-up
  included: what a cron-style drain of N messages costs.

Prints the medians as a table and the --call / exec ratio.  This file is
also the --call target (``bench_worker:noop``): bench/ goes on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
QUEUE = "bench"


def noop(body):
    """The --call handler: does nothing, so what is measured is ipcd's cost."""


def _env(config: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IPCD_", "NOTIFY_", "JOURNAL_"))}
    env["IPCD_CONFIG"] = str(config)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _stamp(line: str) -> float:
    # "2026-11-27 15:01:00,263 INFO ..." (logs.py's file format)
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def run_once(env, client, n: int, concurrency: int, mode: str, log_file: Path) -> tuple[float, float]:
    client.purge(QUEUE)
    client.send_many(QUEUE, [{"i": i, "pad": "x" * 64} for i in range(n)])
    target = ["--call", "bench_worker:noop"] if mode == "call" else ["--", shutil.which("true")]
    log_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "ipcd", "worker", QUEUE, "-j", str(concurrency), "--max-messages", str(n),
            "--log-file", str(log_file), *target]
    t0 = time.monotonic()
    r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"worker exited {r.returncode}:\n{r.stderr}\n{log_file.read_text()[-3000:]}")
    lines = log_file.read_text().splitlines()
    started = next(_stamp(x) for x in lines if "worker started" in x)
    outcomes = [_stamp(x) for x in lines if " result=" in x]
    if len(outcomes) != n or sum(" result=ok" in x for x in lines) != n:
        raise SystemExit(f"expected {n} ok outcomes, got {len(outcomes)}")
    return n / max(outcomes[-1] - started, 1e-3), n / wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=500, help="messages per run (default 500)")
    ap.add_argument("-r", type=int, default=3, help="runs per case; medians are shown (default 3)")
    ap.add_argument("-j", type=int, nargs="+", default=[1, 4], help="concurrency levels (default 1 4)")
    ap.add_argument("--memory", action="store_true", help='durability = "memory" for the bench queue')
    args = ap.parse_args()

    sys.path.insert(0, str(SRC))
    from ipcd.client import Client

    root = Path(tempfile.mkdtemp(prefix="ipcd-bw-", dir="/tmp"))
    sock, state, config = root / "ipcd.sock", root / "state", root / "config.toml"
    config.write_text(f'address = "{sock}"\nstate_dir = "{state}"\n'
                      + (f'[queues.{QUEUE}]\ndurability = "memory"\n' if args.memory else ""))
    env = _env(config)
    daemon = subprocess.Popen([sys.executable, "-m", "ipcd", "start"], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=open(root / "daemon.log", "wb"), process_group=0)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client = Client(str(sock), (state / "authkey").read_bytes().strip(), reconnect_timeout=0)
                break
            except Exception:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit("daemon did not start:\n" + (root / "daemon.log").read_text())
                time.sleep(0.05)
        rows = []
        for j in args.j:
            for mode in ("exec", "call"):
                runs = [run_once(env, client, args.n, j, mode, root / "worker.log") for _ in range(args.r)]
                steady = statistics.median(r[0] for r in runs)
                wall = statistics.median(r[1] for r in runs)
                rows.append((mode, j, steady, wall, [round(r[0]) for r in runs]))
                print(f"  {mode:4} -j {j}: steady {steady:8.0f} msg/s  wall {wall:8.0f} msg/s  "
                      f"(runs: {rows[-1][4]})", file=sys.stderr)
        durability = "memory" if args.memory else "default (os)"
        print(f"\nipcd worker, {args.n} messages, median of {args.r}, durability {durability}, "
              f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
        print("| mode | -j | steady msgs/s | wall msgs/s (start-up included) |")
        print("|---|---|---|---|")
        for mode, j, steady, wall, _ in rows:
            label = "exec `true`" if mode == "exec" else "--call no-op"
            print(f"| {label} | {j} | {steady:,.0f} | {wall:,.0f} |")
        print()
        by = {(m, j): (s, w) for m, j, s, w, _ in rows}
        for j in args.j:
            (es, ew), (cs, cw) = by[("exec", j)], by[("call", j)]
            print(f"-j {j}: --call / exec = {cs / es:.1f}x steady, {cw / ew:.1f}x wall")
        client.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
