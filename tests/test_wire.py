"""The wire format: round trips, zero-copy, and every validation rule of decode."""

from __future__ import annotations

import pickle

import msgpack
import pytest
import torch
import zmq

from partita.errors import WireError
from partita.runtime import codec, wire
from partita.runtime.wire import Limits


def _frames_as_bytes(frames) -> list[bytes]:
    return [bytes(f) for f in frames]


def _header(frames) -> dict:
    return msgpack.unpackb(frames[0], raw=False)


def _with_header(frames, **changes) -> list[bytes]:
    head = {**_header(frames), **changes}
    return [msgpack.packb(head, use_bin_type=True), *frames[1:]]


def _with_meta(frames, index=0, **changes) -> list[bytes]:
    head = _header(frames)
    head["t"][index] = {**head["t"][index], **changes}
    return [msgpack.packb(head, use_bin_type=True), *frames[1:]]


@pytest.fixture
def frames() -> list[bytes]:
    return _frames_as_bytes(wire.encode("act", {"r": 7, "tag": "x"}, [torch.arange(12.0).reshape(3, 4)]))


def test_round_trip_keeps_kind_header_and_tensors():
    tensors = [torch.randn(2, 3), torch.arange(5), torch.tensor(True), torch.ones(0, 4, dtype=torch.bfloat16)]

    msg = wire.decode(
        _frames_as_bytes(wire.encode("act", {"r": 1, "nested": {"a": [1, 2.5, None]}}, tensors))
    )

    assert msg.kind == "act"
    assert msg.header == {"r": 1, "nested": {"a": [1, 2.5, None]}}
    assert len(msg.tensors) == len(tensors)
    for got, want in zip(msg.tensors, tensors, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_message_without_tensors_is_one_frame():
    frames = wire.encode("ping")

    assert len(frames) == 1
    assert wire.decode(frames) == wire.Message("ping", {}, ())


def test_contiguous_tensor_is_sent_zero_copy():
    t = torch.arange(1024, dtype=torch.float32)

    payload = wire.encode("act", None, [t])[1]

    assert isinstance(payload, memoryview)
    t[0] = 42.0
    assert torch.frombuffer(bytearray(payload), dtype=torch.float32)[0].item() == 42.0


def test_non_contiguous_and_grad_tensors_are_sent_as_their_values():
    base = torch.arange(20.0, requires_grad=True)
    view = base.reshape(4, 5)[:, 1::2]

    msg = wire.decode(_frames_as_bytes(wire.encode("act", None, [view])))

    assert torch.equal(msg.tensors[0], view.detach())


def test_bytes_frames_decode_zero_copy_and_bytearray_frames_are_copied():
    payload = wire.encode("act", None, [torch.arange(16, dtype=torch.int64)])
    head, data = bytes(payload[0]), bytearray(payload[1])

    from_bytearray = wire.decode([head, data]).tensors[0]
    data[:8] = bytes(8)

    assert from_bytearray[0].item() == 0 and from_bytearray[1].item() == 1
    stable = _bytes_aligned(bytes(payload[1]), True)
    from_bytes = wire.decode([head, stable]).tensors[0]
    assert from_bytes.untyped_storage().data_ptr() == torch.frombuffer(stable, dtype=torch.uint8).data_ptr()
    # Bytes that are less aligned than torch aligns its tensors are copied (see codec.ALIGNMENT).
    off = _bytes_aligned(bytes(payload[1]), False)
    from_off = wire.decode([head, off]).tensors[0]
    assert from_off.data_ptr() % codec.ALIGNMENT == 0 and torch.equal(from_off, torch.arange(16))


def test_decode_own_gives_tensors_that_own_their_memory_even_from_aligned_stable_frames():
    """`own=True` (how the coordinator decodes results for the user): a copy, never a view of the frame."""
    payload = wire.encode("act", None, [torch.arange(16, dtype=torch.int64)])
    head, stable = bytes(payload[0]), _bytes_aligned(bytes(payload[1]), True)
    frame_ptr = torch.frombuffer(stable, dtype=torch.uint8).data_ptr()

    viewed = wire.decode([head, stable]).tensors[0]
    owned = wire.decode([head, stable], own=True).tensors[0]

    assert viewed.untyped_storage().data_ptr() == frame_ptr  # without `own`, the same frame gives a view
    assert owned.untyped_storage().data_ptr() != frame_ptr
    assert owned.data_ptr() % codec.ALIGNMENT == 0 and torch.equal(owned, torch.arange(16))
    owned.add_(1)  # its own memory: the frame is untouched
    assert torch.equal(wire.decode([head, stable]).tensors[0], torch.arange(16))


def _bytes_aligned(data: bytes, aligned: bool) -> bytes:
    """A copy of `data` as a bytes object whose buffer is (or is not) 64-byte aligned (found by allocating)."""
    held = []
    for _ in range(1000):
        candidate = bytes(bytearray(data))
        if (torch.frombuffer(candidate, dtype=torch.uint8).data_ptr() % codec.ALIGNMENT == 0) == aligned:
            return candidate
        held.append(candidate)  # kept, so that the next copy lands elsewhere
    raise AssertionError("no bytes object with the wanted alignment in 1000 allocations")


@pytest.mark.slow
def test_round_trip_through_real_zmq_sockets_with_copy_false():
    ctx = zmq.Context()
    try:
        pull = ctx.socket(zmq.PULL)
        pull.linger = 0
        pull.bind("tcp://127.0.0.1:0")
        push = ctx.socket(zmq.PUSH)
        push.linger = 0
        push.connect(pull.getsockopt_string(zmq.LAST_ENDPOINT))
        big = torch.randn(300_000)

        push.send_multipart(wire.encode("act", {"r": 3}, [big, torch.arange(3)], codec="none"), copy=False)
        assert pull.poll(5000)
        msg = wire.decode(pull.recv_multipart(copy=False), kinds={"act"})

        assert msg.header == {"r": 3} and torch.equal(msg.tensors[0], big)
        assert torch.equal(msg.tensors[1], torch.arange(3))
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("codec", ["fp16", "int8", "lz4"])
def test_codec_applies_to_every_tensor_of_a_message(codec):
    t = torch.linspace(-1, 1, 256)

    frames = _frames_as_bytes(wire.encode("act", None, [t, t], codec=codec))

    assert [m["codec"] for m in _header(frames)["t"]] == [codec, codec]
    assert wire.decode(frames).tensors[0].shape == t.shape


def test_blob_helpers_round_trip_bytes():
    data = b"\x00archive bytes\xff" * 100

    msg = wire.decode(_frames_as_bytes(wire.encode("load", None, [wire.blob_tensor(data)])))

    assert wire.blob_bytes(msg.tensors[0]) == data
    assert wire.blob_bytes(wire.blob_tensor(b"")) == b""


def test_encode_refuses_headers_msgpack_cannot_hold():
    with pytest.raises(WireError, match="msgpack cannot encode"):
        wire.encode("act", {"obj": object()})
    with pytest.raises(WireError, match="kind"):
        wire.encode("", {})
    with pytest.raises(WireError, match="sequence of tensors"):
        wire.encode("act", None, torch.ones(2))


def test_kind_outside_the_allow_list_is_refused(frames):
    with pytest.raises(WireError, match="'act' is not accepted here"):
        wire.decode(frames, kinds={"load", "ping"})


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda f: [], "empty message"),
        (lambda f: f[:1], "describes 1 tensors but the message has 0"),
        (lambda f: [*f, b"extra"], "describes 1 tensors but the message has 2"),
        (lambda f: [b"\xc1", *f[1:]], "not valid msgpack"),
        (lambda f: [f[0][:-3], *f[1:]], "not valid msgpack"),
        (lambda f: [f[0] + b"\x00", *f[1:]], "not valid msgpack"),
        (lambda f: [msgpack.packb([1, 2]), *f[1:]], "must be a msgpack map"),
        (lambda f: _with_header(f, v=2), "wire version 2 is not supported"),
        (lambda f: _with_header(f, v=True), "wire version True"),
        (lambda f: _with_header(f, kind=7), "kind must be"),
        (lambda f: _with_header(f, kind="k" * 65), "kind must be"),
        (lambda f: _with_header(f, h=[1]), "'h' must be a map"),
        (lambda f: _with_header(f, t={}), "'t' must be a list"),
        (lambda f: _with_header(f, extra=1), "exactly the keys"),
        (lambda f: _with_meta(f, dtype="complex64"), "dtype 'complex64' is not allowed"),
        (lambda f: _with_meta(f, dtype="object"), "not allowed"),
        (lambda f: _with_meta(f, shape=[3, -4]), "non-negative integers"),
        (lambda f: _with_meta(f, shape=[3, 4.0]), "non-negative integers"),
        (lambda f: _with_meta(f, shape=[True, 12]), "non-negative integers"),
        (lambda f: _with_meta(f, shape="3x4"), "must be a list"),
        (lambda f: _with_meta(f, shape=[4, 4]), "needs 64 payload bytes"),
        (lambda f: _with_meta(f, nbytes=47), "needs 48 payload bytes"),
        (lambda f: _with_meta(f, codec="pickle"), "unknown codec 'pickle'"),
        (lambda f: _with_meta(f, scale=1.0), "must have keys"),
        (lambda f: [f[0], f[1][:-4]], "payload is 44 bytes"),
        (lambda f: [f[0], f[1] + b"\x00" * 4], "payload is 52 bytes"),
        (lambda f: [f[0], 12345], "a frame must be"),
        (lambda f: "not frames", "sequence of frames"),
        (
            lambda f: [msgpack.packb({"v": 1, "kind": "a", "h": {"x": msgpack.ExtType(5, b"")}, "t": []})],
            "only plain",
        ),
        (
            lambda f: [pickle.dumps({"v": 1, "kind": "act", "h": {}, "t": []}), *f[1:]],
            "not valid msgpack|must be",
        ),
    ],
)
def test_malformed_messages_raise_wire_error(frames, mutate, match):
    with pytest.raises(WireError, match=match):
        wire.decode(mutate(frames))


def test_limits_on_header_size_tensor_count_frame_size_and_ndim():
    t = torch.zeros(1, 1, 1, 2)
    frames = _frames_as_bytes(wire.encode("act", {"pad": "x" * 100}, [t, t, t]))

    with pytest.raises(WireError, match="header frame is"):
        wire.decode(frames, limits=Limits(max_header_bytes=64))
    with pytest.raises(WireError, match="the limit is 2"):
        wire.decode(frames, limits=Limits(max_tensors=2))
    with pytest.raises(WireError, match="tensor frame 0 is 8 bytes; the limit is 7"):
        wire.decode(frames, limits=Limits(max_frame_bytes=7))
    with pytest.raises(WireError, match="4 dimensions; the limit is 3"):
        wire.decode(frames, limits=Limits(max_ndim=3))
    assert len(wire.decode(frames, limits=Limits(max_tensors=3, max_ndim=4)).tensors) == 3


def test_shape_claiming_a_huge_tensor_is_refused_before_allocation(frames):
    forged = _with_meta(frames, shape=[2**40, 2**20], codec="lz4")

    with pytest.raises(WireError, match="the limit is"):
        wire.decode(forged)


def test_deeply_nested_header_is_refused_without_recursion_error():
    deep = b"\x91" * 100_000 + b"\xc0"  # 100k nested one-element arrays around nil
    # {"v": 1, "kind": "a", "t": [], "h": {"x": <deep>}} written out in msgpack by hand
    frame = b"\x84\xa1v\x01\xa4kind\xa1a\xa1t\x90\xa1h\x81\xa1x" + deep

    with pytest.raises(WireError):
        wire.decode([frame])


def test_limits_refuse_negative_values():
    with pytest.raises(WireError, match="max_tensors"):
        Limits(max_tensors=-1)
