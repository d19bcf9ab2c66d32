"""Built-in tasks, the task registry, the Dirichlet partition, and FedNova against FedAvg on non-IID digits."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

from partita.errors import FLError
from partita.fl import ClientProfile, FedAvg, FedNova, get_task, run_in_process
from partita.fl.tasks.digits import dirichlet_partition
from partita.fl.tasks.quadratic import Quadratic

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine threads oversubscribe.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_registry_resolves_builtins_and_module_references():
    assert get_task("quadratic", num_clients=3).name == "quadratic"
    task = get_task("partita.fl.tasks.quadratic:Quadratic", num_clients=2)
    assert isinstance(task, Quadratic)
    with pytest.raises(FLError, match="built-in"):
        get_task("no-such-task")
    with pytest.raises(FLError, match="cannot import"):
        get_task("no_such_package.mod:Task")
    with pytest.raises(FLError, match="no attribute"):
        get_task("partita.fl.tasks.quadratic:Nope")
    with pytest.raises(FLError, match="does not accept"):
        get_task("quadratic", bogus=1)
    with pytest.raises(FLError, match="not a partita"):
        get_task("partita.fl.tasks.quadratic:Point", dim=2)


def test_client_ids_outside_the_partition_are_refused():
    with pytest.raises(FLError, match="outside"):
        get_task("quadratic", num_clients=2).client_data(2)


def test_quadratic_optimum_is_the_example_weighted_mean_of_targets():
    task = get_task("quadratic", num_clients=3, examples=[1, 1, 2])
    assert torch.allclose(task.optimum(), torch.tensor([0.25, 0.25, 0.5]))
    model = task.model()
    with torch.no_grad():
        model.x.copy_(task.optimum())
    assert task.evaluate(model)["distance_to_optimum"] == pytest.approx(0.0)


def test_dirichlet_partition_is_disjoint_complete_and_skewed_for_small_alpha():
    labels = np.repeat(np.arange(10), 100)
    skewed = dirichlet_partition(labels, 10, 0.1, np.random.default_rng(0))
    even = dirichlet_partition(labels, 10, 100.0, np.random.default_rng(0))
    for parts in (skewed, even):
        joined = np.concatenate(parts)
        assert sorted(joined.tolist()) == list(range(len(labels)))
        assert min(len(p) for p in parts) >= 10

    def labels_held(parts):  # labels holding at least 10% of a client's data, averaged over clients
        return np.mean([np.sum(np.bincount(labels[p], minlength=10) >= 0.1 * len(p)) for p in parts])

    assert labels_held(skewed) < 4 < labels_held(even)


def test_tasks_are_deterministic_in_their_seed():
    a, b = get_task("synthetic", num_clients=4, seed=3), get_task("synthetic", num_clients=4, seed=3)
    assert torch.equal(a.client_data(2).x, b.client_data(2).x)
    assert torch.equal(a.model().weight, b.model().weight)
    assert a.client_data(0).x.shape[1] == 60
    c = get_task("digits", num_clients=5, seed=1)
    d = get_task("digits", num_clients=5, seed=1)
    assert torch.equal(c.client_data(4).y, d.client_data(4).y)
    assert c.test_data().x.shape[1:] == (1, 8, 8)


def test_synthetic_logistic_regression_learns():
    task = get_task("synthetic", num_clients=5, seed=0)
    profiles = {i: ClientProfile(local_steps=10, lr=0.05, batch_size=16) for i in range(5)}
    history = run_in_process(task, FedAvg(), 8, profiles=profiles)
    assert history.final.accuracy > 0.5  # 10 classes: chance is about 0.1
    assert history.final.loss < history.rounds[0].loss


def test_digits_with_the_cli_defaults_visibly_learns_in_three_rounds():
    # `partita fl --task digits --rounds 3` on the README's home-edge cluster: five clients, Dirichlet(0.5),
    # 10 local steps at lr 0.05. With raw [0, 1] pixels the CNN sat on a plateau (0.203, 0.219, 0.225 here) and
    # fell below chance over workers; SmallCNN now standardises its input (see partita/fl/tasks/digits.py).
    task = get_task("digits", num_clients=5, seed=0)
    profiles = {i: ClientProfile() for i in range(5)}
    for strategy in (FedAvg(), FedNova()):
        accuracy = [r.accuracy for r in run_in_process(task, strategy, 3, profiles=profiles).rounds]
        assert accuracy[2] > 0.35 and accuracy[2] > accuracy[0] + 0.2, (strategy, accuracy)


# Deadline-driven unequal work, as on the home-edge cluster: fast devices hit the 40-step cap, Pis fit 2 or 5.
UNEQUAL_STEPS = [40, 40, 2, 2, 5, 40, 40, 2, 2, 5]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fednova_reaches_a_lower_global_loss_than_fedavg_under_unequal_steps(seed):
    # Logistic regression on Synthetic(1, 1): the convex, first-order regime FedNova's analysis covers.
    # Measured on seeds 0-5 (all of those tried): FedNova's test loss was lower on every one.
    task = get_task("synthetic", num_clients=10, seed=seed)
    profiles = {i: ClientProfile(local_steps=s, lr=0.02, batch_size=32) for i, s in enumerate(UNEQUAL_STEPS)}
    fedavg = run_in_process(task, FedAvg(), 10, profiles=profiles, seed=seed).final
    fednova = run_in_process(task, FedNova(), 10, profiles=profiles, seed=seed).final
    assert fednova.loss <= fedavg.loss


# FedNova's own setting (Wang et al. 2020, section 6): every client runs the same number of local *epochs*,
# so tau_i is proportional to its data, n_i. On a Dirichlet(0.3) split of ten clients that is 2 to 22 steps a
# round, and FedAvg's fixed point weights client i by n_i * tau_i, roughly n_i squared.
DIGITS_SEEDS = range(8)
DIGITS_ROUNDS = 12  # benchmarks/fl.py runs 20; at 12 FedNova won 8 of 8 seeds here, 0.902 against 0.828 mean


def _digits_pair(seed: int) -> tuple[float, float, tuple[int, ...], tuple[int, ...]]:
    """FedAvg's and FedNova's final accuracy on one seed (module level: runs in a worker process)."""
    torch.set_num_threads(1)
    task = get_task("digits", num_clients=10, seed=seed, alpha=0.3)
    profiles = {i: ClientProfile(local_steps=None, local_epochs=2, lr=0.05, batch_size=32) for i in range(10)}
    avg = run_in_process(task, FedAvg(), DIGITS_ROUNDS, profiles=profiles, seed=seed).final
    nova = run_in_process(task, FedNova(), DIGITS_ROUNDS, profiles=profiles, seed=seed).final
    return avg.accuracy, nova.accuracy, avg.steps, nova.steps


@pytest.mark.slow
def test_fednova_is_at_least_as_accurate_as_fedavg_on_non_iid_digits_with_unequal_steps():
    # Measured on seeds 0-19 (benchmarks/fl.py, "paired seeds"; default FedNova, standardised SmallCNN): FedNova's
    # final accuracy was higher on 20 of 20, 0.936 against 0.888; a single seed's figure moves by a few points
    # (360 test images), so the test compares the strategies over the same eight seeds and on most of them.
    # Seeds are independent: two processes share them (one per core of the CI machine).
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_digits_pair, DIGITS_SEEDS))
    fedavg = [r[0] for r in results]
    fednova = [r[1] for r in results]
    for _, _, avg_steps, nova_steps in results:
        assert avg_steps == nova_steps and len(set(avg_steps)) > 3, "local steps must be unequal (and the same)"
    figures = ", ".join(f"seed {s}: {a:.3f} -> {b:.3f}" for s, a, b in zip(DIGITS_SEEDS, fedavg, fednova, strict=True))
    assert np.mean(fednova) >= np.mean(fedavg), f"FedAvg -> FedNova accuracy: {figures}"
    assert sum(b >= a for a, b in zip(fedavg, fednova, strict=True)) > len(fedavg) / 2, figures
    assert min(fednova) > 0.5, figures  # 10 balanced classes: chance is 0.1


# Issue 13's robustness target: local steps spread 2-30, in the order of the clients' data sizes or not, with
# local momentum 0.9, at the default lr. The paper's rule (FedNova.paper()) diverged here (mean accuracy 0.36
# and 0.72; docs/fl.md), and with five clients (uncorrelated) FedNova normalised by the paper's A_i fell to 0.908
# mean, worst 0.694, against FedAvg's 0.960: the few-step clients carried the direction. The default (realised
# work) must stay within a point of FedAvg on the mean and never diverge. Paired: FedAvg and FedNova see the
# same partition, initial weights and minibatches. The momentum-0 rows and the five-client correlated rows of
# the same table (FedNova +0.4 to +3.9 points) are measured by benchmarks/fl.py; with them this test would take
# several minutes of CPU on two cores.
# 12 rounds, not benchmarks/fl.py's 20, to keep CI fast. Measured here: FedAvg -> FedNova mean accuracy
# 0.958 -> 0.961, 0.964 -> 0.970 and 0.943 -> 0.961 (worst FedNova run 0.936); the paper's rule at 12 rounds
# 0.379, 0.626 and 0.212 (worst 0.100), so the divergence this test guards against still shows.
ROBUST_SEEDS = range(8)
ROBUST_ROUNDS = 12
ROBUST_SETTINGS = [(10, False, 0.9), (10, True, 0.9), (5, False, 0.9)]  # (clients, correlated, momentum)


def spread_steps(sizes: list[int], correlated: bool, seed: int) -> list[int]:
    """Steps 2..30 spread evenly over the clients: by data size (correlated) or in a seeded random order."""
    steps = [round(2 + 28 * i / (len(sizes) - 1)) for i in range(len(sizes))]
    if correlated:
        order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    else:
        order = [int(i) for i in np.random.default_rng([seed, 99]).permutation(len(sizes))]
    out = [0] * len(sizes)
    for rank, client in enumerate(order):
        out[client] = steps[rank]
    return out


def _robust_pair(job: tuple[int, bool, float, int]) -> tuple[float, float]:
    """FedAvg's and FedNova's final accuracy in one setting and seed (module level: runs in a worker process)."""
    clients, correlated, momentum, seed = job
    torch.set_num_threads(1)
    task = get_task("digits", num_clients=clients, seed=seed, alpha=0.3)
    sizes = [task.client_data(i).num_examples for i in range(clients)]
    steps = spread_steps(sizes, correlated, seed)
    profiles = {i: ClientProfile(local_steps=s, lr=0.05, momentum=momentum) for i, s in enumerate(steps)}
    avg = run_in_process(task, FedAvg(), ROBUST_ROUNDS, profiles=profiles, seed=seed).final
    nova = run_in_process(task, FedNova(), ROBUST_ROUNDS, profiles=profiles, seed=seed).final
    return avg.accuracy, nova.accuracy


@pytest.mark.slow
@pytest.mark.timeout(900)  # about 45 s on two idle cores; far longer on a loaded machine
def test_fednova_stays_within_a_point_of_fedavg_and_never_diverges_under_unequal_work_and_momentum():
    jobs = [(n, c, m, seed) for n, c, m in ROBUST_SETTINGS for seed in ROBUST_SEEDS]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = dict(zip(jobs, pool.map(_robust_pair, jobs), strict=True))
    for clients, correlated, momentum in ROBUST_SETTINGS:
        pairs = [results[(clients, correlated, momentum, seed)] for seed in ROBUST_SEEDS]
        fedavg, fednova = [p[0] for p in pairs], [p[1] for p in pairs]
        figures = f"{clients} clients, correlated={correlated}, momentum={momentum}: " + ", ".join(
            f"{a:.3f}->{b:.3f}" for a, b in pairs
        )
        assert np.mean(fednova) >= np.mean(fedavg) - 0.01, figures
        assert min(fednova) > 0.5, figures  # no divergent run (chance is 0.1)
