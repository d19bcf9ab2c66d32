"""Credit-based flow control and link emulation for one sender-to-receiver hop.

A hop is one directed pair (sender, receiver) of the data plane: the coordinator to a first
stage, a stage to the next, or a last stage back to the coordinator. Two rules keep every queue
bounded and every link honest:

* **Credits.** A sender starts with `window` credits per receiver and spends one per message.
  The receiver returns one credit when it takes the message off its inbound queue to compute.
  So at most `window` messages are queued at (or travelling to) a receiver per sender, and a
  slow stage pushes back on its upstream instead of growing its queue without bound.
* **The emulated link.** Once a message has a credit it enters the link: a token bucket at the
  sender (bandwidth) plus a fixed delay (latency) decide when it may leave. Several messages can
  be in the link at once, as on a real network: latency overlaps, bandwidth serialises.
* **Credits come back in batches.** A receiver that ran a message at once may owe its sender a
  few credits and return them in one message (`credits_at_once`): each credit message wakes the
  sender, and on a loaded host a wake-up costs more than the message.

`Outlink` holds this logic without sockets: it is given a `send(frames)` callable, and the owner's
event loop calls `pump(now)` and sleeps until the returned due time. One thread owns an Outlink.

A send must never block the owner's event loop. A ZeroMQ DEALER whose only peer refused the
handshake (a wrong CURVE key, a plain socket) has no pipe left, and a blocking send on it waits
forever; so `send` returns False when the socket cannot take the message now
(`socket_sender` wraps a socket that way), and the Outlink keeps it and tries again shortly.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

#: Seconds between attempts to hand a message to a socket that could not take it.
RETRY_S = 0.05


class Shaper(Protocol):
    """What an Outlink needs from a link emulator (partita.runtime.emulation.LinkShaper)."""

    def delay_for(self, nbytes: int) -> float: ...


@dataclass
class LinkStats:
    """What one hop carried, in the sender's real seconds (divide by the dilation for device time).

    `occupancy_s` sums how long each message held the emulated link (its departure delay minus the
    part spent waiting behind earlier messages is not separable, so this is the delay the shaper
    imposed: serialisation plus latency); `credit_wait_s` sums how long messages waited for a credit.
    """

    messages: int = 0
    bytes: int = 0
    delay_s: float = 0.0
    credit_wait_s: float = 0.0
    refused_sends: int = 0
    first_sent_at: float | None = None
    last_sent_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "bytes": self.bytes,
            "delay_s": self.delay_s,
            "credit_wait_s": self.credit_wait_s,
            "refused_sends": self.refused_sends,
        }

    def count_sent(self, nbytes: int, now: float) -> None:
        """One message of `nbytes` handed to the socket at `now`."""
        self.messages += 1
        self.bytes += nbytes
        if self.first_sent_at is None:
            self.first_sent_at = now
        self.last_sent_at = now


@dataclass
class _Parcel:
    build: Callable[[], Sequence[Any]]
    queued_at: float
    frames: Sequence[Any] = ()
    nbytes: int = 0
    due_at: float = 0.0


def socket_sender(sock: zmq.Socket) -> Callable[[Sequence[Any]], bool]:
    """A `send` for an Outlink: hand the frames to `sock` without blocking; False if it cannot take them now."""

    def send(frames: Sequence[Any]) -> bool:
        try:
            send_frames(sock, frames, _NOBLOCK)
        except zmq.Again:
            return False
        return True

    return send


# pyzmq's constants are enums: an operation on one builds a new enum member, which costs more than
# the socket call it qualifies. Every message pays for these, so they are plain ints here.
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)


def send_frames(sock: zmq.Socket, frames: Sequence[Any], flags: int = 0) -> None:
    """`sock.send_multipart(frames, flags, copy=False)`, for about half its cost.

    pyzmq's `send_multipart` checks every frame's type in Python and combines enum flags per frame;
    the frames here come from `wire.encode` (bytes, memoryviews) or a receive (zmq.Frame). zmq
    queues a multipart message whole or not at all, so `zmq.Again` can only come from the first frame.
    """
    last = len(frames) - 1
    send = sock.send
    for i, frame in enumerate(frames):
        send(frame, flags | _SNDMORE if i < last else flags, copy=False)


def recv_frames(sock: zmq.Socket) -> list[zmq.Frame]:
    """`sock.recv_multipart(copy=False)`, for less: each frame says whether more follow (no option call per frame)."""
    frame = sock.recv(copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(copy=False)
        frames.append(frame)
    return frames


def readable(sock: zmq.Socket) -> bool:
    """Whether `sock` has a message to receive now, without blocking.

    The same answer as `sock.poll(0)`, for less: that builds a Poller on every call, and an event
    loop asks once per message and once more to find its socket empty.
    """
    return bool(sock.get(_EVENTS) & _POLLIN)  # type: ignore[operator]  # EVENTS is an int option


def frames_nbytes(frames: Sequence[Any]) -> int:
    """Total payload bytes of a multipart message (bytes, memoryviews or zmq.Frame)."""
    return sum(memoryview(f).nbytes for f in frames)


@dataclass
class Outlink:
    """One destination: a credit-gated FIFO, then the emulated link, then `send`.

    `window` is the number of credits the sender starts with (both ends agree on it at deploy
    time). `shaper` is None for an unshaped (real) link. `send` is called from the thread that
    calls `pump`, in FIFO order; it returns False when the message could not be handed over now
    (it is kept, in order, and offered again after `RETRY_S`).
    """

    name: str
    send: Callable[[Sequence[Any]], bool | None]
    window: int
    shaper: Shaper | None = None
    clock: Callable[[], float] = time.monotonic
    stats: LinkStats = field(default_factory=LinkStats)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be at least 1 credit, got {self.window}")
        self._credits = self.window
        self._waiting: deque[_Parcel] = deque()
        self._in_link: deque[_Parcel] = deque()

    @property
    def credits(self) -> int:
        return self._credits

    @property
    def queued(self) -> int:
        """Messages not yet handed to the socket (waiting for a credit or in the emulated link)."""
        return len(self._waiting) + len(self._in_link)

    def put(self, build: Callable[[], Sequence[Any]]) -> None:
        """Queue one message for this destination.

        `build()` makes its frames; it is called when the message gets a credit and enters the
        link, so a timestamp it writes marks that moment and a codec runs only on what is sent.
        """
        self._waiting.append(_Parcel(build, self.clock()))

    def offer(self, build: Callable[[], Sequence[Any]]) -> float | None:
        """Queue one message and move the queue along at once: `put(build)` then `pump()`, returning what pump does.

        The common case, an unshaped link with a credit free and nothing queued ahead, sends the
        message straight away without queueing it: the same outcome and figures as put then pump,
        for less work on every hop.
        """
        if self._waiting or self._in_link or self._credits <= 0 or self.shaper is not None:
            self.put(build)
            return self.pump()
        frames = build()
        if self.send(frames) is False:  # kept, in order, and offered again by pump after RETRY_S
            self.stats.refused_sends += 1
            now = self.clock()
            self._credits -= 1
            self._in_link.append(_Parcel(build, now, frames, frames_nbytes(frames), now))
            return RETRY_S
        self._credits -= 1
        self.stats.count_sent(frames_nbytes(frames), self.clock())
        return None

    def grant(self, n: int) -> None:
        """The receiver returned `n` credits."""
        self._credits = min(self._credits + n, self.window)

    def reset(self) -> None:
        """Forget queued messages and start again with a full window (a new deployment epoch)."""
        self._waiting.clear()
        self._in_link.clear()
        self._credits = self.window

    def pump(self, now: float | None = None) -> float | None:
        """Move messages along; return seconds until the next one is due, or None if none is.

        A message with a credit enters the link (the shaper says when it may leave); a message
        whose departure time has come is sent. Credits that are missing return None for that
        message: a `grant` will wake the owner.
        """
        now = self.clock() if now is None else now
        while self._waiting and self._credits > 0:
            parcel = self._waiting.popleft()
            self._credits -= 1
            self.stats.credit_wait_s += now - parcel.queued_at
            parcel.frames = parcel.build()
            parcel.nbytes = frames_nbytes(parcel.frames)
            delay_s = self.shaper.delay_for(parcel.nbytes) if self.shaper is not None else 0.0
            self.stats.delay_s += delay_s
            parcel.due_at = now + delay_s
            self._in_link.append(parcel)
        while self._in_link and self._in_link[0].due_at <= now:
            parcel = self._in_link[0]
            if self.send(parcel.frames) is False:
                self.stats.refused_sends += 1
                return RETRY_S
            self._in_link.popleft()
            self.stats.count_sent(parcel.nbytes, now)
        if self._in_link:
            return max(0.0, self._in_link[0].due_at - now)
        return None


def credits_at_once(window: int) -> int:
    """How many credits a receiver may owe a sender before it returns them, in one message.

    Half the window: a sender that holds `window` credits is never stopped by it (while all its
    credits are out, at least half of those messages have been taken, or will be), and a request
    alone, or a stream, costs half the credit messages, each of which wakes the sender.
    """
    return max(1, window // 2)


def next_wakeup(delays: Sequence[float | None], default_s: float) -> float:
    """The poll timeout for an event loop: the soonest due delay, else `default_s` (seconds)."""
    due = [d for d in delays if d is not None]
    return min(due) if due else default_s


class PeerNames:
    """The device name in a peer's socket identity (`name/epoch`), decoded once per identity.

    Receivers name each message's sender (for `LinkTimes`, and to find a tile's index) on every
    message; the identities are few, so each is decoded once.
    """

    def __init__(self) -> None:
        self._names: dict[bytes, str] = {}

    def __call__(self, identity: bytes) -> str:
        name = self._names.get(identity)
        if name is None:
            name = self._names[identity] = identity.decode(errors="replace").split("/")[0]
        return name


class LinkTimes:
    """What a receiver measures of each sender's hop: messages, and the seconds the link spent on each.

    A message stamped `sent_at` (the sender's wall clock when it entered the link) that arrives
    at `now` occupied the link from `max(sent_at, previous arrival from that sender)` to `now`:
    the time it waited behind the sender's earlier messages (in the token bucket or the kernel's
    queue) is theirs, not its own. So the mean is latency + bytes / bandwidth on an idle link and
    bytes / bandwidth on a busy one, whatever the queue; read as the mean of per-message figures
    over an interval, the waits cancel out instead of piling up (a queue of four messages would
    otherwise read as a link four times slower). A clock step that makes a figure negative counts 0.
    """

    def __init__(self) -> None:
        self._links: dict[str, list[float]] = {}  # sender -> [messages, sum of seconds, last arrival]

    def record(self, sender: str, sent_at: float, now: float) -> None:
        link = self._links.setdefault(sender, [0, 0.0, float("-inf")])
        link[0] += 1
        link[1] += max(0.0, now - max(sent_at, link[2]))
        link[2] = now

    def reset(self) -> None:
        self._links = {}

    def get(self, sender: str) -> dict[str, Any] | None:
        link = self._links.get(sender)
        return None if link is None else {"messages": int(link[0]), "mean_transfer_s": link[1] / max(link[0], 1)}

    def figures(self) -> dict[str, dict[str, Any]]:
        """{sender: {"messages", "mean_transfer_s"}}, as `stats` reports `links_in`."""
        return {sender: {"messages": int(n), "mean_transfer_s": total / max(n, 1)}
                for sender, (n, total, _) in self._links.items()}
