"""A federated task whose model is one tensor of a chosen size and whose local step costs next to nothing.

benchmarks/fl.py trains it over real workers to measure the round overhead of the runtime (the workers
import it as `_fl_payload:PayloadTask`, with benchmarks/ on their PYTHONPATH).
"""

from __future__ import annotations

import torch
from torch import nn

from partita.fl.tasks import LocalData, Task


class Payload(nn.Module):
    def __init__(self, numel: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(numel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PayloadTask(Task):
    """numel: float32 parameters in the model (payload bytes = 4 * numel)."""

    name = "payload"

    def __init__(self, num_clients: int = 10, seed: int = 0, numel: int = 1024) -> None:
        super().__init__(num_clients, seed)
        self.numel = int(numel)

    def build_model(self) -> nn.Module:
        return Payload(self.numel)

    def _client_data(self, client_id: int) -> LocalData:
        return LocalData(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))

    def test_data(self) -> LocalData:
        return self._client_data(0)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model.w.sum() * 0.0
