"""Tensor payload codecs: how one tensor becomes one wire frame and back.

A codec turns a tensor into `(meta, payload)`: `meta` is the tensor's entry in the message header
(plain msgpack types) and `payload` is the frame body. Decoding checks the meta against the payload
before any byte is interpreted, so a hostile frame gets a `WireError`, never a crash or a huge
allocation.

Codecs (`CODECS`):

- ``none``: the raw contiguous bytes, bit-exact. Sent zero-copy (a memoryview of the tensor's
  storage), so the tensor must not be changed until ZeroMQ has sent it.
- ``lz4``: the raw bytes through `lz4.frame`; bit-exact, smaller for sparse/repetitive data, costs CPU.
- ``fp16``: floating-point tensors as IEEE half. Lossy: relative error <= 2**-11 for |x| in
  [6.1e-5, 65504]; absolute error <= 2**-25 below that; finite values beyond +-65504 saturate to
  +-65504 (inf and nan pass through).
- ``int8``: per-tensor affine quantization of floating-point tensors,
  ``x ~= offset + (q + 128) * scale`` with ``scale = (max - min) / 255`` and ``offset = min`` (both in
  the meta). Lossy: absolute error <= scale / 2 (plus the rounding of the original dtype).

Lossy codecs touch only floating-point tensors; integer and bool tensors are always sent exactly
(codec ``none`` in their meta). ``int8`` also sends a tensor that holds inf or nan exactly, because
an affine int8 grid cannot represent it. The codec actually used is in each tensor's meta.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from partita.errors import WireError

CODECS: frozenset[str] = frozenset({"none", "fp16", "int8", "lz4"})
_LOSSY: frozenset[str] = frozenset({"fp16", "int8"})

#: Bytes a decoded tensor's data is aligned to: what torch's CPU allocator gives every tensor. A view
#: of a frame that is less aligned is copied. Kernels pick their code path by alignment: MKL's GEMM
#: for a few output columns (a Linear(64, 5), say) rounds differently on an input that is not
#: 16-byte aligned, so a stage fed such a view would differ from the unsplit model in the last bit.
#: Received frames often are: libzmq puts a message's data right after its own header.
ALIGNMENT = 64

# Wire dtype name -> torch dtype. The allow-list: anything else is refused on both sides.
DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES: Mapping[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

# Meta keys every tensor entry carries, and the extra keys each codec adds.
_BASE_KEYS = frozenset({"dtype", "shape", "codec", "nbytes"})
_CODEC_KEYS: Mapping[str, frozenset[str]] = {
    "none": _BASE_KEYS,
    "lz4": _BASE_KEYS,
    "fp16": _BASE_KEYS,
    "int8": _BASE_KEYS | {"scale", "offset"},
}

_FP16_MAX = 65504.0
DEFAULT_MAX_NDIM = 8
DEFAULT_MAX_BYTES = 512 * 2**20

# Decoded tensors may be views of a received buffer that Python marks read-only (bytes, a zmq.Frame).
# torch warns once about that; the views are intentional (see decode_tensor), so silence that one
# warning for calls made from this module only.
warnings.filterwarnings(
    "ignore", message="The given buffer is not writable", category=UserWarning, module=__name__
)


def is_lossy(codec: str) -> bool:
    """True for codecs whose decoded tensor may differ from the original (fp16, int8)."""
    check_codec(codec)
    return codec in _LOSSY


def check_codec(codec: str) -> str:
    """Return `codec` if it is a known codec name, else raise a WireError listing the known ones."""
    if not isinstance(codec, str) or codec not in CODECS:
        raise WireError(f"unknown codec {codec!r}; choose one of {', '.join(sorted(CODECS))}")
    return codec


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype ('float32'); WireError if the dtype is not on the allow-list."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise WireError(
            f"dtype {dtype} cannot go on the wire; allowed: {', '.join(DTYPES)}. Cast the tensor first."
        ) from None


def encode_tensor(t: torch.Tensor, codec: str = "none") -> tuple[dict, bytes | memoryview]:
    """Encode one tensor: its header entry and its payload frame.

    The tensor is detached, moved to the CPU and made contiguous when it is not already (only then
    is it copied). With codec ``none`` the payload is a memoryview of the tensor's own storage.
    """
    check_codec(codec)
    if not isinstance(t, torch.Tensor):
        raise WireError(f"expected a torch.Tensor to encode, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_quantized:
        raise WireError(f"only dense tensors go on the wire, got layout {t.layout}; call .to_dense() first")
    name = dtype_name(t.dtype)
    # Each call below is skipped when it would return the tensor unchanged: a message is encoded on
    # every hop, and a tensor op costs more there than the check.
    if t.requires_grad:
        t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_cpu:
        t = t.cpu()
    t = t.contiguous()
    used = codec if (codec in ("none", "lz4") or t.is_floating_point()) else "none"
    if used == "int8" and t.numel() and not bool(torch.isfinite(t).all()):
        used = "none"  # an affine int8 grid cannot hold inf/nan; send this tensor exactly instead
    meta: dict = {"dtype": name, "shape": list(t.shape), "codec": used}
    if used == "none":
        payload: bytes | memoryview = _raw_view(t)
    elif used == "lz4":
        payload = _lz4().compress(_raw_view(t), store_size=True)
    elif used == "fp16":
        finite = torch.isfinite(t)
        half = torch.where(finite, t.clamp(-_FP16_MAX, _FP16_MAX), t).to(torch.float16)
        payload = _raw_view(half)
    else:
        payload, meta["scale"], meta["offset"] = _quantize_int8(t)
    meta["nbytes"] = len(payload) if isinstance(payload, bytes) else payload.nbytes
    return meta, payload


def decode_tensor(
    meta: Mapping,
    payload: bytes | bytearray | memoryview,
    *,
    max_ndim: int = DEFAULT_MAX_NDIM,
    max_bytes: int = DEFAULT_MAX_BYTES,
    copy: bool = True,
) -> torch.Tensor:
    """Check `meta` against `payload` and rebuild the tensor; WireError on anything inconsistent.

    `max_bytes` bounds the decoded tensor's size (and so what lz4 may decompress to). With
    `copy=False` and codec ``none`` the tensor is a view of `payload` (which must then stay
    unchanged for the tensor's lifetime, e.g. bytes or a received zmq.Frame); a payload not
    aligned to `ALIGNMENT` bytes is still copied. Views of read-only buffers must not be modified in place.
    With `copy=True` the tensor owns its memory, whatever the codec.
    """
    dtype, shape, codec = check_meta(meta, max_ndim=max_ndim, max_bytes=max_bytes)
    view = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
    size = len(view)
    if size != meta["nbytes"]:
        raise WireError(f"tensor payload is {size} bytes but its header says nbytes={meta['nbytes']}")
    numel = math.prod(shape)
    if codec == "none":
        return _from_raw(view, dtype, shape, numel, copy=copy)
    if codec == "lz4":
        raw = _lz4_decompress(view, numel * dtype.itemsize)
        return _from_raw(raw, dtype, shape, numel, copy=copy)  # `raw` is stable, but read-only: copy asks for owned memory
    if codec == "fp16":
        half = _from_raw(view, torch.float16, shape, numel, copy=copy and dtype == torch.float16)
        return half.to(dtype)
    return _dequantize_int8(view, meta, dtype, shape, numel)


def check_meta(meta: Mapping, *, max_ndim: int, max_bytes: int) -> tuple[torch.dtype, tuple[int, ...], str]:
    """Validate a tensor's header entry; return (dtype, shape, codec). Touches no payload."""
    if not isinstance(meta, Mapping):
        raise WireError(f"tensor entry must be a map, got {type(meta).__name__}")
    codec = meta.get("codec")
    if not isinstance(codec, str) or codec not in CODECS:
        raise WireError(f"tensor entry has unknown codec {codec!r}; known: {', '.join(sorted(CODECS))}")
    keys = set(meta)
    if keys != _CODEC_KEYS[codec]:
        raise WireError(
            f"tensor entry for codec {codec!r} must have keys {sorted(_CODEC_KEYS[codec])}, got {sorted(map(str, keys))}"
        )
    name = meta["dtype"]
    if not isinstance(name, str) or name not in DTYPES:
        raise WireError(f"dtype {name!r} is not allowed on the wire; allowed: {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if codec in _LOSSY and not dtype.is_floating_point:
        raise WireError(f"codec {codec!r} applies to floating-point tensors only, not {name}")
    shape = meta["shape"]
    if not isinstance(shape, list | tuple):
        raise WireError(f"tensor shape must be a list, got {type(shape).__name__}")
    if len(shape) > max_ndim:
        raise WireError(f"tensor has {len(shape)} dimensions; the limit is {max_ndim}")
    for dim in shape:
        # bool is an int subclass; a shape of [True] is not a shape.
        if type(dim) is not int or dim < 0:
            raise WireError(f"tensor shape {list(shape)!r} must hold non-negative integers")
    raw_bytes = math.prod(shape) * dtype.itemsize
    if raw_bytes > max_bytes:
        raise WireError(
            f"tensor of shape {list(shape)} {name} is {raw_bytes} bytes; the limit is {max_bytes}"
        )
    nbytes = meta["nbytes"]
    if type(nbytes) is not int or nbytes < 0:
        raise WireError(f"tensor nbytes must be a non-negative integer, got {nbytes!r}")
    wire_itemsize = {"none": dtype.itemsize, "fp16": 2, "int8": 1}.get(codec)
    if wire_itemsize is not None and nbytes != math.prod(shape) * wire_itemsize:
        raise WireError(
            f"tensor of shape {list(shape)} {name} with codec {codec!r} needs "
            f"{math.prod(shape) * wire_itemsize} payload bytes, header says nbytes={nbytes}"
        )
    return dtype, tuple(shape), codec


def error_stats(exact: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """How far a lossy round trip moved a tensor: max_abs, mean_abs and rel_l2 (= |a-e|_2 / |e|_2).

    rel_l2 is 0.0 when both are all zeros and inf when only `exact` is; empty tensors give zeros.
    """
    if exact.shape != approx.shape:
        raise WireError(f"cannot compare tensors of shapes {tuple(exact.shape)} and {tuple(approx.shape)}")
    if exact.numel() == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0, "rel_l2": 0.0}
    e = exact.detach().to(torch.float64)
    diff = (approx.detach().to(torch.float64) - e).abs()
    norm = float(torch.linalg.vector_norm(e))
    err = float(torch.linalg.vector_norm(diff))
    rel = err / norm if norm > 0 else (0.0 if err == 0 else math.inf)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "rel_l2": rel}


def _raw_view(t: torch.Tensor) -> memoryview:
    """A flat byte memoryview of a contiguous CPU tensor's storage (no copy; keeps the tensor alive)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16; same bytes
    if t.numel() == 0:  # memoryview cannot cast a shape with a zero in it; an empty flat view is the same bytes
        t = t.reshape(-1)
    array: Any = t.numpy()  # numpy arrays are buffers; its stubs do not say so
    return memoryview(array).cast("B")  # C-contiguous: cast flattens it to bytes


def _from_raw(
    buf: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...], numel: int, *, copy: bool
) -> torch.Tensor:
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    boolean = dtype == torch.bool
    # The caller checked that `buf` holds exactly numel items of `dtype` (bools are read as bytes first).
    flat = torch.frombuffer(buf, dtype=torch.uint8 if boolean else dtype)
    if copy or flat.data_ptr() % ALIGNMENT:
        flat = flat.clone()  # an unstable or less aligned buffer: own the bytes (aligned as torch allocates)
    if boolean:
        if bool((flat > 1).any()):
            raise WireError("bool tensor payload holds bytes other than 0 and 1")
        flat = flat.view(dtype)
    return flat if len(shape) == 1 else flat.view(shape)


def _quantize_int8(t: torch.Tensor) -> tuple[memoryview, float, float]:
    work = t if t.dtype == torch.float64 else t.to(torch.float32)
    if work.numel() == 0:
        return _raw_view(torch.empty(0, dtype=torch.int8)), 1.0, 0.0
    low, high = float(work.min()), float(work.max())
    scale = high / 255.0 - low / 255.0  # (high - low) / 255 without overflowing near the float64 limit
    if not scale > 0 or not math.isfinite(scale):
        scale = 1.0  # constant tensor: every value is `low` exactly
    q = ((work - low) / scale).round_().clamp_(0, 255).sub_(128).to(torch.int8)
    return _raw_view(q), scale, low


def _dequantize_int8(
    view: bytes | memoryview, meta: Mapping, dtype: torch.dtype, shape: tuple[int, ...], numel: int
) -> torch.Tensor:
    scale, offset = meta["scale"], meta["offset"]
    for key, value in (("scale", scale), ("offset", offset)):
        if type(value) is not float or not math.isfinite(value):
            raise WireError(f"int8 codec {key} must be a finite float, got {value!r}")
    if not scale > 0:
        raise WireError(f"int8 codec scale must be positive, got {scale!r}")
    q = _from_raw(view, torch.int8, shape, numel, copy=False)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(work).add_(128).mul_(scale).add_(offset)).to(dtype)


def _lz4():
    try:
        import lz4.frame
    except ImportError:
        raise WireError("codec 'lz4' needs the lz4 package: pip install 'partita[lz4]'") from None
    return lz4.frame


def _lz4_decompress(view: bytes | memoryview, raw_bytes: int) -> bytes:
    decompressor = _lz4().LZ4FrameDecompressor()
    try:
        raw = decompressor.decompress(view, max_length=raw_bytes)
    except RuntimeError as exc:
        # lz4 reports corrupt input as RuntimeError; on the wire that is a malformed frame.
        raise WireError(f"lz4 payload is corrupt: {exc}") from None
    if len(raw) != raw_bytes or not decompressor.eof or decompressor.unused_data:
        raise WireError(f"lz4 payload does not decompress to exactly {raw_bytes} bytes")
    return raw
