"""How a `PostgresStore`'s owners hear of interrupt requests without polling the server: one thread per store
`LISTEN`s on its own connection, and each owned run's requests are read again only when a notification names
the run (a request, a claim by another owner, a delete), after every (re)`LISTEN` (a notification sent while
not listening is lost, so every run is read again: the catch-up), or when a renewal finds a request the last
read did not (the fallback while notifications do not arrive).
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from ._postgres_leases import Requests
from ._postgres_runs import CHANNEL

__all__ = ["Listener", "Notices"]

Key = tuple[str, str]


class Notices:
    """What the owners of one store know of their runs' requests: each run's last read (with the generation
    it was read in), the runs named by notifications since, and the generation, +1 whenever every run must
    be read again. Shared by the listener thread and the event loops, under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._changed: set[Key] = set()
        self._reads: dict[Key, tuple[int, Requests]] = {}

    def cached(self, key: Key) -> Requests | None:
        """The run's last read, if nothing changed since; else None (read it again)."""
        with self._lock:
            read = self._reads.get(key)
            if read is None or read[0] != self._generation or key in self._changed:
                return None
            return read[1]

    def reading(self, key: Key) -> int:
        """Before a read of the run: its mark cleared (a notification during the read marks it again), and the
        generation to keep the read with."""
        with self._lock:
            self._changed.discard(key)
            return self._generation

    def keep(self, key: Key, generation: int, requests: Requests) -> None:
        with self._lock:
            self._reads[key] = (generation, requests)

    def last_request(self, key: Key) -> int:
        """The number of the run's last request in its last read (0: none, or never read)."""
        with self._lock:
            read = self._reads.get(key)
            return read[1][2][-1][0] if read is not None and read[1][2] else 0

    def changed(self, key: Key | None) -> None:
        """The run `key` (None: every run) must be read again."""
        with self._lock:
            if key is None:
                self._generation += 1
                self._reads.clear()
            else:
                self._changed.add(key)
                self._reads.pop(key, None)


class Listener:
    """The store's `LISTEN` thread: started with the store's first claim, stopped by `stop()`. It reconnects
    (backing off up to 2 s) whenever its connection fails; TCP keepalives (the store's connection options)
    make a half-open connection fail instead of hanging. It waits on the connection's socket and on a socket
    pair of its own, so that `stop()` wakes it at once."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], schema: str, notices: Notices) -> None:
        self._connect = connect
        self._schema = schema
        self._notices = notices
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None  # the wake-up pair, made by start()
        self._wake_w: socket.socket | None = None
        self.listening = threading.Event()
        """Set while LISTEN is in effect (for tests and the store's tools)."""

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._wake_r, self._wake_w = socket.socketpair()
                self._thread = threading.Thread(target=self._run, name=f"stoppoint-listen-{self._schema}", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Stop listening; returns within about half a second (the thread's wait for notifications)."""
        self._stop.set()
        with self._lock:
            thread, wake_r, wake_w = self._thread, self._wake_r, self._wake_w
            self._wake_r = self._wake_w = None
        if thread is None or wake_r is None or wake_w is None:
            return
        with contextlib.suppress(OSError):
            wake_w.send(b"x")
        thread.join(timeout=5)
        wake_r.close()
        wake_w.close()

    def _run(self) -> None:
        wake = self._wake_r
        assert wake is not None
        backoff = 0.05
        while not self._stop.is_set():
            try:
                connection = self._connect()
            except psycopg.Error:
                self._wait(wake, backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            try:
                with connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    self._notices.changed(None)  # the catch-up: what was sent before LISTEN is read again
                    self.listening.set()
                    while not self._stop.is_set():
                        # What arrived (or was read along with an earlier reply), without waiting; then wait
                        # for more on the socket, or for stop().
                        for notification in connection.notifies(timeout=0):
                            self._heard(notification.payload)
                        self._wait(wake, None, connection.fileno())
            except psycopg.Error:
                pass
            finally:
                self.listening.clear()
                self._notices.changed(None)

    def _wait(self, wake: socket.socket, timeout: float | None, fileno: int | None = None) -> None:
        """Until `fileno` is readable, stop() is called (`wake` is readable), or `timeout` seconds pass."""
        sockets: list[socket.socket | int] = [wake] if fileno is None else [wake, fileno]
        try:
            select.select(sockets, [], [], timeout)
        except (OSError, ValueError):  # (the wake-up pair closed: stopping)
            self._stop.set()

    def _heard(self, text: str) -> None:
        try:
            names = json.loads(text)
        except ValueError:
            return  # not one of ours
        if not isinstance(names, list) or not names or names[0] != self._schema:
            return
        if len(names) == 3 and all(isinstance(name, str) for name in names):
            self._notices.changed((names[1], names[2]))
        else:
            self._notices.changed(None)
