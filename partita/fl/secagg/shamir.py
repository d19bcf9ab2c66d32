"""Shamir's t-of-n secret sharing over the prime field GF(2^521 - 1), for 32-byte secrets.

A secret s (32 bytes, read as an integer < 2^256) is the constant term of a random polynomial f of degree
t - 1 over GF(P), P = 2^521 - 1 (a Mersenne prime, far above any secret); client x (x = 1, 2, ...) holds
the share (x, f(x)). Any t shares give s back by Lagrange interpolation at 0; t - 1 shares reveal nothing
about s (every secret is equally consistent with them). Coefficients come from `secrets` (the OS CSPRNG).
"""

from __future__ import annotations

import secrets as _random
from collections.abc import Mapping

from partita.errors import FLError

PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8): one field element


def split(secret: bytes, threshold: int, holders: list[int]) -> dict[int, bytes]:
    """Shares of `secret` for each holder x in `holders` (distinct positive ints); any `threshold` recover it."""
    if len(secret) != SECRET_BYTES:
        raise FLError(f"Shamir secrets here are {SECRET_BYTES} bytes, got {len(secret)}.")
    if not 1 <= threshold <= len(holders):
        raise FLError(f"threshold must be in [1, {len(holders)}] holders, got {threshold}.")
    if len(set(holders)) != len(holders) or min(holders) < 1:
        raise FLError(f"Share holders must be distinct positive ints, got {holders}.")
    coefficients = [int.from_bytes(secret, "big")] + [_random.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in holders}


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least `threshold` shares {x: share}; FLError with fewer or malformed shares."""
    if len(shares) < threshold:
        raise FLError(f"{len(shares)} shares cannot recover a secret shared {threshold}-of-n.")
    points = []
    for x, share in list(shares.items())[:threshold]:
        if len(share) != SHARE_BYTES:
            raise FLError(f"A Shamir share is {SHARE_BYTES} bytes, got {len(share)} from holder {x}.")
        points.append((int(x), int.from_bytes(share, "big")))
    secret = 0
    for j, (xj, yj) in enumerate(points):
        numerator, denominator = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                numerator = numerator * (-xm) % PRIME
                denominator = denominator * (xj - xm) % PRIME
        secret = (secret + yj * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise FLError("The Shamir shares are inconsistent: they do not interpolate to a 32-byte secret.")
    return secret.to_bytes(SECRET_BYTES, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for c in reversed(coefficients):
        value = (value * x + c) % PRIME
    return value
