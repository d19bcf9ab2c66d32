"""One client's side of one round of secure aggregation (Bonawitz et al., CCS 2017, honest-but-curious server).

The client has trained; it holds its change Delta = x - x_i (float64, the floating tensors of the global
weights in their order, flattened) and never sends it. Per round:

1. `advertise()`: two fresh X25519 public keys, one to encrypt shares (c), one to agree masks (s).
2. `share_keys(roster, threshold)`: draws a self-mask seed b; splits b and its own mask private key s_SK
   t-of-n (Shamir) over the roster; returns each other client's pair of shares encrypted for it (AES-GCM under
   a key agreed from the c keys), for the server to route.
3. `masked_input(shares, scales, u2)`: stores the shares it got, then returns
       y = Q([w_1 Delta, ..., w_K Delta]) + PRG(b) + sum_{v in U2, v != u} sign(u, v) PRG(s_uv)     in Z_{2^64}
   with sign(u, v) = +1 for u < v and -1 otherwise, so the pairwise masks of any two clients who both
   send cancel in the sum; s_uv comes from X25519(s_u, s_v). The scales w_k are the strategy's weights for
   this client (`Strategy.client_weights`; FedNova: p_i / A_i and p_i), announced by the server after it heard
   every client's scalars.
4. `unmask(survivors, dropped)`: the shares of b for clients whose y arrived, and of s_SK for clients that
   shared keys but sent no y. Never both for one client (that would unmask its update): a request that asks
   for both, or names fewer survivors than the threshold, is refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

from partita.errors import FLError
from partita.fl.secagg import masking, shamir


@dataclass(frozen=True)
class KeyAdvert:
    """A client's public keys for one round: `share_key` encrypts shares to it, `mask_key` agrees masks."""

    client_id: int
    share_key: bytes
    mask_key: bytes

    def to_wire(self) -> list:
        return [self.client_id, self.share_key, self.mask_key]

    @classmethod
    def from_wire(cls, item) -> KeyAdvert:
        if not (isinstance(item, list | tuple) and len(item) == 3):
            raise FLError("A key advert must be [client_id, share_key, mask_key].")
        client_id, share_key, mask_key = item
        if not isinstance(client_id, int) or not all(isinstance(k, bytes) and len(k) == 32 for k in item[1:]):
            raise FLError("A key advert holds an int id and two 32-byte X25519 public keys.")
        return cls(client_id, share_key, mask_key)


def holder(client_id: int) -> int:
    """The Shamir x-coordinate of a client (ids start at 0; x must not)."""
    return client_id + 1


def sign(u: int, v: int) -> int:
    return 1 if u < v else -1


def pair_context(round_key: bytes, u: int, v: int) -> bytes:
    low, high = sorted((u, v))
    return round_key + f"|{low}|{high}".encode()


class SecureSession:
    """Client `client_id`'s state for one round; `delta` is its float64 change (flattened), kept here only."""

    def __init__(self, client_id: int, round_key: bytes, delta: np.ndarray) -> None:
        self.client_id = int(client_id)
        self.round_key = bytes(round_key)
        self.delta = np.asarray(delta, dtype=np.float64)
        self._share_private = masking.new_private_key()
        self._mask_private = masking.new_private_key()
        self._seed = b""
        self._roster: dict[int, KeyAdvert] = {}
        self._threshold = 0
        self._held: dict[int, tuple[bytes, bytes]] = {}  # sender -> (share of its b, share of its s_SK)
        self._masked_for: frozenset[int] = frozenset()

    def advertise(self) -> KeyAdvert:
        return KeyAdvert(
            self.client_id, masking.public_bytes(self._share_private), masking.public_bytes(self._mask_private)
        )

    def share_keys(self, roster: Sequence[KeyAdvert], threshold: int) -> dict[int, bytes]:
        """Encrypted shares {receiver: ciphertext} for every other client of the roster."""
        self._roster = {a.client_id: a for a in roster}
        if self.client_id not in self._roster or len(self._roster) != len(roster):
            raise FLError("The secure-aggregation roster must list every client once, this one included.")
        if not 2 <= threshold <= len(roster):
            raise FLError(f"The threshold must be in [2, {len(roster)}] clients, got {threshold}.")
        self._threshold = int(threshold)
        self._seed = os.urandom(shamir.SECRET_BYTES)
        holders = [holder(v) for v in self._roster]
        seed_shares = shamir.split(self._seed, threshold, holders)
        key_shares = shamir.split(masking.private_bytes(self._mask_private), threshold, holders)
        out = {}
        for v, advert in self._roster.items():
            share = (seed_shares[holder(v)], key_shares[holder(v)])
            if v == self.client_id:
                self._held[v] = share
                continue
            out[v] = masking.encrypt(
                self._share_key_with(advert), msgpack.packb(list(share)), self._associated(self.client_id, v)
            )
        return out

    def masked_input(self, shares: Mapping[int, bytes], scales: Sequence[float], u2: Sequence[int]) -> np.ndarray:
        """y in Z_{2^64}: the scaled, quantised change under the self mask and the pairwise masks with U2."""
        u2 = sorted(set(u2))
        if self.client_id not in u2 or not set(u2) <= set(self._roster) or len(u2) < self._threshold:
            raise FLError("The masking set U2 must hold this client, only roster clients, and >= threshold.")
        for sender in u2:
            if sender == self.client_id:
                continue
            if sender not in shares:
                raise FLError(f"No share arrived from client {sender}, which the server lists in U2.")
            plain = masking.decrypt(
                self._share_key_with(self._roster[sender]), shares[sender], self._associated(sender, self.client_id)
            )
            pair = msgpack.unpackb(plain)
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, bytes) for s in pair)):
                raise FLError(f"Client {sender}'s share is malformed.")
            self._held[sender] = (pair[0], pair[1])
        if not scales or not all(isinstance(w, float | int) and np.isfinite(w) and w >= 0 for w in scales):
            raise FLError(f"The announced scales must be numbers >= 0, got {scales!r}.")
        y = masking.quantize(np.concatenate([float(w) * self.delta for w in scales]))
        with np.errstate(over="ignore"):
            y = y + masking.mask(self._seed, y.size)
            for v in u2:
                if v == self.client_id:
                    continue
                pairwise = masking.mask(self._pair_seed(self._roster[v]), y.size)
                y = y + pairwise if sign(self.client_id, v) > 0 else y - pairwise
        self._masked_for = frozenset(u2)
        return y

    def unmask(self, survivors: Iterable[int], dropped: Iterable[int]) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """({survivor: share of its b}, {dropped: share of its s_SK}) from the shares this client holds."""
        survivors, dropped = frozenset(survivors), frozenset(dropped)
        if survivors & dropped:
            raise FLError("Refused: the server asked to unmask the same client's seed and mask key.")
        if len(survivors) < self._threshold:
            raise FLError(f"Refused: {len(survivors)} survivors, fewer than the threshold {self._threshold}.")
        if not (survivors | dropped) <= self._masked_for:
            raise FLError("Refused: the unmasking sets name clients outside the masking set U2.")
        seeds = {u: self._held[u][0] for u in survivors if u in self._held}
        keys = {u: self._held[u][1] for u in dropped if u in self._held}
        return seeds, keys

    def _share_key_with(self, advert: KeyAdvert) -> bytes:
        return masking.agree(
            self._share_private, advert.share_key, "partita-secagg-share",
            pair_context(self.round_key, self.client_id, advert.client_id),
        )

    def _pair_seed(self, advert: KeyAdvert) -> bytes:
        return masking.agree(
            self._mask_private, advert.mask_key, "partita-secagg-mask",
            pair_context(self.round_key, self.client_id, advert.client_id),
        )

    def _associated(self, sender: int, receiver: int) -> bytes:
        return self.round_key + f"|from {sender}|to {receiver}".encode()
