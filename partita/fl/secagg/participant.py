"""A client's side of secure rounds: train, keep the change here, and answer the four protocol steps.

`SecureParticipant(client_id, train)` wraps any trainer `train(global_weights, config) -> ClientUpdate | None`
(an `InProcessClient.train`, or `train_local` on a worker). Every step names the round by its `round_key`,
so a participant can serve the steps of one round in any process that holds it (a worker keeps its
participants between messages). Only the last few rounds' sessions are kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from partita.errors import FLError
from partita.fl.local import TrainConfig
from partita.fl.secagg.client import KeyAdvert, SecureSession
from partita.fl.update import ClientReport, ClientUpdate

_KEPT_ROUNDS = 4


def floating_names(weights: Mapping[str, Tensor]) -> list[str]:
    """The names whose tensors are aggregated (floating point), in the weights' order."""
    return [name for name, t in weights.items() if torch.is_floating_point(t)]


def flat_delta(global_weights: Mapping[str, Tensor], client_weights: Mapping[str, Tensor]) -> np.ndarray:
    """Delta = x - x_i over the floating tensors, float64, flattened and concatenated in the weights' order."""
    parts = [
        (global_weights[n].detach().to(torch.float64) - client_weights[n].detach().to(torch.float64)).reshape(-1)
        for n in floating_names(global_weights)
    ]
    return torch.cat(parts).numpy() if parts else np.zeros(0)


def unflatten(global_weights: Mapping[str, Tensor], vector: np.ndarray, num_sums: int) -> list[dict[str, Tensor]]:
    """Split a flat [S_1, ..., S_K] back into K dicts of float64 tensors shaped like the global weights."""
    names = floating_names(global_weights)
    size = sum(global_weights[n].numel() for n in names)
    if vector.size != size * num_sums:
        raise FLError(f"The unmasked sum has {vector.size} values; expected {num_sums} x {size}.")
    out, offset = [], 0
    for _ in range(num_sums):
        sums = {}
        for name in names:
            count = global_weights[name].numel()
            sums[name] = torch.from_numpy(vector[offset : offset + count].copy()).reshape(global_weights[name].shape)
            offset += count
        out.append(sums)
    return out


class SecureParticipant:
    """Client `client_id` in secure rounds; `train` is its local training (None: missed the deadline)."""

    def __init__(
        self, client_id: int, train: Callable[[Mapping[str, Tensor], TrainConfig], ClientUpdate | None]
    ) -> None:
        self.client_id = int(client_id)
        self._train = train
        self._sessions: OrderedDict[bytes, SecureSession] = OrderedDict()
        self._lock = threading.Lock()

    def secure_train(
        self, global_weights: Mapping[str, Tensor], config: TrainConfig, round_key: bytes
    ) -> tuple[ClientReport, KeyAdvert] | None:
        """Train; keep the change; return only the scalars and this round's public keys."""
        update = self._train(global_weights, config)
        return None if update is None else self.begin(global_weights, update, round_key)

    def begin(
        self, global_weights: Mapping[str, Tensor], update: ClientUpdate, round_key: bytes
    ) -> tuple[ClientReport, KeyAdvert]:
        """Open this round's session on an update already trained (a worker trains in its own job)."""
        session = SecureSession(self.client_id, round_key, flat_delta(global_weights, update.weights))
        with self._lock:
            self._sessions[bytes(round_key)] = session
            while len(self._sessions) > _KEPT_ROUNDS:
                self._sessions.popitem(last=False)
        return update.report, session.advertise()

    def secure_share(self, round_key: bytes, roster: Sequence[KeyAdvert], threshold: int) -> dict[int, bytes]:
        return self._session(round_key).share_keys(roster, threshold)

    def secure_mask(
        self, round_key: bytes, shares: Mapping[int, bytes], scales: Sequence[float], u2: Sequence[int]
    ) -> np.ndarray:
        return self._session(round_key).masked_input(shares, scales, u2)

    def secure_unmask(
        self, round_key: bytes, survivors: Sequence[int], dropped: Sequence[int]
    ) -> tuple[dict[int, bytes], dict[int, bytes]]:
        session = self._session(round_key)
        try:
            return session.unmask(survivors, dropped)
        finally:  # one unmasking per round: the session (and its change) is forgotten after it
            with self._lock:
                self._sessions.pop(bytes(round_key), None)

    def _session(self, round_key: bytes) -> SecureSession:
        with self._lock:
            session = self._sessions.get(bytes(round_key))
        if session is None:
            raise FLError(f"Client {self.client_id} holds no secure session for this round (it was not trained).")
        return session


class LocalSecureClient(SecureParticipant):
    """A secure participant over an in-process client handle (`InProcessClient`): same id, same training."""

    def __init__(self, client) -> None:
        super().__init__(client.client_id, client.train)
        self.client = client

    def train(self, global_weights, config):
        return self.client.train(global_weights, config)

    def evaluate(self, global_weights):
        return self.client.evaluate(global_weights)
