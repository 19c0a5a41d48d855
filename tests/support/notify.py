"""A datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import socket
import threading
import time

from tests.support.wait import wait_for


class NotifySocket:
    """A datagram socket standing in for systemd; a thread collects what arrives."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []  # (time.time() on arrival, datagram)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.messages.append((time.time(), data.decode("utf-8")))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def mark(self) -> int:
        return len(self.messages)

    def texts(self, after: int = 0) -> list[str]:
        return [text for _, text in self.messages[after:]]

    def kinds(self, after: int = 0) -> list[str]:
        """The first key of each datagram: READY, STATUS, RELOADING, WATCHDOG, STOPPING."""
        return [text.split("=", 1)[0] for text in self.texts(after)]

    def arrivals(self, kind: str, after: int = 0) -> list[float]:
        return [at for at, text in self.messages[after:] if text.startswith(f"{kind}=")]

    def wait(self, kind: str, *, after: int = 0, timeout: float = 10.0) -> tuple[float, str]:
        """The first datagram starting with `KIND=` after *after*."""
        found = wait_for(
            lambda: [(at, t) for at, t in self.messages[after:] if t.startswith(f"{kind}=")],
            timeout=timeout,
            what=f"{kind}= (got {self.texts(after)})",
        )
        return found[0]
