"""Standalone fuzz campaign against a real ipcd daemon (not collected by pytest).

How to run (from the repository root):

    .venv/bin/python tests/fuzz/fuzz_wire.py 20000            # 20,000 cases, random seed
    .venv/bin/python tests/fuzz/fuzz_wire.py 20000 --seed 7   # reproducible
    .venv/bin/python tests/fuzz/fuzz_wire.py 500 --keep       # keep the temp dir (daemon log, findings)

It starts one daemon (``python -m ipcd start`` with its own config in a temp
dir; handshake_timeout = 1 s, max_request_bytes = 1 MiB) and throws cases at
it, weighted across:

* pre-auth: random bytes, lying length headers, a correct or bit-flipped
  digest followed by junk (both halves of the mutual handshake), hang-ups;
* first request after a valid handshake: random bytes, mutated pickles of
  real manager calls (create/incref/get_methods/...), exploit payloads;
* inside a session: random bytes, mutations (bit flips, truncation, splices,
  opcode insertion, length lies) of valid requests from a seed corpus, plain
  data pickles with random ops and arguments, Token objects, exploit payloads.

Invariants checked per case: pre-auth peers only ever receive whole frames
(the challenge, maybe #FAILURE#), never a traceback; every in-sync request
gets ("ok", ...) or ("err", kind, msg) within 10 s and kind is never
"internal"; first requests get #RETURN/#TRACEBACK/#ERROR without a stack
trace.  Every 500 cases and at the end: the daemon is alive, a canary send
and receive round-trips, no exploit marker file exists, and the thread count
settles back near its baseline.  Prints cases run per kind, findings, elapsed
time, RSS and thread figures; exit status 1 if anything was found (details in
<tmpdir>/findings.txt, which --keep preserves).
"""

from __future__ import annotations

import argparse
import builtins
import hmac
import os
import pickle
import random
import shutil
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from multiprocessing import managers
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: conftest.Daemon starts the daemon as the tests do
sys.path.insert(0, str(HERE.parents[1] / "src"))

from conftest import Daemon  # noqa: E402
from ipcd import wire  # noqa: E402

CONFIG = 'handshake_timeout = 1\nmax_request_bytes = "1MiB"\n[defaults]\nmax_message_bytes = "64KiB"'
LIMIT = 1 << 20
OPS = ["put_many", "get_many", "ack", "nack", "touch", "release", "peek", "purge", "stats", "dead_list",
       "dead_replay", "status"]
ARGS = ["queue", "bodies", "timeout", "max_n", "lease", "ack", "items", "delay", "reason", "seconds", "n",
        "dead", "limit", "ids", "all"]
PICKLE_OPCODES = b"()*.01BCFGIJKLMNPQRSTUVXabcdeghijlmopqrstu}]\x80\x81\x82\x83\x84\x85\x86\x87\x88\x89\x8a\x8b" \
                 b"\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96\x97\x98"


def status_of(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


class Campaign:
    def __init__(self, d: Daemon, rng: random.Random, marker: Path):
        self.d, self.rng, self.marker = d, rng, marker
        self.addr, self.key = str(d.sock_path), d.authkey()
        self.session = None
        self.kinds = Counter()
        self.findings: list[str] = []
        self.skipped = 0
        self.corpus = self._corpus()

    # -- inputs -----------------------------------------------------------------

    def _payloads(self):
        touch = f"touch {self.marker}"

        class System:
            def __reduce__(self):
                return (os.system, (touch,))

        class Eval:
            def __reduce__(self):
                return (builtins.eval, (f"__import__('os').system({touch!r})",))

        return [System(), Eval(), [System()], {"k": (Eval(),)}]

    def _corpus(self) -> list[bytes]:
        tok = managers.Token("queue", self.addr, "0" * 32)
        reqs = [
            ("put_many", {"queue": "fz", "bodies": ['{"a": 1}', "[1,2]", '"s"'], "timeout": 0}),
            ("get_many", {"queue": "fz", "max_n": 5, "timeout": 0, "lease": 1.0}),
            ("ack", {"queue": "fz", "items": [(1, 1), (2, 2)]}),
            ("nack", {"queue": "fz", "items": [(1, 1)], "delay": 0.5, "reason": "r"}),
            ("touch", {"queue": "fz", "items": [(1, 1)], "seconds": 2.0}),
            ("peek", {"queue": "fz", "n": 3}), ("stats", {}), ("stats", {"queue": "fz"}), ("status", {}),
            ("dead_list", {"queue": "fz", "limit": 2}), ("dead_replay", {"queue": "fz", "ids": [1, 2]}),
            ("purge", {"queue": "fz.x", "dead": True}), ("release", {"queue": "fz", "items": []}),
            ("stats", {"queue": tok}), (tok, {}),
        ]
        out = []
        for r in reqs:
            for proto in (2, 4, 5):
                try:
                    out.append(pickle.dumps(r, protocol=proto))
                except Exception:  # noqa: BLE001 - a corpus entry that cannot be made is just skipped
                    pass
        out += [pickle.dumps(p, protocol=4) for p in self._payloads()]
        return out

    def _plain(self, depth=0):
        r = self.rng
        k = r.randrange(12 if depth < 3 else 8)
        if k == 0:
            return None
        if k == 1:
            return r.choice([True, False])
        if k == 2:
            return r.choice([0, 1, -1, 2 ** 31, 2 ** 63, 10 ** 30, -(10 ** 30), r.randrange(-10 ** 6, 10 ** 6)])
        if k == 3:
            return r.choice([0.0, -0.0, 1e-9, 0.05, 1e300, float("nan"), float("inf"), -float("inf"), r.random()])
        if k == 4:
            return r.choice(["fz", "fz.dead", "", "a" * 201, "x\x00y", "\ud800", '"j"', "[1]", "NaN", "é" * 3])
        if k == 5:
            return "".join(chr(r.randrange(0, 0x3000)) for _ in range(r.randrange(0, 12)))
        if k == 6:
            return r.randbytes(r.randrange(0, 16))
        if k == 7:
            return managers.Token(self._plain(3), self._plain(3), self._plain(3))
        if k in (8, 9):
            return [self._plain(depth + 1) for _ in range(r.randrange(0, 5))]
        if k == 10:
            return tuple(self._plain(depth + 1) for _ in range(r.randrange(0, 4)))
        keys = [r.choice(ARGS + ["x", ""]) if r.random() < 0.8 else r.randrange(5) for _ in range(r.randrange(4))]
        return {key: self._plain(depth + 1) for key in keys}

    def _op_request(self):
        r = self.rng
        op = r.choice(OPS + ["bogus", "__init__", "_queues"])
        kwargs = {r.choice(ARGS): self._plain(1) for _ in range(r.randrange(0, 6))}
        if r.random() < 0.7:
            kwargs["queue"] = r.choice(["fz", "fz2", "fz.dead", self._plain(2)])
        if op in ("get_many", "put_many"):
            kwargs["timeout"] = r.choice([0, 0.01, -1, float("nan"), "1", None if op == "put_many" else 0])
        return (op, kwargs)

    def _mutate(self, data: bytes) -> bytes:
        r = self.rng
        b = bytearray(data)
        for _ in range(r.randrange(1, 5)):
            m = r.randrange(7)
            if m == 0 and b:  # bit flip
                i = r.randrange(len(b))
                b[i] ^= 1 << r.randrange(8)
            elif m == 1 and b:  # truncate
                del b[r.randrange(len(b)):]
            elif m == 2:  # insert an opcode
                b.insert(r.randrange(len(b) + 1), r.choice(PICKLE_OPCODES))
            elif m == 3:  # splice another corpus entry
                other = r.choice(self.corpus)
                i, j = r.randrange(len(b) + 1), r.randrange(len(other) + 1)
                b[i:] = other[j:]
            elif m == 4 and b:  # random byte
                b[r.randrange(len(b))] = r.randrange(256)
            elif m == 5:  # a length-ish field lie
                i = r.randrange(len(b) + 1)
                b[i:i] = r.choice([b"\x8e", b"\x96", b"B", b"X", b"\x95"]) + struct.pack(
                    "<Q", r.choice([1 << 31, 1 << 40, 2 ** 64 - 1, 7]))
            else:  # duplicate a chunk
                if b:
                    i = r.randrange(len(b))
                    b[i:i] = b[i:i + r.randrange(1, 40)]
        return bytes(b)

    # -- transports ----------------------------------------------------------------

    def _raw(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.addr)
        return s

    def _read_all(self, s: socket.socket) -> bytes:
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                break
            except socket.timeout:
                self.find("pre-auth peer not disconnected within 10 s", data)
                break
            if not chunk:
                break
            data += chunk
        return data

    def _get_session(self):
        if self.session is None:
            c = wire.connect(self.addr, self.key, 10)
            c.send_obj((None, "session", (), {}))
            c.deadline = time.monotonic() + 10
            assert c.recv_obj(LIMIT) == ("#RETURN", None)
            c.deadline = None
            self.session = c
        return self.session

    def drop_session(self):
        if self.session is not None:
            self.session.close()
            self.session = None

    def find(self, what: str, data) -> None:
        shown = data.hex()[:400] if isinstance(data, (bytes, bytearray)) else repr(data)[:400]
        self.findings.append(f"[case {sum(self.kinds.values())}] {what}: {shown}")

    # -- cases ------------------------------------------------------------------------

    def pre_auth(self):
        r = self.rng
        kind = r.choice(["bytes", "header", "digest-flip", "digest-then-junk", "hangup"])
        self.kinds["pre:" + kind] += 1
        s = self._raw()
        try:
            if kind == "bytes":
                s.sendall(r.randbytes(r.randrange(0, 400)))
            elif kind == "header":
                n = r.choice([-1, -2, 0, 16, 255, 256, 257, 2 ** 31 - 1, -(2 ** 31), r.randrange(-2 ** 31, 2 ** 31)])
                s.sendall(struct.pack("!i", n) + r.randbytes(r.randrange(0, 40)))
            elif kind in ("digest-flip", "digest-then-junk"):
                ch = s.recv(64)[4:]
                digest = bytearray(hmac.new(self.key, ch[len(wire.CHALLENGE):], "md5").digest())
                if kind == "digest-flip":
                    digest[r.randrange(16)] ^= 1 << r.randrange(8)
                s.sendall(struct.pack("!i", 16) + bytes(digest))
                if kind == "digest-then-junk":  # the server now expects our #CHALLENGE#
                    junk = self._mutate(wire.CHALLENGE + os.urandom(20))
                    s.sendall(struct.pack("!i", len(junk)) + junk + r.randbytes(r.randrange(0, 40)))
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        got = self._read_all(s)
        s.close()
        self._check_pre_frames(got, kind)

    def _check_pre_frames(self, got: bytes, kind: str):
        rest, frames = got, []
        while len(rest) >= 4:
            (n,) = struct.unpack("!i", rest[:4])
            frames.append(rest[4:4 + n])
            rest = rest[4 + n:]
        if kind in ("digest-flip", "digest-then-junk"):
            frames.insert(0, wire.CHALLENGE + b"x" * 20)  # read before
        if rest or not frames or not frames[0].startswith(wire.CHALLENGE):
            return self.find(f"pre-auth ({kind}): not whole frames starting with the challenge", got)
        allowed = {wire.FAILURE, wire.WELCOME}
        for f in frames[1:]:
            if f not in allowed and not (kind == "digest-then-junk" and len(f) == 16):
                return self.find(f"pre-auth ({kind}): unexpected frame", f)

    def first_request(self):
        r = self.rng
        c = wire.connect(self.addr, self.key, 10)
        choice = r.randrange(4)
        if choice == 0:
            self.kinds["first:bytes"] += 1
            data = r.randbytes(r.randrange(0, 200))
        elif choice == 1:
            self.kinds["first:mutated-call"] += 1
            call = r.choice([(None, "dummy", (), {}), (None, "create", ("queue", "fz"), {}),
                             (None, "get_methods", (managers.Token("queue", self.addr, "0"),), {}),
                             (None, "incref", ("0" * 32,), {}), (None, "shutdown", (), {}),
                             (None, "debug_info", (), {})])
            data = self._mutate(pickle.dumps(call, protocol=4))
        elif choice == 2:
            self.kinds["first:exploit"] += 1
            data = pickle.dumps(r.choice(self._payloads()), protocol=4)
        else:
            self.kinds["first:plain"] += 1
            data = pickle.dumps((self._plain(1), r.choice(["create", "dummy", "incref", "decref", "get_methods",
                                                           "shutdown", self._plain(2)]), self._plain(1),
                                 self._plain(1)), protocol=4)
        try:
            c.send_bytes(data)
            c.deadline = time.monotonic() + 10
            reply = c.recv_obj(LIMIT)
        except wire.BadRequest as e:
            return self.find(f"first request: undecodable reply ({e})", data)
        except TimeoutError:
            return self.find("first request: no reply within 10 s", data)
        except (EOFError, OSError):
            return  # hung up: acceptable for junk (e.g. a broken frame)
        finally:
            c.close()
        if not (isinstance(reply, tuple) and len(reply) == 2 and reply[0] in ("#RETURN", "#TRACEBACK", "#ERROR")):
            return self.find(f"first request: odd reply {reply!r:.200}", data)
        if reply[0] == "#TRACEBACK" and "most recent call" in str(reply[1]):
            return self.find("first request: a stack trace was sent to the peer", data)

    def in_session(self):
        r = self.rng
        choice = r.randrange(10)
        if choice == 0:
            self.kinds["session:bytes"] += 1
            data = r.randbytes(r.randrange(0, 300))
        elif choice in (1, 2, 3, 4):
            self.kinds["session:mutated"] += 1
            data = self._mutate(r.choice(self.corpus))
        elif choice in (5, 6, 7):
            self.kinds["session:op"] += 1
            data = pickle.dumps(self._op_request(), protocol=r.choice([4, 5]))
        elif choice == 8:
            self.kinds["session:plain"] += 1
            data = pickle.dumps(self._plain(), protocol=4)
        else:
            self.kinds["session:exploit"] += 1
            data = pickle.dumps(("put_many", {"queue": "fz", "bodies": [r.choice(self._payloads())]}), protocol=4)
        if self._would_block(data):
            self.skipped += 1  # a valid long wait: legitimate, and it would park a daemon thread
            return
        c = self._get_session()
        try:
            c.send_bytes(data)
            c.deadline = time.monotonic() + 10
            reply = c.recv_obj(LIMIT)
            c.deadline = None
        except TimeoutError:
            self.drop_session()
            return self.find("session: no reply within 10 s", data)
        except (EOFError, OSError, wire.BadRequest) as e:
            self.drop_session()
            return self.find(f"session: connection lost on an in-sync frame ({type(e).__name__}: {e})", data)
        if not (isinstance(reply, tuple) and reply and reply[0] in ("ok", "err")):
            return self.find(f"session: odd reply {reply!r:.200}", data)
        if reply[0] == "err" and reply[1] == "internal":
            return self.find(f"session: internal error {reply[2]!r:.200}", data)

    def truncated(self):
        """A session whose last frame is cut short or lies about its length, then a hang-up."""
        self.kinds["session:truncated"] += 1
        r = self.rng
        c = wire.connect(self.addr, self.key, 10)
        try:
            c.send_obj((None, "session", (), {}))
            c.recv_obj(LIMIT)
            data = r.choice(self.corpus)
            n = r.choice([len(data) + r.randrange(1, 100), 2 ** 31 - 1, LIMIT + 1, -5])
            c._send(struct.pack("!i", n) + data[: r.randrange(len(data) + 1)])
        except OSError:
            pass
        finally:
            c.close()

    @staticmethod
    def _would_block(data: bytes) -> bool:
        try:
            req = wire.loads(data)
        except wire.BadRequest:
            return False
        if not (isinstance(req, tuple) and len(req) == 2 and isinstance(req[1], dict)):
            return False
        op, kwargs = req
        if op not in ("get_many", "put_many"):
            return False
        t = kwargs.get("timeout")
        return (t is None and op == "get_many") or (
            isinstance(t, (int, float)) and not isinstance(t, bool) and 1 < t <= 366 * 86400)

    # -- health ---------------------------------------------------------------------------

    def health(self, baseline_threads: int) -> dict:
        d = self.d
        info = {"alive": d.proc.poll() is None}
        if not info["alive"]:
            self.find("daemon died", d.stderr()[-2000:])
            return info
        got = None
        try:
            c = wire.connect(self.addr, self.key, 10)
            try:
                c.deadline = time.monotonic() + 20
                c.send_obj((None, "session", (), {}))
                c.recv_obj(LIMIT)
                body = f'"canary {time.time()}"'
                c.send_obj(("put_many", {"queue": "canary", "bodies": [body]}))
                ok = c.recv_obj(LIMIT)[0] == "ok"
                c.send_obj(("get_many", {"queue": "canary", "max_n": 1, "timeout": 5}))
                got = c.recv_obj(LIMIT)
                ok = ok and got[0] == "ok" and bool(got[1]) and got[1][0][2] == body
                if ok:
                    c.send_obj(("ack", {"queue": "canary", "items": [(got[1][0][0], got[1][0][1])]}))
                    ok = c.recv_obj(LIMIT)[0] == "ok"
            finally:
                c.close()
        except Exception as e:  # noqa: BLE001 - any failure here is what we are looking for
            ok, got = False, f"{type(e).__name__}: {e}"
        if not ok:
            self.find("canary send/receive failed", got)
        if self.marker.exists():
            self.find("exploit marker file exists: code ran in the daemon", str(self.marker))
        deadline = time.monotonic() + 10
        while (n := status_of(d.proc.pid, "Threads")) > baseline_threads + 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        info.update(threads=n, rss_kib=status_of(d.proc.pid, "VmRSS"), hwm_kib=status_of(d.proc.pid, "VmHWM"))
        if n > baseline_threads + 3:
            self.find(f"threads did not settle: {n} (baseline {baseline_threads})", "")
        return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", type=int, help="number of cases to run")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (daemon log, findings.txt)")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2 ** 32)
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="ipcd-fuzz-", dir="/tmp"))
    d = Daemon(root, CONFIG)
    marker = root / "PWNED"
    t0 = time.monotonic()
    try:
        d.start()
        camp = Campaign(d, rng, marker)
        camp.health(10 ** 6)  # warm up (creates the canary queue, store pages)
        time.sleep(0.3)
        baseline = status_of(d.proc.pid, "Threads")
        start = camp.health(baseline)
        print(f"ipcd fuzz: seed={seed} cases={args.n} daemon pid={d.proc.pid} threads={baseline} "
              f"rss={start['rss_kib']} KiB", flush=True)
        kinds = [camp.pre_auth] * 3 + [camp.first_request] * 2 + [camp.in_session] * 6 + [camp.truncated]
        for i in range(1, args.n + 1):
            try:
                rng.choice(kinds)()
            except Exception as e:  # noqa: BLE001 - a harness error on one case is a finding, not the end
                camp.drop_session()
                camp.find(f"harness: {type(e).__name__}: {e}", "")
            if i % 500 == 0 or i == args.n:
                camp.drop_session()
                h = camp.health(baseline)
                print(f"  {i:>7} cases  {time.monotonic() - t0:7.1f} s  findings={len(camp.findings)}  "
                      f"threads={h.get('threads')}  rss={h.get('rss_kib')} KiB", flush=True)
                if not h["alive"]:
                    break
        elapsed = time.monotonic() - t0
        log = d.stderr()
        end = camp.health(baseline) if d.proc.poll() is None else {}
        print(f"\ncases run: {sum(camp.kinds.values())} (+{camp.skipped} skipped as legitimately blocking) "
              f"in {elapsed:.1f} s, seed {seed}")
        for k, v in sorted(camp.kinds.items()):
            print(f"  {k:<22} {v}")
        print(f"daemon: alive={d.proc.poll() is None} threads {baseline} -> {end.get('threads')} "
              f"VmRSS {start['rss_kib']} -> {end.get('rss_kib')} KiB VmHWM {start['hwm_kib']} -> "
              f"{end.get('hwm_kib')} KiB; log: {log.count('Traceback')} tracebacks, "
              f"{log.count('refused a request')} 'refused a request' lines, "
              f"{log.count('suppressed')} 'suppressed' summaries")
        print(f"findings: {len(camp.findings)}")
        for f in camp.findings[:20]:
            print("  " + f)
        (root / "findings.txt").write_text("\n".join(camp.findings) + "\n")
        return 1 if camp.findings else 0
    finally:
        d.cleanup()
        if args.keep:
            print(f"kept {root} (daemon.stderr, findings.txt)")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
