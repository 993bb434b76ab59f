"""The wire: BaseManager's framing and handshake, hardened, for both ends.

multiprocessing.connection frames every message as a 4-byte big-endian
length (or -1 + an 8-byte length) followed by a pickle, and authenticates
with an HMAC challenge in each direction.  ipcd keeps that wire so a plain
stdlib ``BaseManager`` client can talk to the daemon, but hardens what the
stdlib leaves open (see shared/notes/basemanager.md):

* nothing received is unpickled with the stock unpickler: the restricted
  unpickler admits plain data only (plus the manager's ``Token``), so a
  ``__reduce__`` payload from an authenticated peer cannot execute code;
* frames are size-checked from their header before anything is allocated;
* the handshake has a deadline (the stdlib has none: idle peers pin threads);
* the digest comparison is constant-time and there are no ``assert``s that
  ``python -O`` would strip.

This module imports only multiprocessing.connection (not managers, ~40 ms
heavier), so the CLI's send path stays fast.
"""

from __future__ import annotations

import hmac
import io
import os
import pickle
import select
import socket
import struct
import time
from multiprocessing import connection as mpc

from . import errors

# What the 3.11 handshake sends; a 3.12+ peer detects this legacy (MD5)
# format by its 20-byte challenge and answers in kind (notes §1).
CHALLENGE = b"#CHALLENGE#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"
MESSAGE_LENGTH = 20
HANDSHAKE_MAX = 256

# Globals a request may reference.  Plain containers, str, bytes, numbers,
# bools and None need no global at all; Token is what stdlib proxies send
# for get_methods/incref.
_ALLOWED_GLOBALS = frozenset({("multiprocessing.managers", "Token")})


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden")

    def persistent_load(self, pid):  # pragma: no cover - defensive
        raise pickle.UnpicklingError("persistent ids are forbidden")


def loads(data: bytes):
    """Unpickle *data* admitting only plain data types."""
    return _RestrictedUnpickler(io.BytesIO(data)).load()


def dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


class FrameTooLarge(EOFError):
    """A frame's header announced more than the limit; the connection is closed.

    An EOFError so the serving loop ends the connection: letting the stdlib's
    OSError through leaves the peer blocked mid-send (notes §3, size-cap pitfall).
    """


class Conn(mpc.Connection):
    """A Connection whose reads honour a deadline and a size limit.

    ``deadline`` (a time.monotonic() value, or None) bounds every read; it is
    set during the handshake so a silent or trickling peer cannot hold a
    thread, and by clients for a whole request.
    """

    deadline: float | None = None

    def _recv(self, size, read=os.read):
        buf = io.BytesIO()
        handle = self._handle
        remaining = size
        while remaining > 0:
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0 or not select.select([handle], [], [], left)[0]:
                    raise TimeoutError("timed out waiting for the peer")
            chunk = read(handle, remaining)
            if not chunk:
                if remaining == size:
                    raise EOFError
                raise OSError("got end of file during message")
            buf.write(chunk)
            remaining -= len(chunk)
        return buf

    def recv_obj(self, limit: int):
        """Receive one frame of at most *limit* bytes and restricted-unpickle it."""
        buf = self._recv_bytes(limit)
        if buf is None:
            self.close()
            raise FrameTooLarge(f"frame larger than {limit} bytes")
        return loads(buf.getbuffer())

    def send_obj(self, obj) -> None:
        self.send_bytes(dumps(obj))


def server_handshake(conn: Conn, authkey: bytes) -> None:
    """Run the server side of the mutual handshake (deliver, then answer).

    Raises AuthError on a wrong digest, TimeoutError/EOFError/OSError on a
    peer that stalls, hangs up or sends junk.  Sends no traceback either way.
    """
    message = os.urandom(MESSAGE_LENGTH)
    conn.send_bytes(CHALLENGE + message)
    expected = hmac.new(authkey, message, "md5").digest()
    response = _recv_small(conn)
    if not hmac.compare_digest(response, expected):
        conn.send_bytes(FAILURE)
        raise errors.AuthError("digest received was wrong")
    conn.send_bytes(WELCOME)
    challenge = _recv_small(conn)
    if not challenge.startswith(CHALLENGE):
        raise errors.AuthError("peer sent no challenge")
    conn.send_bytes(hmac.new(authkey, challenge[len(CHALLENGE):], "md5").digest())
    if _recv_small(conn) != WELCOME:
        raise errors.AuthError("peer rejected our digest")


def client_handshake(conn: Conn, authkey: bytes) -> None:
    """Client side: answer the server's challenge, then challenge it back."""
    challenge = _recv_small(conn)
    if not challenge.startswith(CHALLENGE):
        raise errors.Unavailable("the peer is not an ipcd daemon (no challenge)")
    conn.send_bytes(hmac.new(authkey, challenge[len(CHALLENGE):], "md5").digest())
    if _recv_small(conn) != WELCOME:
        raise errors.AuthError("the daemon rejected the authkey")
    message = os.urandom(MESSAGE_LENGTH)
    conn.send_bytes(CHALLENGE + message)
    expected = hmac.new(authkey, message, "md5").digest()
    ok = hmac.compare_digest(_recv_small(conn), expected)
    conn.send_bytes(WELCOME if ok else FAILURE)
    if not ok:
        raise errors.AuthError("the daemon does not hold our authkey (wrong daemon?)")


def _recv_small(conn: Conn) -> bytes:
    buf = conn._recv_bytes(HANDSHAKE_MAX)
    if buf is None:
        raise EOFError("oversized handshake frame")
    return buf.getvalue()


def make_socket(address) -> socket.socket:
    """A stream socket of the right family for *address* (str path or (host, port))."""
    if isinstance(address, str):
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host = address[0]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.socket(family, socket.SOCK_STREAM)


def connect(address, authkey: bytes, timeout: float) -> Conn:
    """Open an authenticated connection, never waiting longer than *timeout*.

    ``multiprocessing.connection.Client()`` has no connect timeout: against a
    socket that listens but never accepts it blocks forever (notes §6).  This
    bounds the connect and the whole handshake.
    """
    shown = address if isinstance(address, str) else "%s:%d" % address
    deadline = time.monotonic() + timeout
    sock = make_socket(address)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.setblocking(True)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        raise errors.Unavailable(
            f"no daemon is listening on {shown} (is 'ipcd start' running?)"
        ) from e
    except PermissionError as e:
        sock.close()
        raise errors.PermissionDenied(
            f"permission denied connecting to {shown}: ask the daemon's owner "
            "for access (socket_group) or use your own daemon"
        ) from e
    except (socket.timeout, TimeoutError) as e:
        sock.close()
        raise errors.Unavailable(f"the daemon on {shown} did not accept within {timeout:g} s") from e
    except OSError as e:
        sock.close()
        raise errors.Unavailable(f"cannot connect to {shown}: {e.strerror or e}") from e
    conn = Conn(sock.detach())
    conn.deadline = deadline
    try:
        client_handshake(conn, authkey)
    except errors.IpcdError:
        conn.close()
        raise
    except TimeoutError as e:
        conn.close()
        raise errors.Unavailable(f"the daemon on {shown} did not answer within {timeout:g} s") from e
    except (EOFError, OSError) as e:
        conn.close()
        raise errors.Unavailable(
            f"the daemon on {shown} closed the connection during the handshake "
            "(too many connections, or not allowed by allow_uids/allow_gids)"
        ) from e
    conn.deadline = None
    return conn


def peer_credentials(conn: Conn) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a Unix-socket peer via SO_PEERCRED, else None."""
    try:
        s = socket.socket(fileno=os.dup(conn.fileno()))
    except OSError:
        return None
    try:
        if s.family != socket.AF_UNIX:
            return None
        raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", raw)
    except OSError:
        return None
    finally:
        s.close()


def peer_name(conn: Conn) -> str:
    """A log-friendly description of the peer: uid/pid on Unix, address on TCP."""
    cred = peer_credentials(conn)
    if cred is not None:
        pid, uid, gid = cred
        return f"uid={uid} gid={gid} pid={pid}"
    try:
        s = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            host, port = s.getpeername()[:2]
            return f"{host}:{port}"
        finally:
            s.close()
    except OSError:
        return "unknown peer"
