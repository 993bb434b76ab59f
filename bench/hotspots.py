#!/usr/bin/env python3
"""Where does the daemon's time go?  Profiles behind bench/RESULTS.md.

    .venv/bin/python bench/hotspots.py [--out DIR] [--seconds S] [--skip-daemon] [--skip-worker]
                                       [--skip-cprofile] [--skip-cli]

1. py-spy (sampling, native frames, per thread) on the daemon while it serves
   scenario 1 (unbatched 1->1, ack piggybacked) and scenario 2 (batches of 100),
   durability "os" (and "memory" for scenario 1, to separate the store's share).
2. cProfile in every daemon thread (bench/cprofile_daemon.py) for the same
   unbatched stream: call counts per message and self time per function.
3. `python -X importtime -m ipcd send`: import-time offenders (median of 5), and
   cProfile of the whole `ipcd send` process.
4. py-spy on `ipcd worker` (--call and exec) draining a pre-filled queue.

Needs py-spy (.venv/bin/pip install py-spy); step 1 is skipped without it.
Writes raw data into --out (default: a temp dir, printed) and a Markdown
summary on stdout.
"""

from __future__ import annotations

import argparse
import collections
import marshal
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the suite: daemons, adapters, stream_run)

PY_FRAME = re.compile(r"^(?P<func>.+) \((?P<file>[^()]*\.py):(?P<line>\d+)\)$")


def thread_group(name: str) -> str:
    if "ipcd-store" in name:
        return "store thread"
    if "ipcd-sessions" in name:
        return "session loop"
    if "handle_request" in name or "session" in name:
        return "connection threads"
    if "accept" in name:
        return "accepter"
    if "MainThread" in name:
        return "main thread"
    if "ipcd-worker" in name:
        return name
    return "other threads"


# Innermost frames that mean "blocked, not on a CPU" (py-spy's own idle detection does not
# work in this container: a thread parked in accept() or a futex shows up as active).
def is_blocked(frames: list[str]) -> bool:
    leaf = frames[-1].split(" (")[0]
    if leaf in ("accept4", "accept", "select", "poll", "epoll_wait", "sem_timedwait", "sem_wait",
                "pthread_cond_timedwait", "pthread_cond_wait", "nanosleep", "clock_nanosleep"):
        return True
    if leaf == "read" or leaf == "recv":  # a socket read waiting for the next request
        return any("Conn._recv" in f or "_recv_small" in f for f in frames)
    if leaf.startswith("0x") and "libc" in frames[-1]:
        # unsymbolised libc: the futex wait inside lock/GIL waits (see its Python caller)
        return True
    return False


def native_class(frame: str) -> str:
    f = frame.split(" (")[0]
    if f in ("sem_post", "pthread_cond_signal", "pthread_cond_broadcast", "pthread_mutex_unlock"):
        return "waking another thread (sem_post/cond_signal: lock & GIL hand-off)"
    if f in ("pwrite64", "write", "__libc_write", "send", "sendto", "__send"):
        return "syscall: write/send/pwrite"
    if f in ("read", "__libc_read", "recv", "recvfrom", "pread64"):
        return "syscall: read/pread"
    if f in ("fdatasync", "fsync", "__libc_fsync"):
        return "syscall: fsync/fdatasync"
    if f in ("statfs64", "statfs", "statvfs", "stat", "__xstat64", "fstat", "newfstatat"):
        return "syscall: stat/statfs"
    if "sqlite" in frame.lower():
        return "SQLite (C)"
    if "_pickle" in frame or "pickle" in f.lower():
        return "pickle (C)"
    if "_json" in frame or "scanstring" in f or "scan_once" in f:
        return "json (C)"
    if "gc_collect" in f:
        return "garbage collector"
    return "other native / interpreter"


def parse_pyspy(path: Path, drop_blocked: bool):
    """-> (total, blocked, by_group, self_py, cum_py, leaf, tid_names) over the kept samples."""
    total = blocked = 0
    by_group, self_py, cum_py, leaf = (collections.Counter() for _ in range(4))
    tid_names = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        head = frames[0]
        m = re.match(r"thread \((?:0x)?([0-9A-Fa-f]+)\): ?(.*)", head)
        name = head
        if m:
            name = m[2] or m[1]
            tid_names[int(m[1])] = name
        if drop_blocked and is_blocked(frames):
            blocked += n
            continue
        total += n
        by_group[thread_group(name)] += n
        py = []
        for fr in frames[1:]:
            pm = PY_FRAME.match(fr)
            if pm:
                py.append(f"{pm['func']} ({pm['file']})")
        if py:
            self_py[py[-1]] += n
        for f in set(py):
            cum_py[f] += n
        last = frames[-1]
        leaf[native_class(last) if not PY_FRAME.match(last) else "Python code (self)"] += n
    return total, blocked, by_group, self_py, cum_py, leaf, tid_names


def pct(n, total):
    return f"{100 * n / total:.1f}%" if total else "-"


def task_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """tid -> (utime, stime) seconds for every live thread of pid."""
    out = {}
    tck = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) / tck, int(fields[12]) / tck)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def thread_names(pid: int) -> dict[int, str]:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not spy:
        return {}
    text = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60).stdout
    return {int(m[1]): m[2] for m in re.finditer(r'Thread (?:0x)?(\d+) \([^)]*\): "([^"]*)"', text)}


def thread_cpu_run(adapter, batch, seconds):
    """A clean run (no profiler attached): daemon CPU per thread group, user vs system."""
    w = run.stream_run(adapter, 1, 1, batch, 200 * batch)
    n = max(batch, int(w["rate"] * seconds) // batch * batch)
    pid = adapter.srv_pid
    snaps, names = [], {}
    totals = []

    def start():
        totals.append(run.proc_cpu(pid))
        snaps.append(task_cpu(pid))

    def end():
        totals.append(run.proc_cpu(pid))
        snaps.append(task_cpu(pid))
        names.update(thread_names(pid))  # one pause of the daemon, after the timed part
    r = run.stream_run(adapter, 1, 1, batch, n, hooks=(start, end))
    groups = collections.defaultdict(lambda: [0.0, 0.0])
    gone = [tid for tid in snaps[0] if tid not in snaps[1]]
    for tid, (u, st) in snaps[1].items():
        u0, s0 = snaps[0].get(tid, (0.0, 0.0))
        g = groups[thread_group(names.get(tid, "?"))]
        g[0] += u - u0
        g[1] += st - s0
    live = sum(u + st for u, st in groups.values())
    if gone:  # threads that ended during the run (the producer's connection closes when it is done)
        groups["ended connection thread(s) (user+sys shown as user)"][0] += max(0.0, totals[1] - totals[0] - live)
    total = sum(u + st for u, st in groups.values()) or float("nan")
    parts = [f"{g} {(u + st) / r['n'] * 1e6:.1f} us/msg ({pct(u + st, total)}; user {u / r['n'] * 1e6:.1f} + "
             f"sys {st / r['n'] * 1e6:.1f})" for g, (u, st) in sorted(groups.items(), key=lambda kv: -sum(kv[1]))]
    note = (f" ({len(gone)} thread(s) ended during the run, i.e. the producer's connection: process total minus "
            f"live threads)") if gone else ""
    return (f"**Daemon CPU by thread, clean run without a profiler**{note} ({r['n']:,} msgs at {r['rate']:,.0f} msg/s, "
            f"daemon {r['srv_us']:.1f} us/msg, clients {r['cli_us']:.1f} us/msg; /proc/PID/task): " + "; ".join(parts))


def pyspy_profile(label, adapter, nprod, ncons, batch, seconds, out: Path, gil: bool):
    """Record the daemon while a stream runs for about `seconds`; also per-thread CPU."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    w = run.stream_run(adapter, nprod, ncons, batch, 200 * batch)
    n = max(batch, int(w["rate"] * seconds) // batch * batch)
    raw = out / f"pyspy-{label}{'-gil' if gil else ''}.txt"
    proc = run._spawn([spy, "record", "-p", str(adapter.srv_pid), "-f", "raw", "-o", str(raw), "-r", "250",
                       "-t", "-F", "-n"] + (["--gil"] if gil else []),
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # let py-spy attach
    r = run.stream_run(adapter, nprod, ncons, batch, n)
    time.sleep(0.2)
    run._stop_proc(proc, signal.SIGINT, timeout=60)
    return r, raw


def render_pyspy(title, r, raw_all: Path, raw_gil: Path, cpu_line: str, top=16) -> str:
    tot, blocked, by_group, self_py, cum_py, leaf, names = parse_pyspy(raw_all, True)
    gtot, _b, gby_group, gself, gcum, gleaf, gnames = parse_pyspy(raw_gil, False)
    n = r["n"]
    o = [f"### {title}", "", cpu_line, "",
         f"py-spy runs: {n:,} msgs at {r['rate']:,.0f} msg/s while sampled (py-spy pauses the process ~250x/s, so "
         f"slower than the suite).", "",
         f"**All threads, on-CPU samples** ({tot} kept, {blocked} blocked samples dropped): "
         + ", ".join(f"{g} {pct(k, tot)}" for g, k in by_group.most_common()), "",
         "Innermost frame of on-CPU samples: " + ", ".join(f"{k} {pct(k2, tot)}" for k, k2 in leaf.most_common(8)), "",
         f"**GIL holder** ({gtot} samples; where the serialised Python work goes): "
         + ", ".join(f"{g} {pct(k, gtot)}" for g, k in gby_group.most_common()), "",
         "| # | GIL holder: cumulative | % | GIL holder: self (innermost Python frame) | % |",
         "|---|---|---|---|---|"]
    cum = [kv for kv in gcum.most_common(top + 8) if not kv[0].startswith("Thread.")][:top]
    slf = gself.most_common(top)
    for i in range(top):
        c = cum[i] if i < len(cum) else ("", 0)
        s = slf[i] if i < len(slf) else ("", 0)
        o.append(f"| {i + 1} | `{c[0]}` | {pct(c[1], gtot)} | `{s[0]}` | {pct(s[1], gtot)} |")
    o += ["", "Innermost frame of GIL-holding samples: "
          + ", ".join(f"{k} {pct(k2, gtot)}" for k, k2 in gleaf.most_common(8))]
    return "\n".join(o)


def _children_cpu(pid: int) -> float:
    """cutime + cstime of pid: CPU of its children that have exited (exec mode: one per message)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def worker_profile(tmp: Path, out: Path, seconds: float, mode=("--call", "worker_handlers:noop"), n=20_000) -> str:
    """py-spy (GIL holder) on `ipcd worker QUEUE <mode>` draining a pre-filled queue."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    d = run.IpcdDaemon(tmp / f"wk{len(mode)}", "os")
    d.start()
    try:
        with d.client() as c:
            c.send_json_many("wq", [run._dumps(run.make_body(i)) for i in range(n)])
        env = d.env
        env["PYTHONPATH"] = str(run.BENCH) + os.pathsep + env["PYTHONPATH"]
        errf = open(d.root / "worker.stderr", "wb")
        w = run._spawn([sys.executable, "-m", "ipcd", "worker", "wq", *mode], env=env,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf)
        time.sleep(1.5)  # started and draining
        kids = run._children_of(w.pid) if "--call" in mode else []  # exec children come and go
        cc0 = _children_cpu(w.pid)
        c0 = run.proc_cpu(w.pid)
        k0 = sum(run.proc_cpu(k) for k in kids)
        d0 = run.proc_cpu(d.pid)
        with d.client() as c:
            a0 = c.stats("wq")[0]["acked"]
        raw = out / f"pyspy-worker-{'call' if '--call' in mode else 'exec'}-gil.txt"
        spy_p = run._spawn([spy, "record", "-p", str(w.pid), "-f", "raw", "-o", str(raw), "-r", "250", "-t", "-F",
                            "-n", "--gil", "-d", str(int(seconds))], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        spy_p.wait(seconds + 60)
        run._STARTED.remove(spy_p)
        with d.client() as c:
            a1 = c.stats("wq")[0]["acked"]
        c1 = run.proc_cpu(w.pid)
        cc1 = _children_cpu(w.pid)
        k1 = sum(run.proc_cpu(k) for k in kids)
        d1 = run.proc_cpu(d.pid)
        run._stop_proc(w, timeout=30)
        errf.close()
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
        lines = (d.root / "worker.stderr").read_bytes().count(b"\n")
    finally:
        d.stop()
    m = max(1, a1 - a0)
    gtot, _b, gby, gself, gcum, gleaf, _n = parse_pyspy(raw, False)
    o = [f"### `ipcd worker wq {' '.join(mode)}` (-j 1) draining a pre-filled queue (durability os)", "",
         f"Under py-spy: {m:,} msgs acked in {seconds:g} s; per message CPU: worker main process "
         f"{(c1 - c0) / m * 1e6:.0f} us, its children {((k1 - k0) if kids else (cc1 - cc0)) / m * 1e6:.0f} us, "
         f"daemon {(d1 - d0) / m * 1e6:.0f} us; "
         f"{lines:,} log lines on stderr for {n:,} messages.", "",
         "GIL holder by thread: " + ", ".join(f"{g} {pct(k, gtot)}" for g, k in gby.most_common()), "",
         "| # | worker, GIL holder: cumulative | % | self (innermost Python frame) | % |", "|---|---|---|---|---|"]
    skip = ("Thread.", "<module>", "_run_code", "_run_module_as_main", "main (", "Typer.", "TyperGroup", "Command.",
            "Group.", "Context.", "get_callback", "guarded", "_main (", "worker (ipcd/cli_worker")
    cum = [kv for kv in gcum.most_common(60) if not kv[0].startswith(skip)][:14]
    slf = gself.most_common(14)
    for i in range(14):
        c = cum[i] if i < len(cum) else ("", 0)
        s_ = slf[i] if i < len(slf) else ("", 0)
        o.append(f"| {i + 1} | `{c[0]}` | {pct(c[1], gtot)} | `{s_[0]}` | {pct(s_[1], gtot)} |")
    return "\n".join(o)


def cprofile_daemon(tmp: Path, n: int, batch: int, durability="os") -> str:
    d = run.IpcdDaemon(tmp / f"cp-{durability}-{batch}", durability)
    prof = d.root / "daemon.prof"
    d.start(prefix=[sys.executable, str(Path(__file__).resolve().parent / "cprofile_daemon.py"), str(prof)])
    try:
        r = run.stream_run(run.IpcdAdapter(d), 1, 1, batch, n)
    finally:
        d.stop()
    stats = marshal.loads(prof.read_bytes())
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)
    total_tt = sum(v[2] for v in stats.values())
    o = [f"### cProfile, all daemon threads: unbatched={batch == 1} stream of {n:,} msgs (batch {batch}), "
         f"durability {durability}",
         f"{r['rate']:,.0f} msg/s under cProfile (deterministic profiling inflates Python-heavy code). "
         f"Self time includes blocking waits (Event/Condition/lock, socket reads), so look at calls/msg and the CPU rows.",
         "", "| function | calls/msg | self s | self % | cum s |", "|---|---|---|---|---|"]
    shown = 0
    for (fn_file, line, name), (cc, nc, tt, ct, _callers) in rows:
        where = fn_file if fn_file == "~" else "/".join(Path(fn_file).parts[-2:])
        label = f"{name}" if fn_file == "~" else f"{name} ({where}:{line})"
        o.append(f"| `{label}` | {nc / n:.2f} | {tt:.2f} | {100 * tt / total_tt:.1f}% | {ct:.2f} |")
        shown += 1
        if shown >= int(os.environ.get("TOPN", 25)):
            break
    # a few call counts that explain the cost
    interesting = ("execute", "executemany", "loads", "dumps", "wait", "set", "notify", "acquire", "select",
                   "send_bytes", "recv_bytes", "_recv", "validate_body", "put", "get", "start_new_thread",
                   "encode")
    o += ["", "Selected call counts per message:",
          ", ".join(f"`{name}` {nc / n:.2f}" for (f_, l_, name), (cc, nc, tt, ct, _c) in
                    sorted(stats.items(), key=lambda kv: -kv[1][1])
                    if any(name.endswith(k) or name == f"<method '{k}' of" for k in interesting) and nc / n >= 0.5)]
    return "\n".join(o)


def importtime(d: run.IpcdDaemon, reps=5) -> str:
    body = run._dumps(run.make_body(1))
    selfs, cums = collections.defaultdict(list), collections.defaultdict(list)
    totals = []
    for _ in range(reps):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "ipcd", "send", "prof-cli", body],
                           env=d.env, capture_output=True, text=True, timeout=60)
        if r.returncode:
            raise RuntimeError(r.stderr)
        tot = 0
        for line in r.stderr.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
            if not m:
                continue
            s, c, indent, mod = int(m[1]), int(m[2]), len(m[3]) - 1, m[4]
            selfs[mod].append(s)
            cums[mod].append((c, indent))
            tot += s
        totals.append(tot)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    top_level = sorted(((m, med([c for c, i in v])) for m, v in cums.items() if v[0][1] == 0),
                       key=lambda kv: -kv[1])[:12]
    by_self = sorted(((m, med(v)) for m, v in selfs.items()), key=lambda kv: -kv[1])[:15]
    groups = collections.Counter()
    for m, v in selfs.items():
        groups[m.split(".")[0]] += med(v)
    o = [f"### `python -X importtime -m ipcd send` (median of {reps}); all imports {med(totals) / 1000:.1f} ms self-total",
         "", "Top-level imports by cumulative time:", "",
         "| module (top level) | cumulative ms |", "|---|---|"]
    o += [f"| `{m}` | {c / 1000:.1f} |" for m, c in top_level]
    o += ["", "By top-level package (sum of self times):", "", "| package | ms |", "|---|---|"]
    o += [f"| `{m}` | {s / 1000:.1f} |" for m, s in groups.most_common(12)]
    o += ["", "Single modules by self time:", "", "| module | self ms |", "|---|---|"]
    o += [f"| `{m}` | {s / 1000:.1f} |" for m, s in by_self]
    return "\n".join(o)


def cprofile_cli(d: run.IpcdDaemon, tmp: Path) -> str:
    import pstats

    body = run._dumps(run.make_body(1))
    out = tmp / "cli.prof"
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "ipcd", "send", "prof-cli", body],
                   env=d.env, check=True, capture_output=True, timeout=60)
    st = pstats.Stats(str(out))
    total = st.total_tt
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][3], reverse=True)
    o = [f"### cProfile of one whole `ipcd send` process ({total * 1000:.0f} ms profiled, inflated by cProfile)",
         "", "| function (by cumulative) | cum ms |", "|---|---|"]
    seen = 0
    for (f_, line, name), (cc, nc, tt, ct, _c) in rows:
        if name in ("<module>", "<built-in method builtins.exec>") and seen > 3:
            continue
        where = "/".join(Path(f_).parts[-2:]) if f_ != "~" else ""
        o.append(f"| `{name}` {where}:{line} | {ct * 1000:.1f} |")
        seen += 1
        if seen >= 22:
            break
    return "\n".join(o)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="directory for raw profiles (default: a new temp dir)")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds of sampling per profile")
    p.add_argument("--skip-cprofile", action="store_true")
    p.add_argument("--skip-cli", action="store_true")
    p.add_argument("--skip-daemon", action="store_true", help="skip the daemon sampling profiles")
    p.add_argument("--skip-worker", action="store_true")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ipcd-prof-", dir="/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ipcd-p-", dir="/tmp"))
    sections = []
    try:
        dos = run.IpcdDaemon(tmp / "os", "os")
        dos.start()
        dmem = run.IpcdDaemon(tmp / "mem", "memory")
        dmem.start()
        if shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy"):
            for label, d, batch in (() if args.skip_daemon else (("unbatched-os", dos, 1), ("batched-os", dos, 100),
                                                                  ("unbatched-memory", dmem, 1))):
                run.log(f"py-spy: {label}")
                cpu_line = thread_cpu_run(run.IpcdAdapter(d), batch, args.seconds / 2)
                r, raw_all = pyspy_profile(label, run.IpcdAdapter(d), 1, 1, batch, args.seconds, out, gil=False)
                _r2, raw_gil = pyspy_profile(label, run.IpcdAdapter(d), 1, 1, batch, args.seconds, out, gil=True)
                sections.append(render_pyspy(
                    f"Daemon under scenario {'1 (unbatched, recv_many ack=prev)' if batch == 1 else '2 (batch 100)'}, "
                    f"durability {d.durability}", r, raw_all, raw_gil, cpu_line))
            for mode, n in ((("--call", "worker_handlers:noop"), 20_000),
                            (("--", shutil.which("true") or "/bin/true"), 3000)):
                if args.skip_worker:
                    break
                run.log(f"py-spy: ipcd worker {' '.join(mode)}")
                try:
                    sections.append(worker_profile(tmp, out, args.seconds, mode, n))
                except Exception as e:  # noqa: BLE001 - the worker is young; do not lose the rest
                    sections.append(f"worker profile ({' '.join(mode)}) failed: {e}")
        else:
            sections.append("py-spy not installed: sampling profiles skipped (.venv/bin/pip install py-spy)")
        if not args.skip_cprofile:
            run.log("cProfile: unbatched os / batched os")
            sections.append(cprofile_daemon(tmp, 3000, 1))
            sections.append(cprofile_daemon(tmp, 50_000, 100))
        if not args.skip_cli:
            run.log("import time / cProfile of ipcd send")
            sections.append(importtime(dos))
            sections.append(cprofile_cli(dos, out))
        dos.stop()
        dmem.stop()
    finally:
        run.stop_everything()
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n\n".join(sections)
    (out / "profile.md").write_text(text + "\n")
    print(text)
    run.log(f"raw profiles and profile.md in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
