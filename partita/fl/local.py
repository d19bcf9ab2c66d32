"""A client's local training for one round: SGD with optional momentum and proximal term, under a deadline.

The solver is written out (not `torch.optim.SGD`) so that it is exactly the one FedNova's normalising
vector a_i describes (Wang et al. 2020; the authors' `distoptim/FedNova.py`). With gradient g_k at step k:

    buf_k = g_k                       (k = 1: the buffer starts empty every round)
    buf_k = rho * buf_{k-1} + g_k     (k > 1; rho = momentum, 0 for vanilla SGD)
    d_k   = buf_k + mu * (x_k - x_0)  (mu = prox_mu; x_0 = the global weights of the round)
    x_{k+1} = x_k - lr * d_k

A deadline (`deadline_s`) bounds the round's emulated compute time: the client runs as many steps as fit at
its speed and reports how many it ran (`ClientUpdate.local_steps`). A step costs `step_time_s` emulated
seconds when given (deterministic emulation), else its measured host time divided by `speed`. A client that
cannot fit a single step returns None: it missed the deadline and is left out of the round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from partita.errors import FLError
from partita.fl.tasks.base import LocalData, Task
from partita.fl.update import (
    ARRAYS,
    CONFIG,
    METRICS,
    MISSED_DEADLINE,
    ClientUpdate,
    update_from_record,
    update_to_record,
    weights_of,
)

# A step that ends exactly at the deadline counts; the slack absorbs float rounding of summed step times.
_DEADLINE_SLACK = 1 + 1e-9


@dataclass(frozen=True)
class TrainConfig:
    """What a client runs in one round (sent to it; msgpack-able via `to_dict`).

    round:        round number (mixes into the minibatch seed).
    local_steps:  the most local steps to run (None: use local_epochs).
    local_epochs: passes over the local data, converted to ceil(epochs * n_i / batch_size) steps; local_steps,
                  when also set, caps it.
    lr, momentum, prox_mu: the local solver (see the module docstring).
    batch_size:   examples per step (capped at n_i).
    deadline_s:   emulated seconds the client may compute this round (None: no deadline).
    step_time_s:  emulated seconds one step takes on this client (None: measured host time / speed).
    speed:        emulated speed relative to this host (0.5 = half as fast); used when step_time_s is None.
    seed:         base seed of minibatch sampling.
    """

    round: int = 0
    local_steps: int | None = 10
    local_epochs: float | None = None
    lr: float = 0.05
    momentum: float = 0.0
    prox_mu: float = 0.0
    batch_size: int = 32
    deadline_s: float | None = None
    step_time_s: float | None = None
    speed: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.local_steps is None and self.local_epochs is None:
            raise FLError("TrainConfig needs local_steps or local_epochs.")
        if self.local_steps is not None and (
            int(self.local_steps) != self.local_steps or self.local_steps < 0
        ):
            raise FLError(
                f"TrainConfig.local_steps must be a non-negative integer, got {self.local_steps!r}."
            )
        if self.local_epochs is not None and not self.local_epochs > 0:
            raise FLError(f"TrainConfig.local_epochs must be > 0, got {self.local_epochs!r}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise FLError(f"TrainConfig.lr must be positive, got {self.lr!r}.")
        if not 0.0 <= self.momentum < 1.0:
            raise FLError(f"TrainConfig.momentum must be in [0, 1), got {self.momentum!r}.")
        if self.prox_mu < 0:
            raise FLError(f"TrainConfig.prox_mu must be >= 0, got {self.prox_mu!r}.")
        if self.batch_size < 1:
            raise FLError(f"TrainConfig.batch_size must be >= 1, got {self.batch_size!r}.")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise FLError(f"TrainConfig.deadline_s must be > 0 or None, got {self.deadline_s!r}.")
        if self.step_time_s is not None and not self.step_time_s > 0:
            raise FLError(f"TrainConfig.step_time_s must be > 0 or None, got {self.step_time_s!r}.")
        if not self.speed > 0:
            raise FLError(f"TrainConfig.speed must be > 0, got {self.speed!r}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> TrainConfig:
        """Build from a wire dict; FLError naming unknown keys (values are checked by __post_init__)."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise FLError(
                f"Unknown training options {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}."
            )
        return cls(**dict(data))

    def planned_steps(self, num_examples: int) -> int:
        """Steps the client would run without a deadline."""
        steps: int | None = None
        if self.local_epochs is not None:
            steps = math.ceil(self.local_epochs * num_examples / min(self.batch_size, num_examples))
        if self.local_steps is not None:
            steps = self.local_steps if steps is None else min(steps, self.local_steps)
        return int(steps or 0)  # __post_init__ requires local_epochs or local_steps: steps is set


def _minibatches(num_examples: int, batch_size: int, generator: torch.Generator):
    """Endless minibatch indices: a fresh permutation per epoch, consecutive slices of it."""
    batch_size = min(batch_size, num_examples)
    while True:
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def train_local(
    task: Task,
    client_id: int,
    global_weights: Mapping[str, Tensor],
    config: TrainConfig,
    *,
    data: LocalData | None = None,
    model: torch.nn.Module | None = None,
    pace: Callable[[float], None] | None = None,
) -> ClientUpdate | None:
    """Run one round of local training from `global_weights`; None if not one step fits before the deadline.

    data: the client's local data (None: `task.client_data(client_id)`).
    model: a model of the task to train in place (None: a fresh `task.model()`); its weights are overwritten.
    pace: called with each step's host seconds after the step; a real worker passes its speed emulator's
          `wait_after` so that the step also takes its emulated time in wall-clock terms. In-process runs leave
          it None and keep time virtually.
    """
    data = task.client_data(client_id) if data is None else data
    model = task.model() if model is None else model
    model.load_state_dict(dict(global_weights))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    buffers: list[Tensor | None] = [None] * len(params)
    mixed = np.random.SeedSequence([config.seed, config.round, client_id]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(mixed))
    batches = _minibatches(data.num_examples, config.batch_size, generator)
    planned = config.planned_steps(data.num_examples)

    steps, emulated_s, host_total_s, loss_sum, first_gradient = 0, 0.0, 0.0, 0.0, 0.0
    last_step_s = config.step_time_s
    while steps < planned:
        if (
            config.deadline_s is not None
            and last_step_s is not None
            and emulated_s + last_step_s > config.deadline_s * _DEADLINE_SLACK
        ):
            break
        measured_deadline = config.deadline_s is not None and config.step_time_s is None
        before = [p.detach().clone() for p in params] if measured_deadline else None
        began = time.perf_counter()
        index = next(batches)
        loss = task.loss(model, data.x[index], data.y[index])
        model.zero_grad(set_to_none=True)
        loss.backward()
        if steps == 0:  # the first minibatch gradient, at the global weights: the unit of the realised work
            first_gradient = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None))
        with torch.no_grad():
            for i, p in enumerate(params):
                grad = torch.zeros_like(p) if p.grad is None else p.grad
                if config.momentum:
                    buffer = buffers[i]
                    buffer = grad.clone() if buffer is None else buffer.mul_(config.momentum).add_(grad)
                    buffers[i] = buffer
                    direction = buffer.clone()
                else:
                    direction = grad.clone()
                if config.prox_mu:
                    direction.add_(p - start[i], alpha=config.prox_mu)
                p.sub_(direction, alpha=config.lr)
        host_s = time.perf_counter() - began
        host_total_s += host_s
        step_s = config.step_time_s if config.step_time_s is not None else host_s / config.speed
        if config.deadline_s is not None and emulated_s + step_s > config.deadline_s * _DEADLINE_SLACK:
            # Only reachable when step times are measured: this step finished too late, so undo it.
            with torch.no_grad():
                for p, old in zip(params, before or [], strict=True):
                    p.copy_(old)
            break
        if pace is not None:
            pace(host_s)
        emulated_s += step_s
        last_step_s = step_s
        loss_sum += float(loss.detach())
        steps += 1
    if steps == 0 and planned > 0:
        return None
    with torch.no_grad():
        moved = math.sqrt(sum(float((p.double() - s.double()).square().sum()) for p, s in zip(params, start, strict=True)))
    work = moved / first_gradient if steps and first_gradient > 0 and moved > 0 else None
    return ClientUpdate(
        weights=weights_of(model),
        num_examples=data.num_examples,
        local_steps=steps,
        lr=config.lr,
        momentum=config.momentum,
        prox_mu=config.prox_mu,
        work=work if work is not None and math.isfinite(work) else None,
        metrics={
            "train-loss": loss_sum / max(steps, 1),
            "emulated-s": emulated_s,
            "host-s": host_total_s,
        },
    )


def evaluate_local(task: Task, client_id: int, weights: Mapping[str, Tensor]) -> dict[str, float]:
    """The task's evaluation of `weights` on client `client_id`'s local data (federated evaluation)."""
    model = task.model()
    model.load_state_dict(dict(weights))
    data = task.client_data(client_id)
    return {**task.evaluate(model, data), "num-examples": float(data.num_examples)}


# --- The train exchange as records (what a runtime transport carries; see docs/fl.md) -----------------------


def train_request_record(
    global_weights: Mapping[str, Tensor],
    config: TrainConfig,
    *,
    task: str,
    client_id: int,
    task_options: Mapping | None = None,
) -> dict:
    """The server's request to client `client_id`: {"arrays": global weights, "config": {...}} (Flower names).

    config holds "task", "task-options" (msgpack-able), "client-id" and every `TrainConfig` field.
    """
    return {
        ARRAYS: dict(global_weights),
        CONFIG: {
            "task": task,
            "task-options": dict(task_options or {}),
            "client-id": int(client_id),
            **config.to_dict(),
        },
    }


def serve_train_request(
    record: Mapping,
    *,
    get_task: Callable[..., Task],
    pace: Callable[[float], None] | None = None,
) -> dict:
    """What a worker does when told to train: build the task, train on its local data, answer with a record.

    record:   a `train_request_record` (after `record_from_wire`).
    get_task: task resolver, e.g. a cached `partita.fl.tasks.get_task` (tasks load data; build each once).
    Returns `update_to_record(update)`, or {"arrays": {}, "metrics": {"missed-deadline": 1}} when not one step
    fit before the deadline. FLError for a malformed request.
    """
    config = dict(record.get(CONFIG) or {})
    try:
        task_name = config.pop("task")
        task_options = config.pop("task-options", {})
        client_id = config.pop("client-id")
    except KeyError as exc:  # name the missing field for the sender
        raise FLError(f"A train request's config lacks {exc.args[0]!r}.") from exc
    task = get_task(task_name, **task_options)
    update = train_local(
        task, int(client_id), record.get(ARRAYS, {}), TrainConfig.from_dict(config), pace=pace
    )
    if update is None:
        return {ARRAYS: {}, METRICS: {MISSED_DEADLINE: 1}}
    return update_to_record(update)


def update_from_reply(record: Mapping) -> ClientUpdate | None:
    """The server's reading of a worker's reply: None when the client missed the deadline."""
    if dict(record.get(METRICS) or {}).get(MISSED_DEADLINE):
        return None
    return update_from_record(record)
