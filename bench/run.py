#!/usr/bin/env python3
"""ipcd benchmark suite (issue 7): ipcd beside what users would pick instead, and the floor.

    .venv/bin/python bench/run.py [--long] [--json] [--runs N] [--scenarios a,b] [--smoke]

Scenarios (100-byte JSON messages; producers and consumers are separate
forked processes; every figure is the median of >= 3 runs with min-max):

  unbatched  1 producer -> 1 consumer, one message per call, acks included
  batched    the same with batches of 100 (acks piggybacked on the next recv)
  rtt        send -> blocked recv wakes -> echo on a reply queue; p50/p99
  multi      4 producers -> 2 consumers, unbatched and batched
  cli        whole-process `ipcd send` vs a minimal stdlib BaseManager client
  depth      fill to 1 M (10 M with --long): daemon RSS, put/get at depth vs empty
  worker     `ipcd worker` exec vs --call (skipped when the command does not exist)

Systems: ipcd at durability memory / os / fsync; Redis (redis-py + hiredis,
own redis-server on a private Unix socket) with no persistence / AOF everysec
/ AOF always; multiprocessing.Queue between forked processes; and two floors
in pure Python over AF_UNIX: "direct" (producer writes length-prefixed frames
straight to the consumer: no broker, no acks) and "relay" (bench/floor.py: a
one-process, thread-per-connection broker with request/reply framing like
ipcd's, but no pickle, auth, validation, store or acks).

Every process the suite starts (daemons, redis-server, the relay, workers,
forked clients) is stopped by PID before it exits, also on errors/Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from ipcd.client import Client  # noqa: E402

import floor  # noqa: E402

CTX = mp.get_context("fork")
now = time.perf_counter  # CLOCK_MONOTONIC on Linux: comparable across processes
T_START = now()
DURABILITIES = ("memory", "os", "fsync")
REDIS_MODES = {"memory": "none", "os": "everysec", "fsync": "always"}  # matching durability
SCENARIOS = ("unbatched", "batched", "rtt", "multi", "cli", "depth", "worker")
ALIASES = {"1": "unbatched", "2": "batched", "3": "rtt", "4": "multi", "5": "cli", "6": "depth",
           "7": "worker", "stream": "unbatched", "roundtrip": "rtt", "fanin": "multi"}
MSG_BYTES = 100
_SCRUB = ("IPCD_CONFIG", "IPCD_ADDRESS", "IPCD_STATE_DIR", "NOTIFY_SOCKET", "WATCHDOG_USEC",
          "WATCHDOG_PID", "JOURNAL_STREAM", "RUNTIME_DIRECTORY", "STATE_DIRECTORY", "LOGS_DIRECTORY",
          "LISTEN_FDS", "LISTEN_PID")


def log(msg: str) -> None:
    print(f"[{now() - T_START:6.1f}s] {msg}", file=sys.stderr, flush=True)


# -- messages -----------------------------------------------------------------------------


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


_PAD = MSG_BYTES - len(_dumps({"id": "0" * 12, "src": "bench", "pad": ""}))


def make_body(i: int) -> dict:
    """A dict whose compact JSON is exactly MSG_BYTES bytes."""
    return {"id": f"{i:012d}", "src": "bench", "pad": "x" * _PAD}


assert len(_dumps(make_body(123))) == MSG_BYTES


# -- processes we start ---------------------------------------------------------------------

_STARTED: list[subprocess.Popen] = []


def _spawn(argv, **kw) -> subprocess.Popen:
    p = subprocess.Popen(argv, **kw)
    _STARTED.append(p)
    return p


def _stop_proc(p: subprocess.Popen, sig=signal.SIGTERM, timeout=20.0) -> int | None:
    if p.poll() is None:
        try:
            os.kill(p.pid, sig)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(5)
        except ProcessLookupError:
            pass
    if p in _STARTED:
        _STARTED.remove(p)
    return p.returncode


def stop_everything() -> None:
    for p in list(_STARTED):
        try:
            _stop_proc(p, timeout=10)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    for c in mp.active_children():
        c.kill()
        c.join(2)


atexit.register(stop_everything)


def proc_cpu(pid: int) -> float:
    """utime + stime of a whole process (live and exited threads), seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU-seconds the whole machine has spent busy (all cores; /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int, key: str) -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


class IpcdDaemon:
    """`python -m ipcd start` with its own config in a private temp dir (as tests/conftest.py)."""

    def __init__(self, root: Path, durability: str, extra: str = "", src: Path | None = None):
        self.root = root
        self.src = src  # run the daemon from another source tree (--baseline)
        self.durability = durability
        root.mkdir(parents=True, exist_ok=True)
        self.sock_path = root / "run" / "ipcd.sock"
        self.state_dir = root / "state"
        self.config_path = root / "config.toml"
        self.log_path = root / "daemon.log"
        self.config_path.write_text(
            f'address = "{self.sock_path}"\nstate_dir = "{self.state_dir}"\nlog_level = "WARNING"\n'
            f'[defaults]\ndurability = "{durability}"\nmax_messages = 50000000\nmax_bytes = "64GiB"\n'
            f"{extra}\n")
        self.proc: subprocess.Popen | None = None
        self._key: bytes | None = None

    @property
    def env(self) -> dict:
        env = base_env(IPCD_CONFIG=str(self.config_path))
        if self.src is not None:
            env["PYTHONPATH"] = str(self.src) + os.pathsep + env["PYTHONPATH"]
        return env

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, prefix: list[str] | None = None, timeout: float = 600.0) -> float:
        """Start and wait for READY=1 on a notify socket; return seconds to ready."""
        notify_path = self.root / "notify.sock"
        if notify_path.exists():
            notify_path.unlink()
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ns.bind(str(notify_path))
        env = self.env
        env["NOTIFY_SOCKET"] = str(notify_path)
        t0 = now()
        with open(self.log_path, "ab") as logf:
            argv = (prefix or [sys.executable, "-m", "ipcd"]) + ["start"]
            self.proc = _spawn(argv, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        try:
            deadline = t0 + timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ipcd exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
                if now() > deadline:
                    raise RuntimeError(f"ipcd not ready within {timeout} s")
                ns.settimeout(0.2)
                try:
                    if "READY=1" in ns.recv(4096).decode().split("\n"):
                        return now() - t0
                except socket.timeout:
                    continue
        finally:
            ns.close()

    def stop(self) -> float:
        t0 = now()
        rc = _stop_proc(self.proc, timeout=60)
        if rc not in (0, None):
            log(f"warning: ipcd ({self.durability}) exited with {rc}")
        return now() - t0

    def authkey(self) -> bytes:
        if self._key is None:
            self._key = (self.state_dir / "authkey").read_bytes().strip()
        return self._key

    def client(self) -> Client:
        return Client(str(self.sock_path), self.authkey(), reconnect_timeout=0)


class RedisServer:
    MODES = {"none": ["--appendonly", "no"],
             "everysec": ["--appendonly", "yes", "--appendfsync", "everysec"],
             "always": ["--appendonly", "yes", "--appendfsync", "always"]}

    def __init__(self, root: Path, mode: str):
        self.root, self.mode = root, mode
        root.mkdir(parents=True, exist_ok=True)
        self.sock_path = str(root / "redis.sock")
        self.proc = None

    @property
    def pid(self):
        return self.proc.pid

    def start(self):
        argv = ["redis-server", "--port", "0", "--unixsocket", self.sock_path, "--unixsocketperm", "700",
                "--dir", str(self.root), "--save", "", "--daemonize", "no", "--loglevel", "warning",
                "--logfile", str(self.root / "redis.log"), *self.MODES[self.mode]]
        self.proc = _spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = now() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                r = redis.Redis(unix_socket_path=self.sock_path)
                r.ping()
                r.close()
                return
            except (redis.ConnectionError, FileNotFoundError):
                if now() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self):
        _stop_proc(self.proc)


class RelayServer:
    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.sock_path = str(root / "relay.sock")
        self.proc = None

    @property
    def pid(self):
        return self.proc.pid

    def start(self):
        self.proc = _spawn([sys.executable, str(BENCH / "floor.py"), self.sock_path],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the relay floor did not start")

    def stop(self):
        self.proc.stdout.close()
        _stop_proc(self.proc)


def redis_usable() -> str | None:
    """None if Redis can be benchmarked, else why not."""
    if not shutil.which("redis-server"):
        return "redis-server is not installed (apt-get install -y redis-server)"
    try:
        import redis  # noqa: F401
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        return "redis-py is not installed (.venv/bin/pip install redis hiredis)"
    if not HIREDIS_AVAILABLE:
        return "hiredis is not installed (.venv/bin/pip install hiredis)"
    return None


# -- adapters: one producer/consumer API per system -----------------------------------------
# prepare() runs in the parent before the fork; producer()/consumer() in the child.
# producer -> (send(list_of_dicts), close);  consumer -> (get(timeout) -> n decoded, close)

_uniq = [0]


def _next_name(prefix: str) -> str:
    _uniq[0] += 1
    return f"{prefix}{os.getpid()}-{_uniq[0]}"


class IpcdAdapter:
    kind = "ipcd"

    def __init__(self, daemon: IpcdDaemon, variant: str = "piggyback", prefix: str = ""):
        self.d, self.variant = daemon, variant
        self.durability = daemon.durability
        self.label = prefix + ("ipcd recv_many(ack=prev)" if variant == "piggyback" else "ipcd recv + ack")
        self.srv_pid = daemon.pid

    def supports(self, nprod, ncons):
        return True

    def prepare(self, names):
        return {n: _next_name(f"b-{n}-") for n in names}

    def cleanup(self, handles):
        pass

    def producer(self, q, batch):
        c = self.d.client()
        if batch == 1:
            return (lambda objs: c.send(q, objs[0])), c.close
        return (lambda objs: c.send_many(q, objs)), c.close

    def consumer(self, q, batch):
        c = self.d.client()
        if self.variant == "plain":
            def get(timeout):
                msgs = c.recv_many(q, batch, timeout=timeout)
                for m in msgs:
                    m.body
                if msgs:
                    c.ack(msgs)
                return len(msgs)
            return get, c.close
        pending = []

        def get(timeout):
            nonlocal pending
            msgs = c.recv_many(q, batch, timeout=timeout, ack=pending)
            for m in msgs:
                m.body
            pending = msgs
            return len(msgs)

        def close():
            if pending:
                c.ack(pending)
            c.close()
        return get, close


class RedisAdapter:
    kind = "redis"

    def __init__(self, server: RedisServer, durability: str):
        self.s, self.durability = server, durability
        self.label = f"redis AOF {server.mode}" if server.mode != "none" else "redis no persistence"
        self.srv_pid = server.pid

    def supports(self, nprod, ncons):
        return True

    def prepare(self, names):
        return {n: _next_name(f"b:{n}:") for n in names}

    def cleanup(self, handles):
        pass

    def _conn(self):
        import redis

        return redis.Redis(unix_socket_path=self.s.sock_path)

    def producer(self, key, batch):
        r = self._conn()
        if batch == 1:
            return (lambda objs: r.lpush(key, _dumps(objs[0]))), r.close
        return (lambda objs: r.lpush(key, *[_dumps(o) for o in objs])), r.close

    def consumer(self, key, batch):
        r = self._conn()
        if batch == 1:
            def get(timeout):
                got = r.brpop(key, timeout)
                if got is None:
                    return 0
                json.loads(got[1])
                return 1
        else:
            def get(timeout):  # BLMPOP ... RIGHT COUNT n: RPOP count n that blocks when empty
                got = r.blmpop(timeout, 1, key, direction="RIGHT", count=batch)
                if not got:
                    return 0
                for v in got[1]:
                    json.loads(v)
                return len(got[1])
        return get, r.close


class RelayAdapter:
    kind = "floor"
    durability = "-"
    label = "floor: relay (Python broker)"

    def __init__(self, server: RelayServer):
        self.s = server
        self.srv_pid = server.pid

    def supports(self, nprod, ncons):
        return True

    def prepare(self, names):
        return {n: _next_name(f"b-{n}-").encode() for n in names}

    def cleanup(self, handles):
        pass

    def producer(self, q, batch):
        cl = floor.RelayClient(self.s.sock_path)
        return (lambda objs: cl.put(q, [_dumps(o).encode() for o in objs])), cl.close

    def consumer(self, q, batch):
        cl = floor.RelayClient(self.s.sock_path)

        def get(timeout):
            msgs = cl.get(q, batch, timeout)
            for m in msgs:
                json.loads(m)
            return len(msgs)
        return get, cl.close


class DirectAdapter:
    """Producer writes length-prefixed frames straight to the consumer (socketpair)."""

    kind = "floor"
    durability = "-"
    label = "floor: direct AF_UNIX"
    srv_pid = None

    def supports(self, nprod, ncons):
        return nprod == 1 and ncons == 1

    def prepare(self, names):
        return {n: socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for n in names}

    def cleanup(self, handles):
        for a, b in handles.values():
            a.close()
            b.close()

    def producer(self, pair, batch):
        w = pair[0]
        pack = struct.Struct("!I").pack

        def send(objs):
            w.sendall(b"".join(pack(len(b)) + b for b in (_dumps(o).encode() for o in objs)))
        return send, (lambda: None)

    def consumer(self, pair, batch):
        import select

        r = pair[1]
        buf = bytearray()
        pos = [0]
        unpack_from = struct.Struct("!I").unpack_from

        def get(timeout):
            n = 0
            while True:
                p, end = pos[0], len(buf)
                while n < batch and end - p >= 4:
                    (size,) = unpack_from(buf, p)
                    if end - p - 4 < size:
                        break
                    json.loads(bytes(buf[p + 4:p + 4 + size]))
                    p += 4 + size
                    n += 1
                pos[0] = p
                if n:
                    if p > 1 << 16:
                        del buf[:p]
                        pos[0] = 0
                    return n
                if not select.select([r], [], [], timeout)[0]:
                    return 0
                buf.extend(r.recv(1 << 16))
        return get, (lambda: None)


class MpQueueAdapter:
    kind = "mpq"
    durability = "-"
    label = "multiprocessing.Queue"
    srv_pid = None

    def supports(self, nprod, ncons):
        return True

    def prepare(self, names):
        return {n: CTX.Queue() for n in names}

    def cleanup(self, handles):
        for q in handles.values():
            q.close()

    def producer(self, q, batch):
        if batch == 1:
            return (lambda objs: q.put(_dumps(objs[0]))), (lambda: (q.close(), q.join_thread()))
        return (lambda objs: q.put([_dumps(o) for o in objs])), (lambda: (q.close(), q.join_thread()))

    def consumer(self, q, batch):
        import queue as stdqueue

        def get(timeout):
            try:
                item = q.get(timeout=timeout)
            except stdqueue.Empty:
                return 0
            if isinstance(item, list):
                for t in item:
                    json.loads(t)
                return len(item)
            json.loads(item)
            return 1
        return get, (lambda: None)


# -- harness ------------------------------------------------------------------------------------


class ChildFailed(RuntimeError):
    pass


def _child_main(conn, barrier, fn, args):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the runner's handler is not for children
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        conn.send(("ok", fn(barrier, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass
        conn.send(("err", traceback.format_exc()))
    finally:
        conn.close()


class _Child:
    __slots__ = ("proc", "reader", "result", "done")

    def __init__(self, proc, reader):
        self.proc, self.reader, self.result, self.done = proc, reader, None, False

    def poll(self, timeout=0.0) -> bool:
        """Read the child's report if it is there; raise if the child failed."""
        if not self.done and self.reader.poll(timeout):
            status, val = self.reader.recv()
            if status != "ok":
                raise ChildFailed(val)
            self.result, self.done = val, True
        return self.done


def _start_children(barrier, specs, daemon=True) -> list[_Child]:
    out = []
    for fn, args in specs:
        r, w = CTX.Pipe(duplex=False)
        p = CTX.Process(target=_child_main, args=(w, barrier, fn, args), daemon=daemon)
        p.start()
        w.close()
        out.append(_Child(p, r))
    return out


def _collect(children, timeout=120.0):
    deadline = now() + timeout
    for c in children:
        if not c.poll(max(0.0, deadline - now())):
            raise ChildFailed(f"child {c.proc.pid} did not report within {timeout} s")
        c.proc.join(10)
    return [c.result for c in children]


def _check_children(children):
    for c in children:
        if not c.poll() and c.proc.exitcode not in (None, 0):
            raise ChildFailed(f"child {c.proc.pid} died with exit code {c.proc.exitcode}")


def _kill_children(children):
    for c in children:
        if c.proc.is_alive():
            c.proc.kill()
        c.proc.join(5)


def _producer(barrier, adapter, h, batch, n, seq0):
    send, close = adapter.producer(h, batch)
    bodies = [make_body(seq0 + i) for i in range(n)]
    barrier.wait(60)
    c0, t0 = own_cpu(), now()
    for i in range(0, n, batch):
        send(bodies[i:i + batch])
    t1 = now()
    cpu = own_cpu() - c0
    close()
    return {"t0": t0, "t1": t1, "cpu": cpu}


def _consumer(barrier, adapter, h, batch, idx, counts, last, stop):
    get, close = adapter.consumer(h, batch)
    barrier.wait(60)
    c0 = own_cpu()
    n = 0
    while True:
        k = get(0.1)
        if k:
            n += k
            last[idx] = now()
            counts[idx] = n
        elif stop.is_set():
            break
    cpu = own_cpu() - c0
    close()
    return {"n": n, "cpu": cpu}


def stream_run(adapter, nprod, ncons, batch, total, max_wait=300.0, hooks=None) -> dict:
    """One timed run: `total` messages from nprod producers to ncons consumers."""
    handles = adapter.prepare(["s"])
    h = handles["s"]
    barrier = CTX.Barrier(nprod + ncons + 1)
    stop = CTX.Event()
    counts = CTX.RawArray("q", ncons)
    last = CTX.RawArray("d", ncons)
    per = total // nprod
    specs = [(_producer, (adapter, h, batch, per, i * per)) for i in range(nprod)]
    specs += [(_consumer, (adapter, h, batch, i, counts, last, stop)) for i in range(ncons)]
    children = _start_children(barrier, specs)
    try:
        try:
            barrier.wait(60)
        except Exception:
            _check_children(children)
            raise
        t0 = now()
        m0 = machine_busy()
        s0 = proc_cpu(adapter.srv_pid) if adapter.srv_pid else float("nan")
        if hooks:
            hooks[0]()
        total = per * nprod
        deadline = t0 + max_wait
        while sum(counts) < total:
            _check_children(children)
            if now() > deadline:
                raise TimeoutError(f"{adapter.label}: {sum(counts)}/{total} messages after {max_wait} s")
            time.sleep(0.01)
        s1 = proc_cpu(adapter.srv_pid) if adapter.srv_pid else float("nan")
        m1, t1 = machine_busy(), now()
        if hooks:
            hooks[1]()
        stop.set()
        res = _collect(children)
    except BaseException:
        _kill_children(children)
        raise
    finally:
        adapter.cleanup(handles)
    elapsed = max(last) - t0
    got = sum(r["n"] for r in res[nprod:])
    if got != total:
        raise RuntimeError(f"{adapter.label}: consumers got {got} messages, expected {total}")
    own = (0.0 if s1 != s1 else s1 - s0) + sum(r["cpu"] for r in res)
    return {"rate": total / elapsed, "elapsed": elapsed, "n": total,
            "srv_us": (s1 - s0) / total * 1e6, "cli_us": sum(r["cpu"] for r in res) / total * 1e6,
            "other_load": max(0.0, (m1 - m0) - own) / (t1 - t0)}


def _pinger(barrier, adapter, hreq, hrep, n, warm):
    send, close_s = adapter.producer(hreq, 1)
    get, close_g = adapter.consumer(hrep, 1)
    body = [make_body(1)]
    lat = []
    barrier.wait(60)
    c0 = own_cpu()
    for i in range(warm + n):
        t = now()
        send(body)
        while not get(10.0):
            pass
        lat.append(now() - t)
    cpu = own_cpu() - c0
    close_s()
    close_g()
    return {"lat": lat[warm:], "cpu": cpu}


def _echo(barrier, adapter, hreq, hrep, stop):
    get, close_g = adapter.consumer(hreq, 1)
    send, close_s = adapter.producer(hrep, 1)
    body = [make_body(2)]
    barrier.wait(60)
    c0 = own_cpu()
    while True:
        if get(0.2):
            send(body)
            cpu = own_cpu() - c0
        elif stop.is_set():
            break
    close_g()
    close_s()
    return {"cpu": cpu}


def rtt_run(adapter, n, warm=20) -> dict:
    handles = adapter.prepare(["req", "rep"])
    barrier = CTX.Barrier(3)
    stop = CTX.Event()
    children = _start_children(barrier, [(_pinger, (adapter, handles["req"], handles["rep"], n, warm)),
                                         (_echo, (adapter, handles["req"], handles["rep"], stop))])
    try:
        try:
            barrier.wait(60)
        except Exception:
            _check_children(children)
            raise
        s0 = proc_cpu(adapter.srv_pid) if adapter.srv_pid else float("nan")
        m0, t0 = machine_busy(), now()
        if not children[0].poll(600):
            raise TimeoutError(f"{adapter.label}: round trips did not finish")
        s1 = proc_cpu(adapter.srv_pid) if adapter.srv_pid else float("nan")
        m1, t1 = machine_busy(), now()
        stop.set()
        ping, echo = _collect(children)
    except BaseException:
        _kill_children(children)
        raise
    finally:
        adapter.cleanup(handles)
    lat = sorted(ping["lat"])
    own = (0.0 if s1 != s1 else s1 - s0) + ping["cpu"] + echo["cpu"]
    return {"p50": _pct(lat, 50), "p99": _pct(lat, 99), "mean": statistics.fmean(lat), "n": len(lat),
            "srv_us": (s1 - s0) / (n + warm) * 1e6, "other_load": max(0.0, (m1 - m0) - own) / (t1 - t0)}


def _pct(sorted_vals, p):
    k = (len(sorted_vals) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def in_child(fn, *args, timeout=3600.0):
    """Run fn(*args) in a forked child; return its result."""
    barrier = CTX.Barrier(1)
    children = _start_children(barrier, [(lambda b, *a: fn(*a), args)], daemon=False)  # may fork a Pool
    try:
        return _collect(children, timeout)[0]
    except BaseException:
        _kill_children(children)
        raise


# -- results -------------------------------------------------------------------------------------


class Results:
    def __init__(self):
        self.rows: list[dict] = []
        self.skips: list[dict] = []
        self.notes: list[str] = []

    def add(self, scenario, adapter_or_label, durability, metric, unit, values, higher_better,
            extra=None, kind=None):
        if isinstance(adapter_or_label, str):
            label, dkind = adapter_or_label, kind
        else:
            label, dkind = adapter_or_label.label, adapter_or_label.kind
        vals = [v for v in values if v == v]
        row = {"scenario": scenario, "system": label, "kind": dkind, "durability": durability,
               "metric": metric, "unit": unit, "values": values, "runs": len(vals),
               "median": statistics.median(vals) if vals else None,
               "min": min(vals) if vals else None, "max": max(vals) if vals else None,
               "higher_is_better": higher_better, **(extra or {})}
        self.rows.append(row)
        return row

    def skip(self, scenario, what, why):
        self.skips.append({"scenario": scenario, "what": what, "why": why})
        log(f"skipped: {scenario}: {what}: {why}")

    def find(self, scenario, kind=None, durability=None, metric=None, system_prefix=None):
        for r in self.rows:
            if (r["scenario"] == scenario and (kind is None or r["kind"] == kind)
                    and (durability is None or r["durability"] == durability)
                    and (metric is None or r["metric"] == metric)
                    and (system_prefix is None or r["system"].startswith(system_prefix))):
                return r
        return None


def _med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


# -- scenario drivers ----------------------------------------------------------------------------


class Suite:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.runs = args.runs
        self.target_s = 1.5 if args.long else 0.35  # seconds per timed run
        self.res = Results()
        self.tmp = Path(tempfile.mkdtemp(prefix="ipcd-b-", dir="/tmp"))
        self.daemons: dict[str, IpcdDaemon] = {}
        self.baselines: dict[str, IpcdDaemon] = {}  # --baseline: the same daemons from older code
        self.redis: dict[str, RedisServer] = {}
        self.relay: RelayServer | None = None
        self.redis_why = "--smoke runs without Redis" if (self.smoke or args.no_redis) else redis_usable()
        self.durabilities = ("os",) if self.smoke else DURABILITIES

    # backends ---------------------------------------------------------------------------------

    def start_backends(self, need_stream: bool):
        if not need_stream and "cli" not in self.args.scenarios:
            return
        wanted = self.durabilities if need_stream else ("os",)
        for d in wanted:
            dm = IpcdDaemon(self.tmp / f"i-{d}", d)
            log(f"starting ipcd durability={d} ({dm.start():.2f} s to READY, pid {dm.pid})")
            self.daemons[d] = dm
            if self.args.baseline and need_stream:
                bm = IpcdDaemon(self.tmp / f"base-{d}", d, src=self.args.baseline)
                log(f"starting baseline ipcd ({self.args.baseline}) durability={d} "
                    f"({bm.start():.2f} s to READY, pid {bm.pid})")
                self.baselines[d] = bm
        if not need_stream:
            return
        self.relay = RelayServer(self.tmp / "relay")
        self.relay.start()
        if self.redis_why is None:
            for d in self.durabilities:
                rs = RedisServer(self.tmp / f"r-{REDIS_MODES[d]}", REDIS_MODES[d])
                rs.start()
                self.redis[d] = rs
            log(f"started redis-server x{len(self.redis)} (unix sockets only) and the relay floor")
        else:
            log(f"Redis skipped: {self.redis_why}")

    def stop_backends(self):
        for d in list(self.daemons.values()) + list(self.baselines.values()):
            d.stop()
        self.daemons.clear()
        self.baselines.clear()
        for r in list(self.redis.values()):
            r.stop()
        self.redis.clear()
        if self.relay:
            self.relay.stop()
            self.relay = None

    def adapters(self, scenario: str, nprod=1, ncons=1, variants=("piggyback",)):
        out = []
        for d in self.durabilities:
            for v in variants:
                out.append(IpcdAdapter(self.daemons[d], v))
                if d in self.baselines:
                    out.append(IpcdAdapter(self.baselines[d], v, prefix="baseline "))
        for d in self.durabilities:
            if d in self.redis:
                out.append(RedisAdapter(self.redis[d], d))
        out.append(RelayAdapter(self.relay))
        out.append(DirectAdapter())
        out.append(MpQueueAdapter())
        return [a for a in out if a.supports(nprod, ncons)]

    # streaming ------------------------------------------------------------------------------

    def _stream_scenario(self, scenario, title, nprod, ncons, batch, variants=("piggyback",)):
        adapters = self.adapters(scenario, nprod, ncons, variants)
        unit = nprod * batch
        sizes = {}
        for a in adapters:  # warm-up run that also sizes the timed runs
            if self.smoke:
                sizes[id(a)] = max(unit, (300 if batch == 1 else 2000) // unit * unit)
                continue
            n_w = max(unit, 200 * batch // unit * unit)
            w = stream_run(a, nprod, ncons, batch, n_w)
            n = int(w["rate"] * self.target_s) // unit * unit
            sizes[id(a)] = min(max(n, n_w), 2_000_000 // unit * unit)
            log(f"{scenario}: warm-up {a.label} [{a.durability}] {w['rate']:,.0f} msg/s -> {sizes[id(a)]} msgs/run")
        data = {id(a): [] for a in adapters}
        for run in range(self.runs):  # interleaved: A B C, A B C, ...
            for a in adapters:
                r = stream_run(a, nprod, ncons, batch, sizes[id(a)])
                data[id(a)].append(r)
                log(f"{scenario} run {run + 1}/{self.runs}: {a.label} [{a.durability}] {r['rate']:,.0f} msg/s "
                    f"(srv {r['srv_us']:.1f} us/msg, clients {r['cli_us']:.1f} us/msg, "
                    f"other load {r['other_load']:.2f} cores)")
        for a in adapters:
            rs = data[id(a)]
            self.res.add(scenario, a, a.durability, "throughput", "msg/s", [r["rate"] for r in rs], True,
                         {"title": title, "n_per_run": rs[0]["n"],
                          "srv_cpu_us_per_msg": _med([r["srv_us"] for r in rs]),
                          "client_cpu_us_per_msg": _med([r["cli_us"] for r in rs]),
                          "other_load": [round(r["other_load"], 3) for r in rs]})
        for d in self.durabilities:
            if d not in self.redis:
                self.res.skip(scenario, f"Redis ({REDIS_MODES[d]})", self.redis_why)

    def s_unbatched(self):
        self._stream_scenario("unbatched", "1 producer -> 1 consumer, unbatched", 1, 1, 1,
                              variants=("piggyback", "plain"))

    def s_batched(self):
        self._stream_scenario("batched", "1 producer -> 1 consumer, batches of 100", 1, 1, 100)

    def s_multi(self):
        self._stream_scenario("multi-unbatched", "4 producers -> 2 consumers, unbatched", 4, 2, 1)
        self._stream_scenario("multi-batched", "4 producers -> 2 consumers, batches of 100", 4, 2, 100)

    def s_rtt(self):
        adapters = self.adapters("rtt")
        sizes = {}
        for a in adapters:
            if self.smoke:
                sizes[id(a)] = 100
                continue
            w = rtt_run(a, 100)
            sizes[id(a)] = int(min(max(self.target_s / w["mean"], 300), 20_000))
            log(f"rtt: warm-up {a.label} [{a.durability}] p50 {w['p50'] * 1e6:.0f} us -> {sizes[id(a)]} round trips/run")
        data = {id(a): [] for a in adapters}
        for run in range(self.runs):
            for a in adapters:
                r = rtt_run(a, sizes[id(a)])
                data[id(a)].append(r)
                log(f"rtt run {run + 1}/{self.runs}: {a.label} [{a.durability}] p50 {r['p50'] * 1e6:.0f} us "
                    f"p99 {r['p99'] * 1e6:.0f} us (other load {r['other_load']:.2f} cores)")
        for a in adapters:
            rs = data[id(a)]
            extra = {"title": "round trip: send -> blocked recv wakes -> echo on a reply queue",
                     "n_per_run": rs[0]["n"], "srv_cpu_us_per_rtt": _med([r["srv_us"] for r in rs]),
                     "other_load": [round(r["other_load"], 3) for r in rs]}
            self.res.add("rtt", a, a.durability, "p50", "us", [r["p50"] * 1e6 for r in rs], False, extra)
            self.res.add("rtt", a, a.durability, "p99", "us", [r["p99"] * 1e6 for r in rs], False, extra)
        for d in self.durabilities:
            if d not in self.redis:
                self.res.skip("rtt", f"Redis ({REDIS_MODES[d]})", self.redis_why)

    # whole-process CLI --------------------------------------------------------------------------

    def s_cli(self):
        d = self.daemons["os"]
        body = _dumps(make_body(5))
        keyfile = str(d.state_dir / "authkey")
        script = shutil.which("ipcd", path=str(Path(sys.executable).parent))
        cmds = {"python -c pass (interpreter floor)": [sys.executable, "-c", "pass"],
                "stdlib BaseManager client (bench/stdlib_put.py)":
                    [sys.executable, str(BENCH / "stdlib_put.py"), str(d.sock_path), keyfile, "cli", body]}
        if script:
            cmds["ipcd send (console script)"] = [script, "send", "cli", body]
        if self.args.long or not script:
            cmds["python -m ipcd send"] = [sys.executable, "-m", "ipcd", "send", "cli", body]
        env = d.env
        per_run = 5 if self.smoke else 21
        hf = shutil.which("hyperfine")
        times: dict[str, list[list[float]]] = {k: [] for k in cmds}
        # sanity: every command works before timing it
        for name, argv in cmds.items():
            r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"{name} failed ({r.returncode}): {r.stderr.strip()[:500]}")
        tool = "hyperfine" if hf and not self.smoke else "own timing (subprocess, perf_counter)"
        for run in range(self.runs):
            if tool == "hyperfine":
                out = self.tmp / f"hf-{run}.json"
                argv = [hf, "-N", "--style", "none", "--warmup", "3", "--runs", str(per_run),
                        "--export-json", str(out)] + [shlex.join(c) for c in cmds.values()]
                subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, timeout=900)
                for name, res in zip(cmds, json.loads(out.read_text())["results"]):
                    times[name].append(res["times"])
            else:
                for name, argv in cmds.items():
                    ts = []
                    for _ in range(per_run):
                        t = now()
                        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True, timeout=60)
                        ts.append(now() - t)
                    times[name].append(ts)
            log(f"cli run {run + 1}/{self.runs}: " + ", ".join(
                f"{n.split(' (')[0]} {statistics.median(times[n][-1]) * 1e3:.1f} ms" for n in cmds))
        for name in cmds:
            kind = "ipcd" if "ipcd" in name else ("floor" if "pass" in name else "stdlib")
            self.res.add("cli", name, "os" if kind == "ipcd" else "-", "wall", "ms",
                         [statistics.median(t) * 1e3 for t in times[name]], False,
                         {"title": f"whole process, one send (median of {per_run} per run; {tool})",
                          "per_run": per_run, "p10_ms": _med([_pct(sorted(t), 10) * 1e3 for t in times[name]])},
                         kind=kind)
        with d.client() as c:
            c.purge("cli")

    # depth ---------------------------------------------------------------------------------------

    def s_depth(self):
        """Two daemons side by side: E (empty store) and D (filled to `depth`); put/get measured
        interleaved on both (E, D / D, E alternating) so background load hits both alike."""
        depth = 3000 if self.smoke else (10_000_000 if self.args.long else 1_000_000)
        k_b, k_u = (500, 100) if self.smoke else (10_000, 1_000)
        dd = IpcdDaemon(self.tmp / "i-deep", "os")
        de = IpcdDaemon(self.tmp / "i-empty", "os")
        log(f"depth: starting ipcd (os) for a fill to {depth:,}: {dd.start():.2f} s to READY")
        q = "depth"
        phases: dict[tuple[str, str], list[float]] = {}
        try:
            rss0 = proc_status(dd.pid, "VmRSS")
            log(f"depth: filling to {depth:,} x {MSG_BYTES} B ...")
            t0 = now()
            fill_rate = in_child(_depth_fill, str(dd.sock_path), dd.authkey(), q, depth, timeout=7200)
            fill_s = now() - t0
            rss_full = proc_status(dd.pid, "VmRSS")
            hwm_full = proc_status(dd.pid, "VmHWM")
            log(f"depth: filled in {fill_s:.1f} s ({fill_rate:,.0f} msg/s); daemon RSS {rss_full / 2**20:.1f} MiB "
                f"(peak {hwm_full / 2**20:.1f} MiB)")
            de.start()
            pairs = (("empty", de), ("at depth", dd))
            for run in range(self.runs):
                for name, fn, k, b in (("put batch 100", _depth_put, k_b, 100),
                                       ("get+ack batch 100", _depth_get, k_b, 100),
                                       ("put unbatched", _depth_put, k_u, 1),
                                       ("get+ack unbatched", _depth_get, k_u, 1)):
                    for tag, dm in (pairs if run % 2 == 0 else pairs[::-1]):
                        rate = in_child(fn, str(dm.sock_path), dm.authkey(), q, k, b)
                        phases.setdefault((tag, name), []).append(rate)
                log(f"depth run {run + 1}/{self.runs}: " + ", ".join(
                    f"{n} {t} {v[-1]:,.0f}/s" for (t, n), v in phases.items()))
            de.stop()
            rss_after = proc_status(dd.pid, "VmRSS")
            hwm_after = proc_status(dd.pid, "VmHWM")
            with dd.client() as c:
                st = c.stats(q)[0]
                store_bytes = c.status()["store_bytes"]
            stop_s = dd.stop()
            ready_s = dd.start()
            rss_restart = proc_status(dd.pid, "VmRSS")
            log(f"depth: restart with {st['ready']:,} stored: stop {stop_s:.2f} s, start to READY {ready_s:.2f} s, "
                f"RSS {rss_restart / 2**20:.1f} MiB")
        finally:
            for dm in (dd, de):
                if dm.proc and dm.proc.poll() is None:
                    dm.stop()
                shutil.rmtree(dm.root, ignore_errors=True)
        title = (f"depth {depth:,} x {MSG_BYTES} B, durability os (put/get: a daemon with an empty store vs one "
                 f"holding {depth:,}, interleaved)")
        mib = 2 ** 20
        for label, val in (("daemon RSS, just started", rss0),
                           (f"daemon RSS at {depth:,}", rss_full), ("daemon VmHWM (peak) during fill", hwm_full),
                           ("daemon RSS after the put/get runs", rss_after),
                           ("daemon VmHWM (peak) overall", hwm_after),
                           ("daemon RSS after restart at depth", rss_restart)):
            self.res.add("depth", label, "os", "rss", "MiB", [val / mib], False, {"title": title}, kind="ipcd")
        self.res.add("depth", "store size on disk at depth", "os", "disk", "MiB", [store_bytes / mib], False,
                     {"title": title}, kind="ipcd")
        self.res.add("depth", f"fill to {depth:,} (send_json_many 10,000/request)", "os", "throughput", "msg/s",
                     [fill_rate], True, {"title": title, "seconds": fill_s}, kind="ipcd")
        self.res.add("depth", "restart at depth: start to READY", "os", "wall", "s", [ready_s], False,
                     {"title": title}, kind="ipcd")
        for name in ("put batch 100", "get+ack batch 100", "put unbatched", "get+ack unbatched"):
            for tag in ("empty", "at depth"):
                self.res.add("depth", f"{name} ({tag})", "os", "throughput", "msg/s", phases[(tag, name)], True,
                             {"title": title, "phase": tag, "op": name, "depth": depth}, kind="ipcd")
        self.res.depth = depth

    # worker --------------------------------------------------------------------------------------

    def s_worker(self):
        r = subprocess.run([sys.executable, "-m", "ipcd", "worker", "--help"], env=base_env(),
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            said = next((ln.strip(" │") for ln in (r.stderr + r.stdout).splitlines()
                         if "No such command" in ln or "Error" in ln), f"exit code {r.returncode}")
            self.res.skip("worker", "ipcd worker exec vs --call",
                          f"skipped: not available (`python -m ipcd worker --help`: {said.strip()})")
            return
        dm = IpcdDaemon(self.tmp / "i-worker", "os")
        log(f"worker: starting ipcd (os): {dm.start():.2f} s to READY")
        true = shutil.which("true") or "/bin/true"
        modes = [("exec: ipcd worker Q -- true", ["--", true], 20 if self.smoke else 200),
                 ("--call worker_handlers:noop (-j 1)", ["--call", "worker_handlers:noop"], 100 if self.smoke else 1500),
                 ("--call worker_handlers:noop (-j 2)", ["--call", "worker_handlers:noop", "-j", "2"],
                  100 if self.smoke else 1500)]
        env = dm.env
        env["PYTHONPATH"] = str(BENCH) + os.pathsep + env["PYTHONPATH"]
        per_msg = {m[0]: [] for m in modes}
        startup = {m[0]: [] for m in modes}
        try:
            c = dm.client()
            for run_i in range(self.runs):
                for name, extra, n in modes:
                    q = _next_name("w-")
                    texts = [_dumps(make_body(i)) for i in range(n)]
                    c.send_json_many(q, texts)
                    t0 = now()
                    errf = open(dm.root / f"{q}.stderr", "w+b")  # a file, not a pipe: it logs per ack
                    p = _spawn([sys.executable, "-m", "ipcd", "worker", q, *extra], env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf)
                    t_first = None
                    try:
                        deadline = t0 + 600
                        while True:
                            acked = c.stats(q)[0]["acked"]
                            t = now()
                            if acked and t_first is None:
                                t_first, first_n = t, acked
                            if acked >= n:
                                break
                            if p.poll() is not None:
                                errf.seek(0)
                                raise RuntimeError(f"worker exited {p.returncode}: {errf.read()[-800:]!r}")
                            if t > deadline:
                                raise TimeoutError(f"worker: {acked}/{n} after 600 s")
                            time.sleep(0.002)
                    finally:
                        kids = _children_of(p.pid)
                        _stop_proc(p, timeout=30)
                        errf.close()
                        for k in kids:  # a pool process left behind would be ours to stop
                            try:
                                os.kill(k, signal.SIGKILL)
                            except ProcessLookupError:
                                pass
                    per_msg[name].append((t - t_first) / max(1, n - first_n) * 1e3)
                    startup[name].append((t_first - t0) * 1e3)
                    log(f"worker run {run_i + 1}/{self.runs}: {name}: {per_msg[name][-1]:.3f} ms/msg, "
                        f"start to first ack {startup[name][-1]:.0f} ms")
            c.close()
        finally:
            dm.stop()
        floors = {"floor: subprocess.run([true], input=body) per message": (_floor_exec, 20 if self.smoke else 200),
                  "floor: multiprocessing Pool(1).apply(noop, (body,))": (_floor_pool, 100 if self.smoke else 3000)}
        floor_vals = {k: [] for k in floors}
        for _ in range(self.runs):
            for k, (fn, n) in floors.items():
                floor_vals[k].append(in_child(fn, n) * 1e3)
        title = "ipcd worker per-message cost (queue pre-filled; first ack to last ack)"
        for name, _e, n in modes:
            self.res.add("worker", name, "os", "per_msg", "ms", per_msg[name], False,
                         {"title": title, "n_per_run": n, "startup_ms": _med(startup[name])}, kind="ipcd")
        for name in modes:
            self.res.add("worker", f"  start to first ack: {name[0]}", "os", "startup", "ms", startup[name[0]],
                         False, {"title": title}, kind="ipcd-startup")
        for k, vals in floor_vals.items():
            self.res.add("worker", k, "-", "per_msg", "ms", vals, False, {"title": title}, kind="floor")

    # running --------------------------------------------------------------------------------------

    def run(self):
        sc = self.args.scenarios
        stream = [s for s in ("unbatched", "batched", "rtt", "multi") if s in sc]
        try:
            self.start_backends(bool(stream))
            for s in ("unbatched", "batched", "rtt", "multi", "cli"):
                if s in sc:
                    getattr(self, "s_" + s)()
            self.stop_backends()
            if "depth" in sc:
                self.s_depth()
            if "worker" in sc:
                self.s_worker()
        finally:
            self.stop_backends()
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.res


def _children_of(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return kids


def _floor_exec(n):
    true = shutil.which("true") or "/bin/true"
    body = _dumps(make_body(1)).encode()
    t0 = now()
    for _ in range(n):
        subprocess.run([true], input=body, check=True)
    return (now() - t0) / n


def _noop(body):
    return None


def _floor_pool(n):
    body = _dumps(make_body(1))
    with CTX.Pool(1) as pool:
        pool.apply(_noop, (body,))
        t0 = now()
        for _ in range(n):
            pool.apply(_noop, (body,))
        return (now() - t0) / n


# depth helpers (run in a forked child) ------------------------------------------------------------


def _depth_put(sock, key, q, k, batch):
    c = Client(sock, key, reconnect_timeout=0)
    bodies = [make_body(i) for i in range(k)]
    t0 = now()
    if batch == 1:
        for b in bodies:
            c.send(q, b)
    else:
        for i in range(0, k, batch):
            c.send_many(q, bodies[i:i + batch])
    rate = k / (now() - t0)
    c.close()
    return rate


def _depth_get(sock, key, q, k, batch):
    c = Client(sock, key, reconnect_timeout=0)
    pending, n = [], 0
    t0 = now()
    while n < k:
        msgs = c.recv_many(q, min(batch, k - n), timeout=30, ack=pending)
        if not msgs:
            raise RuntimeError(f"depth: queue ran dry after {n}/{k}")
        for m in msgs:
            m.body
        pending = msgs
        n += len(msgs)
    if pending:
        c.ack(pending)
    rate = k / (now() - t0)
    c.close()
    return rate


def _depth_fill(sock, key, q, total):
    c = Client(sock, key, reconnect_timeout=0)
    texts = [_dumps(make_body(i)) for i in range(10_000)]
    t0 = now()
    sent = 0
    while sent < total:
        chunk = texts[:min(10_000, total - sent)]
        c.send_json_many(q, chunk)
        sent += len(chunk)
    rate = total / (now() - t0)
    c.close()
    return rate


# -- report ---------------------------------------------------------------------------------------------


def _fmt(v, unit):
    if v is None or v != v:
        return "-"
    if unit == "msg/s":
        return f"{v:,.0f}"
    if unit == "ms" and v < 10:
        return f"{v:.3f}"
    if unit in ("us", "ms"):
        return f"{v:,.1f}" if v < 1000 else f"{v:,.0f}"
    return f"{v:,.2f}"


def _ratio(a, b):
    if not a or not b or a["median"] is None or b["median"] is None or b["median"] == 0:
        return None
    return a["median"] / b["median"]


def _rstr(x):
    return "-" if x is None else f"{x:.2f}x"


def build_targets(res: Results, args) -> list[dict]:
    t = []

    def add(name, ratio, op, limit, detail, note=""):
        if ratio is None:
            t.append({"target": name, "status": "n/a", "ratio": None, "limit": f"{op} {limit}",
                      "detail": detail or "not measured in this run", "note": note})
            return
        ok = ratio >= limit if op == ">=" else ratio <= limit
        t.append({"target": name, "status": "MET" if ok else "MISSED", "ratio": ratio,
                  "limit": f"{op} {limit}", "detail": detail, "note": note})

    def pair(scn, dur, metric="throughput", prefix="ipcd recv_many"):
        a = res.find(scn, "ipcd", dur, metric, prefix)
        b = res.find(scn, "redis", dur, metric)
        return a, b, _ratio(a, b)

    cores = os.cpu_count() or 1

    def budget(a, b, k):
        """What a throughput target leaves for the daemon: producer, consumer and broker
        share the machine's cores, so k x Redis's rate allows cores / (k x rate) of CPU per
        message for all three; the clients' share is measured in the same run."""
        if not (a and b and b["median"]):
            return ""
        total = cores / (k * b["median"]) * 1e6
        cli, srv = a.get("client_cpu_us_per_msg"), a.get("srv_cpu_us_per_msg")
        if cli is None or srv is None:
            return ""
        left = total - cli
        return (f"CPU budget at the target: {total:.1f} us/msg on {cores} cores; ipcd's clients use {cli:.1f}, "
                + (f"leaving {left:.1f} for the daemon (it uses {srv:.1f})" if left > 0
                   else "more than all of it: with these clients no daemon could meet it on this machine"))

    a, b, r = pair("unbatched", "os")
    add("unbatched 1->1, ipcd os (recv_many ack=prev) >= 1.5x Redis LPUSH/BRPOP AOF everysec", r, ">=", 1.5,
        a and b and f"{a['median']:,.0f} vs {b['median']:,.0f} msg/s", budget(a, b, 1.5))
    a2, b2, r2 = pair("unbatched", "os", prefix="ipcd recv + ack")
    add("unbatched 1->1, ipcd os (plain recv + ack) >= 1.5x Redis AOF everysec", r2, ">=", 1.5,
        a2 and b2 and f"{a2['median']:,.0f} vs {b2['median']:,.0f} msg/s", budget(a2, b2, 1.5))
    a, b, r = pair("batched", "os")
    add("batched(100) 1->1, ipcd os >= 1.5x Redis batched AOF everysec", r, ">=", 1.5,
        a and b and f"{a['median']:,.0f} vs {b['median']:,.0f} msg/s", budget(a, b, 1.5))
    a, b, r = pair("batched", "fsync")
    add("batched(100) 1->1, ipcd fsync >= 1.0x Redis batched AOF always", r, ">=", 1.0,
        a and b and f"{a['median']:,.0f} vs {b['median']:,.0f} msg/s", budget(a, b, 1.0))
    for dur in ("os", "fsync", "memory"):
        for metric, lim in (("p50", 1.0), ("p99", 1.5)):
            a, b, r = pair("rtt", dur, metric)
            if dur != "os" and r is None:
                continue
            add(f"round trip {metric}, ipcd {dur} <= {lim}x Redis ({REDIS_MODES[dur]})", r, "<=", lim,
                a and b and f"{a['median']:,.0f} vs {b['median']:,.0f} us",
                "" if dur == "os" else "reference (target is stated for the default durability)")
    a = res.find("cli", "ipcd", metric="wall", system_prefix="ipcd send")
    b = res.find("cli", "stdlib", metric="wall")
    add("`ipcd send` whole process <= 1.3x minimal stdlib client", _ratio(a, b), "<=", 1.3,
        a and b and f"{a['median']:.1f} vs {b['median']:.1f} ms")
    depth = getattr(res, "depth", None)
    if depth:
        full = res.find("depth", system_prefix=f"daemon RSS at {depth:,}")
        peak = res.find("depth", system_prefix="daemon VmHWM (peak) overall")
        note = "" if depth >= 10_000_000 else f"measured at {depth:,}; the target is for 10 M (run --long)"
        rss_mb = full["median"] * 2**20 / 1e6
        add(f"depth {depth:,} x 100 B: daemon RSS <= 150 MB", rss_mb / 150, "<=", 1.0,
            f"RSS {rss_mb:.1f} MB (peak {peak['median'] * 2**20 / 1e6:.1f} MB)", note)
        for op in ("put batch 100", "get+ack batch 100", "put unbatched", "get+ack unbatched"):
            e = res.find("depth", system_prefix=f"{op} (empty)")
            d = res.find("depth", system_prefix=f"{op} (at depth)")
            add(f"depth: {op} at depth within 20% of empty (ratio >= 0.8)", _ratio(d, e), ">=", 0.8,
                d and e and f"{d['median']:,.0f} vs {e['median']:,.0f} msg/s", note)
    return t


def render(res: Results, targets, meta) -> str:
    out = []
    w = out.append
    w(f"ipcd benchmark — {meta['date']}  ({meta['mode']}, {meta['runs']} run(s) per figure)")
    w(f"machine: {meta['nproc']} CPU ({meta['cpu']}), {meta['mem_total']} RAM, {meta['kernel']}; "
      f"Python {meta['python']}; redis {meta['redis']}; hyperfine {meta['hyperfine']}")
    w("calls: ipcd Client.send | send_many(100) -> recv_many(q, 1|100, ack=<previous batch>) (\"recv + ack\": "
      "recv then ack() as its own call); Redis LPUSH -> BRPOP | variadic LPUSH x100 -> BLMPOP RIGHT COUNT 100 "
      "(RPOP count 100 that blocks when empty); floors: length-prefixed frames; mp.Queue put/get (a list of 100 "
      "when batched). Every consumer JSON-decodes every message.")
    w("srv = CPU of the server process (ipcd daemon / redis-server / relay) per message; "
      "cli = CPU of all producer+consumer processes per message.")
    w("vs Redis = ipcd / Redis at matching durability (memory~no persistence, os~AOF everysec, "
      "fsync~AOF always); vs relay = / the Python broker floor.")
    w("other = highest CPU load (in cores) from processes outside the benchmark during any run of that row "
      f"(machine busy time minus ours); whole suite: {meta.get('other_load', float('nan')):.2f} cores on average.")
    w(f"code: src/ipcd sha256 {meta['src_sha256'][:12]}"
      + ("" if meta.get("src_sha256_end", meta["src_sha256"]) == meta["src_sha256"]
         else f" -> {meta['src_sha256_end'][:12]} (src/ changed DURING the run: figures mix versions)"))
    scenarios = []
    for r in res.rows:
        if r["scenario"] not in scenarios:
            scenarios.append(r["scenario"])
    for scn in scenarios:
        rows = [r for r in res.rows if r["scenario"] == scn]
        w("")
        if scn == "rtt":
            w(f"== rtt: {rows[0]['title']} (us, lower is better) ==")
            w(f"{'system':34} {'dur':7} {'p50 med':>9} {'p50 min-max':>17} {'p99 med':>9} {'p99 min-max':>17}"
              f" {'runs':>4} {'n/run':>6} {'srv us/rt':>9} {'p50 vs Redis':>12} {'p99 vs Redis':>12} {'other':>5}")
            p50s = [r for r in rows if r["metric"] == "p50"]
            for r in p50s:
                p99 = next(x for x in rows if x["metric"] == "p99" and x["system"] == r["system"]
                           and x["durability"] == r["durability"])
                rr50 = rr99 = None
                if r["kind"] == "ipcd":
                    rr50 = _ratio(r, res.find("rtt", "redis", r["durability"], "p50"))
                    rr99 = _ratio(p99, res.find("rtt", "redis", r["durability"], "p99"))
                w(f"{r['system']:34} {r['durability']:7} {_fmt(r['median'], 'us'):>9} "
                  f"{_fmt(r['min'], 'us') + '-' + _fmt(r['max'], 'us'):>17} {_fmt(p99['median'], 'us'):>9} "
                  f"{_fmt(p99['min'], 'us') + '-' + _fmt(p99['max'], 'us'):>17} {r['runs']:>4} "
                  f"{r['n_per_run']:>6} {_fmt(r.get('srv_cpu_us_per_rtt'), 'us'):>9} {_rstr(rr50):>12} {_rstr(rr99):>12}"
                  f" {max(r['other_load']):>5.2f}")
        elif scn in ("cli", "depth", "worker"):
            w(f"== {scn}: {rows[0]['title']} ==")
            w(f"{'what':58} {'median':>12} {'min-max':>25} {'unit':>5} {'runs':>4}")
            for r in rows:
                w(f"{r['system']:58} {_fmt(r['median'], r['unit']):>12} "
                  f"{_fmt(r['min'], r['unit']) + '-' + _fmt(r['max'], r['unit']):>25} {r['unit']:>5} {r['runs']:>4}")
            if scn == "cli":
                a = res.find("cli", "ipcd", system_prefix="ipcd send")
                b = res.find("cli", "stdlib")
                f = res.find("cli", "floor")
                w(f"  ipcd send / stdlib client = {_rstr(_ratio(a, b))}; stdlib client - bare interpreter = "
                  f"{(b['median'] - f['median']) if b and f else float('nan'):.1f} ms; ipcd send - bare interpreter = "
                  f"{(a['median'] - f['median']) if a and f else float('nan'):.1f} ms")
        else:
            w(f"== {scn}: {rows[0]['title']}, {MSG_BYTES}-byte JSON (msg/s, higher is better) ==")
            w(f"{'system':34} {'dur':7} {'median':>10} {'min-max':>21} {'runs':>4} {'n/run':>8} "
              f"{'srv us/msg':>10} {'cli us/msg':>10} {'vs Redis':>9} {'vs relay':>9} {'other':>5}")
            relay = next((x for x in rows if x["system"].startswith("floor: relay")), None)
            for r in rows:
                vr = _ratio(r, res.find(scn, "redis", r["durability"])) if r["kind"] == "ipcd" else None
                vf = _ratio(r, relay) if r["kind"] in ("ipcd", "redis") else None
                w(f"{r['system']:34} {r['durability']:7} {_fmt(r['median'], 'msg/s'):>10} "
                  f"{_fmt(r['min'], 'msg/s') + '-' + _fmt(r['max'], 'msg/s'):>21} {r['runs']:>4} {r['n_per_run']:>8} "
                  f"{_fmt(r['srv_cpu_us_per_msg'], 'us'):>10} {_fmt(r['client_cpu_us_per_msg'], 'us'):>10} "
                  f"{_rstr(vr):>9} {_rstr(vf):>9} {max(r['other_load']):>5.2f}")
    if res.skips:
        w("")
        w("== skipped ==")
        for s in res.skips:
            w(f"- {s['scenario']}: {s['what']}: {s['why']}")
    w("")
    w("== targets ==")
    for t in targets:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        w(f"[{t['status']:6}] {t['target']}: {ratio} (needs {t['limit']})"
          + (f" — {t['detail']}" if t["detail"] else "") + (f" [{t['note']}]" if t["note"] else ""))
    return "\n".join(out)


def src_digest() -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted((SRC / "ipcd").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def machine_info(args) -> dict:
    def cmd(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "not installed"
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(next(ln for ln in open("/proc/meminfo") if ln.startswith("MemTotal")).split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        pass
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "nproc": os.cpu_count(), "cpu": cpu, "mem_total": mem, "kernel": platform.release(),
            "python": platform.python_version(),
            "redis": (cmd(["redis-server", "--version"]).split(" v=")[1].split()[0]
                      if shutil.which("redis-server") else "not installed"),
            "hyperfine": cmd(["hyperfine", "--version"]).replace("hyperfine ", "") if shutil.which("hyperfine")
            else "not installed",
            "loadavg_start": open("/proc/loadavg").read().split()[:3], "src_sha256": src_digest(),
            "mode": "smoke" if args.smoke else ("long" if args.long else "default"), "runs": args.runs,
            "scenarios": list(args.scenarios)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--long", action="store_true", help="10 M depth, longer timed runs, `python -m ipcd send` too")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout (table to stderr)")
    p.add_argument("--save", metavar="FILE", help="also write the JSON results to FILE")
    p.add_argument("--runs", type=int, default=None, help="timed runs per figure (default 3; --smoke 1)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of: {', '.join(SCENARIOS)} (or 1-7)")
    p.add_argument("--smoke", action="store_true", help="tiny run for CI: few hundred messages, 1 run, no Redis")
    p.add_argument("--no-redis", action="store_true", help="leave Redis out even if installed")
    p.add_argument("--baseline", type=Path, metavar="SRC",
                   help="also run the streaming and round-trip scenarios against daemons started from "
                        "this source tree (e.g. `git worktree add /tmp/base HEAD~1` then /tmp/base/src), "
                        "interleaved with the current code: before/after in one run")
    a = p.parse_args(argv)
    wanted = []
    for s in a.scenarios.split(","):
        s = ALIASES.get(s.strip(), s.strip())
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
        wanted.append(s)
    a.scenarios = wanted
    if a.runs is None:
        a.runs = 1 if a.smoke else 3
    if a.runs < 1:
        p.error("--runs must be >= 1")
    if a.baseline is not None:
        a.baseline = a.baseline.resolve()
        if not (a.baseline / "ipcd" / "__init__.py").is_file():
            p.error(f"--baseline {a.baseline}: no ipcd package there (give the src/ folder of a checkout)")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    meta = machine_info(args)
    busy0 = machine_busy()
    log(f"ipcd bench: {meta['mode']}, {args.runs} run(s), scenarios {', '.join(args.scenarios)}; "
        f"loadavg {' '.join(meta['loadavg_start'])}")
    suite = Suite(args)
    try:
        res = suite.run()
    except KeyboardInterrupt:
        log("interrupted: stopping everything we started")
        return 130
    finally:
        stop_everything()
    ru_s, ru_c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = ru_s.ru_utime + ru_s.ru_stime + ru_c.ru_utime + ru_c.ru_stime
    meta["other_load"] = max(0.0, machine_busy() - busy0 - ours) / (now() - T_START)
    meta["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    meta["src_sha256_end"] = src_digest()
    targets = build_targets(res, args)
    table = render(res, targets, meta)
    doc = {"meta": meta, "results": res.rows, "skipped": res.skips, "targets": targets,
           "elapsed_s": now() - T_START}
    if args.save:
        Path(args.save).write_text(json.dumps(doc, indent=1))
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(doc, indent=1))
    else:
        print(table)
    log(f"done in {now() - T_START:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
