"""Aggregation rules on small hand-computed examples, record conversion, and the round loop's drop handling."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from partita.errors import FLError, WorkerError
from partita.fl import (
    ClientProfile,
    ClientUpdate,
    FedAvg,
    FedNova,
    FedProx,
    FLServer,
    TrainConfig,
    a_norm_l1,
    get_task,
    normalizing_vector,
    record_from_wire,
    record_to_wire,
    train_local,
    update_from_record,
    update_to_record,
)

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine threads oversubscribe.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def w(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


def upd(values, n=1, steps=1, lr=1.0, **kw) -> ClientUpdate:
    return ClientUpdate(weights=w(*values), num_examples=n, local_steps=steps, lr=lr, **kw)


def test_fedavg_is_the_example_weighted_mean():
    out = FedAvg().aggregate(w(0.0, 0.0), [upd([1.0, 0.0], n=1), upd([0.0, 2.0], n=3)])
    assert torch.allclose(out["w"], torch.tensor([0.25, 1.5]))


def test_p_is_renormalised_over_the_clients_that_answered():
    everyone = [upd([1.0], n=1), upd([3.0], n=1), upd([10.0], n=2)]
    out = FedAvg().aggregate(w(0.0), everyone[:2])  # the third client did not answer
    assert torch.allclose(out["w"], torch.tensor([2.0]))  # (1 + 3) / 2, not (1 + 3) / 4


def test_fedprox_aggregates_like_fedavg_and_configures_the_proximal_term():
    updates = [upd([1.0], n=1), upd([4.0], n=2)]
    assert torch.equal(FedProx(0.1).aggregate(w(0.0), updates)["w"], FedAvg().aggregate(w(0.0), updates)["w"])
    assert FedProx(0.1).configure_train(TrainConfig(lr=0.1)).prox_mu == 0.1
    with pytest.raises(FLError):
        FedProx(-1.0)


def test_fednova_normalises_vanilla_sgd_by_local_steps():
    # Delta_1 = 1 after 1 step, Delta_2 = 6 after 3 steps, p = 1/2 each: tau_eff = 2,
    # D = 2 * (0.5 * 1/1 + 0.5 * 6/3) = 3  (FedAvg would move by 3.5).
    updates = [upd([-1.0], steps=1), upd([-6.0], steps=3)]
    assert torch.allclose(FedNova.paper().aggregate(w(0.0), updates)["w"], torch.tensor([-3.0]))
    assert torch.allclose(FedAvg().aggregate(w(0.0), updates)["w"], torch.tensor([-3.5]))


def test_fednova_momentum_normaliser():
    # rho = 0.5, tau = 2: a = [1 + 0.5, 1], ||a||_1 = 2.5. With a vanilla 1-step client (Delta 1):
    # tau_eff = 0.5 * 1 + 0.5 * 2.5 = 1.75; D = 1.75 * (0.5 * 1 + 0.5 * 5 / 2.5) = 2.625.
    updates = [upd([-1.0], steps=1), upd([-5.0], steps=2, momentum=0.5)]
    assert torch.allclose(FedNova.paper().aggregate(w(0.0), updates)["w"], torch.tensor([-2.625]))


def test_fednova_proximal_normaliser_and_tau_eff_as_the_authors_code():
    # lr 0.5, mu 1, tau 2: a = [1 - 0.5, 1], lr-weighted A = 0.5 * 1.5 = 0.75; its tau_eff share is lr * tau = 1.
    # Vanilla client: lr 0.5, tau 1, Delta 1, A = 0.5. tau_eff = 0.5 * 0.5 + 0.5 * 1 = 0.75;
    # D = 0.75 * (0.5 * 1 / 0.5 + 0.5 * 1.5 / 0.75) = 1.5.
    updates = [upd([-1.0], steps=1, lr=0.5), upd([-1.5], steps=2, lr=0.5, prox_mu=1.0)]
    assert torch.allclose(FedNova.paper().aggregate(w(0.0), updates)["w"], torch.tensor([-1.5]))


def test_fednova_weights_a_by_learning_rate():
    # Same steps, lr 0.1 vs 0.4: A = 0.2 and 0.8. Deltas 0.2 and 1.6 are one average gradient of 1 and 2.
    # tau_eff = 0.5; D = 0.5 * (0.5 * 1 + 0.5 * 2) = 0.75.
    updates = [upd([-0.2], steps=2, lr=0.1), upd([-1.6], steps=2, lr=0.4)]
    assert torch.allclose(FedNova.paper().aggregate(w(0.0), updates)["w"], torch.tensor([-0.75]))


def test_a_norm_overrides_what_the_fields_imply():
    implied = [upd([-1.0], steps=1), upd([-6.0], steps=3)]
    same = [upd([-1.0], steps=1), upd([-6.0], steps=3, a_norm=3.0)]
    other = [upd([-1.0], steps=1), upd([-6.0], steps=3, a_norm=6.0)]
    base = FedNova.paper().aggregate(w(0.0), implied)["w"]
    assert torch.equal(FedNova.paper().aggregate(w(0.0), same)["w"], base)
    # A_2 = 6: tau_eff = 3.5, D = 3.5 * (0.5 * 1 + 0.5 * 1) = 3.5
    assert torch.allclose(FedNova.paper().aggregate(w(0.0), other)["w"], torch.tensor([-3.5]))


def test_fednova_bounds_its_step_by_fedavgs_and_keeps_its_direction():
    # Client 1: 1 step, Delta (4, 0), d = (4, 0). Client 2: 4 steps, Delta (0, 4), d = (0, 1) (a saturated
    # many-step client). p = 1/2 each. Paper: tau_eff = 2.5, sum p d = (2, 0.5), D = (5, 1.25), longer than
    # FedAvg's step (2, 2) (norm 2.83). Bounded: tau_eff = 2.83 / ||(2, 0.5)|| = 1.372, D = 1.372 * (2, 0.5).
    updates = [upd([-4.0, 0.0], steps=1), upd([0.0, -4.0], steps=4)]
    paper = FedNova.paper().aggregate(w(0.0, 0.0), updates)["w"]
    bounded = FedNova(server_momentum=0.0).aggregate(w(0.0, 0.0), updates)["w"]
    assert torch.allclose(paper, torch.tensor([-5.0, -1.25]))
    tau = math.sqrt(8.0) / math.sqrt(2.0**2 + 0.5**2)
    assert torch.allclose(bounded, torch.tensor([-2.0 * tau, -0.5 * tau]))
    assert math.isclose(float(bounded.norm()), math.sqrt(8.0), rel_tol=1e-6)  # FedAvg's step length
    # Where the paper's step is the shorter one, the bound leaves it alone (the first example above).
    short = [upd([-1.0], steps=1), upd([-6.0], steps=3)]
    assert torch.equal(FedNova(server_momentum=0.0).aggregate(w(0.0), short)["w"],
                       FedNova.paper().aggregate(w(0.0), short)["w"])


def test_fednova_server_momentum_accumulates_across_rounds():
    strategy = FedNova(server_lr=0.5, server_momentum=0.5)
    x = w(0.0)
    x = strategy.aggregate(x, [upd([float(x["w"][0]) - 1.0], steps=1)])  # v = 1, x = -0.5
    assert torch.allclose(x["w"], torch.tensor([-0.5]))
    x = strategy.aggregate(x, [upd([float(x["w"][0]) - 1.0], steps=1)])  # v = 0.5 + 1, x = -0.5 - 0.75
    assert torch.allclose(x["w"], torch.tensor([-1.25]))
    strategy.reset()
    x = strategy.aggregate(w(0.0), [upd([-1.0], steps=1)])
    assert torch.allclose(x["w"], torch.tensor([-0.5]))


def test_fednova_leaves_out_clients_that_ran_no_steps():
    out = FedNova.paper().aggregate(w(0.0), [upd([-2.0], steps=2), upd([0.0], steps=0, n=100)])
    assert torch.allclose(out["w"], torch.tensor([-2.0]))


@settings(max_examples=60, deadline=None)
@given(
    tau=st.integers(1, 40),
    rho=st.sampled_from([0.0, 0.3, 0.9]),
    mu=st.sampled_from([0.0, 0.1, 1.0]),
    lr=st.floats(0.001, 0.5),
)
def test_closed_form_norms_match_the_recursion(tau, rho, mu, lr):
    a = normalizing_vector(tau, rho, mu, lr)
    if rho == 0 and mu == 0:
        expected = tau
    elif mu == 0:
        expected = sum((1 - rho**k) / (1 - rho) for k in range(1, tau + 1))
    elif rho == 0:
        expected = sum((1 - lr * mu) ** j for j in range(tau))
    else:
        expected = float(abs(a).sum())
    assert math.isclose(float(abs(a).sum()), expected, rel_tol=1e-9)
    assert math.isclose(a_norm_l1(tau, rho, mu, lr), expected, rel_tol=1e-9)


def test_aggregate_rejects_mismatched_or_missing_updates():
    with pytest.raises(FLError, match="No client answered"):
        FedAvg().aggregate(w(0.0), [])
    with pytest.raises(FLError, match="shape"):
        FedNova().aggregate(w(0.0), [upd([1.0, 2.0])])
    with pytest.raises(FLError):
        upd([1.0], n=0)


def test_integer_buffers_come_from_the_largest_client():
    base = {"w": torch.zeros(1), "count": torch.tensor(0)}
    a = ClientUpdate({"w": torch.ones(1), "count": torch.tensor(3)}, num_examples=1, local_steps=1, lr=1.0)
    b = ClientUpdate({"w": torch.ones(1), "count": torch.tensor(7)}, num_examples=5, local_steps=1, lr=1.0)
    assert FedAvg().aggregate(base, [a, b])["count"].item() == 7


def test_records_use_flower_names_and_round_trip_through_the_wire_layout():
    update = upd([1.0, 2.0], n=7, steps=3, lr=0.1, momentum=0.9, metrics={"train-loss": 0.5})
    record = update_to_record(update)
    assert set(record) == {"arrays", "metrics"}
    assert record["metrics"]["num-examples"] == 7
    header, tensors = record_to_wire(record)
    assert header["arrays"] == ["w"]
    back = update_from_record(record_from_wire(header, tensors))
    assert torch.equal(back.weights["w"], update.weights["w"])
    assert (back.num_examples, back.local_steps, back.lr, back.momentum) == (7, 3, 0.1, 0.9)
    assert back.metrics == {"train-loss": 0.5}
    with pytest.raises(FLError):
        record_from_wire({"arrays": ["w", "v"]}, tensors)
    with pytest.raises(FLError):
        update_from_record({"arrays": {"w": torch.zeros(1)}, "metrics": {}})
    # a record from the wire is checked by the same rule as a ClientUpdate built in Python, and says which field
    for key, bad, field in [("lr", -0.1, "lr"), ("momentum", 1.0, "momentum"), ("a-norm", float("nan"), "a_norm"),
                            ("work", 0.0, "work"), ("num-examples", 0, "num_examples")]:
        with pytest.raises(FLError, match=f"out of range: ClientReport.{field} must"):
            update_from_record({"arrays": {"w": torch.zeros(1)}, "metrics": {**record["metrics"], key: bad}})
        kwargs = {"n": 7, "steps": 3, "lr": 0.1, ("n" if field == "num_examples" else field): bad}
        with pytest.raises(FLError, match=f"ClientUpdate.{field} must"):
            upd([1.0], **kwargs)


class FakeClient:
    """A handle that answers with fixed weights, misses the deadline, or dies."""

    def __init__(self, client_id: int, value: float | None, n: int = 1, dies: bool = False) -> None:
        self.client_id, self.value, self.n, self.dies = client_id, value, n, dies

    def train(self, global_weights, config):
        if self.dies:
            raise WorkerError(f"worker {self.client_id} stopped answering")
        if self.value is None:
            return None
        return upd([self.value], n=self.n, steps=config.local_steps, lr=config.lr)

    def evaluate(self, global_weights):
        return {"loss": float(global_weights["w"][0]), "num-examples": 1.0}


def test_server_leaves_out_late_and_dead_clients_and_keeps_training():
    clients = [FakeClient(0, 1.0), FakeClient(1, 3.0), FakeClient(2, None), FakeClient(3, 100.0, dies=True)]
    server = FLServer(FedAvg(), clients)
    history = server.run(w(0.0), rounds=2)
    first = history.rounds[0]
    assert first.clients == (0, 1)
    assert first.dropped == {2: "missed deadline", 3: "lost: worker 3 stopped answering"}
    assert torch.allclose(history.weights["w"], torch.tensor([2.0]))
    assert first.loss == pytest.approx(2.0)  # federated evaluation of the new weights
    assert first.to_dict()["steps"] == [10, 10]


def test_deadline_bounds_local_steps_and_a_client_that_fits_none_is_dropped():
    task = get_task("quadratic", num_clients=2)
    start = {k: v.clone() for k, v in task.model().state_dict().items()}
    config = TrainConfig(local_steps=10, lr=0.1, deadline_s=0.35, step_time_s=0.1)
    update = train_local(task, 0, start, config)
    assert update.local_steps == 3
    assert update.metrics["emulated-s"] == pytest.approx(0.3)
    assert (
        train_local(task, 0, start, TrainConfig(local_steps=10, lr=0.1, deadline_s=0.35, step_time_s=0.5))
        is None
    )
    slow, fast = (
        ClientProfile(local_steps=10, step_time_s=1.0),
        ClientProfile(local_steps=10, step_time_s=0.01),
    )
    from partita.fl import InProcessClient

    server = FLServer(
        FedAvg(),
        [InProcessClient(task, 0), InProcessClient(task, 1)],
        profiles={0: slow, 1: fast},
        deadline_s=0.5,
    )
    record = server.run(start, rounds=1).final
    assert record.clients == (1,)
    assert record.dropped == {0: "missed deadline"}


def test_train_exchange_round_trips_through_the_runtime_wire():
    wire = pytest.importorskip("partita.runtime.wire", reason="the runtime's wire module is not present")
    from partita.fl import serve_train_request, train_request_record, update_from_reply

    task = get_task("quadratic", num_clients=2)
    start = task.model().state_dict()
    config = TrainConfig(local_steps=4, lr=0.1, deadline_s=1.0, step_time_s=0.3)
    request = train_request_record(
        start, config, task="quadratic", client_id=1, task_options={"num_clients": 2}
    )
    message = wire.decode(wire.encode("fl-train", *record_to_wire(request)))
    reply = serve_train_request(record_from_wire(message.header, list(message.tensors)), get_task=get_task)
    message = wire.decode(wire.encode("fl-update", *record_to_wire(reply)))
    update = update_from_reply(record_from_wire(message.header, list(message.tensors)))
    assert update.local_steps == 3  # 3 x 0.3 s fit in the 1 s deadline
    assert torch.equal(update.weights["x"], train_local(task, 1, start, config).weights["x"])
    late_config = TrainConfig(local_steps=4, deadline_s=0.1, step_time_s=0.3)
    late = train_request_record(
        start, late_config, task="quadratic", client_id=1, task_options={"num_clients": 2}
    )
    assert update_from_reply(serve_train_request(late, get_task=get_task)) is None


def test_parallel_and_sampled_rounds_aggregate_the_same_way():
    clients = [FakeClient(0, 1.0), FakeClient(1, 3.0), FakeClient(2, None)]
    parallel = FLServer(FedAvg(), clients, parallel=3).run(w(0.0), rounds=1)
    assert parallel.final.clients == (0, 1)
    assert torch.allclose(parallel.weights["w"], torch.tensor([2.0]))
    sampled = FLServer(FedAvg(), clients, fraction=0.34, seed=5)
    assert len(sampled.sample(1)) == 1


def test_local_epochs_become_steps_and_local_steps_cap_them():
    assert TrainConfig(local_steps=None, local_epochs=2, batch_size=32).planned_steps(100) == 7
    assert TrainConfig(local_steps=5, local_epochs=2, batch_size=32).planned_steps(100) == 5
    with pytest.raises(FLError):
        TrainConfig(local_steps=None, local_epochs=None)
    with pytest.raises(FLError, match="Unknown training options"):
        TrainConfig.from_dict({"lr": 0.1, "optimizer": "adam"})
