"""One federated round under secure aggregation, as the server runs it (Bonawitz et al., CCS 2017).

    1. train    every sampled client trains and keeps its change; it answers with its scalars (n_i, tau_i,
                solver, a_norm: a `ClientReport`) and two fresh X25519 public keys.           -> U1
    2. share    the server sends U1's keys to U1; each client returns its Shamir shares of its self-mask
                seed and mask key, encrypted for each other client; the server routes them.   -> U2
    3. mask     the server computes the strategy's weights w_i from U2's scalars (FedNova: p_i / A_i, and
                p_i for its step bound) and sends each client its w_i, its shares and U2; each returns
                its masked, scaled, quantised change y_i.                                       -> U3
    4. unmask   each client of U3 returns its shares of the self-mask seeds of U3 and of the mask keys of
                U2 \\ U3 (clients that dropped after sharing); the server removes every mask.   -> U4

A stage proceeds while at least `threshold` clients remain (default: a majority of U1, at least 2). A client
that answers None (missed the deadline) or fails (CLIENT_LOST_ERRORS) at any stage is left out. The server
learns the sum over U3 of w_i Delta_i (quantised), rescales it for the clients that dropped after step 3
(`Strategy.counted_examples` over U2 / over U3), and steps with `Strategy.server_step`. Integer buffers keep
their global values (the server never sees a client's model).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from partita.errors import FLError
from partita.fl.local import TrainConfig
from partita.fl.secagg.masking import quantization_bound
from partita.fl.secagg.participant import unflatten
from partita.fl.secagg.unmask import unmasked_sum
from partita.fl.strategy import Strategy
from partita.fl.update import ClientReport


@dataclass(frozen=True)
class SecureAggregation:
    """Settings of secure rounds. threshold: shares needed to unmask (None: a majority of U1, at least 2)."""

    threshold: int | None = None

    def threshold_for(self, clients: int) -> int:
        if self.threshold is not None:
            return int(self.threshold)
        return max(2, clients // 2 + 1)


@dataclass
class SecureTranscript:
    """Everything the server received in one secure round (for tests and accounting; nothing is secret here).

    reports: client -> scalars; adverts: client -> public keys; shares: sender -> {receiver: ciphertext};
    masked: client -> y (uint64); seed_shares / key_shares: responder -> {client: share}.
    """

    reports: dict[int, ClientReport] = field(default_factory=dict)
    adverts: dict = field(default_factory=dict)
    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)
    masked: dict = field(default_factory=dict)
    seed_shares: dict[int, dict[int, bytes]] = field(default_factory=dict)
    key_shares: dict[int, dict[int, bytes]] = field(default_factory=dict)
    rescale: float = 1.0


@dataclass(frozen=True)
class SecureResult:
    weights: dict[str, Tensor]
    answered: list[tuple[int, ClientReport]]  # U3, the clients whose changes are in the sum
    dropped: dict[int, str]
    transcript: SecureTranscript
    error_bound: float  # per coordinate, on each unmasked sum, before the server's step


def secure_round(
    strategy: Strategy,
    clients: Sequence,
    configs: Sequence[TrainConfig],
    weights: Mapping[str, Tensor],
    *,
    settings: SecureAggregation = SecureAggregation(),
    parallel: int = 1,
    lost_errors: tuple[type[BaseException], ...] = (),
) -> SecureResult:
    """Run the four stages over `clients` (secure handles: `secure_train`, `secure_share`, ...)."""
    round_key = os.urandom(16)
    transcript = SecureTranscript()
    dropped: dict[int, str] = {}

    def stage(name: str, members: Sequence, call: Callable) -> dict:
        def one(client):
            try:
                return client.client_id, call(client), None
            except lost_errors as exc:  # a lost client is left out; the masks let the others go on
                return client.client_id, None, f"lost during secure {name}: {exc}"

        if parallel > 1 and len(members) > 1:
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                results = list(pool.map(one, members))
        else:
            results = [one(c) for c in members]
        answers = {}
        for cid, answer, why in results:
            if why is not None:
                dropped[cid] = why
            elif answer is None:
                dropped[cid] = "missed deadline"
            else:
                answers[cid] = answer
        return answers

    def unchanged(reason: str) -> SecureResult:
        for client in clients:
            dropped.setdefault(client.client_id, reason)
        kept = {name: t.detach().clone() for name, t in weights.items()}
        return SecureResult(kept, [], dropped, transcript, 0.0)

    config_of = {c.client_id: cfg for c, cfg in zip(clients, configs, strict=True)}
    trained = stage("training", clients, lambda c: c.secure_train(weights, config_of[c.client_id], round_key))
    transcript.reports = {cid: report for cid, (report, _) in trained.items()}
    transcript.adverts = {cid: advert for cid, (_, advert) in trained.items()}
    if len(trained) < 2:
        return unchanged("secure aggregation needs at least 2 clients in a round")
    threshold = settings.threshold_for(len(trained))
    if not 2 <= threshold <= len(trained):
        raise FLError(f"The secure-aggregation threshold must be in [2, {len(trained)}], got {threshold}.")
    roster = [transcript.adverts[cid] for cid in sorted(trained)]
    u1 = [c for c in clients if c.client_id in trained]
    transcript.shares = stage("key sharing", u1, lambda c: c.secure_share(round_key, roster, threshold))
    u2_ids = sorted(transcript.shares)
    if len(u2_ids) < threshold:
        return unchanged(f"secure aggregation lost too many clients ({len(u2_ids)} < threshold {threshold})")
    reports_u2 = [transcript.reports[cid] for cid in u2_ids]
    scales = dict(zip(u2_ids, strategy.client_weights(reports_u2), strict=True))
    u2 = [c for c in clients if c.client_id in scales]

    def inbox(receiver: int) -> dict[int, bytes]:
        return {s: transcript.shares[s][receiver] for s in u2_ids if s != receiver and receiver in transcript.shares[s]}

    transcript.masked = stage(
        "masking", u2, lambda c: c.secure_mask(round_key, inbox(c.client_id), scales[c.client_id], u2_ids)
    )
    expected = strategy.num_sums * sum(t.numel() for t in weights.values() if t.is_floating_point())
    for cid, masked in list(transcript.masked.items()):
        if getattr(masked, "shape", None) != (expected,) or masked.dtype != np.uint64:
            del transcript.masked[cid]  # treated as lost after sharing: its pairwise masks are removed
            dropped[cid] = f"lost during secure masking: sent {getattr(masked, 'shape', '?')}, not ({expected},) uint64"
    u3_ids = sorted(transcript.masked)
    if len(u3_ids) < threshold:
        return unchanged(f"secure aggregation lost too many clients ({len(u3_ids)} < threshold {threshold})")
    gone = [cid for cid in u2_ids if cid not in transcript.masked]
    u3 = [c for c in clients if c.client_id in transcript.masked]
    unmasking = stage("unmasking", u3, lambda c: c.secure_unmask(round_key, u3_ids, gone))
    transcript.seed_shares = {cid: seeds for cid, (seeds, _) in unmasking.items()}
    transcript.key_shares = {cid: keys for cid, (_, keys) in unmasking.items()}
    if len(unmasking) < threshold:
        return unchanged(f"secure aggregation lost too many clients ({len(unmasking)} < threshold {threshold})")
    total = unmasked_sum(
        round_key=round_key,
        roster={a.client_id: a for a in roster},
        survivors=u3_ids,
        dropped=gone,
        masked=transcript.masked,
        seed_shares=transcript.seed_shares,
        key_shares=transcript.key_shares,
        threshold=threshold,
    )
    reports_u3 = [transcript.reports[cid] for cid in u3_ids]
    counted_u3 = strategy.counted_examples(reports_u3)
    transcript.rescale = strategy.counted_examples(reports_u2) / counted_u3 if counted_u3 else 1.0
    sums = unflatten(weights, total * transcript.rescale, strategy.num_sums)
    new_weights = strategy.server_step(weights, sums, reports_u3)
    bound = quantization_bound(len(u3_ids)) * transcript.rescale
    answered = [(cid, transcript.reports[cid]) for cid in u3_ids]
    if not math.isfinite(bound):
        raise FLError("Secure aggregation produced a non-finite error bound.")
    return SecureResult(new_weights, answered, dropped, transcript, bound)
