"""Failure detection: which workers stopped answering, and which came back.

A `Heartbeat` thread pings every watched worker's control socket every `interval_s` and reads the
`pong`s. Two signals mark a worker failed:

* **missed heartbeats** — no reply to any ping for `detection_s` seconds (a hung process, a
  machine that vanished without closing its connections, a cut network);
* **broken sends** — the ping socket connects only to live peers (`ZMQ_IMMEDIATE`), so a send
  that finds no connection fails at once. When the worker's process dies its kernel closes the
  TCP connection; after sends have been failing for `confirm_s` (half the detection time), the
  worker is failed without waiting for the full detection time. Until a worker has answered
  once, only the missed-heartbeat rule applies (its first handshake may be slow).

A worker answers pings from the same thread that runs control commands, so a long command (a
stage `load` with its warm-up) silences it. While the coordinator has such a call in progress
(`with heartbeat.busy(name):`) only the broken-send rule applies, and a call that returns counts
as a heartbeat.

A failed worker is still pinged: when it answers again (it restarted at the same address with the
same keys) it is reported as recovered. The thread owns its sockets (its own zmq context) and
only hands out names through `take_failed` / `take_recovered`, so any thread may read them.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import zmq

from partita.errors import WireError, WorkerError
from partita.runtime.handle import Keypair, WorkerEndpoint
from partita.runtime.keys import apply_client
from partita.runtime.wire import Limits, decode, encode

REPLY_KINDS = frozenset({"pong", "error"})


@dataclass(frozen=True)
class Failure:
    """A worker found failed: `device`, when (time.monotonic() seconds) and which signal said so."""

    device: str
    at: float
    reason: str


@dataclass
class _Watched:
    endpoint: WorkerEndpoint
    socket: zmq.Socket
    since: float
    last_seen: float | None = None  # None: has not answered since it was watched
    broken_since: float | None = None
    next_ping: float = 0.0
    failed: bool = False


class Heartbeat:
    """Pings workers and reports failures within `detection_s` seconds (see the module docstring).

    `interval_s` None pings four times per detection time. Start with `start()`, stop with `stop()`.
    """

    def __init__(self, endpoints: Mapping[str, WorkerEndpoint], keys: Keypair | None, *, detection_s: float,
                 interval_s: float | None = None) -> None:
        if not detection_s > 0:
            raise WorkerError(f"the failure detection time must be > 0 seconds, got {detection_s!r}")
        self.detection_s = float(detection_s)
        self.interval_s = float(interval_s) if interval_s else self.detection_s / 4
        self.confirm_s = self.detection_s / 2
        self._keys = keys
        self._commands: queue.Queue[tuple[str, str, WorkerEndpoint | None]] = queue.Queue()
        self._failed: queue.Queue[Failure] = queue.Queue()
        self._recovered: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._busy: dict[str, int] = {}
        self._proven: dict[str, float] = {}
        for name, endpoint in endpoints.items():
            self.watch(name, endpoint)
        self._thread = threading.Thread(target=self._run, name="partita-heartbeat", daemon=True)

    # -- any thread ---------------------------------------------------------------------------
    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def watch(self, name: str, endpoint: WorkerEndpoint) -> None:
        """Start (or restart, at a new endpoint) watching worker `name`."""
        self._commands.put(("watch", name, endpoint))

    def unwatch(self, name: str) -> None:
        self._commands.put(("unwatch", name, None))

    @contextmanager
    def busy(self, name: str) -> Iterator[None]:
        """A control call to `name` is in progress: do not count its silence; its return proves it alive."""
        with self._lock:
            self._busy[name] = self._busy.get(name, 0) + 1
        ok = False
        try:
            yield
            ok = True
        finally:
            with self._lock:
                self._busy[name] -= 1
                if ok:
                    self._proven[name] = time.monotonic()

    def take_failed(self) -> list[Failure]:
        """Workers found failed since the last call (each failure is reported once)."""
        return _drain(self._failed)

    def take_recovered(self) -> list[str]:
        """Workers reported failed earlier that answer again, since the last call."""
        return _drain(self._recovered)

    # -- the heartbeat thread -----------------------------------------------------------------
    def _run(self) -> None:
        context = zmq.Context()
        watched: dict[str, _Watched] = {}
        try:
            while not self._stop.is_set():
                self._apply_commands(context, watched)
                now = time.monotonic()
                for name, w in watched.items():
                    if now >= w.next_ping:
                        self._ping(w, now)
                    self._judge(name, w, now)
                poller = zmq.Poller()
                for w in watched.values():
                    poller.register(w.socket, zmq.POLLIN)
                ready = dict(poller.poll(math.ceil(self.interval_s / 2 * 1000))) if watched else {}
                if not watched:
                    self._stop.wait(self.interval_s / 2)
                now = time.monotonic()
                for name, w in watched.items():
                    if w.socket in ready:
                        self._on_reply(name, w, now)
        finally:
            for w in watched.values():
                w.socket.close(linger=0)
            context.term()

    def _apply_commands(self, context: zmq.Context, watched: dict[str, _Watched]) -> None:
        for what, name, endpoint in _drain(self._commands):
            old = watched.pop(name, None)
            if old is not None:
                old.socket.close(linger=0)
            if what == "watch" and endpoint is not None:
                watched[name] = _Watched(endpoint, self._socket(context, endpoint), time.monotonic())

    def _socket(self, context: zmq.Context, endpoint: WorkerEndpoint) -> zmq.Socket:
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        sock.immediate = 1  # queue only on a live connection: a send to a dead peer fails at once
        sock.sndhwm = 4
        keys = self._keys
        plain = keys is None or endpoint.public_key is None
        secret = None if keys is None or plain else (keys.public, keys.secret)
        apply_client(sock, secret, None if plain else endpoint.public_key, insecure=plain)
        sock.connect(endpoint.control)
        return sock

    def _ping(self, w: _Watched, now: float) -> None:
        w.next_ping = now + self.interval_s
        try:
            w.socket.send_multipart(encode("ping", {"id": next(self._ids)}), flags=zmq.NOBLOCK)
            w.broken_since = None
        except zmq.Again:
            # No live connection to send on: the broken-send signal (judged in _judge).
            if w.broken_since is None:
                w.broken_since = now

    def _judge(self, name: str, w: _Watched, now: float) -> None:
        if w.failed:
            return
        with self._lock:
            busy = self._busy.get(name, 0) > 0
            proven = self._proven.pop(name, None)
        if proven is not None and proven > w.since:
            w.last_seen = max(w.last_seen or proven, proven)
        silent_s = now - (w.last_seen if w.last_seen is not None else w.since)
        if silent_s > self.detection_s and not busy:
            reason = f"no heartbeat for {silent_s:.2f} s"
        elif w.last_seen is not None and w.broken_since is not None and now - w.broken_since > self.confirm_s:
            reason = f"connection lost (sends refused for {now - w.broken_since:.2f} s)"
        else:
            return
        w.failed = True
        self._failed.put(Failure(name, now, reason))

    def _on_reply(self, name: str, w: _Watched, now: float) -> None:
        while w.socket.poll(0):
            frames = w.socket.recv_multipart(copy=False)
            try:
                decode(frames, limits=Limits(), kinds=REPLY_KINDS)
            except WireError:
                continue  # not a reply we understand: it proves nothing about liveness
            w.last_seen = now
            w.broken_since = None
            if w.failed:
                w.failed = False
                self._recovered.put(name)


def _drain(q: queue.Queue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
