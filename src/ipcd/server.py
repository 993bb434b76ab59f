"""The network face of the daemon: a locked-down multiprocessing manager Server.

Stdlib ``BaseManager`` clients keep working (typeid ``queue`` with put/get),
and ipcd's own clients use one extra public method, ``session``, that turns
an authenticated connection into a loop of ``(op, kwargs)`` requests answered
with ``("ok", result)`` or ``("err", kind, message)``.

What is different from ``multiprocessing.managers.Server`` (notes §4):

* we bind and own the listening socket (mode, stale-socket probe, TCP/IPv6),
  so ``Server.__init__`` — which binds its own Listener — is not called;
* ``public`` is an explicit allow-list enforced with ``if``, not ``assert``:
  no remote ``shutdown``, ``debug_info`` or ``number_of_objects``;
* ``create`` only makes the registered ``queue`` typeid; no ``#GETVALUE``;
* requests are read with the restricted unpickler and a size limit;
* the handshake has a deadline; unauthenticated connections are capped, the
  oldest evicted first, so a flood of idle peers cannot lock real clients out;
* a failed handshake gets no traceback, and is logged (rate-limited) with the
  peer's uid/pid.
"""

from __future__ import annotations

import collections
import logging
import os
import queue as stdqueue
import socket
import threading
import time
from multiprocessing import managers

from . import errors, wire

log = logging.getLogger("ipcd.server")

# Methods a peer may call before it has an object ident.
PUBLIC = frozenset({"create", "accept_connection", "get_methods", "dummy", "incref", "decref", "session"})
MAX_SHARED_OBJECTS = 10_000


class Limits:
    """Connection limits, read on each accept so a reload can change them."""

    def __init__(self, *, handshake_timeout=5.0, max_connections=256, max_request_bytes=64 << 20,
                 allow_uids=(), allow_gids=()):
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.max_request_bytes = max_request_bytes
        self.allow_uids = frozenset(allow_uids)
        self.allow_gids = frozenset(allow_gids)


class RateLimitedLog:
    """Log at most *burst* lines per *period*; count and report the rest."""

    def __init__(self, logger, period=10.0, burst=5, clock=time.monotonic):
        self._log, self._period, self._burst, self._clock = logger, period, burst, clock
        self._lock = threading.Lock()
        self._window_start = -period
        self._count = 0
        self._suppressed = 0

    def warning(self, msg, *args):
        with self._lock:
            now = self._clock()
            if now - self._window_start >= self._period:
                if self._suppressed:
                    self._log.warning("%d similar messages suppressed", self._suppressed)
                self._window_start, self._count, self._suppressed = now, 0, 0
            self._count += 1
            if self._count > self._burst:
                self._suppressed += 1
                return
        self._log.warning(msg, *args)


class HardenedServer(managers.Server):
    """Serve stdlib manager requests and ipcd sessions on a socket we own."""

    public = sorted(PUBLIC)
    # No '#GETVALUE' (it returns a copy of the referent to anyone).
    fallback_mapping = {
        "__str__": lambda self, conn, ident, obj: f"<ipcd {type(obj).__name__}>",
        "__repr__": lambda self, conn, ident, obj: f"<ipcd {type(obj).__name__}>",
    }

    def __init__(self, listener: socket.socket, authkey: bytes, registry, ops, limits: Limits):
        # Deliberately not calling Server.__init__: it binds a Listener of its own.
        self.registry = registry
        self.authkey = authkey
        self.sock = listener
        self.address = listener.getsockname()
        self.id_to_obj = {"0": (None, ())}
        self.id_to_refcount = {}
        self.id_to_local_proxy_obj = {}
        self.mutex = threading.Lock()
        self.ops = ops
        self.limits = limits
        self.stop_event = threading.Event()
        self.auth_log = RateLimitedLog(log)
        self._conn_lock = threading.Lock()
        self._pending = collections.OrderedDict()  # unauthenticated: conn -> accept time
        self._active = set()  # authenticated connections
        self._in_flight = 0
        self._idle = threading.Condition(self._conn_lock)
        self.accepted_total = 0
        self.auth_failures = 0

    # -- accepting -------------------------------------------------------

    def serve_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.accepter, name="ipcd-accept", daemon=True)
        t.start()
        return t

    def accepter(self):
        while not self.stop_event.is_set():
            try:
                sock, _ = self.sock.accept()
            except OSError:
                if self.stop_event.is_set():
                    return
                time.sleep(0.01)  # EMFILE and friends: do not spin
                continue
            sock.setblocking(True)
            conn = wire.Conn(sock.detach())
            self._admit(conn)

    def _admit(self, conn):
        evict = None
        with self._conn_lock:
            self.accepted_total += 1
            # Pending handshakes are capped at max_connections too; the oldest
            # is evicted so idle floods cannot lock real clients out (a real
            # client finishes its handshake in well under a millisecond).
            if len(self._pending) >= self.limits.max_connections:
                evict, _ = self._pending.popitem(last=False)
            self._pending[conn] = time.monotonic()
        if evict is not None:
            _shutdown(evict)
        t = threading.Thread(target=self.handle_request, args=(conn,), daemon=True)
        t.start()

    def handle_request(self, conn):
        try:
            self._handle_request(conn)
        except (EOFError, OSError, SystemExit):
            pass
        except Exception:  # a bug: keep serving others, but say so
            log.exception("unexpected error serving a connection")
        finally:
            with self._conn_lock:
                self._pending.pop(conn, None)
                self._active.discard(conn)
            conn.close()

    def _handle_request(self, c):
        c.deadline = time.monotonic() + self.limits.handshake_timeout
        cred = wire.peer_credentials(c)
        try:
            if not self._peer_allowed(cred):
                self.auth_log.warning("refused connection from %s: not in allow_uids/allow_gids",
                                      wire.peer_name(c))
                return
            wire.server_handshake(c, self.authkey)
        except errors.AuthError:
            self.auth_failures += 1
            self.auth_log.warning("authentication failed for %s (wrong authkey)", wire.peer_name(c))
            return
        except (TimeoutError, EOFError, OSError):
            self.auth_failures += 1
            self.auth_log.warning("handshake with %s did not complete (timeout, hang-up or junk)",
                                  wire.peer_name(c))
            return
        with self._conn_lock:
            self._pending.pop(c, None)
            if len(self._active) >= self.limits.max_connections:
                full = True
            else:
                full = False
                self._active.add(c)
        if full:
            c.deadline = time.monotonic() + 1.0
            try:
                c.recv_obj(self.limits.max_request_bytes)
                c.send_obj(("#TRACEBACK", "ipcd: too many connections, retry later\n"))
            except Exception:
                pass
            log.warning("refused a connection: max_connections=%d reached", self.limits.max_connections)
            return
        # The first request after the handshake must arrive promptly too.
        request = c.recv_obj(self.limits.max_request_bytes)
        c.deadline = None
        try:
            ignore, funcname, args, kwds = request
            if funcname not in PUBLIC or not isinstance(args, tuple) or not isinstance(kwds, dict):
                raise PermissionError(f"{funcname!r} is not allowed")
            func = getattr(self, funcname)
        except Exception as e:
            c.send_obj(("#TRACEBACK", f"ipcd: request refused: {e}\n"))
            return
        try:
            result = func(c, *args, **kwds)
        except (SystemExit, EOFError, OSError):
            raise
        except Exception as e:
            msg = ("#TRACEBACK", f"ipcd: {funcname} failed: {type(e).__name__}: {e}\n")
        else:
            msg = ("#RETURN", result)
        c.send_obj(msg)

    def _peer_allowed(self, cred) -> bool:
        lim = self.limits
        if not (lim.allow_uids or lim.allow_gids):
            return True
        if cred is None:  # TCP: no credentials to check; the authkey is the guard
            return True
        _pid, uid, gid = cred
        return uid == 0 or uid in lim.allow_uids or gid in lim.allow_gids

    # -- ipcd sessions -----------------------------------------------------

    def session(self, c):
        """Serve ``(op, kwargs)`` requests on this connection until it closes."""
        c.send_obj(("#RETURN", None))
        limit = self.limits.max_request_bytes
        while not self.stop_event.is_set():
            request = c.recv_obj(limit)
            with self._conn_lock:
                self._in_flight += 1
            try:
                reply = self._run_op(request)
            finally:
                with self._conn_lock:
                    self._in_flight -= 1
                    self._idle.notify_all()
            c.send_obj(reply)
        raise EOFError  # ends the thread; handle_request closes the connection

    def _run_op(self, request):
        try:
            op, kwargs = request
            func = self.ops.get(op) if isinstance(op, str) else None
            if func is None:
                raise errors.UsageError(f"unknown operation {op!r}")
            if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
                raise errors.DataError("operation arguments must be a dict")
            try:
                return ("ok", func(**kwargs))
            except TypeError as e:
                if "argument" in str(e):
                    raise errors.DataError(f"bad arguments for {op}: {e}") from None
                raise
        except errors.IpcdError as e:
            return ("err", e.kind, str(e))
        except (ValueError, TypeError) as e:
            return ("err", "data", f"malformed request: {e}")
        except Exception as e:
            log.exception("internal error in %r", request[0] if isinstance(request, tuple) and request else "?")
            return ("err", "internal", f"internal error: {type(e).__name__}: {e}")

    # -- stdlib manager protocol -----------------------------------------

    def create(self, c, typeid, /, *args, **kwds):
        if typeid not in self.registry:
            raise PermissionError(f"typeid {typeid!r} is not served (only 'queue')")
        if len(self.id_to_obj) > MAX_SHARED_OBJECTS:
            raise RuntimeError("too many shared objects; release some proxies")
        return super().create(c, typeid, *args, **kwds)

    def get_methods(self, c, token):
        try:
            return tuple(self.id_to_obj[token.id][1])
        except (KeyError, AttributeError):
            raise KeyError("unknown object") from None

    def serve_client(self, conn):
        """The per-proxy request loop, as the stdlib's but with our checks."""
        limit = self.limits.max_request_bytes
        while not self.stop_event.is_set():
            request = conn.recv_obj(limit)
            try:
                ident, methodname, args, kwds = request
                if not isinstance(args, tuple) or not isinstance(kwds, dict):
                    raise TypeError("malformed request")
                try:
                    obj, exposed, _gettypeid = self.id_to_obj[ident]
                except (KeyError, TypeError):
                    raise KeyError("unknown object") from None
                if methodname in exposed:
                    try:
                        msg = ("#RETURN", getattr(obj, methodname)(*args, **kwds))
                    except Exception as e:
                        msg = ("#ERROR", _portable_exception(e))
                elif methodname in self.fallback_mapping:
                    msg = ("#RETURN", self.fallback_mapping[methodname](self, conn, ident, obj))
                else:
                    raise AttributeError(f"method {methodname!r} is not exposed")
            except Exception as e:
                msg = ("#TRACEBACK", f"ipcd: request refused: {type(e).__name__}: {e}\n")
            conn.send_obj(msg)
        raise EOFError

    # -- stopping ----------------------------------------------------------

    def stop_accepting(self):
        """Stop taking connections (main thread, never a signal handler)."""
        self.stop_event.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def drain(self, timeout: float) -> bool:
        """Wait for in-flight requests to finish, then close every connection."""
        deadline = time.monotonic() + timeout
        with self._conn_lock:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(left)
            drained = self._in_flight == 0
            conns = list(self._active) + list(self._pending)
        for conn in conns:
            _shutdown(conn)
        return drained

    def counts(self) -> dict:
        with self._conn_lock:
            return {"connections": len(self._active), "handshaking": len(self._pending),
                    "accepted_total": self.accepted_total, "auth_failures": self.auth_failures}


def _shutdown(conn):
    """Wake a thread blocked reading *conn* (close() alone would not)."""
    try:
        s = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            s.shutdown(socket.SHUT_RDWR)
        finally:
            s.close()
    except (OSError, ValueError):
        pass


def _portable_exception(e: Exception) -> BaseException:
    """An exception a stdlib client can unpickle without importing ipcd."""
    if isinstance(e, (stdqueue.Empty, stdqueue.Full)):
        return e
    if isinstance(e, errors.DataError):
        return ValueError(str(e))
    if isinstance(e, (errors.QueueFull, errors.StorageFull)):
        return stdqueue.Full(str(e))
    if isinstance(e, errors.Unavailable):
        return ConnectionError(str(e))
    if isinstance(e, errors.IpcdError):
        return RuntimeError(str(e))
    if isinstance(e, (ValueError, TypeError, KeyError)):
        return type(e)(str(e))
    return RuntimeError(f"{type(e).__name__}: {e}")
