"""sd_notify over an AF_UNIX datagram socket, standard library only.

Does nothing when $NOTIFY_SOCKET is unset (not started by systemd). Send
errors are returned, never raised: a notify failure must not stop the daemon.
The socket is non-blocking: when the manager does not read (the kernel keeps
only net.unix.max_dgram_qlen datagrams), a message is dropped and counted,
and the loop goes on — a blocked sendto() would stop cycles, the watchdog
and shutdown alike.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Talks to the service manager named by $NOTIFY_SOCKET (if any)."""

    def __init__(self, address: str | None = None) -> None:
        raw = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + raw[1:] if raw.startswith("@") else raw
        self._sock: socket.socket | None = None
        self.dropped = 0  # messages not sent because the manager's queue was full

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> str | None:
        """Send KEY=VALUE lines as one datagram; returns an error text or None."""
        if not self.address:
            return None
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto("\n".join(lines).encode("utf-8"), self.address)
        except BlockingIOError:
            self.dropped += 1
            return f"sd_notify to {self.address!r}: the queue is full; message dropped"
        except OSError as exc:
            return f"sd_notify to {self.address!r} failed: {exc}"
        return None

    def ready(self, status: str | None = None) -> str | None:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> str | None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def status(self, text: str) -> str | None:
        return self.send(f"STATUS={' '.join(text.split())}")

    def watchdog(self) -> str | None:
        return self.send("WATCHDOG=1")

    def stopping(self) -> str | None:
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half of $WATCHDOG_USEC in seconds, when the watchdog is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None
