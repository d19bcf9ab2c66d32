"""FedProx (Li et al., MLSys 2020): FedAvg's aggregation, with a proximal term in every client's local loss.

Each client minimises F_i(x) + mu/2 * ||x - x^t||^2 locally, which keeps clients that run many steps near the
global model x^t; the server averages like FedAvg (x^{t+1} = sum_i p_i x_i). `configure_train` is where the
strategy differs: it sets the clients' `prox_mu`. The proximal term shrinks, but does not remove, FedAvg's
objective inconsistency under unequal local work; FedNova with a proximal local solver removes it.
"""

from __future__ import annotations

import dataclasses
import math

from partita.errors import FLError
from partita.fl.fedavg import FedAvg
from partita.fl.local import TrainConfig


class FedProx(FedAvg):
    """mu: proximal coefficient (>= 0; 0 is FedAvg)."""

    name = "fedprox"

    def __init__(self, mu: float) -> None:
        if not (math.isfinite(mu) and mu >= 0):
            raise FLError(f"FedProx mu must be a finite number >= 0, got {mu!r}.")
        self.mu = float(mu)

    def configure_train(self, config: TrainConfig) -> TrainConfig:
        return dataclasses.replace(config, prox_mu=self.mu)

    def __repr__(self) -> str:
        return f"FedProx(mu={self.mu})"
