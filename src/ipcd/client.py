"""The Python client: ``ipcd.connect()`` and ``Message``.

One authenticated connection per Client, speaking the daemon's ``session``
protocol: each call is one ``(op, kwargs)`` request and one reply.  Stdlib
proxies never reconnect after a daemon restart (notes/basemanager.md §6);
this client does, within ``reconnect_timeout``, and retries the call.

What a retry means: a ``send`` whose reply was lost may be delivered twice;
a ``recv`` whose reply was lost leaves the message leased, so it is
redelivered when the lease expires.  Either way at-least-once holds, which
is why handlers should be idempotent (``Message.id`` is stable across
redeliveries and can be used to deduplicate).

Thread safety: a Client serialises its calls with a lock; use one Client per
thread for parallel blocking receives.
"""

from __future__ import annotations

import json
import threading
import time

from . import errors, wire

RECONNECT_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0)
REPLY_GRACE = 30.0  # extra seconds to wait for a reply beyond the server-side timeout


def dumps(obj) -> str:
    """Compact JSON as ipcd stores it (unicode kept, not \\u-escaped)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def loads(text: str):
    """Decode a stored message.  The daemon accepts any nesting its own decoder manages;
    a consumer deeper in its call stack may hit Python's recursion limit on the same text."""
    try:
        return json.loads(text)
    except RecursionError:
        raise errors.DataError("message nested too deeply for Python's json in this process "
                               "(recursion limit); use msg.text") from None


class Message:
    """One delivery: ``body`` (the decoded JSON value), ``id``, ``attempts``.

    Leased to you until ``ack()``, ``nack()`` or the lease expires.
    """

    __slots__ = ("client", "queue", "id", "lease", "text", "attempts", "enqueued_at", "reason", "_body")

    def __init__(self, client, queue, delivery):
        self.client, self.queue = client, queue
        self.id, self.lease, self.text, self.attempts, self.enqueued_at, self.reason = delivery
        self._body = _UNSET

    @property
    def body(self):
        if self._body is _UNSET:
            self._body = loads(self.text)
        return self._body

    def envelope(self) -> dict:
        env = {"id": self.id, "queue": self.queue, "body": self.body, "attempts": self.attempts,
               "enqueued_at": self.enqueued_at}
        if self.reason is not None:
            env["reason"] = self.reason
        return env

    def ack(self) -> None:
        self.client.ack([self])

    def nack(self, delay: float = 0.0, reason: str | None = None) -> None:
        self.client.nack([self], delay=delay, reason=reason)

    def touch(self, seconds: float | None = None) -> float:
        return self.client.touch([self], seconds)

    def __repr__(self):
        return f"<Message {self.queue}#{self.id} attempts={self.attempts} {self.text[:60]}>"


_UNSET = object()


class Client:
    def __init__(self, address, authkey: bytes, *, connect_timeout: float = 5.0,
                 reconnect_timeout: float = 30.0, max_request_bytes: int = 64 << 20):
        self.address = address
        self._authkey = authkey
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self.max_request_bytes = max_request_bytes
        self._conn = None
        self._lock = threading.RLock()
        self.reconnects = 0
        self._connect()

    # -- connection management ---------------------------------------------

    def _connect(self):
        conn = wire.connect(self.address, self._authkey, self.connect_timeout)
        try:
            conn.deadline = time.monotonic() + self.connect_timeout
            conn.send_obj((None, "session", (), {}))
            kind, result = conn.recv_obj(self.max_request_bytes)
            if kind != "#RETURN":
                raise errors.Unavailable(f"the daemon refused the session: {str(result).strip()[:200]}")
            conn.deadline = None
        except (EOFError, OSError) as e:
            conn.close()
            raise errors.Unavailable(f"the daemon closed the connection: {e or 'EOF'}") from None
        self._conn = conn

    def _drop(self):
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._conn = None

    def _reconnect(self, cause):
        deadline = time.monotonic() + self.reconnect_timeout
        for attempt in range(1_000_000):
            try:
                self._connect()
                self.reconnects += 1
                return
            except (errors.Unavailable, errors.AuthError) as e:
                if isinstance(e, errors.AuthError) or time.monotonic() >= deadline:
                    raise errors.Unavailable(f"lost the daemon ({cause}) and could not reconnect "
                                             f"within {self.reconnect_timeout:g} s: {e}") from None
            time.sleep(min(RECONNECT_BACKOFF[min(attempt, len(RECONNECT_BACKOFF) - 1)],
                           max(0.0, deadline - time.monotonic())))

    def call(self, op: str, reply_timeout: float | None = None, **kwargs):
        """Run one operation; reconnect and retry if the daemon went away."""
        with self._lock:
            while True:
                try:
                    if self._conn is None:
                        self._reconnect("not connected")
                    return self._call_once(op, reply_timeout, kwargs)
                except TimeoutError:
                    self._drop()
                    raise errors.Timeout("the daemon did not reply in time") from None
                except (EOFError, OSError, errors.Unavailable) as e:
                    self._drop()
                    if self.reconnect_timeout <= 0:
                        if isinstance(e, errors.IpcdError):
                            raise
                        raise errors.Unavailable(f"lost the connection to the daemon: {e or 'EOF'}") from None
                    self._reconnect(e or "EOF")

    def _call_once(self, op, reply_timeout, kwargs):
        conn = self._conn
        conn.deadline = None if reply_timeout is None else time.monotonic() + reply_timeout + REPLY_GRACE
        conn.send_obj((op, kwargs))
        try:
            reply = conn.recv_obj(self.max_request_bytes)
        finally:
            conn.deadline = None
        if reply[0] == "ok":
            return reply[1]
        if reply[0] == "err":
            raise errors.from_wire(reply[1], reply[2])
        raise errors.IpcdError(f"unexpected reply from the daemon: {reply!r:.100}")

    def close(self):
        with self._lock:
            self._drop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- sending --------------------------------------------------------------

    def send(self, queue: str, body, *, timeout: float | None = None) -> int:
        """Send one JSON-serialisable value; returns its id once it is stored."""
        return self.send_json_many(queue, [dumps(body)], timeout=timeout)[0]

    def send_many(self, queue: str, bodies, *, timeout: float | None = None) -> list[int]:
        return self.send_json_many(queue, [dumps(b) for b in bodies], timeout=timeout)

    def send_json_many(self, queue: str, texts: list[str], *, timeout: float | None = None) -> list[int]:
        """Send pre-encoded JSON texts (validated by the daemon), in as few requests as fit."""
        ids: list[int] = []
        for chunk in _chunks(texts, self.max_request_bytes // 2):
            ids += self.call("put_many", timeout, queue=queue, bodies=chunk, timeout=timeout)
        return ids

    # -- receiving --------------------------------------------------------------

    def recv(self, queue: str, timeout: float | None = None, *, lease: float | None = None) -> Message | None:
        got = self.recv_many(queue, 1, timeout=timeout, lease=lease)
        return got[0] if got else None

    def recv_many(self, queue: str, n: int = 100, timeout: float | None = None, *,
                  lease: float | None = None, ack: list | None = None) -> list[Message]:
        """Wait up to *timeout* for at least one message; return up to *n*.

        *ack*: messages to acknowledge in the same round trip.
        """
        got = self.call("get_many", timeout, queue=queue, max_n=n, timeout=timeout, lease=lease,
                        ack=_pairs(ack) if ack else None)
        return [Message(self, queue, d) for d in got]

    def ack(self, messages) -> int:
        return sum(self.call("ack", None, queue=q, items=items) for q, items in _by_queue(messages))

    def nack(self, messages, delay: float = 0.0, reason: str | None = None) -> int:
        return sum(self.call("nack", None, queue=q, items=items, delay=delay, reason=reason)
                   for q, items in _by_queue(messages))

    def touch(self, messages, seconds: float | None = None) -> float:
        out = 0.0
        for q, items in _by_queue(messages):
            out = self.call("touch", None, queue=q, items=items, seconds=seconds)
        return out

    def release(self, messages) -> int:
        """Give messages back at once without charging the attempt (clean shutdown)."""
        return sum(self.call("release", None, queue=q, items=items) for q, items in _by_queue(messages))

    # -- inspection and administration -----------------------------------------

    def status(self) -> dict:
        return self.call("status")

    def stats(self, queue: str | None = None) -> list[dict]:
        return self.call("stats", queue=queue)

    def tail(self, queue: str | None = None, n: int = 10, after: int | None = None,
             timeout: float = 0.0) -> dict:
        """Recently *sent* messages, consuming nothing (what ``ipcd tail`` shows).

        Returns ``{"seq", "entries": [(seq, queue, id, body_json, enqueued_at)], "gap"}``;
        pass the returned ``seq`` as *after* (with a *timeout*) to wait for newer ones.
        """
        return self.call("tail", timeout, queue=queue, n=n, after=after, timeout=timeout)

    def peek(self, queue: str, n: int = 10) -> list[Message]:
        return [Message(self, queue, d) for d in self.call("peek", queue=queue, n=n)]

    def purge(self, queue: str, *, dead: bool = False) -> int:
        return self.call("purge", queue=queue, dead=dead)

    def dead_list(self, queue: str, limit: int = 100) -> list[dict]:
        return [{"id": i, "body": loads(b), "attempts": a, "enqueued_at": t, "reason": r}
                for i, b, a, t, r in self.call("dead_list", queue=queue, limit=limit)]

    def dead_replay(self, queue: str, ids: list[int] | None = None, *, all: bool = False) -> dict:
        return self.call("dead_replay", queue=queue, ids=ids, all=all)


def _pairs(messages):
    return [(m.id, m.lease) for m in messages]


def _by_queue(messages):
    groups: dict[str, list] = {}
    for m in messages:
        groups.setdefault(m.queue, []).append((m.id, m.lease))
    return groups.items()


def _chunks(texts, budget):
    chunk, size = [], 0
    for t in texts:
        n = len(t) * 4 if not t.isascii() else len(t)  # worst-case UTF-8 bytes, cheap
        if chunk and (size + n > budget or len(chunk) >= 10_000):
            yield chunk
            chunk, size = [], 0
        chunk.append(t)
        size += n + 16
    if chunk:
        yield chunk


def read_authkey(path: str) -> bytes:
    """The key is the file's contents with whitespace stripped, as bytes."""
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except FileNotFoundError:
        raise errors.Unavailable(f"no authkey at {path}: has the daemon been started? (ipcd start)") from None
    except PermissionError:
        raise errors.PermissionDenied(f"cannot read the authkey {path}: permission denied "
                                      "(ask the daemon's owner to add you to socket_group)") from None
    if not key:
        raise errors.ConfigError(f"the authkey file {path} is empty")
    return key


def connect(config_path: str | None = None, *, address: str | None = None, authkey: bytes | None = None,
            timeout: float = 5.0, reconnect_timeout: float = 30.0) -> Client:
    """Connect to the daemon the way the CLI does (same config discovery).

    ``address``/``authkey`` override what the configuration says.
    """
    from . import config as configmod

    cfg = configmod.load(config_path, overrides={"address": address} if address else None)
    return client_for(cfg, authkey=authkey, timeout=timeout, reconnect_timeout=reconnect_timeout)


def client_for(cfg, *, authkey: bytes | None = None, timeout: float = 5.0,
               reconnect_timeout: float = 30.0) -> Client:
    """A Client for a loaded Config: its address, authkey file and request limit."""
    from . import paths

    key = authkey if authkey is not None else read_authkey(cfg.authkey_file)
    _kind, addr = paths.parse_address(cfg.address)
    return Client(addr, key, connect_timeout=timeout, reconnect_timeout=reconnect_timeout,
                  max_request_bytes=cfg.max_request_bytes)


__all__ = ["Client", "Message", "client_for", "connect", "dumps", "read_authkey"]
