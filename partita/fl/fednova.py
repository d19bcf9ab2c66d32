"""FedNova (Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", NeurIPS 2020; the authors' code JYWa/FedNova, `distoptim/FedNova.py`): normalised averaging.

Client i starts a round at the global weights x and runs tau_i local steps of its solver with stochastic
gradients g_1..g_tau. For every solver below its total change is a linear combination of those gradients,

    Delta_i = x - x_i = eta_i * sum_k a_{i,k} g_k = eta_i * G_i a_i,

with a normalising vector a_i that depends only on the solver (`partita.fl.local` runs exactly these):

    vanilla SGD:                 a_i = [1, ..., 1],                          ||a_i||_1 = tau_i
    momentum SGD (rho), buffer
    reset each round:            a_{i,k} = (1 - rho^(tau_i - k + 1)) / (1 - rho),
                                 ||a_i||_1 = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho)
    proximal SGD (mu):           a_{i,k} = (1 - eta_i mu)^(tau_i - k),       ||a_i||_1 = [1 - (1 - eta_i mu)^tau_i] / (eta_i mu)
    momentum and proximal:       the same linear recursion, solved numerically (`normalizing_vector`).

Learning-rate weighting: clients may use different learning rates, so the normaliser is taken in
learning-rate units, A_i = eta_i ||a_i||_1 (for a per-step schedule, sum_k eta_k a_{i,k}: what a client sends
as `ClientUpdate.a_norm`). The normalised update d_i = Delta_i / A_i is then an average gradient, whatever
eta_i and tau_i were, and the server takes

    D       = tau_eff * sum_i p_i d_i = sum_i p_i (tau_eff / A_i) Delta_i
    v <- server_momentum * v + D ;  x^{t+1} = x^t - server_lr * v      (server momentum, as the authors' `gmf`)

    tau_eff = sum_i p_i A_i                                    (`FedNova.paper()`: effective local work)
    tau_eff = min(sum_i p_i A_i, ||S_avg|| / ||sum_i p_i d_i||)  (`FedNova()`, the default: "bounded")

where S_avg = sum_i p_i Delta_i is FedAvg's step (norms over all floating parameters together).

The step length. The paper's tau_eff extrapolates every client's average gradient over the mean work; with
very unequal work (2 against 30 steps) the few-step clients' changes are multiplied up (8x, and about 35x with
local momentum 0.9, whose ||a_i||_1 grows faster than tau_i) while the many-step clients' saturated
trajectories give small d_i, so the paper's step overshoots (docs/fl.md: it diverged with momentum 0.9 on
non-IID digits). The default keeps the direction and bounds its length by FedAvg's step, a mean of real client
trajectories; server momentum 0.5 recovers the speed. Near the fixed point sum_i p_i d_i -> 0, so the bound
lifts and the paper's tau_eff applies.

The realised work (default `work="realised"`). A_i is the client's work *if its gradient stayed constant*
along its trajectory (then Delta_i = A_i g_i exactly). Where the trajectory saturates (many steps, momentum)
the client moves much less than A_i g_i, so d_i = Delta_i / A_i understates its gradient and the few-step
clients carry the direction (with five clients, steps 2-30 and momentum 0.9, a 2-step client held 60-90% of
it). Each client therefore measures its work: W_i = ||Delta_i|| / ||g_i,1|| (`ClientUpdate.work`), with g_i,1
its first minibatch gradient, taken at the global weights. W_i = A_i when the gradient stays constant, and
d_i = Delta_i / W_i always has the length of the client's own gradient at the round's start: no client's
change is extrapolated beyond it. On `quadratic` W_i = c_i exactly, so the fixed point is the optimum at any
learning rate (the paper's normaliser leaves an O(lr) residue). `work="paper"` uses A_i, as does a client
that sends no `work`. W_i is a client's own scalar, so secure aggregation's weights stay linear.

With equal learning rates eta this is the authors' code exactly: x^{t+1} = x^t - sum_i p_i (tau_eff/||a_i||_1)
Delta_i with tau_eff = sum_i p_i ||a_i||_1. One detail follows their code rather than the general formula: for a
proximal client the code counts its work in tau_eff as tau_i (not ||a_i||_1), so a proximal client contributes
p_i eta_i tau_i to tau_eff here too. tau_eff and server momentum only scale the step; the fixed point,
sum_i p_i d_i = 0, is the same for every positive tau_eff. A client that ran no steps has no direction and is left out (p renormalised over the rest).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from partita.errors import FLError
from partita.fl.strategy import Strategy
from partita.fl.update import ClientReport


def normalizing_vector(
    local_steps: int, momentum: float = 0.0, prox_mu: float = 0.0, lr: float = 1.0
) -> np.ndarray:
    """a_i (length tau_i) such that x_0 - x_tau = lr * sum_k a_k g_k for the solver of `partita.fl.local`.

    Solved from the solver's recursion on coefficient vectors: buf_k = rho buf_{k-1} + g_k,
    d_k = buf_k - lr mu (sum_{j<k} d_j), so that S_tau = sum_k d_k = sum_k a_k g_k.
    """
    tau = int(local_steps)
    buf = np.zeros(tau)
    total = np.zeros(tau)
    for k in range(tau):
        buf *= momentum
        buf[k] += 1.0
        total = total + buf - lr * prox_mu * total
    return total


def a_norm_l1(local_steps: int, momentum: float = 0.0, prox_mu: float = 0.0, lr: float = 1.0) -> float:
    """||a_i||_1 in closed form for vanilla, momentum and proximal SGD (recursion when both are on)."""
    tau = int(local_steps)
    if momentum and prox_mu:
        return float(np.abs(normalizing_vector(tau, momentum, prox_mu, lr)).sum())
    if momentum:
        return (tau - momentum * (1 - momentum**tau) / (1 - momentum)) / (1 - momentum)
    if prox_mu:
        shrink = lr * prox_mu
        return (1 - (1 - shrink) ** tau) / shrink
    return float(tau)


def lr_weighted_norm(update: ClientReport) -> float:
    """A_i = eta_i ||a_i||_1, or the client's own `a_norm` when it sent one."""
    if update.a_norm is not None:
        return float(update.a_norm)
    return update.lr * a_norm_l1(update.local_steps, update.momentum, update.prox_mu, update.lr)


def effective_work(update: ClientReport) -> float:
    """Client i's contribution to tau_eff before the p_i factor (eta_i tau_i for proximal, as the authors' code)."""
    if update.a_norm is None and update.prox_mu and not update.momentum:
        return update.lr * update.local_steps
    return lr_weighted_norm(update)


def works(report: ClientReport) -> bool:
    """Whether a client has a direction to count (it ran a step, or says how much work it did)."""
    return report.local_steps > 0 or report.a_norm is not None


TAU_EFF_RULES = ("bounded", "paper")
WORK_RULES = ("realised", "paper")


class FedNova(Strategy):
    """Normalised averaging; the defaults are the stable variant (module docstring, "The step length").

    server_lr:       the server's step size on D (1.0 = the paper's).
    server_momentum: beta of the server momentum buffer v (0 = none); it persists across rounds until
                     `reset()`. Default 0.5.
    work:            "realised" (default): normalise by the work the client measured (`ClientUpdate.work`,
                     ||Delta_i|| / ||g_i,1||), falling back to A_i; "paper": by A_i = eta_i ||a_i||_1.
    tau_eff:         "bounded" (default): min(sum_i p_i A_i, ||S_avg|| / ||sum_i p_i d_i||), so the step is never
                     longer than FedAvg's would be; "paper": sum_i p_i A_i, as the paper and its code.
    `FedNova.paper()` is the paper's plain rule (paper normaliser and tau_eff, no server momentum).
    """

    name = "fednova"

    def __init__(
        self, server_lr: float = 1.0, server_momentum: float = 0.5, tau_eff: str = "bounded", work: str = "realised"
    ) -> None:
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise FLError(f"FedNova server_lr must be > 0, got {server_lr!r}.")
        if not 0.0 <= server_momentum < 1.0:
            raise FLError(f"FedNova server_momentum must be in [0, 1), got {server_momentum!r}.")
        if tau_eff not in TAU_EFF_RULES:
            raise FLError(f"FedNova tau_eff must be one of {', '.join(TAU_EFF_RULES)}, got {tau_eff!r}.")
        if work not in WORK_RULES:
            raise FLError(f"FedNova work must be one of {', '.join(WORK_RULES)}, got {work!r}.")
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)
        self.tau_eff = tau_eff
        self.work = work
        self._velocity: dict[str, Tensor] = {}

    @classmethod
    def paper(cls) -> FedNova:
        """The rule of the paper and its code: tau_eff = sum_i p_i A_i, server_lr 1, no server momentum."""
        return cls(server_lr=1.0, server_momentum=0.0, tau_eff="paper", work="paper")

    def reset(self) -> None:
        self._velocity = {}

    @property
    def num_sums(self) -> int:
        return 2 if self.tau_eff == "bounded" else 1

    def normaliser(self, report: ClientReport) -> float:
        """W_i: the client's realised work when it measured one and `work="realised"`, else the paper's A_i."""
        if self.work == "realised" and report.work is not None:
            return float(report.work)
        return lr_weighted_norm(report)

    def _raw_weights(self, report: ClientReport) -> tuple[float, ...]:
        """(n_i / W_i) for the paper's rule; (n_i / W_i, n_i) when bounded (the second sum is FedAvg's step)."""
        if not works(report):
            return (0.0,) * self.num_sums
        normalised = report.num_examples / self.normaliser(report)
        return (normalised, float(report.num_examples)) if self.tau_eff == "bounded" else (normalised,)

    def step_length(self, sums: Sequence[Mapping[str, Tensor]], reports: Sequence[ClientReport]) -> float:
        """tau_eff of this round: the paper's sum_i p_i A_i, capped by ||S_avg|| / ||sum_i p_i d_i|| when bounded."""
        working = [r for r in reports if works(r)]
        if not working:
            return 0.0
        total = sum(r.num_examples for r in working)
        if self.work == "realised":
            paper = sum(r.num_examples / total * self.normaliser(r) for r in working)
        else:
            paper = sum(r.num_examples / total * effective_work(r) for r in working)
        if self.tau_eff == "paper":
            return paper
        normalised = math.sqrt(sum(float((t * t).sum()) for t in sums[0].values()))
        averaged = math.sqrt(sum(float((t * t).sum()) for t in sums[1].values()))
        return paper if normalised == 0.0 else min(paper, averaged / normalised)

    def server_step(self, global_weights, sums, reports):
        tau_eff = self.step_length(sums, reports)
        if tau_eff == 0.0:  # no client did any work: nothing moves, and the momentum buffer is left as it was
            return {name: t.detach().clone() for name, t in global_weights.items()}
        out = {}
        for name, current in global_weights.items():
            if not torch.is_floating_point(current):
                out[name] = current.detach().clone()
                continue
            base = current.detach().to(torch.float64)
            direction = tau_eff * sums[0][name]
            if self.server_momentum:
                previous = self._velocity.get(name)
                if previous is not None and previous.shape != direction.shape:
                    raise FLError(
                        f"FedNova's momentum buffer for {name} has another shape; call reset() for a new model."
                    )
                direction = direction if previous is None else self.server_momentum * previous + direction
                self._velocity[name] = direction
            out[name] = (base - self.server_lr * direction).to(current.dtype)
        return out

    def __repr__(self) -> str:
        return (
            f"FedNova(server_lr={self.server_lr}, server_momentum={self.server_momentum}, "
            f"tau_eff={self.tau_eff!r}, work={self.work!r})"
        )
