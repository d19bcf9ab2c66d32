"""Flow control and the request book, without sockets: credits bound what is in flight, links keep order,
and every accepted request is answered exactly once."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch
import zmq

from partita.errors import RequestError
from partita.runtime.emulation import LinkShaper
from partita.runtime.flow import RETRY_S, Outlink, readable, recv_frames, send_frames, socket_sender
from partita.runtime.ledger import Accepted, Delivered, Dispatched, Failed, Ledger, Replayed


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def outlink(window: int, shaper=None, clock=None) -> tuple[Outlink, list]:
    sent: list = []
    return Outlink("next", sent.append, window, shaper, clock or FakeClock()), sent


def test_a_message_the_socket_cannot_take_is_kept_in_order_and_offered_again():
    """A send that would block (no pipe to the peer) returns False: the Outlink keeps it rather than lose it."""
    sent: list = []
    accept = [False]

    def send(frames):
        if not accept[0]:
            return False
        sent.append(frames)
        return True

    link = Outlink("next", send, 4, None, FakeClock())
    for i in range(3):
        link.put(lambda i=i: [bytes([i])])
    assert link.pump() == RETRY_S
    assert sent == [] and link.queued == 3 and link.stats.refused_sends == 1
    accept[0] = True
    assert link.pump() is None
    assert [f[0] for f in sent] == [b"\x00", b"\x01", b"\x02"]
    assert link.stats.messages == 3 and link.queued == 0


def test_offer_sends_as_put_then_pump_would_and_keeps_what_the_socket_refuses():
    """`offer` is put + pump: the same frames in the same order, the same credits and figures, a refusal kept."""
    accept = [True]
    by_offer: list = []

    def send(frames):
        if not accept[0]:
            return False
        by_offer.append(frames)
        return True

    offered = Outlink("next", send, 2, None, FakeClock())
    pumped, by_pump = outlink(window=2)
    for i in range(3):  # the third waits for a credit, in both
        assert offered.offer(lambda i=i: [bytes([i])]) is None
        pumped.put(lambda i=i: [bytes([i])])
        pumped.pump()
    assert by_offer == by_pump and [f[0] for f in by_offer] == [b"\x00", b"\x01"]
    assert offered.credits == pumped.credits == 0 and offered.queued == pumped.queued == 1
    assert offered.stats.to_dict() == pumped.stats.to_dict()
    offered.grant(2)
    offered.pump()
    accept[0] = False
    assert offered.offer(lambda: [b"\x03"]) == RETRY_S  # the socket cannot take it now: kept, not lost
    assert offered.queued == 1 and offered.stats.refused_sends == 1
    accept[0] = True
    assert offered.pump() is None
    assert [f[0] for f in by_offer] == [b"\x00", b"\x01", b"\x02", b"\x03"] and offered.queued == 0


def test_a_sender_never_has_more_messages_out_than_its_credits():
    link, sent = outlink(window=2)
    for i in range(5):
        link.put(lambda i=i: [bytes([i])])
    link.pump()
    assert [f[0] for f in sent] == [b"\x00", b"\x01"]
    link.grant(1)
    link.pump()
    assert len(sent) == 3 and link.queued == 2


def test_credits_never_exceed_the_window():
    link, _ = outlink(window=3)
    link.grant(10)
    assert link.credits == 3


def test_an_emulated_link_holds_messages_for_latency_plus_serialisation_in_order():
    clock = FakeClock()
    shaper = LinkShaper(1000.0, 0.5, clock=clock)  # 1000 bytes/s, 0.5 s latency
    link, sent = outlink(window=8, shaper=shaper, clock=clock)
    link.put(lambda: [bytes(100)])  # leaves at 0.1 + 0.5
    link.put(lambda: [bytes(100)])  # behind it: 0.2 + 0.5
    assert link.pump(0.0) == pytest.approx(0.6)
    clock.now = 0.65
    link.pump(0.65)
    assert len(sent) == 1
    clock.now = 0.7
    link.pump(0.7)
    assert len(sent) == 2


def test_the_frames_are_built_when_the_message_gets_its_credit():
    link, _ = outlink(window=1)
    built: list[int] = []
    link.put(lambda: built.append(1) or [b"a"])
    link.put(lambda: built.append(2) or [b"b"])
    link.pump()
    assert built == [1]


def _accept(ledger: Ledger, request: int) -> Future:
    future: Future = Future()
    ledger.apply(Accepted(request, (torch.zeros(1),), future, 0.0))
    return future


def test_a_request_is_delivered_once_and_a_late_duplicate_is_dropped():
    ledger = Ledger()
    future = _accept(ledger, 0)
    ledger.apply(Dispatched(0, epoch=1, at=1.0))
    ledger.apply(Delivered(0, 1, (torch.ones(1),), 2.0))
    ledger.apply(Delivered(0, 1, (torch.full((1,), 9.0),), 2.5))
    assert torch.equal(future.result()[0], torch.ones(1))
    assert ledger.delivered == 1 and ledger.duplicates == 1 and not ledger.pending
    assert ledger.latencies_s == [1.0]


def test_an_answer_from_an_older_epoch_is_stale_after_a_replay():
    ledger = Ledger()
    future = _accept(ledger, 0)
    ledger.apply(Dispatched(0, epoch=1, at=0.0))
    ledger.apply(Replayed(epoch=2, at=1.0))
    assert [r.request for r in ledger.undispatched()] == [0]
    ledger.apply(Dispatched(0, epoch=2, at=1.0))
    ledger.apply(Delivered(0, 1, (torch.zeros(1),), 1.5))
    assert not future.done() and ledger.stale == 1
    ledger.apply(Delivered(0, 2, (torch.ones(1),), 2.0))
    assert torch.equal(future.result()[0], torch.ones(1))


def test_a_failed_request_raises_a_request_error_naming_the_cause():
    ledger = Ledger()
    future = _accept(ledger, 3)
    ledger.apply(Dispatched(3, epoch=1, at=0.0))
    ledger.apply(Failed(3, 1, "stage 1 failed: boom", 0.5))
    with pytest.raises(RequestError, match="request 3 failed: stage 1 failed: boom"):
        future.result()


def test_the_ledger_counts_how_many_requests_were_in_flight_at_once():
    ledger = Ledger()
    for r in range(4):
        _accept(ledger, r)
        ledger.apply(Dispatched(r, epoch=1, at=0.0))
    ledger.apply(Delivered(0, 1, (), 1.0))
    assert ledger.max_in_flight == 4 and ledger.in_flight == 3


def test_link_times_count_a_message_from_when_the_link_took_it_not_its_wait_in_the_queue():
    from partita.runtime.flow import LinkTimes

    times = LinkTimes()
    for k in range(4):  # four messages enter a 10 ms-per-message link at once: they leave one after another
        times.record("a", sent_at=0.0, now=0.010 * (k + 1))
    assert times.get("a") == {"messages": 4, "mean_transfer_s": pytest.approx(0.010)}
    times.record("b", sent_at=1.0, now=1.011)  # an idle link: latency + occupancy
    times.record("b", sent_at=2.0, now=2.011)
    assert times.figures()["b"]["mean_transfer_s"] == pytest.approx(0.011)
    times.reset()
    assert times.get("a") is None and times.figures() == {}


def test_peer_names_are_the_device_part_of_a_socket_identity():
    from partita.runtime.flow import PeerNames

    name = PeerNames()
    assert name(b"pi-a/3") == "pi-a" and name(b"pi-a/4") == "pi-a" and name(b"client") == "client"
    assert name(b"\xffbad/1") == "\ufffdbad"  # a malformed identity still names something, never raises


def test_send_frames_and_recv_frames_carry_a_multipart_message_whole_and_refuse_without_blocking():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://frames")
        b.connect("inproc://frames")
        assert not readable(a)
        payload = torch.arange(6, dtype=torch.float32)
        send_frames(b, [b"head", memoryview(payload.numpy()).cast("B"), b""])
        assert readable(a)
        got = recv_frames(a)
        assert [f.bytes for f in got] == [b"head", payload.numpy().tobytes(), b""]
        assert not readable(a)
        send_frames(a, got)  # received frames go out again as they are
        assert [f.bytes for f in recv_frames(b)] == [b"head", payload.numpy().tobytes(), b""]
        alone = ctx.socket(zmq.DEALER)  # no peer: a non-blocking send cannot be queued
        try:
            assert socket_sender(alone)([b"x", b"y"]) is False
            with pytest.raises(zmq.Again):
                send_frames(alone, [b"x"], zmq.NOBLOCK)
        finally:
            alone.close(linger=0)
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()
