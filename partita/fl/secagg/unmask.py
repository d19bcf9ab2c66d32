"""The server's side of unmasking: from the masked inputs and the shares the survivors return, the sum only.

    sum_{u in U3} y_u = sum_{u in U3} Q(x_u) + sum_{u in U3} PRG(b_u) + sum_{u in U2 \\ U3} sum_{v in U3} sign(v, u) PRG(s_vu)

(the pairwise masks between two survivors cancel). The server rebuilds b_u of every survivor and the mask
private key s_u of every client that shared keys but sent no input (Shamir, `threshold` shares each), then
subtracts their masks. It never holds a survivor's s_u nor a dropped client's input, so it learns only the
sum of the survivors' scaled updates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from partita.errors import FLError
from partita.fl.secagg import masking, shamir
from partita.fl.secagg.client import KeyAdvert, holder, pair_context, sign


def unmasked_sum(
    *,
    round_key: bytes,
    roster: Mapping[int, KeyAdvert],
    survivors: Sequence[int],
    dropped: Sequence[int],
    masked: Mapping[int, np.ndarray],
    seed_shares: Mapping[int, Mapping[int, bytes]],
    key_shares: Mapping[int, Mapping[int, bytes]],
    threshold: int,
) -> np.ndarray:
    """sum_{u in survivors} Q(scale_u * Delta_u) decoded to float64.

    masked:      survivor -> y_u (uint64).
    seed_shares: responder -> {survivor: share of b_survivor};  key_shares: responder -> {dropped: share of s}.
    FLError when fewer than `threshold` clients answered the unmasking, or a share is missing or inconsistent.
    """
    if len(seed_shares) < threshold:
        raise FLError(
            f"Only {len(seed_shares)} clients answered the unmasking; {threshold} are needed to recover the sum."
        )
    total = np.zeros_like(next(iter(masked.values())))
    with np.errstate(over="ignore"):
        for u in survivors:
            total = total + masked[u]
        for u in survivors:
            seed = shamir.combine(_shares_of(u, seed_shares), threshold)
            total = total - masking.mask(seed, total.size)
        for u in dropped:
            private = masking.private_key_from(shamir.combine(_shares_of(u, key_shares), threshold))
            for v in survivors:
                seed = masking.agree(
                    private, roster[v].mask_key, "partita-secagg-mask", pair_context(round_key, u, v)
                )
                pairwise = masking.mask(seed, total.size)
                total = total - pairwise if sign(v, u) > 0 else total + pairwise
    return masking.dequantize(total)


def _shares_of(client: int, by_responder: Mapping[int, Mapping[int, bytes]]) -> dict[int, bytes]:
    return {holder(r): shares[client] for r, shares in by_responder.items() if client in shares}
