"""The wire format: one message = one msgpack header frame + one raw frame per tensor.

Frame 0 is a msgpack map ``{"v": 1, "kind": str, "h": {...}, "t": [tensor meta, ...]}``; frames
1..n are the tensor payloads in the order of ``"t"`` (see `partita.runtime.codec` for the meta and
the codecs). `encode` returns the frames for ``socket.send_multipart(frames, copy=False)``; with
codec ``none`` a tensor's frame is a memoryview of its own storage (zero-copy), so do not modify a
tensor until ZeroMQ has sent it.

`decode` trusts nothing: it checks frame count and sizes, header size and type, version, kind,
tensor count, each tensor's dtype (allow-list), ndim, shape and byte count before it touches a
payload, and it raises only `WireError`. Nothing is ever unpickled.

Aliasing: a decoded tensor (codec ``none``) is a zero-copy view of its frame when that frame's memory
is stable: a ``zmq.Frame`` (received with ``copy=False``: libzmq owns that message's memory until the
Frame is released, and never reuses it while referenced) or ``bytes`` (immutable); and only when it
is 64-byte aligned, as torch aligns what it allocates (`partita.runtime.codec.ALIGNMENT`: some
kernels round differently on less aligned inputs). Frames given as ``bytearray`` or ``memoryview``
may be reused by their owner, so their tensors are copies. Views of received frames are read-only
memory to Python: clone before modifying such a tensor in place.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import msgpack
import torch
import zmq

from partita.errors import WireError
from partita.runtime.codec import check_codec, decode_tensor, encode_tensor

WIRE_VERSION = 1
MAX_KIND_CHARS = 64
_HEADER_KEYS = frozenset({"v", "kind", "h", "t"})


@dataclass(frozen=True)
class Limits:
    """What `decode` accepts. Sizes in bytes; a message breaking any of them is refused with WireError.

    `max_frame_bytes` bounds every tensor payload frame and every decoded tensor (so also what lz4
    may expand to); `max_header_bytes` bounds frame 0.
    """

    max_frame_bytes: int = 512 * 2**20
    max_tensors: int = 256
    max_header_bytes: int = 1 << 20
    max_ndim: int = 8

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "max_tensors", "max_header_bytes", "max_ndim"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise WireError(f"Limits.{name} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class Message:
    """A decoded message: its kind (e.g. "infer"), its free-form header map, and its tensors."""

    kind: str
    header: dict = field(default_factory=dict)
    tensors: tuple[torch.Tensor, ...] = ()


def encode(
    kind: str, header: Mapping | None = None, tensors: Sequence[torch.Tensor] = (), *, codec: str = "none"
) -> list:
    """Frames for one message: [msgpack header, payload per tensor]; send with copy=False.

    `header` must hold plain msgpack types (None, bool, int, float, str, bytes, lists, str-keyed
    maps). `codec` applies to every tensor (lossy codecs only to floating-point ones).
    """
    _check_kind(kind)
    check_codec(codec)
    if isinstance(tensors, torch.Tensor):
        raise WireError("tensors must be a sequence of tensors; wrap a single tensor as (t,)")
    metas, payloads = [], []
    for t in tensors:
        meta, payload = encode_tensor(t, codec)
        metas.append(meta)
        payloads.append(payload)
    head = {"v": WIRE_VERSION, "kind": kind, "h": dict(header or {}), "t": metas}
    try:
        packed = msgpack.packb(head, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        # msgpack refuses objects it has no plain encoding for; we never fall back to pickle.
        raise WireError(f"message header for {kind!r} holds a value msgpack cannot encode: {exc}") from None
    return [packed, *payloads]


def decode(
    frames: Sequence, *, limits: Limits = Limits(), kinds: Collection[str] | None = None, own: bool = False
) -> Message:
    """Validate and decode received frames; raise WireError (and nothing else) on any problem.

    `kinds` is the allow-list of message kinds this receiver handles (None: any well-formed kind).
    Frames may be bytes, bytearray, memoryview or zmq.Frame. `own` True: every decoded tensor owns
    its memory (writable, outliving the frames), as a result handed to a user must; False: tensors
    may be read-only views of stable frames (see the module docstring).
    """
    if type(frames) is not list and (not isinstance(frames, Sequence) or isinstance(frames, bytes | bytearray | memoryview | str)):
        raise WireError(f"a message is a sequence of frames, got {type(frames).__name__}")
    if len(frames) == 0:
        raise WireError("empty message: no header frame")
    if len(frames) - 1 > limits.max_tensors:
        raise WireError(f"message has {len(frames) - 1} tensor frames; the limit is {limits.max_tensors}")
    buffers = [_buffer(f) for f in frames]
    head = _unpack_header(buffers[0][0], limits)
    kind = head["kind"]
    if kinds is not None and kind not in kinds:
        raise WireError(f"message kind {kind!r} is not accepted here; expected one of {sorted(kinds)}")
    metas = head["t"]
    if len(metas) != len(frames) - 1:
        raise WireError(
            f"header describes {len(metas)} tensors but the message has {len(frames) - 1} tensor frames"
        )
    for i, (buf, _stable) in enumerate(buffers[1:]):
        if len(buf) > limits.max_frame_bytes:
            raise WireError(f"tensor frame {i} is {len(buf)} bytes; the limit is {limits.max_frame_bytes}")
    tensors = []
    for i, (meta, (buf, stable)) in enumerate(zip(metas, buffers[1:], strict=True)):
        try:
            tensors.append(
                decode_tensor(
                    meta, buf, max_ndim=limits.max_ndim, max_bytes=limits.max_frame_bytes, copy=own or not stable
                )
            )
        except WireError as exc:
            raise WireError(f"{kind!r} tensor {i}: {exc}") from None
    return Message(kind=kind, header=head["h"], tensors=tuple(tensors))


def blob_tensor(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Wrap opaque bytes (a stage archive, say) as a uint8 tensor so they travel as a payload frame.

    Blobs larger than `Limits.max_header_bytes` must travel this way rather than in the header.
    """
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if len(data)
        else torch.empty(0, dtype=torch.uint8)
    )


def blob_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a uint8 tensor made by `blob_tensor` (after decode); WireError for any other tensor."""
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise WireError(f"a blob is a 1-D uint8 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    return t.contiguous().numpy().tobytes()


def _check_kind(kind: object) -> str:
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_CHARS:
        raise WireError(
            f"message kind must be a non-empty string of at most {MAX_KIND_CHARS} chars, got {kind!r}"
        )
    return kind


def _buffer(frame: object) -> tuple[bytes | memoryview, bool]:
    """A frame's bytes, and whether its memory is stable (safe for a decoded tensor to alias)."""
    if isinstance(frame, zmq.Frame):  # first: what every receive gives
        return frame.buffer, True
    if isinstance(frame, bytes):
        return frame, True
    if isinstance(frame, bytearray | memoryview):
        view = memoryview(frame)
        if not view.contiguous:
            raise WireError("a frame must be a contiguous buffer")
        return view.cast("B") if view.ndim != 1 or view.format != "B" else view, False
    raise WireError(f"a frame must be bytes, bytearray, memoryview or zmq.Frame, got {type(frame).__name__}")


def _unpack_header(buf: bytes | memoryview, limits: Limits) -> dict:
    if len(buf) > limits.max_header_bytes:
        raise WireError(f"header frame is {len(buf)} bytes; the limit is {limits.max_header_bytes}")
    try:
        head = msgpack.unpackb(buf, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:
        # msgpack signals malformed input through several classes (its own UnpackException family,
        # ValueError for truncated data/bad UTF-8, TypeError for unhashable keys, OverflowError, and
        # StackError for deep nesting). Any of them means the same thing here: a malformed header.
        raise WireError(f"header frame is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(head, dict):
        raise WireError(f"header must be a msgpack map, got {type(head).__name__}")
    if head.keys() != _HEADER_KEYS:
        raise WireError(
            f"header must have exactly the keys {sorted(_HEADER_KEYS)}, got {sorted(map(str, head))}"
        )
    version = head["v"]
    if type(version) is not int or version != WIRE_VERSION:
        raise WireError(
            f"wire version {version!r} is not supported; this build speaks version {WIRE_VERSION}"
        )
    _check_kind(head["kind"])
    if not isinstance(head["h"], dict):
        raise WireError(f"header field 'h' must be a map, got {type(head['h']).__name__}")
    _check_plain(head["h"])
    if not isinstance(head["t"], list):
        raise WireError(f"header field 't' must be a list, got {type(head['t']).__name__}")
    if len(head["t"]) > limits.max_tensors:
        raise WireError(f"message has {len(head['t'])} tensors; the limit is {limits.max_tensors}")
    return head


_PLAIN_LEAVES = (type(None), bool, int, float, str, bytes)
_PLAIN_LEAF_TYPES = frozenset(_PLAIN_LEAVES)  # what msgpack decodes them to: exactly these types


def _check_plain(value: object) -> None:
    """Refuse msgpack extension values (ExtType, Timestamp) anywhere in the header map.

    Iterative rather than recursive: nesting depth is attacker-controlled.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) in _PLAIN_LEAF_TYPES:  # the common case, by one set lookup
            continue
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif not isinstance(item, _PLAIN_LEAVES):
            raise WireError(f"header holds a {type(item).__name__}; only plain msgpack types are accepted")
