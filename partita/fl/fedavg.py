"""FedAvg (McMahan et al. 2017): the next global model is the example-weighted mean of the client models.

    x^{t+1} = sum_i p_i x_i^{t} = x^t - sum_i p_i Delta_i,   p_i = n_i / sum_{j answered} n_j

(one weighted sum, S_0 = sum_i p_i Delta_i, in the form of `partita.fl.strategy`). When clients run unequal
numbers of local steps tau_i, Delta_i grows with tau_i, so FedAvg minimises sum_i p_i tau_i F_i / sum_i p_i
tau_i (to first order in the learning rate), not the intended sum_i p_i F_i: the objective inconsistency
FedNova removes.
"""

from __future__ import annotations

from partita.fl.strategy import Strategy
from partita.fl.update import ClientReport


class FedAvg(Strategy):
    name = "fedavg"

    def _raw_weights(self, report: ClientReport) -> tuple[float, ...]:
        return (float(report.num_examples),)
