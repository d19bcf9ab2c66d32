"""What a federated task provides: a model factory, each client's local data, a loss, an evaluation.

A task is built once per process from its name and options (`partita.fl.tasks.get_task`), on the server and
on every client alike; it must be deterministic in its options (`num_clients`, `seed`, ...) so that client i
on a worker sees the same local data the server assumes, without any data crossing the wire.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from partita.errors import FLError


@dataclass(frozen=True)
class LocalData:
    """A client's examples: inputs x (first dim = examples) and targets y (same length)."""

    x: Tensor
    y: Tensor

    @property
    def num_examples(self) -> int:
        return int(self.x.shape[0])


class Task(ABC):
    """Base of every task. Subclasses set `name` and implement the four hooks below.

    num_clients: how many clients the data is partitioned over (client ids 0..num_clients-1).
    seed:        fixes the model's initial weights and the data partition.
    """

    name: str = "task"

    def __init__(self, num_clients: int = 10, seed: int = 0) -> None:
        if int(num_clients) != num_clients or num_clients < 1:
            raise FLError(f"{self.name}: num_clients must be a positive integer, got {num_clients!r}.")
        self.num_clients = int(num_clients)
        self.seed = int(seed)

    def model(self) -> nn.Module:
        """A fresh model with the task's deterministic initial weights (the global RNG is left untouched)."""
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed also seeds accelerators, which is slow and not needed here.
            torch.random.default_generator.manual_seed(self.seed)
            return self.build_model()

    def client_data(self, client_id: int) -> LocalData:
        """Client `client_id`'s local training data; FLError for an id outside 0..num_clients-1."""
        if int(client_id) != client_id or not 0 <= client_id < self.num_clients:
            raise FLError(f"{self.name}: client id {client_id!r} is outside 0..{self.num_clients - 1}.")
        return self._client_data(int(client_id))

    def evaluate(self, model: nn.Module, data: LocalData | None = None) -> dict[str, float]:
        """{"loss", "accuracy"} of `model` on `data` (None = the task's held-out test set)."""
        data = self.test_data() if data is None else data
        model.eval()
        with torch.no_grad():
            logits = model(data.x)
            loss = nn.functional.cross_entropy(logits, data.y).item()
            accuracy = (logits.argmax(dim=1) == data.y).double().mean().item()
        return {"loss": loss, "accuracy": accuracy}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The scalar training loss of one minibatch (default: cross-entropy of classification logits)."""
        return nn.functional.cross_entropy(model(x), y)

    @abstractmethod
    def build_model(self) -> nn.Module:
        """Construct the model (called under a fixed seed by `model`)."""

    @abstractmethod
    def _client_data(self, client_id: int) -> LocalData:
        """The local data of a valid client id."""

    @abstractmethod
    def test_data(self) -> LocalData:
        """The held-out data the server evaluates the global model on."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_clients={self.num_clients}, seed={self.seed})"
