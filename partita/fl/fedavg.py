"""FedAvg (McMahan et al. 2017): the next global model is the example-weighted mean of the client models.

    x^{t+1} = sum_i p_i x_i^{t},   p_i = n_i / sum_{j answered} n_j

Equivalently x^{t+1} = x^t - sum_i p_i Delta_i with Delta_i = x^t - x_i^t. When clients run unequal numbers of
local steps tau_i, Delta_i grows with tau_i, so FedAvg minimises sum_i p_i tau_i F_i / sum_i p_i tau_i (to first
order in the learning rate), not the intended sum_i p_i F_i: the objective inconsistency FedNova removes.
"""

from __future__ import annotations

from partita.fl.strategy import Strategy, combine
from partita.fl.update import ClientUpdate, example_weights


class FedAvg(Strategy):
    name = "fedavg"

    def _aggregate(self, global_weights, updates: list[ClientUpdate]):
        p = example_weights(updates)
        return combine(
            global_weights, updates, lambda _name, _base, xs: sum(w * x for w, x in zip(p, xs, strict=True))
        )
