"""`quadratic`: client i minimises F_i(x) = 1/2 ||x - e_i||^2, so every fixed point is known in closed form.

x lives in R^num_clients and e_i is the i-th unit vector. Client i holds n_i examples (all equal to e_i, so a
minibatch's loss is F_i exactly); p_i = n_i / sum_j n_j. The global objective F(x) = sum_i p_i F_i(x) has
its minimum at x* = sum_i p_i e_i. FedAvg with unequal local work converges elsewhere (towards the
p_i tau_i-weighted point); FedNova converges to x* up to an O(lr) residue. The tests check both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from partita.errors import FLError
from partita.fl.tasks.base import LocalData, Task


class Point(nn.Module):
    """The model: a single parameter vector x (starts at zero)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(dim))

    def forward(self, targets: Tensor) -> Tensor:
        return self.x.expand_as(targets)


class Quadratic(Task):
    """examples: n_i per client (default: 10 * (i + 1), so p_i are unequal)."""

    name = "quadratic"

    def __init__(self, num_clients: int = 4, seed: int = 0, examples: Sequence[int] | None = None) -> None:
        super().__init__(num_clients, seed)
        counts = [10 * (i + 1) for i in range(self.num_clients)] if examples is None else list(examples)
        if len(counts) != self.num_clients or any(int(n) != n or n < 1 for n in counts):
            raise FLError(
                f"quadratic: examples must list {self.num_clients} positive integers, got {counts!r}."
            )
        self.examples = [int(n) for n in counts]

    def build_model(self) -> nn.Module:
        return Point(self.num_clients)

    def _client_data(self, client_id: int) -> LocalData:
        target = torch.zeros(self.examples[client_id], self.num_clients)
        target[:, client_id] = 1.0
        return LocalData(target, torch.zeros(self.examples[client_id], dtype=torch.long))

    def test_data(self) -> LocalData:
        rows = [self._client_data(i).x for i in range(self.num_clients)]
        x = torch.cat(rows)
        return LocalData(x, torch.zeros(x.shape[0], dtype=torch.long))

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return 0.5 * ((model(x) - x) ** 2).sum(dim=1).mean()

    def optimum(self) -> Tensor:
        """x* = sum_i p_i e_i, the minimiser of the global objective."""
        counts = torch.tensor(self.examples, dtype=torch.float64)
        return (counts / counts.sum()).to(torch.float32)

    def evaluate(self, model: nn.Module, data: LocalData | None = None) -> dict[str, float]:
        """{"loss": F(x) on `data` (default: all clients, i.e. the global objective), "distance_to_optimum"}."""
        data = self.test_data() if data is None else data
        with torch.no_grad():
            loss = self.loss(model, data.x, data.y).item()
            distance = torch.linalg.vector_norm(model.x.detach() - self.optimum()).item()
        return {"loss": loss, "distance_to_optimum": distance}
