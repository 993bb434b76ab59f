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
  peer's uid/pid;
* a request that is not plain data (a ``__reduce__`` payload, junk) is refused
  with a short error and one rate-limited log line, and the connection stays
  usable; a frame over ``max_request_bytes`` closes the connection unread;
* stdlib object idents are random (not ``id(obj)``), so one client cannot
  guess another's ident to ``decref`` or call it.
"""

from __future__ import annotations

import collections
import logging
import os
import queue as stdqueue
import secrets
import socket
import threading
import time
from multiprocessing import managers

from . import errors, wire
from .sessions import SessionLoop

log = logging.getLogger("ipcd.server")

# Methods a peer may call before it has an object ident.
PUBLIC = frozenset({"create", "accept_connection", "get_methods", "dummy", "incref", "decref", "session"})
MAX_SHARED_OBJECTS = 10_000


class Refused(Exception):
    """A request we will not serve.

    Deliberately not PermissionError: that is an OSError, which the request
    loop treats as "the connection broke" and answers by hanging up, so the
    peer would see EOF instead of the refusal.
    """


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
        self.log(logging.WARNING, msg, *args)

    def log(self, level, msg, *args, exc_info=None):
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
        self._log.log(level, msg, *args, exc_info=exc_info)


class HardenedServer(managers.Server):
    """Serve stdlib manager requests and ipcd sessions on a socket we own."""

    public = sorted(PUBLIC)
    # No '#GETVALUE' (it returns a copy of the referent to anyone).
    fallback_mapping = {
        "__str__": lambda self, conn, ident, obj: f"<ipcd {type(obj).__name__}>",
        "__repr__": lambda self, conn, ident, obj: f"<ipcd {type(obj).__name__}>",
    }

    def __init__(self, listener: socket.socket, authkey: bytes, registry, ops, limits: Limits, hub):
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
        self.auth_log = RateLimitedLog(log)  # failed handshakes, allow_uids refusals
        self.abuse_log = RateLimitedLog(log)  # refused requests, oversized frames, internal errors
        self._conn_lock = threading.Lock()
        self._pending = collections.OrderedDict()  # unauthenticated: conn -> accept time
        self._active = set()  # authenticated connections served by a thread (stdlib clients)
        # ipcd sessions, after their handshake, are served by one event-loop thread.
        self.loop = SessionLoop(hub, ops, lambda: self.limits, self.abuse_log)
        self.accepted_total = 0
        self.auth_failures = 0

    # -- accepting -------------------------------------------------------

    def serve_in_thread(self) -> threading.Thread:
        self.loop.start()
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
                _shutdown(evict)  # under the lock: see _shutdown
            self._pending[conn] = time.monotonic()
        t = threading.Thread(target=self.handle_request, args=(conn,), daemon=True)
        t.start()

    def handle_request(self, conn):
        try:
            self._handle_request(conn)
        except wire.FrameTooLarge as e:
            self.abuse_log.warning("closed the connection from %s: %s (max_request_bytes)",
                                   getattr(conn, "peer", "unknown peer"), e)
        except (EOFError, OSError, SystemExit):
            pass
        except Exception:  # a bug: keep serving others, but say so (rate-limited: peers can trigger it)
            self.abuse_log.log(logging.ERROR, "unexpected error serving a connection", exc_info=True)
        finally:
            with self._conn_lock:
                self._pending.pop(conn, None)
                self._active.discard(conn)
                conn.close()  # under the lock: see _shutdown

    def _handle_request(self, c):
        c.deadline = time.monotonic() + self.limits.handshake_timeout
        cred = wire.peer_credentials(c)
        c.peer = wire.peer_name(c, cred)  # now: after an oversized frame the socket is gone
        try:
            if not self._peer_allowed(cred):
                self.auth_log.warning("refused connection from %s: not in allow_uids/allow_gids", c.peer)
                return
            wire.server_handshake(c, self.authkey)
        except errors.AuthError:
            self.auth_failures += 1
            self.auth_log.warning("authentication failed for %s (wrong authkey)", c.peer)
            return
        except (TimeoutError, EOFError, OSError):
            self.auth_failures += 1
            self.auth_log.warning("handshake with %s did not complete (timeout, hang-up or junk)", c.peer)
            return
        with self._conn_lock:
            self._pending.pop(c, None)
            if len(self._active) + self.loop.count() >= self.limits.max_connections:
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
            # rate-limited: anyone holding the key can open connections in a loop
            self.abuse_log.warning("refused a connection from %s: max_connections=%d reached",
                                   c.peer, self.limits.max_connections)
            return
        # The first request after the handshake must arrive promptly too.
        try:
            request = c.recv_obj(self.limits.max_request_bytes)
        except wire.BadRequest as e:
            self._refuse_logged(c, e)
            c.send_obj(("#TRACEBACK", f"ipcd: request refused: {e}\n"))
            return
        c.deadline = None
        try:
            ignore, funcname, args, kwds = request
            if (not isinstance(funcname, str) or funcname not in PUBLIC
                    or not isinstance(args, tuple) or not isinstance(kwds, dict)):
                raise Refused(f"{funcname!r:.60} is not allowed")
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

    def _refuse_logged(self, c, e):
        # Someone holding the authkey sent something that is not plain data:
        # worth a line (rate-limited), never a traceback.
        self.abuse_log.warning("refused a request from %s: %s", getattr(c, "peer", "unknown peer"), e)

    def _peer_allowed(self, cred) -> bool:
        lim = self.limits
        if not (lim.allow_uids or lim.allow_gids):
            return True
        if cred is None:  # TCP: no credentials to check; the authkey is the guard
            return True
        _pid, uid, gid = cred
        # root, and the daemon's own user (its watchdog self-check connects), always pass.
        return uid in (0, os.geteuid()) or uid in lim.allow_uids or gid in lim.allow_gids

    # -- ipcd sessions -----------------------------------------------------

    def session(self, c):
        """Hand this connection to the session loop (sessions.py), which serves its
        ``(op, kwargs)`` requests from now on; this thread ends."""
        c.send_obj(("#RETURN", None))
        self.loop.adopt(os.dup(c.fileno()), c.peer)
        raise EOFError  # ends the thread; handle_request closes its copy of the fd

    # -- stdlib manager protocol -----------------------------------------

    def create(self, c, typeid, /, *args, **kwds):
        """The stdlib's create, with an allow-listed typeid and a random ident.

        The stdlib names objects ``'%x' % id(obj)``: heap addresses, close
        together and easy to guess, and any client may incref/decref/call any
        ident.  A random 128-bit ident is known only to the client it was
        returned to.
        """
        if not isinstance(typeid, str) or typeid not in self.registry:
            raise Refused(f"typeid {typeid!r:.60} is not served (only 'queue')")
        if len(self.id_to_obj) > MAX_SHARED_OBJECTS:
            raise RuntimeError("too many shared objects; release some proxies")
        factory, exposed, method_to_typeid, _proxytype = self.registry[typeid]
        obj = factory(*args, **kwds)  # validates its arguments (hub.stdlib_queue)
        exposed = tuple(exposed)
        ident = secrets.token_hex(16)
        with self.mutex:
            self.id_to_obj[ident] = (obj, set(exposed), method_to_typeid)
            self.id_to_refcount[ident] = 1  # the stdlib's create() increfs once too
        return ident, exposed

    def incref(self, c, ident):
        with self.mutex:
            if not isinstance(ident, str) or ident not in self.id_to_refcount:
                raise KeyError("unknown object")
            self.id_to_refcount[ident] += 1

    def decref(self, c, ident):
        # The stdlib's raises an AssertionError quoting repr(obj) (a heap address).
        obj = None
        with self.mutex:
            if not isinstance(ident, str) or ident not in self.id_to_refcount:
                raise KeyError("unknown object")
            self.id_to_refcount[ident] -= 1
            if self.id_to_refcount[ident] <= 0:
                del self.id_to_refcount[ident]
                obj = self.id_to_obj.pop(ident, None)
        del obj  # dropped outside the mutex, as the stdlib does

    def accept_connection(self, c, name):
        # The stdlib names the thread after the peer-supplied *name*; not needed.
        c.send_obj(("#RETURN", None))
        self.serve_client(c)

    def get_methods(self, c, token):
        try:
            return tuple(self.id_to_obj[token.id][1])
        except (KeyError, AttributeError):
            raise KeyError("unknown object") from None

    def serve_client(self, conn):
        """The per-proxy request loop, as the stdlib's but with our checks."""
        limit = self.limits.max_request_bytes
        while not self.stop_event.is_set():
            try:
                request = conn.recv_obj(limit)
            except wire.BadRequest as e:  # the frame was consumed: answer and go on
                self._refuse_logged(conn, e)
                conn.send_obj(("#TRACEBACK", f"ipcd: request refused: {e}\n"))
                continue
            try:
                ident, methodname, args, kwds = request
                if not isinstance(args, tuple) or not isinstance(kwds, dict):
                    raise TypeError("malformed request")
                try:
                    obj, exposed, _gettypeid = self.id_to_obj[ident]
                except (KeyError, TypeError):
                    raise KeyError("unknown object") from None
                if not isinstance(methodname, str):
                    raise TypeError("malformed request")
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
        """Stop taking connections and requests (main thread, never a signal handler)."""
        self.stop_event.set()
        self.loop.begin_stop()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def drain(self, timeout: float) -> bool:
        """Wait up to *timeout* for in-flight session requests to be answered; once they
        are (or with timeout 0), close every connection.  Returns whether they were."""
        drained = self.loop.wait_idle(timeout)
        if drained or timeout <= 0:
            self.loop.close()
            with self._conn_lock:
                for conn in list(self._active) + list(self._pending):
                    _shutdown(conn)  # under the lock: see _shutdown
        return drained

    def counts(self) -> dict:
        with self._conn_lock:
            return {"connections": len(self._active) + self.loop.count(), "handshaking": len(self._pending),
                    "accepted_total": self.accepted_total, "auth_failures": self.auth_failures}


def _shutdown(conn):
    """Wake a thread blocked reading *conn* (close() alone would not).

    Call with the server's _conn_lock held: handle_request closes connections
    under it, so the fd cannot be closed and reused by an unrelated socket
    (a new client, the watchdog probe) between our check and the shutdown.
    """
    if conn.closed:
        return
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
