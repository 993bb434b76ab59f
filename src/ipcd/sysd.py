"""systemd's notify protocol (sd_notify(3)), reimplemented: ~20 lines, no dependency.

Without ``$NOTIFY_SOCKET`` every call is a no-op, so ``ipcd start`` behaves
the same in a terminal, under cron wrappers and in tests.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, env=None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        # Only paths and abstract names; newer systemd may pass e.g. vsock:...
        if addr[:1] == "@":
            self.address = "\0" + addr[1:]
        elif addr[:1] == "/":
            self.address = addr
        else:
            self.address = None
        usec = env.get("WATCHDOG_USEC", "")
        wpid = env.get("WATCHDOG_PID", "")
        ok = usec.isdigit() and int(usec) > 0 and (not wpid or wpid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if ok else None  # ping at half the timeout

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send KEY=VALUE fields in one datagram; never raises (a failed notify is not fatal)."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall("\n".join(fields).encode("utf-8"))
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")
