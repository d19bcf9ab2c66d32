"""partita's strategies inside Flower: a Flower simulation ends where partita's own server does.

Needs the optional extra `flower` (flwr with its Ray-based simulation engine), which pins typer, rich and
starlette below what partita uses: `make test` runs this module in the overlay venv .venv-flower (see the
Makefile); the main venv skips it.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from flwr.app import ArrayRecord  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from partita.fl import (  # noqa: E402
    ClientProfile,
    FedAvg,
    FedNova,
    FedProx,
    flower,  # noqa: E402
    get_task,
    run_in_process,
)
from partita.fl.update import weights_of  # noqa: E402

# Ray runs each ClientApp with one CPU (one intra-op thread); so does partita's side, for the same sums.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# Three clients of unequal work with local momentum (so that a_norm and the realised work matter), two rounds (so
# that FedNova's server momentum carries over). Most of the test's time is Ray starting its one actor.
CLIENTS = 3
ROUNDS = 2
PROFILES = {i: ClientProfile(local_steps=2 + 4 * i, lr=0.05, momentum=0.5) for i in range(CLIENTS)}
STRATEGIES = {
    "fednova": (lambda: flower.FedNova(**SAMPLING), FedNova),
    "fedavg": (lambda: flower.FedAvg(**SAMPLING), FedAvg),
    "fedprox": (lambda: flower.FedProx(0.1, **SAMPLING), lambda: FedProx(0.1)),
}
SAMPLING = {"min_train_nodes": CLIENTS, "min_available_nodes": CLIENTS, "fraction_evaluate": 0.0}


def test_a_flower_simulation_ends_where_partitas_own_server_does():
    # One simulation (one Ray start) runs the three strategies one after the other on the same nodes.
    task = get_task("digits", num_clients=CLIENTS, seed=0, alpha=0.3)
    result = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        for name, (make_flower, _) in STRATEGIES.items():
            finished = make_flower().start(grid, ArrayRecord(weights_of(task.model())), num_rounds=ROUNDS)
            result[name] = finished.arrays.to_torch_state_dict()

    run_simulation(
        server_app, flower.client_app(task, PROFILES), num_supernodes=CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 1}},
    )

    assert set(result) == set(STRATEGIES)
    for name, (_, make_partita) in STRATEGIES.items():
        ours = run_in_process(task, make_partita(), ROUNDS, profiles=PROFILES, seed=0).weights
        assert set(result[name]) == set(ours)
        for key, tensor in ours.items():
            difference = float((result[name][key] - tensor).abs().max())
            assert torch.equal(result[name][key], tensor), (name, key, difference)
