"""The base of every aggregation strategy: small verbs, no loop, no I/O.

A strategy answers two questions a round asks (Flower's shape, `configure_train` / `aggregate_train`):

- `configure_train(config)`: what should a client run this round? (FedProx adds its proximal mu.)
- `aggregate(global_weights, updates)`: given the global weights the round started from and the updates
  of the clients that answered, what are the next global weights?

Every strategy here is *linear in the clients' changes* Delta_i = x - x_i: it forms K weighted sums

    S_k = sum_i w_{i,k} Delta_i          (w_{i,k} = `client_weights(reports)[i][k]`, scalars only)

and takes its step from those sums and the clients' scalars (`server_step`). The weights depend on a
client's own scalars (`ClientReport`: n_i, tau_i, its solver) and on the others' only through one normaliser,
sum_j n_j over the clients counted (`counted_examples`), so leaving a client out rescales every w_{i,k} by
the same factor. That is what lets secure aggregation (`partita.fl.secagg`) compute the sums without the
server seeing any single Delta_i: clients pre-scale by their announced weights and mask, and the server
rescales the unmasked sums when clients dropped after masking. The plain `aggregate` computes the same
sums in float64 from the updates themselves.

p_i is renormalised over the clients that answered, so a client that missed the deadline or died changes
the weights of the others, not the scale of the step. `server_step` may keep optimizer state (FedNova's
server momentum) until `reset()`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from partita.fl.local import TrainConfig
from partita.fl.update import ClientReport, ClientUpdate, check_compatible


class Strategy(ABC):
    """Base class: public verbs check their inputs, then call a private hook."""

    name: str = "strategy"

    def configure_train(self, config: TrainConfig) -> TrainConfig:
        """The local-training configuration a client gets this round (default: unchanged)."""
        return config

    def aggregate(
        self, global_weights: Mapping[str, Tensor], updates: Sequence[ClientUpdate]
    ) -> dict[str, Tensor]:
        """Next global weights from the updates of the clients that answered; FLError if none did or shapes differ.

        Floating-point tensors are combined in float64 and returned in their original dtype; integer
        buffers (counters) are taken from the client holding the most examples.
        """
        check_compatible(global_weights, updates)
        reports = [u.report for u in updates]
        sums = weighted_sums(global_weights, updates, self.client_weights(reports))
        stepped = self.server_step(global_weights, sums, reports)
        largest = max(updates, key=lambda u: u.num_examples)
        for name, current in global_weights.items():
            if not torch.is_floating_point(current):
                stepped[name] = largest.weights[name].detach().clone()
        return stepped

    def client_weights(self, reports: Sequence[ClientReport]) -> list[tuple[float, ...]]:
        """w_{i,k} for every client i (in order) and sum k; every w_{i,k} is a multiple of 1 / counted_examples."""
        total = self.counted_examples(reports)
        return [tuple(w / total for w in self._raw_weights(r)) for r in reports]

    def counted_examples(self, reports: Sequence[ClientReport]) -> float:
        """sum_j n_j over the clients whose changes count (the normaliser of p_j; > 0 when any counts)."""
        return float(sum(r.num_examples for r in reports if any(self._raw_weights(r)))) or 1.0

    def server_step(
        self, global_weights: Mapping[str, Tensor], sums: Sequence[Mapping[str, Tensor]], reports: Sequence[ClientReport]
    ) -> dict[str, Tensor]:
        """The next global weights from the sums S_k (float64 tensors of the floating parameters).

        Integer buffers are returned unchanged (`aggregate` takes them from the largest client).
        """
        out = {}
        for name, current in global_weights.items():
            if torch.is_floating_point(current):
                base = current.detach().to(torch.float64)
                out[name] = self._step(name, base, [s[name] for s in sums], reports).to(current.dtype)
            else:
                out[name] = current.detach().clone()
        return out

    @property
    def num_sums(self) -> int:
        """K, the number of weighted sums the strategy needs."""
        return 1

    def reset(self) -> None:  # noqa: B027 - optional hook: most strategies keep no state
        """Forget server-side optimizer state (call between independent training runs)."""

    @abstractmethod
    def _raw_weights(self, report: ClientReport) -> tuple[float, ...]:
        """n_i * g_k(report_i) for k < K: the client's weights before dividing by sum_j n_j (0s: not counted)."""

    def _step(self, name: str, base: Tensor, sums: list[Tensor], reports: Sequence[ClientReport]) -> Tensor:
        """One floating tensor's new value (default: x - S_0, the averaging step)."""
        return base - sums[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def weighted_sums(
    global_weights: Mapping[str, Tensor],
    updates: Sequence[ClientUpdate],
    weights: Sequence[Sequence[float]],
) -> list[dict[str, Tensor]]:
    """S_k[name] = sum_i w_{i,k} (x - x_i)[name] in float64, for every floating tensor of the global weights."""
    num_sums = len(weights[0]) if weights else 0
    sums: list[dict[str, Tensor]] = [{} for _ in range(num_sums)]
    for name, current in global_weights.items():
        if not torch.is_floating_point(current):
            continue
        base = current.detach().to(torch.float64)
        deltas = [base - u.weights[name].detach().to(torch.float64) for u in updates]
        for k in range(num_sums):
            terms = [w[k] * d for w, d in zip(weights, deltas, strict=True) if w[k]]
            sums[k][name] = sum(terms) if terms else torch.zeros_like(base)
    return sums
