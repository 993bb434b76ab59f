"""The Python "broker floor" for bench/run.py: a minimal relay on AF_UNIX.

Same process model as ipcd (one daemon process, one thread per connection,
one request and one reply per call, length-prefixed frames) with everything
ipcd adds taken away: no pickle, no authentication, no JSON validation, no
store, no leases or acks.  Whatever ipcd costs above this is ipcd's own.

Run: ``python bench/floor.py SOCKET_PATH`` (prints "ready" on stdout once
it accepts; stops on SIGTERM).

Request frame payload: op (1 byte, b"P" or b"G"), queue-name length
(1 byte), queue name, then
  P: the messages, each a 4-byte big-endian length + bytes   -> reply: empty
  G: max_n (u16), timeout in ms (u32; 0xFFFFFFFF = wait for ever)
                                                             -> reply: messages
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import struct
import sys
import threading
import time

_HDR = struct.Struct("!I")
_GET = struct.Struct("!HI")


class _Q:
    __slots__ = ("items", "cond")

    def __init__(self):
        self.items = collections.deque()
        self.cond = threading.Condition(threading.Lock())


_queues: dict[bytes, _Q] = {}
_qlock = threading.Lock()


def _queue(name: bytes) -> _Q:
    q = _queues.get(name)
    if q is None:
        with _qlock:
            q = _queues.setdefault(name, _Q())
    return q


def split_frames(buf, start=0):
    out, pos, n = [], start, len(buf)
    while pos < n:
        (size,) = _HDR.unpack_from(buf, pos)
        out.append(bytes(buf[pos + 4:pos + 4 + size]))
        pos += 4 + size
    return out


def join_frames(msgs) -> bytes:
    return b"".join(_HDR.pack(len(m)) + m for m in msgs)


def _serve(conn: socket.socket):
    rfile = conn.makefile("rb", buffering=1 << 16)
    try:
        while True:
            hdr = rfile.read(4)
            if len(hdr) < 4:
                return
            (size,) = _HDR.unpack(hdr)
            payload = rfile.read(size)
            op, qlen = payload[0], payload[1]
            q = _queue(payload[2:2 + qlen])
            rest = 2 + qlen
            if op == 0x50:  # P
                msgs = split_frames(payload, rest)
                with q.cond:
                    q.items.extend(msgs)
                    q.cond.notify(len(msgs))
                conn.sendall(_HDR.pack(0))
            else:  # G
                max_n, tmo = _GET.unpack_from(payload, rest)
                deadline = None if tmo == 0xFFFFFFFF else time.monotonic() + tmo / 1000
                got = []
                with q.cond:
                    while not q.items:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            break
                        q.cond.wait(left)
                    items = q.items
                    while items and len(got) < max_n:
                        got.append(items.popleft())
                body = join_frames(got)
                conn.sendall(_HDR.pack(len(body)) + body)
    except (OSError, ValueError):
        pass
    finally:
        rfile.close()
        conn.close()


class RelayClient:
    """Client side of the floor protocol (used by bench/run.py)."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.rfile = self.sock.makefile("rb", buffering=1 << 16)

    def _call(self, payload: bytes) -> bytes:
        self.sock.sendall(_HDR.pack(len(payload)) + payload)
        (size,) = _HDR.unpack(self.rfile.read(4))
        return self.rfile.read(size) if size else b""

    def put(self, queue: bytes, msgs) -> None:
        self._call(b"P" + bytes([len(queue)]) + queue + join_frames(msgs))

    def get(self, queue: bytes, max_n: int, timeout: float | None) -> list[bytes]:
        tmo = 0xFFFFFFFF if timeout is None else int(timeout * 1000)
        return split_frames(self._call(b"G" + bytes([len(queue)]) + queue + _GET.pack(max_n, tmo)))

    def close(self):
        self.rfile.close()
        self.sock.close()


def main(path: str) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))  # nothing to flush: a floor keeps no state
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(128)
    print("ready", flush=True)
    while not stop.is_set():
        conn, _ = srv.accept()
        threading.Thread(target=_serve, args=(conn,), daemon=True).start()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
