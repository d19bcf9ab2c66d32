"""The base of every aggregation strategy: small verbs, no loop, no I/O.

A strategy answers two questions a round asks (Flower's shape, `configure_train` / `aggregate_train`):

- `configure_train(config)`: what should a client run this round? (FedProx adds its proximal mu.)
- `aggregate(global_weights, updates)`: given the global weights the round started from and the updates
  of the clients that answered, what are the next global weights?

`aggregate` is pure apart from a strategy's own optimizer state (FedNova's server momentum buffer): tensors
in, tensors out. p_i is renormalised over the clients that answered, so a client that missed the deadline
or died changes the weights of the others, not the scale of the step. The round loop lives in
`partita.fl.server`; the transport that reaches clients is not a strategy's concern.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from partita.fl.local import TrainConfig
from partita.fl.update import ClientUpdate, check_compatible


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
        return self._aggregate(dict(global_weights), list(updates))

    def reset(self) -> None:  # noqa: B027 - optional hook: most strategies keep no state
        """Forget server-side optimizer state (call between independent training runs)."""

    @abstractmethod
    def _aggregate(self, global_weights: dict[str, Tensor], updates: list[ClientUpdate]) -> dict[str, Tensor]:
        """The strategy's rule; inputs are already checked and non-empty."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def combine(
    global_weights: Mapping[str, Tensor],
    updates: Sequence[ClientUpdate],
    rule,
) -> dict[str, Tensor]:
    """Apply `rule(name, global_f64, [client_f64, ...]) -> new_f64` to every floating tensor.

    Non-floating tensors (e.g. BatchNorm's num_batches_tracked) are not averaged: the value of the client
    with the most examples is kept.
    """
    largest = max(updates, key=lambda u: u.num_examples)
    out: dict[str, Tensor] = {}
    for name, current in global_weights.items():
        if not torch.is_floating_point(current):
            out[name] = largest.weights[name].detach().clone()
            continue
        base = current.detach().to(torch.float64)
        clients = [u.weights[name].detach().to(torch.float64) for u in updates]
        out[name] = rule(name, base, clients).to(current.dtype)
    return out
