"""Fuzzing decode: random and mutated frames either raise WireError or give a valid Message, nothing else.

Each example runs under hypothesis' per-example deadline, so a decode that hangs (or crawls) fails.
"""

from __future__ import annotations

import math

import msgpack
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partita.errors import WireError
from partita.runtime import codec, wire
from partita.runtime.wire import Limits

LIMITS = Limits(max_frame_bytes=1 << 16, max_tensors=8, max_header_bytes=4096, max_ndim=4)
FUZZ = settings(
    max_examples=1500,
    deadline=1000,  # ms per example: generous for a noisy shared host, finite so a hang fails
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)


def _decode_is_safe(frames) -> None:
    """The property: WireError, or a Message whose every part is within the limits."""
    try:
        msg = wire.decode(frames, limits=LIMITS)
    except WireError:
        return
    assert isinstance(msg, wire.Message)
    assert isinstance(msg.kind, str) and 0 < len(msg.kind) <= wire.MAX_KIND_CHARS
    assert isinstance(msg.header, dict)
    assert len(msg.tensors) == len(frames) - 1 <= LIMITS.max_tensors
    for t in msg.tensors:
        assert isinstance(t, torch.Tensor)
        assert t.dtype in codec.DTYPES.values()
        assert t.dim() <= LIMITS.max_ndim
        assert t.numel() * t.element_size() <= LIMITS.max_frame_bytes


dtypes = st.sampled_from(list(codec.DTYPES.values()))
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3)


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = draw(dtypes)
    shape = draw(shapes)
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return (
        torch.randint(-100, 100, shape, generator=g).to(dtype)
        if dtype != torch.uint8
        else torch.randint(0, 255, shape, generator=g, dtype=torch.uint8)
    )


@st.composite
def valid_messages(draw) -> list[bytes]:
    kind = draw(st.sampled_from(["act", "load", "ping", "x" * 64]))
    header = draw(
        st.dictionaries(
            st.text(max_size=5), st.integers(-(2**63), 2**63) | st.text(max_size=5) | st.none(), max_size=3
        )
    )
    ts = draw(st.lists(tensors(), max_size=4))
    name = draw(st.sampled_from(sorted(codec.CODECS)))
    return [bytes(f) for f in wire.encode(kind, header, ts, codec=name)]


def _pool() -> list[list[bytes]]:
    """Valid messages covering every dtype and codec, built once: mutating them is what the fuzzers do."""
    g = torch.Generator().manual_seed(0)
    pool = []
    for i, (name, dtype) in enumerate(codec.DTYPES.items()):
        for j, codec_name in enumerate(sorted(codec.CODECS)):
            shape = [(i + j) % 4 + 1, (i * j) % 3 + 1][: (i + j) % 3]
            t = (torch.rand(shape, generator=g) * 50).to(dtype)
            pool.append(
                [
                    bytes(f)
                    for f in wire.encode("act", {"r": i, "n": name}, [t, t.reshape(-1)[:1]], codec=codec_name)
                ]
            )
    pool.append([bytes(f) for f in wire.encode("ping", {"t": 1.5})])
    return pool


POOL = _pool()
pooled_messages = st.sampled_from(POOL)

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@settings(FUZZ, max_examples=3000)
@given(st.lists(st.binary(max_size=300), max_size=5))
def test_random_frames_never_escape_as_anything_but_wire_error(frames):
    _decode_is_safe(frames)


@FUZZ
@given(pooled_messages, st.data())
def test_mutated_valid_messages_never_escape_as_anything_but_wire_error(frames, data):
    mutated = list(frames)
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "truncate", "extend", "drop", "duplicate", "swap"]))
        i = data.draw(st.integers(0, len(mutated) - 1)) if mutated else 0
        if op == "flip" and mutated and mutated[i]:
            frame = bytearray(mutated[i])
            pos = data.draw(st.integers(0, len(frame) - 1))
            frame[pos] ^= 1 << data.draw(st.integers(0, 7))
            mutated[i] = bytes(frame)
        elif op == "truncate" and mutated:
            mutated[i] = mutated[i][: data.draw(st.integers(0, len(mutated[i])))]
        elif op == "extend" and mutated:
            mutated[i] = mutated[i] + data.draw(st.binary(min_size=1, max_size=16))
        elif op == "drop" and mutated:
            del mutated[i]
        elif op == "duplicate" and mutated:
            mutated.insert(i, mutated[i])
        elif op == "swap" and len(mutated) > 1:
            mutated[0], mutated[-1] = mutated[-1], mutated[0]
    _decode_is_safe(mutated)


@FUZZ
@given(pooled_messages, st.data())
def test_headers_with_arbitrary_field_values_never_escape_as_anything_but_wire_error(frames, data):
    head = msgpack.unpackb(frames[0], raw=False)
    if head["t"] and data.draw(st.booleans()):
        meta = head["t"][data.draw(st.integers(0, len(head["t"]) - 1))]
        key = data.draw(st.sampled_from(["dtype", "shape", "codec", "nbytes", "scale", "offset", "other"]))
        meta[key] = data.draw(plain | st.lists(st.integers(-(2**63), 2**64 - 1), max_size=5))
    else:
        key = data.draw(st.sampled_from(["v", "kind", "h", "t", "other"]))
        head[key] = data.draw(plain)
    _decode_is_safe([msgpack.packb(head, use_bin_type=True), *frames[1:]])


@settings(max_examples=200, deadline=1000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(valid_messages())
def test_valid_messages_decode_to_their_tensors(frames):
    msg = wire.decode(frames, limits=LIMITS)
    head = msgpack.unpackb(frames[0], raw=False)
    for t, meta in zip(msg.tensors, head["t"], strict=True):
        assert list(t.shape) == meta["shape"]
        assert t.dtype == codec.DTYPES[meta["dtype"]]
        assert math.prod(meta["shape"]) == t.numel()
