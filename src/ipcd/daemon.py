"""``ipcd start``: the daemon's lifecycle, in the foreground.

Order matters (shared/notes/systemd.md §1): handlers for every signal are
installed before anything else, then the instance lock, the authkey, the
store, the socket; READY=1 is sent only once the socket accepts.  Signal
handlers only record the signal in a SimpleQueue (Event.set() or logging in
a handler can deadlock, notes/basemanager.md §5); the main loop acts on it.
"""

from __future__ import annotations

import fcntl
import grp
import logging
import os
import queue as stdqueue
import secrets
import signal
import socket
import stat
import sys
import time

from . import __version__, config as configmod, errors, paths, wire
from .client import read_authkey
from .hub import Hub
from .logs import LogSetup
from .server import HardenedServer, Limits
from .sinks import Sinks
from .memstore import MemoryStore
from .store import SqliteStore
from .sysd import Notifier

log = logging.getLogger("ipcd.daemon")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
# Settings a reload cannot change: the socket, the store and the key are open already.
RESTART_KEYS = ("address", "state_dir", "authkey_file", "socket_group", "max_store_bytes")


def config_changes(old, new) -> tuple[list[str], list[str]]:
    """("key: old -> new" applied live, the same for keys that need a restart)."""
    changed, restart = [], []
    for key in configmod.TOP_KEYS:
        a, b = getattr(old, key), getattr(new, key)
        if a != b:
            (restart if key in RESTART_KEYS else changed).append(f"{key}: {a!r} -> {b!r}")
    tables = [("defaults", old.defaults, new.defaults)]
    tables += [(f"queues.{n}", old.queue(n), new.queue(n)) for n in sorted(set(old.queues) | set(new.queues))]
    for prefix, a, b in tables:
        for key in configmod.QUEUE_KEYS:
            if getattr(a, key) != getattr(b, key):
                changed.append(f"{prefix}.{key}: {getattr(a, key)!r} -> {getattr(b, key)!r}")
    return changed, restart


class Daemon:
    def __init__(self, config, *, reload_overrides=None):
        self.config = config
        self.reload_overrides = reload_overrides or {}
        self.sigq: stdqueue.SimpleQueue = stdqueue.SimpleQueue()
        self.notifier = Notifier()
        self.logs = None
        self.lock_fd = None
        self.sock = None
        self.socket_path = None
        self.server = None
        self.hub = None
        self.sinks = None
        self.stores = []
        self.authkey = b""
        self.started = time.time()

    # -- signals ---------------------------------------------------------

    def _on_signal(self, signum, frame):
        self.sigq.put_nowait(signum)  # only record: no logging, no locks (see module doc)

    def install_signals(self):
        for s in HANDLED_SIGNALS:
            signal.signal(s, self._on_signal)

    # -- start-up steps ----------------------------------------------------

    def _group_gid(self):
        g = self.config.socket_group
        if g is None:
            return None
        try:
            return int(g) if str(g).isdigit() else grp.getgrnam(g).gr_gid
        except KeyError:
            raise errors.ConfigError(f"socket_group = {g!r}: no such group") from None

    def _socket_dir(self, directory, gid):
        """0700 (0750 with socket_group), owned by us, not a symlink: else refuse."""
        mode = 0o750 if gid is not None else 0o700
        try:
            paths.ensure_private_dir(directory, mode=mode)
        except errors.PermissionDenied as e:  # one Error: line that also says how to fix it
            raise errors.PermissionDenied(f"{e}; {_dir_fix(directory, mode, gid)}") from None
        if gid is not None:  # ours (checked above): give the group its way in
            os.chown(directory, -1, gid)
            os.chmod(directory, 0o750)

    def acquire_lock(self):
        path = self.config.lock_path()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise errors.AlreadyRunning(
                f"ipcd is already running on {self.config.address} (pid {pid})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.lock_fd = fd  # held until exit; never unlinked (see systemd.md §7)

    def ensure_authkey(self, gid):
        """Create or check the authkey; refuse one others could read, write or replace.

        Whoever can read the key can run any queue operation as this daemon,
        so an existing file wider than configured is refused, never silently
        narrowed: it may already have been read.
        """
        path = self.config.authkey_file
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        allowed = 0o640 if gid is not None else 0o600
        dst = os.stat(directory)
        if dst.st_mode & 0o022 and not dst.st_mode & stat.S_ISVTX:
            raise errors.PermissionDenied(
                f"the authkey's directory {directory} has mode {stat.S_IMODE(dst.st_mode):04o}: other users "
                f"could replace {path}; run 'chmod go-w {directory}' or set authkey_file elsewhere")
        if not os.path.exists(path):
            old = os.umask(0o077)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32) + "\n")
            finally:
                os.umask(old)
            log.info("generated a new authkey in %s", path)
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise errors.PermissionDenied(f"authkey {path} is not a regular file: remove it (a new key is "
                                          "generated at start) or set authkey_file to a file")
        if st.st_uid not in (os.geteuid(), 0):  # its owner knows the key, and can change it
            raise errors.PermissionDenied(
                f"authkey {path} is owned by uid {st.st_uid}, not {os.geteuid()}: run "
                f"'chown {os.geteuid()} {path}', or remove it to have a new key generated")
        if st.st_mode & 0o777 & ~allowed:
            raise errors.PermissionDenied(
                f"authkey {path} has mode {stat.S_IMODE(st.st_mode):04o}, readable or writable beyond "
                f"{allowed:04o}: run 'chmod {allowed:o} {path}'"
                + ("" if gid is not None else " (or set socket_group for shared use)"))
        if gid is not None:
            os.chown(path, -1, gid)
            os.chmod(path, 0o640)
            self._let_group_read_authkey(path, gid)
        return read_authkey(path)

    def _let_group_read_authkey(self, path, gid):
        """socket_group members need the key too: let them traverse to it.

        The default authkey lives in state_dir, created 0700, where the group
        could never read it.  Search permission alone (0710, no listing) lets
        them open the key by name; the store next to it stays 0600.
        """
        directory = os.path.dirname(path) or "."
        st = os.stat(directory)
        if st.st_uid == os.geteuid() and not st.st_mode & 0o011:
            os.chown(directory, -1, gid)
            os.chmod(directory, stat.S_IMODE(st.st_mode) | 0o010)
        d = os.path.abspath(directory)
        while True:  # not fatal (ACLs, supplementary groups): say why clients will fail
            st = os.stat(d)
            if not (st.st_mode & 0o001 or (st.st_mode & 0o010 and st.st_gid == gid)):
                log.warning("members of socket_group %s may not be able to read the authkey %s: %s has mode "
                            "%04o; grant the group search permission (chgrp + chmod g+x) on it",
                            self.config.socket_group, path, d, stat.S_IMODE(st.st_mode))
                return
            if d == "/":
                return
            d = os.path.dirname(d)

    def bind(self, gid):
        kind, addr = paths.parse_address(self.config.address)
        if kind == "tcp":
            host, port = addr
            if not paths.is_loopback_host(host):
                log.warning("listening on %s:%d, which is not loopback: traffic is NOT encrypted and the "
                            "authkey is the only guard; prefer a Unix socket or an SSH/WireGuard tunnel",
                            host, port)
            if self.config.allow_uids or self.config.allow_gids or gid is not None:
                log.warning("allow_uids, allow_gids and socket_group have no effect on a TCP address: "
                            "anyone who can reach %s:%d and holds the authkey gets in", host, port)
            sock = wire.make_socket(addr)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
            return sock
        if os.path.lexists(addr):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(addr)
            except (ConnectionRefusedError, FileNotFoundError):
                log.info("removing stale socket %s left by a previous run", addr)
                os.unlink(addr)
            except OSError as e:
                raise errors.AlreadyRunning(f"{addr} exists and answers oddly ({e}); is another daemon there?") from None
            else:
                raise errors.AlreadyRunning(f"another daemon is listening on {addr}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # born srw------- : no window where others can connect
        try:
            sock.bind(addr)
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(addr, -1, gid)
            os.chmod(addr, 0o660)
        sock.listen(128)
        self.socket_path = addr
        return sock

    def open_store(self):
        os.makedirs(self.config.state_dir, mode=0o700, exist_ok=True)
        sqlite = SqliteStore(self.config.store_path(), max_bytes=self.config.max_store_bytes,
                             logger=logging.getLogger("ipcd.store"))
        sqlite.open()
        memory = MemoryStore()
        memory.open()
        self.stores = [sqlite, memory]
        return {"os": sqlite, "fsync": sqlite, "memory": memory}

    def limits(self):
        c = self.config
        return Limits(handshake_timeout=c.handshake_timeout, max_connections=c.max_connections,
                      max_request_bytes=c.max_request_bytes, allow_uids=c.allow_uids, allow_gids=c.allow_gids)

    def status(self):
        return {
            "pid": os.getpid(), "version": __version__, "address": self.config.address,
            "started": self.started, "uptime": time.time() - self.started,
            "queues": self.hub.names(), "config": self.config.path, "log_file": self.config.log_file,
            "store_bytes": self.stores[0].size_on_disk() if self.stores else 0,
            **self.server.counts(),
        }

    # -- running -------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until told to stop, clean up; return the exit code."""
        self.install_signals()
        os.umask(0o077)  # store, authkey, lock: private unless configured otherwise
        self.logs = LogSetup(self.config.log_file, self.config.log_level)
        try:
            try:
                self._start()
            except errors.IpcdError as e:
                if self.config.log_file:  # stderr gets the one Error: line from main()
                    log.error("cannot start: %s", e)
                self.notifier.notify(f"STATUS=failed: {e}", f"ERRNO={int(e.exit_code)}")
                self._cleanup()
                raise
            return self._loop()
        finally:
            self._cleanup()

    def _start(self):
        gid = self._group_gid()
        kind, addr = paths.parse_address(self.config.address)
        if kind == "unix":
            self._socket_dir(os.path.dirname(addr) or ".", gid)
        os.makedirs(os.path.dirname(self.config.lock_path()), mode=0o700, exist_ok=True)
        self.acquire_lock()
        authkey = self.authkey = self.ensure_authkey(gid)
        self.hub = Hub(self.config, self.open_store())
        self.hub.open()
        self._compact()  # reclaim what the last run freed before serving (cheap when nothing to do)
        self.sock = self.bind(gid)
        registry = {"queue": (self.hub.stdlib_queue, ("put", "get", "qsize"), None, None)}
        ops = self.hub.ops()
        ops["status"] = self.status
        self.server = HardenedServer(self.sock, authkey, registry, ops, self.limits(), self.hub)
        self.server.serve_in_thread()
        self.sinks = Sinks(self.hub)
        self.sinks.apply(self.config)
        log.info("ipcd %s listening on %s (pid %d, store %s)", __version__, self.config.address,
                 os.getpid(), self.config.store_path())
        self.notifier.ready(self._summary())

    def _summary(self):
        stats = self.hub.stats()
        depth = sum(s["ready"] + s["leased"] + s["delayed"] for s in stats)
        return f"{len(stats)} queue(s), {depth} message(s)"

    def _loop(self) -> int:
        next_ping = time.monotonic()
        next_status = time.monotonic() + 5
        next_compact = time.monotonic() + 60
        while True:
            if not self.server.loop.alive():  # its last words are in the log (CRITICAL)
                log.critical("the session loop has stopped; exiting so that the service manager "
                             "restarts ipcd (stored messages are safe)")
                return int(errors.ExitCode.FAILURE)
            wait = self.hub.tick()
            now = time.monotonic()
            if self.notifier.watchdog_interval:
                if now >= next_ping:
                    if self.server_alive():
                        self.notifier.watchdog()
                    next_ping = now + self.notifier.watchdog_interval
                wait = min(wait, max(0.0, next_ping - now))
            if now >= next_status:
                self.notifier.status(self._summary())
                next_status = now + 5
                if self.config.defaults.sink:  # queues created since then get their sink too
                    self.sinks.apply(self.config)
            if now >= next_compact:
                self._compact()
                next_compact = now + 60
            try:
                signum = self.sigq.get(timeout=min(max(wait, 0.02), 1.0))  # 20 ms floor: no busy loop
            except stdqueue.Empty:
                continue
            if signum in (signal.SIGTERM, signal.SIGINT):
                return self.shutdown(signal.Signals(signum).name)
            if signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGUSR1:  # logrotate's postrotate: reopen files, nothing else
                self.logs.reopen()
                self.sinks.reopen()
                log.info("reopened log and sink files")

    def server_alive(self) -> bool:
        """The accepter answers a handshake and the session loop runs: a wedged server must
        stop the watchdog pings."""
        try:
            wire.connect(self.server_address(), self.authkey, timeout=2.0).close()
        except errors.IpcdError:
            return False
        return self.server.loop.responsive(2.0)

    def server_address(self):
        kind, addr = paths.parse_address(self.config.address)
        return addr

    def _compact(self):
        for s in self.stores:
            try:
                s.maybe_compact()
            except Exception as e:  # housekeeping must never stop the daemon
                log.warning("compaction failed: %s", e)

    def reload(self):
        """SIGHUP: re-read the config file, apply what can change live, name what cannot.

        An invalid file (or a log_file that cannot be opened) changes nothing:
        the running configuration stays, and systemd hears READY=1 with
        STATUS=reload failed, so `systemctl reload` does not hang.
        """
        self.notifier.reloading()
        try:
            new = configmod.load(self.config.path, overrides=self.reload_overrides)
            self.logs.apply(new.log_file, new.log_level)  # a fresh handler: reopens the file too
        except (errors.IpcdError, OSError) as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            self.notifier.notify("READY=1", f"STATUS=reload failed: {e}")
            return
        changed, restart = config_changes(self.config, new)
        restart += self.hub.reload(new)
        self.server.limits = Limits(handshake_timeout=new.handshake_timeout, max_connections=new.max_connections,
                                    max_request_bytes=new.max_request_bytes, allow_uids=new.allow_uids,
                                    allow_gids=new.allow_gids)
        self.config = new
        self.sinks.apply(new)
        self.sinks.reopen()
        log.info("reloaded configuration%s; changed: %s", f" from {new.path}" if new.path else "",
                 "; ".join(changed) or "nothing")
        if restart:
            log.warning("reload: these settings need a restart to take effect: %s", "; ".join(restart))
        self.notifier.ready(self._summary())

    def shutdown(self, why: str) -> int:
        log.info("received %s: stopping (send it again to exit at once)", why)
        self.notifier.stopping()
        self.server.stop_accepting()
        deadline = time.monotonic() + self.config.shutdown_timeout
        self.hub.stop()
        if not self.sinks.stop(self.config.shutdown_timeout):
            log.warning("a sink did not finish its write within shutdown_timeout; it is re-appended after restart")
        drained = False
        while time.monotonic() < deadline:
            if self.server.drain(0.1):
                drained = True
                break
            if self._second_signal():
                return self._exit_now()
        if self._second_signal():
            return self._exit_now()
        if not drained:
            log.warning("in-flight requests did not finish within shutdown_timeout=%gs", self.config.shutdown_timeout)
            self.server.drain(0)
        log.info("stopped")
        return 0

    def _second_signal(self) -> bool:
        try:
            while True:
                if self.sigq.get_nowait() in (signal.SIGTERM, signal.SIGINT):
                    return True
        except stdqueue.Empty:
            return False

    def _exit_now(self) -> int:
        log.warning("second stop signal: exiting now without draining (the store stays consistent)")
        return 1

    def _cleanup(self):
        if self.sock is not None and self.server is None:
            self.sock.close()
        if self.sinks is not None:  # before the stores close: a sink may be acking
            self.sinks.stop(2.0)
            self.sinks = None
        for s in self.stores:
            try:
                s.close()
            except Exception as e:
                log.error("closing the store failed: %s", e)
        self.stores = []
        if self.socket_path:
            try:
                os.unlink(self.socket_path)  # we bound it ourselves: nothing else unlinks it
            except FileNotFoundError:
                pass
            self.socket_path = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # releases the flock; the file stays (see acquire_lock)
            self.lock_fd = None
        if self.logs is not None:
            for h in list(self.logs.logger.handlers):
                h.flush()


def _dir_fix(directory, mode, gid) -> str:
    """How to fix what ensure_private_dir refused, for the Error: line."""
    try:
        st = os.lstat(directory)
    except OSError:
        return "check the directory, or set address to a socket path in a directory you own"
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
        return ("remove it (it may be another user's trap), or set address to a socket path in a "
                "directory you own")
    return f"run 'chmod {mode:o} {directory}'" + ("" if gid is not None else " (or set socket_group for shared use)")


def main(config, reload_overrides=None) -> int:
    try:
        return Daemon(config, reload_overrides=reload_overrides).run()
    except errors.IpcdError as e:
        print(f"Error: {e}", file=sys.stderr)
        return int(e.exit_code)
