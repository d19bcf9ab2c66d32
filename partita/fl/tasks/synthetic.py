"""`synthetic`: multinomial logistic regression on Synthetic(alpha, beta) of the FedProx paper.

Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020), section 5.1, generator
`generate_synthetic(alpha, beta, iid=False)`: for client k,
    u_k ~ N(0, alpha), B_k ~ N(0, beta)           (alpha: how much local models differ; beta: local inputs)
    W_k ~ N(u_k, 1) in R^{60x10},  b_k ~ N(u_k, 1) in R^10
    v_k ~ N(B_k, 1) in R^60,  x ~ N(v_k, Sigma) with Sigma = diag(j^-1.2),  y = argmax softmax(W_k^T x + b_k)
    n_k ~ lognormal(4, 2) + 50 examples (capped here at `max_examples` to keep rounds short).
Each client keeps 80% of its examples for training; the server evaluates on the union of the other 20%.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from partita.errors import FLError
from partita.fl.tasks.base import LocalData, Task

DIMENSION = 60
CLASSES = 10


class Synthetic(Task):
    name = "synthetic"

    def __init__(
        self,
        num_clients: int = 10,
        seed: int = 0,
        alpha: float = 1.0,
        beta: float = 1.0,
        max_examples: int = 600,
    ) -> None:
        super().__init__(num_clients, seed)
        if alpha < 0 or beta < 0 or max_examples < 60:
            raise FLError(
                f"synthetic: need alpha, beta >= 0 and max_examples >= 60; got {alpha}, {beta}, {max_examples}."
            )
        self.alpha, self.beta = float(alpha), float(beta)
        rng = np.random.default_rng(self.seed)
        counts = np.minimum(rng.lognormal(4, 2, self.num_clients).astype(int) + 50, max_examples)
        mean_w = rng.normal(0, self.alpha, self.num_clients)
        mean_x_center = rng.normal(0, self.beta, self.num_clients)
        sigma_diag = np.power(np.arange(1, DIMENSION + 1, dtype=np.float64), -1.2)
        self._train: list[LocalData] = []
        test_x, test_y = [], []
        for k in range(self.num_clients):
            weight = rng.normal(mean_w[k], 1, (DIMENSION, CLASSES))
            bias = rng.normal(mean_w[k], 1, CLASSES)
            center = rng.normal(mean_x_center[k], 1, DIMENSION)
            x = center + rng.normal(size=(counts[k], DIMENSION)) * np.sqrt(sigma_diag)
            y = np.argmax(x @ weight + bias, axis=1)
            cut = int(0.8 * counts[k])
            xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
            self._train.append(LocalData(xt[:cut], yt[:cut]))
            test_x.append(xt[cut:])
            test_y.append(yt[cut:])
        self._test = LocalData(torch.cat(test_x), torch.cat(test_y))

    def build_model(self) -> nn.Module:
        return nn.Linear(DIMENSION, CLASSES)

    def _client_data(self, client_id: int) -> LocalData:
        return self._train[client_id]

    def test_data(self) -> LocalData:
        return self._test
