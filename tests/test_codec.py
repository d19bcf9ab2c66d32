"""Tensor codecs: exact ones are bit-exact for every dtype, lossy ones stay within their documented bounds."""

from __future__ import annotations

import math

import pytest
import torch

from partita.errors import WireError
from partita.runtime import codec

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _sample(dtype: torch.dtype, shape=(3, 5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def _round_trip(t: torch.Tensor, name: str) -> torch.Tensor:
    meta, payload = codec.encode_tensor(t, name)
    return codec.decode_tensor(meta, bytes(payload))


@pytest.mark.parametrize("name", ["none", "lz4"])
@pytest.mark.parametrize("dtype", list(codec.DTYPES.values()), ids=list(codec.DTYPES))
def test_exact_codecs_round_trip_bit_exact_for_every_dtype(name, dtype):
    t = _sample(dtype)

    back = _round_trip(t, name)

    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(
        back.view(torch.uint8) if dtype != torch.bool else back,
        t.view(torch.uint8) if dtype != torch.bool else t,
    )


@pytest.mark.parametrize("name", ["none", "lz4", "fp16", "int8"])
@pytest.mark.parametrize("shape", [(), (0,), (4, 0, 3), (1,)])
def test_scalars_and_empty_tensors_round_trip(name, shape):
    t = torch.full(shape, 1.5)
    assert torch.equal(_round_trip(t, name), t)


def test_non_contiguous_tensor_is_sent_as_its_values():
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, ::2].t()

    assert torch.equal(_round_trip(t, "none"), t)


def test_exact_codec_keeps_nan_inf_and_negative_zero_bits():
    t = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-45])

    back = _round_trip(t, "none")

    assert torch.equal(back.view(torch.int32), t.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fp16_error_within_half_precision_rounding(dtype):
    t = _sample(dtype, (2000,))

    back = _round_trip(t, "fp16")

    # round to nearest half: relative error <= 2**-11 in the normal range, plus the rounding back to dtype
    eps_back = torch.finfo(dtype).eps if dtype != torch.float64 else 0.0
    bound = t.to(torch.float64).abs() * (2.0**-11 + eps_back) + 2.0**-25
    assert back.dtype == dtype
    assert bool(((back.to(torch.float64) - t.to(torch.float64)).abs() <= bound).all())


def test_fp16_saturates_out_of_range_finite_values_and_keeps_specials():
    t = torch.tensor([1e6, -1e6, math.inf, 2.0])

    back = _round_trip(t, "fp16")

    assert back.tolist() == [65504.0, -65504.0, math.inf, 2.0]


@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_error_within_half_a_quantization_step(dtype):
    t = _sample(dtype, (4096,)) + 10.0  # an offset range, not centred on zero

    meta, payload = codec.encode_tensor(t, "int8")
    back = codec.decode_tensor(meta, bytes(payload))

    exact = t.to(torch.float64)
    scale = (exact.max() - exact.min()).item() / 255
    rounding_back = exact.abs().max().item() * (torch.finfo(dtype).eps if dtype != torch.float64 else 1e-12)
    stats = codec.error_stats(t, back)
    assert meta["codec"] == "int8" and len(payload) == t.numel()
    assert stats["max_abs"] <= scale / 2 * (1 + 1e-5) + rounding_back
    assert stats["mean_abs"] <= stats["max_abs"]


def test_int8_of_a_constant_tensor_is_exact():
    t = torch.full((10,), -3.25)
    assert torch.equal(_round_trip(t, "int8"), t)


def test_int8_sends_non_finite_tensors_exactly():
    t = torch.tensor([1.0, math.inf, 2.0])

    meta, payload = codec.encode_tensor(t, "int8")

    assert meta["codec"] == "none"
    assert torch.equal(codec.decode_tensor(meta, bytes(payload)), t)


@pytest.mark.parametrize("name", ["fp16", "int8"])
def test_lossy_codecs_leave_integer_and_bool_tensors_exact(name):
    for dtype in (torch.int64, torch.uint8, torch.bool):
        t = _sample(dtype)
        meta, payload = codec.encode_tensor(t, name)
        assert meta["codec"] == "none"
        assert torch.equal(codec.decode_tensor(meta, bytes(payload)), t)


def test_is_lossy_names_exactly_the_lossy_codecs():
    assert {name for name in codec.CODECS if codec.is_lossy(name)} == {"fp16", "int8"}


def test_unknown_codec_is_refused_with_the_known_names():
    with pytest.raises(WireError, match=r"unknown codec 'zstd'; choose one of fp16, int8, lz4, none"):
        codec.encode_tensor(torch.ones(2), "zstd")
    with pytest.raises(WireError, match="unknown codec"):
        codec.is_lossy("gzip")


def test_dtypes_off_the_allow_list_are_refused_on_encode():
    with pytest.raises(WireError, match="cannot go on the wire"):
        codec.encode_tensor(torch.ones(2, dtype=torch.complex64))


def test_error_stats_matches_hand_computed_values():
    exact = torch.tensor([3.0, 4.0])
    approx = torch.tensor([3.0, 5.0])

    stats = codec.error_stats(exact, approx)

    assert stats == pytest.approx({"max_abs": 1.0, "mean_abs": 0.5, "rel_l2": 1.0 / 5.0})


def test_decode_refuses_payload_that_disagrees_with_meta():
    meta, payload = codec.encode_tensor(torch.ones(4), "none")
    with pytest.raises(WireError, match="nbytes"):
        codec.decode_tensor(meta, bytes(payload)[:-1])
    with pytest.raises(WireError, match="payload bytes"):
        codec.decode_tensor({**meta, "shape": [5]}, bytes(payload))


def test_decode_refuses_lz4_payload_that_expands_beyond_its_shape():
    big_meta, big_payload = codec.encode_tensor(torch.zeros(1000), "lz4")
    forged = {**big_meta, "shape": [10]}

    with pytest.raises(WireError, match="exactly 40 bytes"):
        codec.decode_tensor(forged, big_payload)


def test_decode_refuses_corrupt_lz4_payload():
    meta, payload = codec.encode_tensor(torch.arange(100.0), "lz4")
    with pytest.raises(WireError, match="lz4"):
        codec.decode_tensor(meta, b"\x00" * len(payload))


def test_decode_refuses_bool_bytes_other_than_zero_and_one():
    meta, _ = codec.encode_tensor(torch.ones(2, dtype=torch.bool))
    with pytest.raises(WireError, match="bool"):
        codec.decode_tensor(meta, b"\x01\x07")


def _placed(raw: bytes, past_alignment: int) -> tuple[memoryview, int]:
    """`raw` inside a buffer, starting `past_alignment` bytes past a 64-byte boundary; the view and its address."""
    backing = bytearray(len(raw) + 2 * codec.ALIGNMENT)
    base = torch.frombuffer(backing, dtype=torch.uint8).data_ptr()
    offset = (past_alignment - base) % codec.ALIGNMENT
    backing[offset:offset + len(raw)] = raw
    return memoryview(backing)[offset:offset + len(raw)], base + offset


def test_a_view_is_kept_only_when_aligned_as_torch_allocates_so_kernels_round_as_in_the_model():
    """A less aligned payload is copied: MKL's GEMM with few output columns rounds differently on it.

    libzmq hands frames 8 bytes past a 16-byte boundary (its header comes first). A stage that starts
    with a Linear(64, 5) then differed from the unsplit model in the last bit (the drift test saw it).
    """
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(64, 5), torch.randn(32, 64)
    meta, payload = codec.encode_tensor(x)

    aligned, aligned_at = _placed(bytes(payload), 0)
    off, _ = _placed(bytes(payload), 8)
    kept = codec.decode_tensor(meta, aligned, copy=False)
    copied = codec.decode_tensor(meta, off, copy=False)

    assert kept.data_ptr() == aligned_at  # zero-copy where it is safe
    assert copied.data_ptr() % codec.ALIGNMENT == 0 and torch.equal(copied, x)
    with torch.no_grad():
        assert torch.equal(layer(copied), layer(x)) and torch.equal(layer(kept), layer(x))


def test_decode_copy_false_aliases_stable_bytes_and_copy_true_owns_them():
    meta, payload = codec.encode_tensor(torch.arange(8, dtype=torch.int32))
    buf = bytearray(payload)

    owned = codec.decode_tensor(meta, buf)
    buf[0] = 99

    assert owned[0].item() == 0
