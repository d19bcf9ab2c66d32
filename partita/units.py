"""Friendly spellings of quantities in cluster files, turned into base SI units.

A cluster file may say `bandwidth: 100Mbit/s`, `latency: 2ms`, `memory: 4GiB` or `compute: 13.5GFLOPS`;
internally everything is bytes per second, seconds, bytes and FLOP per second. A plain number is
already in the base unit. Decimal prefixes (k, M, G, T, P) are powers of 1000; binary ones (Ki, Mi,
Gi, Ti) powers of 1024. `bit` and `b` are bits, `B` is bytes (case matters for that letter only).

Each parser raises `ValueError` with what was expected; `partita.cluster` turns that into a
`ClusterSpecError` naming the file and the field.
"""

from __future__ import annotations

import math
import re

__all__ = ["parse_bandwidth", "parse_compute", "parse_latency", "parse_memory", "format_quantity"]

_NUMBER = r"(?P<num>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
_PREFIX = {
    "": 1.0,
    "k": 1e3,
    "K": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
}
_PREFIX_RE = r"(?P<prefix>Ki|Mi|Gi|Ti|k|K|M|G|T|P|)"
_TIME_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}

_BANDWIDTH_RE = re.compile(rf"^{_NUMBER}\s*{_PREFIX_RE}(?P<unit>bit/s|bps|b/s|B/s|Bps)$")
_MEMORY_RE = re.compile(rf"^{_NUMBER}\s*{_PREFIX_RE}(?P<unit>B|bytes?)$")
_COMPUTE_RE = re.compile(rf"^{_NUMBER}\s*{_PREFIX_RE}(?P<unit>FLOPS|FLOP/s|flops|flop/s)$")
_LATENCY_RE = re.compile(rf"^{_NUMBER}\s*(?P<unit>s|sec|ms|us|µs|μs|ns)$")
_PLAIN_RE = re.compile(rf"^{_NUMBER}$")


def _plain(value: object, what: str, example: str) -> float | None:
    """A number already in base units (int, float or a numeric string), or None if `value` is text."""
    if isinstance(value, bool):
        raise ValueError(f"expected {what} (e.g. {example}), got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected {what} (e.g. {example}), got {value!r}")
    # PyYAML reads `1.35e10` (no sign in the exponent) as a string, so numeric strings count as numbers.
    match = _PLAIN_RE.match(value.strip())
    return float(match.group("num")) if match else None


def _checked(number: float, what: str, example: str, raw: object, *, allow_zero: bool) -> float:
    if math.isnan(number) or number < 0 or (number == 0 and not allow_zero) or math.isinf(number):
        bound = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"expected {what} as {bound} (e.g. {example}), got {raw!r}")
    return number


def parse_bandwidth(value: object) -> float:
    """Bytes per second from a number or e.g. `100Mbit/s`, `12.5MB/s`, `1 Gbps`, `10MiB/s`."""
    example = "100Mbit/s or 12.5MB/s"
    plain = _plain(value, "a bandwidth", example)
    if plain is None:
        match = _BANDWIDTH_RE.match(str(value).strip())
        if not match:
            raise ValueError(f"expected a bandwidth (e.g. {example}), got {value!r}")
        scale = _PREFIX[match.group("prefix")]
        per_bit = match.group("unit") in ("bit/s", "bps", "b/s")
        plain = float(match.group("num")) * scale / (8.0 if per_bit else 1.0)
    return _checked(plain, "a bandwidth in bytes/s", example, value, allow_zero=False)


def parse_latency(value: object) -> float:
    """Seconds from a number or e.g. `2ms`, `500us`, `0.1 s`."""
    example = "2ms or 0.002"
    plain = _plain(value, "a latency", example)
    if plain is None:
        match = _LATENCY_RE.match(str(value).strip())
        if not match:
            raise ValueError(f"expected a latency (e.g. {example}), got {value!r}")
        plain = float(match.group("num")) * _TIME_UNITS[match.group("unit")]
    return _checked(plain, "a latency in seconds", example, value, allow_zero=True)


def parse_memory(value: object) -> float:
    """Bytes from a number or e.g. `4GiB`, `512MB`, `8 GB`."""
    example = "4GiB or 4.0e9"
    plain = _plain(value, "a memory size", example)
    if plain is None:
        match = _MEMORY_RE.match(str(value).strip())
        if not match:
            raise ValueError(f"expected a memory size (e.g. {example}), got {value!r}")
        plain = float(match.group("num")) * _PREFIX[match.group("prefix")]
    return _checked(plain, "a memory size in bytes", example, value, allow_zero=False)


def parse_compute(value: object) -> float:
    """FLOP per second from a number or e.g. `13.5GFLOPS`, `1.2 TFLOP/s`."""
    example = "13.5GFLOPS or 1.35e10"
    plain = _plain(value, "a compute rate", example)
    if plain is None:
        match = _COMPUTE_RE.match(str(value).strip())
        if not match:
            raise ValueError(f"expected a compute rate (e.g. {example}), got {value!r}")
        plain = float(match.group("num")) * _PREFIX[match.group("prefix")]
    return _checked(plain, "a compute rate in FLOP/s", example, value, allow_zero=False)


def format_quantity(value: float, unit: str, *, binary: bool = False) -> str:
    """A short human form, e.g. `format_quantity(1.25e7, "B/s")` -> `12.5 MB/s`; inf -> `inf`."""
    if math.isinf(value):
        return "inf"
    base = 1024.0 if binary else 1000.0
    prefixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi"] if binary else ["", "k", "M", "G", "T", "P"]
    index = 0
    magnitude = abs(value)
    while magnitude >= base and index < len(prefixes) - 1:
        magnitude /= base
        index += 1
    shown = value / base**index
    return f"{shown:.3g} {prefixes[index]}{unit}"
