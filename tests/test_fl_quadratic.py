"""The `quadratic` task's fixed points, computed in closed form here, independently of partita's code.

Client i minimises F_i(x) = 1/2 ||x - e_i||^2. Its gradient at x is x - e_i, so from a round's start x every
local solver moves along x - e_i: Delta_i = x - x_i = c_i (x - e_i), with c_i found below by running the
solver on the scalar u = x - e_i (u_0 = 1). Then

    FedAvg:  x+ = x - sum_i p_i c_i (x - e_i)              fixed point  sum_i p_i c_i e_i / sum_i p_i c_i
    FedNova: x+ = x - tau_eff sum_i p_i c_i/W_i (x - e_i)  fixed point  sum_i p_i (c_i/W_i) e_i / sum_i p_i c_i/W_i

With the paper's normaliser (`FedNova(work="paper")`), W_i = A_i = eta_i ||a_i||_1 from the paper's closed forms:
to first order in eta, c_i = eta_i tau_i and c_i / A_i = 1, hence FedAvg's tau-weighted point and FedNova's
x* = sum_i p_i e_i up to an O(eta) residue. With the realised work (the default), W_i = ||Delta_i|| / ||g_i|| =
|c_i| (the gradient at the round's start is x - e_i), so c_i / W_i = 1 and the fixed point is x* exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from partita.fl import ClientProfile, FedAvg, FedNova, FedProx, get_task, run_in_process

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine threads oversubscribe.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


EXAMPLES = [10, 20, 30, 40]  # p = 0.1, 0.2, 0.3, 0.4
TAUS = [1, 2, 4, 8]


def contraction(tau: int, lr: float, momentum: float = 0.0, mu: float = 0.0) -> float:
    """c = 1 - u_tau for the local solver run on u (gradient u) from u_0 = 1."""
    u, buf = 1.0, None
    for _ in range(tau):
        grad = u
        buf = grad if buf is None else momentum * buf + grad
        direction = (buf if momentum else grad) + mu * (u - 1.0)
        u -= lr * direction
    return 1.0 - u


def paper_norm(tau: int, lr: float, momentum: float = 0.0, mu: float = 0.0) -> float:
    """A = eta ||a||_1 with the paper's closed forms (vanilla, momentum, proximal)."""
    if momentum:
        return lr * (tau - momentum * (1 - momentum**tau) / (1 - momentum)) / (1 - momentum)
    if mu:
        return (1 - (1 - lr * mu) ** tau) / mu
    return lr * tau


def weighted_point(weights) -> np.ndarray:
    p = np.array(EXAMPLES, dtype=float) / sum(EXAMPLES)
    w = p * np.array(weights, dtype=float)
    return w / w.sum()


def run(strategy, lrs, momentum=0.0, mu=0.0, rounds=80):
    task = get_task("quadratic", num_clients=4, examples=EXAMPLES)
    profiles = {
        i: ClientProfile(local_steps=TAUS[i], lr=lrs[i], momentum=momentum, prox_mu=mu, batch_size=5)
        for i in range(4)
    }
    history = run_in_process(task, strategy, rounds, profiles=profiles)
    return history.weights["x"].double().numpy(), task.optimum().double().numpy()


SOLVERS = {
    "vanilla": dict(lrs=[0.05] * 4, momentum=0.0, mu=0.0),
    "momentum": dict(lrs=[0.05] * 4, momentum=0.5, mu=0.0),
    "proximal": dict(lrs=[0.05] * 4, momentum=0.0, mu=1.0),
    "unequal-lr": dict(lrs=[0.08, 0.02, 0.05, 0.03], momentum=0.0, mu=0.0),
}


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_fedavg_converges_to_the_tau_weighted_point_and_fednova_to_the_optimum(solver):
    lrs, momentum, mu = SOLVERS[solver]["lrs"], SOLVERS[solver]["momentum"], SOLVERS[solver]["mu"]
    c = [contraction(t, lr, momentum, mu) for t, lr in zip(TAUS, lrs, strict=True)]
    norms = [paper_norm(t, lr, momentum, mu) for t, lr in zip(TAUS, lrs, strict=True)]
    fedavg_exact = weighted_point(c)
    paper_exact = weighted_point([ci / ai for ci, ai in zip(c, norms, strict=True)])
    realised_exact = weighted_point([ci / abs(ci) for ci in c])

    avg_strategy = FedProx(mu) if mu else FedAvg()
    x_avg, optimum = run(avg_strategy, lrs, momentum, mu)
    x_paper, _ = run(FedNova(work="paper"), lrs, momentum, mu)
    x_nova, _ = run(FedNova(), lrs, momentum, mu)

    np.testing.assert_allclose(x_avg, fedavg_exact, atol=2e-4)
    np.testing.assert_allclose(x_paper, paper_exact, atol=2e-4)
    np.testing.assert_allclose(x_nova, realised_exact, atol=2e-4)
    np.testing.assert_allclose(realised_exact, optimum, atol=1e-12)
    # First order in the learning rate: FedAvg weights p_i eta_i tau_i, FedNova p_i.
    residue = max(lr * t for lr, t in zip(lrs, TAUS, strict=True))
    tau_weighted = weighted_point([lr * t for lr, t in zip(lrs, TAUS, strict=True)])
    assert np.linalg.norm(x_avg - tau_weighted) < residue
    assert np.linalg.norm(x_paper - optimum) < residue / 2
    assert np.linalg.norm(x_avg - optimum) > 3 * np.linalg.norm(x_paper - optimum)


def test_server_momentum_keeps_fednovas_fixed_point():
    lrs = [0.05] * 4
    c = [contraction(t, 0.05) for t in TAUS]
    exact = weighted_point([ci / paper_norm(t, 0.05) for ci, t in zip(c, TAUS, strict=True)])
    x, _ = run(FedNova(server_lr=0.5, server_momentum=0.5, work="paper"), lrs, rounds=120)
    np.testing.assert_allclose(x, exact, atol=2e-4)
    x, optimum = run(FedNova(server_lr=0.5, server_momentum=0.5), lrs, rounds=120)
    np.testing.assert_allclose(x, optimum, atol=2e-4)


def test_equal_work_makes_fednova_and_fedavg_agree():
    task = get_task("quadratic", num_clients=4, examples=EXAMPLES)
    profiles = {i: ClientProfile(local_steps=3, lr=0.05, batch_size=5) for i in range(4)}
    avg = run_in_process(task, FedAvg(), 5, profiles=profiles).weights["x"]
    nova = run_in_process(task, FedNova.paper(), 5, profiles=profiles).weights["x"]
    np.testing.assert_allclose(avg.numpy(), nova.numpy(), atol=1e-6)
