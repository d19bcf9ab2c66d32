"""The federated round loop, independent of how clients are reached.

Each round the server (1) samples clients, (2) asks the strategy how each should train (`configure_train`
on the client's own profile: local steps or epochs, learning rate, momentum, speed, plus the round's
deadline), (3) collects the updates of those that answer, leaving out a client that missed the deadline
(its handle returns None) or died (its handle raises), (4) aggregates with p_i renormalised over the clients
that answered, (5) evaluates the new global weights and records the round.

Clients are reached through a `ClientHandle`. `InProcessClient` trains in this process with virtual time;
a handle over the runtime's workers implements the same two methods (see docs/fl.md, "Over the runtime").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from torch import Tensor

from partita.errors import FLError, PartitaError
from partita.fl.local import TrainConfig, evaluate_local, train_local
from partita.fl.strategy import Strategy
from partita.fl.tasks.base import Task
from partita.fl.update import ClientUpdate, clone_weights, weights_of

if TYPE_CHECKING:  # secure aggregation needs the optional `cryptography`; imported when used
    from partita.fl.secagg.round import SecureAggregation

# What a transport may raise for a client that is gone; anything else is a bug and propagates.
CLIENT_LOST_ERRORS = (PartitaError, TimeoutError, ConnectionError, OSError)


@runtime_checkable
class ClientHandle(Protocol):
    """One client as the server sees it. `train` returns None when the client missed the round's deadline and
    raises one of CLIENT_LOST_ERRORS when it is gone; the server then leaves it out of the round."""

    client_id: int

    def train(self, global_weights: Mapping[str, Tensor], config: TrainConfig) -> ClientUpdate | None: ...

    def evaluate(self, global_weights: Mapping[str, Tensor]) -> dict[str, float] | None: ...


class InProcessClient:
    """A client that trains in this process (virtual time: emulated step times are added up, never slept)."""

    def __init__(self, task: Task, client_id: int) -> None:
        self.task = task
        self.client_id = int(client_id)
        self._data = task.client_data(client_id)
        self._model = task.model()  # reused across rounds; every round loads the global weights into it

    def train(self, global_weights: Mapping[str, Tensor], config: TrainConfig) -> ClientUpdate | None:
        return train_local(
            self.task, self.client_id, global_weights, config, data=self._data, model=self._model
        )

    def evaluate(self, global_weights: Mapping[str, Tensor]) -> dict[str, float] | None:
        return evaluate_local(self.task, self.client_id, global_weights)


@dataclass(frozen=True)
class ClientProfile:
    """One client's heterogeneity: how much it trains per round and how fast it is.

    local_steps / local_epochs / lr / momentum / prox_mu / batch_size: as in `TrainConfig` (a strategy may
    override some: FedProx sets prox_mu).
    step_time_s: emulated seconds per local step (None: measured host time / speed).
    speed: emulated speed relative to this host.
    """

    local_steps: int | None = 10
    local_epochs: float | None = None
    lr: float = 0.05
    momentum: float = 0.0
    prox_mu: float = 0.0
    batch_size: int = 32
    step_time_s: float | None = None
    speed: float = 1.0

    def config(self, round_number: int, deadline_s: float | None, seed: int) -> TrainConfig:
        return TrainConfig(
            round=round_number,
            local_steps=self.local_steps,
            local_epochs=self.local_epochs,
            lr=self.lr,
            momentum=self.momentum,
            prox_mu=self.prox_mu,
            batch_size=self.batch_size,
            deadline_s=deadline_s,
            step_time_s=self.step_time_s,
            speed=self.speed,
            seed=seed,
        )


@dataclass(frozen=True)
class RoundRecord:
    """What one round did. loss/accuracy: of the new global weights (None when the evaluation has none).
    clients/steps: ids of the clients aggregated and the local steps each ran; dropped: id -> reason."""

    round: int
    strategy: str
    loss: float | None
    accuracy: float | None
    clients: tuple[int, ...]
    steps: tuple[int, ...]
    dropped: Mapping[int, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    duration_s: float = 0.0

    def to_dict(self) -> dict:
        out = {
            "round": self.round,
            "strategy": self.strategy,
            "loss": _finite_or_none(self.loss),
            "accuracy": _finite_or_none(self.accuracy),
            "clients": list(self.clients),
            "steps": list(self.steps),
            "dropped": {str(k): v for k, v in self.dropped.items()},
            "duration_s": self.duration_s,
        }
        out.update({k: _finite_or_none(v) for k, v in self.metrics.items()})
        return out


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass(frozen=True)
class History:
    """All rounds of one run and the final global weights."""

    rounds: tuple[RoundRecord, ...]
    weights: dict[str, Tensor]

    @property
    def final(self) -> RoundRecord:
        return self.rounds[-1]


class FLServer:
    """The round loop.

    clients:     the client handles (distinct client_id each).
    profiles:    client_id -> ClientProfile (missing ids get ClientProfile()).
    evaluate:    weights -> {"loss", "accuracy", ...} on held-out data; None = federated evaluation (the
                 example-weighted mean of the sampled clients' `evaluate`).
    deadline_s:  emulated seconds per round each client may compute (None: no deadline).
    fraction:    share of clients sampled each round (at least one).
    parallel:    clients trained at once (threads; useful when handles wait on remote workers).
    secure:      None = plain aggregation (the server sees every update); `SecureAggregation(...)` = the
                 server learns only the weighted sum (`partita.fl.secagg`); the clients must then be secure
                 handles (`LocalSecureClient`, or `RemoteClient`, which is one).
    """

    def __init__(
        self,
        strategy: Strategy,
        clients: Sequence[ClientHandle],
        *,
        profiles: Mapping[int, ClientProfile] | None = None,
        evaluate: Callable[[Mapping[str, Tensor]], Mapping[str, float]] | None = None,
        deadline_s: float | None = None,
        fraction: float = 1.0,
        parallel: int = 1,
        seed: int = 0,
        secure: SecureAggregation | None = None,
    ) -> None:
        if not clients:
            raise FLError("An FL server needs at least one client.")
        ids = [c.client_id for c in clients]
        if len(set(ids)) != len(ids):
            raise FLError(f"Client ids must be distinct, got {ids}.")
        if not 0 < fraction <= 1:
            raise FLError(f"fraction must be in (0, 1], got {fraction!r}.")
        if parallel < 1:
            raise FLError(f"parallel must be >= 1, got {parallel!r}.")
        self.strategy = strategy
        self.clients = list(clients)
        self.profiles = dict(profiles or {})
        self.evaluate_fn = evaluate
        self.deadline_s = deadline_s
        self.fraction = fraction
        self.parallel = parallel
        self.seed = seed
        self.secure = secure
        if secure is not None:
            missing = [c.client_id for c in clients if not hasattr(c, "secure_train")]
            if missing:
                raise FLError(f"Secure aggregation needs secure client handles; clients {missing} are not.")

    def sample(self, round_number: int) -> list[ClientHandle]:
        """The clients asked to train in `round_number` (all of them when fraction == 1)."""
        count = max(1, round(self.fraction * len(self.clients)))
        if count == len(self.clients):
            return list(self.clients)
        rng = np.random.default_rng([self.seed, round_number])
        chosen = sorted(rng.choice(len(self.clients), size=count, replace=False))
        return [self.clients[i] for i in chosen]

    def configure(self, client: ClientHandle, round_number: int) -> TrainConfig:
        profile = self.profiles.get(client.client_id, ClientProfile())
        return self.strategy.configure_train(profile.config(round_number, self.deadline_s, self.seed))

    def _train_one(self, client: ClientHandle, weights, config) -> tuple[ClientUpdate | None, str | None]:
        try:
            update = client.train(weights, config)
        except CLIENT_LOST_ERRORS as exc:  # a lost client is left out of the round, with its reason recorded
            return None, f"lost: {exc}"
        return (None, "missed deadline") if update is None else (update, None)

    def run_round(
        self, round_number: int, weights: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], RoundRecord]:
        began = time.perf_counter()
        sampled = self.sample(round_number)
        configs = [self.configure(c, round_number) for c in sampled]
        if self.secure is not None:
            from partita.fl.secagg.round import secure_round

            result = secure_round(
                self.strategy, sampled, configs, weights, settings=self.secure, parallel=self.parallel,
                lost_errors=CLIENT_LOST_ERRORS,
            )
            weights = result.weights
            reports = [(cid, report) for cid, report in result.answered]
            return weights, self._record(round_number, weights, sampled, reports, result.dropped, began)
        if self.parallel > 1:
            with ThreadPoolExecutor(max_workers=self.parallel) as pool:
                results = list(
                    pool.map(
                        lambda cc: self._train_one(cc[0], weights, cc[1]), zip(sampled, configs, strict=True)
                    )
                )
        else:
            results = [self._train_one(c, weights, cfg) for c, cfg in zip(sampled, configs, strict=True)]
        answered = [(c.client_id, u) for c, (u, _) in zip(sampled, results, strict=True) if u is not None]
        dropped = {c.client_id: why for c, (_, why) in zip(sampled, results, strict=True) if why is not None}
        if answered:
            weights = self.strategy.aggregate(weights, [u for _, u in answered])
        return weights, self._record(round_number, weights, sampled, answered, dropped, began)

    def _record(self, round_number, weights, sampled, answered, dropped, began) -> RoundRecord:
        scores = dict(self._evaluate(weights, sampled))
        loss, accuracy = scores.pop("loss", None), scores.pop("accuracy", None)
        return RoundRecord(
            round=round_number,
            strategy=self.strategy.name,
            loss=loss,
            accuracy=accuracy,
            clients=tuple(cid for cid, _ in answered),
            steps=tuple(u.local_steps for _, u in answered),
            dropped=dropped,
            metrics={k: float(v) for k, v in scores.items()},
            duration_s=time.perf_counter() - began,
        )

    def _evaluate(self, weights, sampled: Sequence[ClientHandle]) -> Mapping[str, float]:
        if self.evaluate_fn is not None:
            return self.evaluate_fn(weights)
        results = []
        for client in sampled:
            try:
                result = client.evaluate(weights)
            except CLIENT_LOST_ERRORS:  # a client lost during evaluation just does not vote this round
                continue
            if result is not None:
                results.append(result)
        if not results:
            return {}
        total = sum(r.get("num-examples", 1.0) for r in results)
        keys = set.intersection(*(set(r) for r in results)) - {"num-examples"}
        return {k: sum(r[k] * r.get("num-examples", 1.0) for r in results) / total for k in keys}

    def run(
        self,
        initial_weights: Mapping[str, Tensor],
        rounds: int,
        *,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> History:
        """Train for `rounds` rounds from `initial_weights` (not modified); `on_round` sees each record."""
        if rounds < 1:
            raise FLError(f"rounds must be >= 1, got {rounds!r}.")
        weights = clone_weights(initial_weights)
        records = []
        for round_number in range(1, rounds + 1):
            weights, record = self.run_round(round_number, weights)
            records.append(record)
            if on_round is not None:
                on_round(record)
        return History(tuple(records), weights)


def task_evaluator(task: Task) -> Callable[[Mapping[str, Tensor]], dict[str, float]]:
    """Central evaluation on the task's held-out test set."""
    model = task.model()

    def evaluate(weights: Mapping[str, Tensor]) -> dict[str, float]:
        model.load_state_dict(dict(weights))
        return task.evaluate(model)

    return evaluate


def run_in_process(
    task: Task,
    strategy: Strategy,
    rounds: int,
    *,
    profiles: Mapping[int, ClientProfile] | None = None,
    deadline_s: float | None = None,
    fraction: float = 1.0,
    seed: int = 0,
    on_round: Callable[[RoundRecord], None] | None = None,
    secure: SecureAggregation | None = None,
) -> History:
    """Federated training of `task` with every client in this process; evaluation on the task's test set.

    secure: run every round under secure aggregation (`partita.fl.secagg`) instead of plain aggregation.
    """
    from partita.fl.secagg.participant import LocalSecureClient

    strategy.reset()
    clients: list[Any] = [InProcessClient(task, i) for i in range(task.num_clients)]
    if secure is not None:
        clients = [LocalSecureClient(c) for c in clients]
    server = FLServer(
        strategy,
        clients,
        profiles=profiles,
        evaluate=task_evaluator(task),
        deadline_s=deadline_s,
        fraction=fraction,
        seed=seed,
        secure=secure,
    )
    return server.run(weights_of(task.model()), rounds, on_round=on_round)

