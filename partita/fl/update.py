"""What a client sends back after a round of local training, and how it crosses the wire.

A `ClientUpdate` carries the client's weights after local training and the facts a strategy needs to
weigh them: how many examples the client holds (p_i), how many local steps it ran (tau_i), and with
which local solver (learning rate, momentum, proximal mu). FedNova derives the client's normalising
vector a_i from those fields; a client whose solver the fields cannot describe (a per-step learning
rate schedule, say) sends `a_norm` itself.

Records use Flower's names (`arrays`, `metrics`, `num-examples`) so that an adapter to Flower's
`RecordDict` / `ArrayRecord` / `MetricRecord` stays a renaming exercise:

    {"arrays":  {param_name: Tensor, ...},
     "metrics": {"num-examples": int, "local-steps": int, "lr": float,
                 "momentum": float, "prox-mu": float, "a-norm": float | None, ...extra metrics}}

On partita's wire (`partita.runtime.wire.encode(kind, header, tensors)`) a record travels as a header
`{"arrays": [param_name, ...], "metrics": {...}}` plus the tensors in the order of the names
(`record_to_wire` / `record_from_wire`). Nothing is pickled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from partita.errors import FLError

# Flower's record names, kept verbatim.
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
NUM_EXAMPLES = "num-examples"
MISSED_DEADLINE = "missed-deadline"  # metric of a reply that carries no update

_UPDATE_KEYS = ("num-examples", "local-steps", "lr", "momentum", "prox-mu", "a-norm", "work")


def _check_scalars(owner: str, scalars: ClientReport | ClientUpdate) -> None:
    """FLError naming the first scalar of a client's round that is out of range (one check for both classes)."""
    if int(scalars.num_examples) != scalars.num_examples or scalars.num_examples <= 0:
        raise FLError(f"{owner}.num_examples must be a positive integer, got {scalars.num_examples!r}.")
    if int(scalars.local_steps) != scalars.local_steps or scalars.local_steps < 0:
        raise FLError(f"{owner}.local_steps must be a non-negative integer, got {scalars.local_steps!r}.")
    if not (math.isfinite(scalars.lr) and scalars.lr > 0):
        raise FLError(f"{owner}.lr must be a positive finite learning rate, got {scalars.lr!r}.")
    if not 0.0 <= scalars.momentum < 1.0:
        raise FLError(f"{owner}.momentum must be in [0, 1), got {scalars.momentum!r}.")
    if not (math.isfinite(scalars.prox_mu) and scalars.prox_mu >= 0):
        raise FLError(f"{owner}.prox_mu must be >= 0, got {scalars.prox_mu!r}.")
    if scalars.a_norm is not None and not (math.isfinite(scalars.a_norm) and scalars.a_norm > 0):
        raise FLError(f"{owner}.a_norm must be a positive finite number or None, got {scalars.a_norm!r}.")
    if scalars.work is not None and not (math.isfinite(scalars.work) and scalars.work > 0):
        raise FLError(f"{owner}.work must be a positive finite number or None, got {scalars.work!r}.")


@dataclass(frozen=True)
class ClientReport:
    """The scalars of one client's round that a strategy weighs it by (a `ClientUpdate` without weights).

    Under secure aggregation this is all the server learns about one client: n_i, tau_i, its solver,
    a_norm and its realised work (see `ClientUpdate` for the fields' meaning).
    """

    num_examples: int
    local_steps: int
    lr: float
    momentum: float = 0.0
    prox_mu: float = 0.0
    a_norm: float | None = None
    work: float | None = None

    def __post_init__(self) -> None:
        _check_scalars("ClientReport", self)

    def to_metrics(self) -> dict:
        return {
            "num-examples": int(self.num_examples),
            "local-steps": int(self.local_steps),
            "lr": float(self.lr),
            "momentum": float(self.momentum),
            "prox-mu": float(self.prox_mu),
            "a-norm": None if self.a_norm is None else float(self.a_norm),
            "work": None if self.work is None else float(self.work),
        }

    @classmethod
    def from_metrics(cls, metrics: Mapping) -> ClientReport:
        """From a record's metrics; FLError naming a missing, malformed or out-of-range field."""
        for key in ("num-examples", "local-steps", "lr"):
            if not isinstance(metrics.get(key), int | float):
                raise FLError(f"A client record's metrics lack a numeric {key!r}.")
        for key in ("momentum", "prox-mu", "a-norm", "work"):
            value = metrics.get(key)
            if value is not None and not isinstance(value, int | float):
                raise FLError(f"A client record's {key!r} must be a number or None, got {value!r}.")
        a_norm, work = metrics.get("a-norm"), metrics.get("work")
        try:
            return cls(
                num_examples=int(metrics["num-examples"]),
                local_steps=int(metrics["local-steps"]),
                lr=float(metrics["lr"]),
                momentum=float(metrics.get("momentum") or 0.0),
                prox_mu=float(metrics.get("prox-mu") or 0.0),
                a_norm=None if a_norm is None else float(a_norm),
                work=None if work is None else float(work),
            )
        except FLError as exc:
            raise FLError(f"A client record is out of range: {exc}") from None


@dataclass(frozen=True)
class ClientUpdate:
    """One client's result of one round.

    weights:      the client's parameters after local training (name -> tensor), same names and shapes as
                  the global weights it started from.
    num_examples: size of the client's local dataset; p_i = num_examples / sum over answering clients.
    local_steps:  tau_i, the number of local optimizer steps actually run this round (0 = none ran).
    lr:           the client's (constant) local learning rate eta_i.
    momentum:     rho, heavy-ball momentum of the local SGD (0 = vanilla SGD); the buffer starts empty each round.
    prox_mu:      mu of the proximal term mu/2 * ||x - x_global||^2 (0 = none).
    a_norm:       None = derive eta_i * ||a_i||_1 from the fields above; a float overrides it and must be the
                  learning-rate-weighted norm sum_k eta_k * a_{i,k} (see `partita.fl.fednova`).
    work:         the realised work ||x_0 - x_tau|| / ||g_1||: how far the client moved per unit of its first
                  minibatch gradient (in learning-rate units, like a_norm; None = not measured). It equals
                  a_norm when the gradient stays constant along the trajectory; FedNova normalises by it.
    metrics:      free-form scalar metrics of local training (e.g. "train-loss", "emulated-s").

    The scalar fields are `ClientReport`'s, in its order, checked by the same rule.
    """

    weights: dict[str, Tensor]
    num_examples: int
    local_steps: int
    lr: float
    momentum: float = 0.0
    prox_mu: float = 0.0
    a_norm: float | None = None
    work: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.weights, Mapping) or not self.weights:
            raise FLError("ClientUpdate.weights must be a non-empty dict of name -> tensor.")
        _check_scalars("ClientUpdate", self)

    @property
    def report(self) -> ClientReport:
        """The update's scalars, without the weights."""
        return ClientReport(**{f.name: getattr(self, f.name) for f in fields(ClientReport)})


def check_compatible(global_weights: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> None:
    """Raise FLError unless every update has exactly the global weights' names and shapes."""
    if not updates:
        raise FLError("No client answered this round; there is nothing to aggregate.")
    for index, update in enumerate(updates):
        if set(update.weights) != set(global_weights):
            missing = sorted(set(global_weights) - set(update.weights))
            extra = sorted(set(update.weights) - set(global_weights))
            raise FLError(
                f"Update {index} does not match the global model: missing {missing}, unexpected {extra}."
            )
        for name, tensor in update.weights.items():
            if tuple(tensor.shape) != tuple(global_weights[name].shape):
                raise FLError(
                    f"Update {index}: {name} has shape {tuple(tensor.shape)}, "
                    f"the global model has {tuple(global_weights[name].shape)}."
                )


def example_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """p_i = n_i / sum_j n_j over the clients that answered (renormalised every round)."""
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def update_to_record(update: ClientUpdate) -> dict:
    """The update as a Flower-named record: {"arrays": {...}, "metrics": {"num-examples": ..., ...}}."""
    metrics = update.report.to_metrics()
    for key, value in update.metrics.items():
        if key in metrics:
            raise FLError(f"Client metric {key!r} clashes with a reserved record key; rename it.")
        metrics[key] = float(value)
    return {ARRAYS: dict(update.weights), METRICS: metrics}


def update_from_record(record: Mapping) -> ClientUpdate:
    """Inverse of `update_to_record`; FLError naming the field when the record is malformed."""
    try:
        arrays = record[ARRAYS]
        metrics = dict(record[METRICS])
    except (KeyError, TypeError) as exc:  # a record from the wire may be anything; say what it lacks
        raise FLError(
            f"A client record needs {ARRAYS!r} and {METRICS!r}; got {type(record).__name__}."
        ) from exc
    for name, tensor in arrays.items():
        if not isinstance(tensor, Tensor):
            raise FLError(f"A client record's array {name!r} is a {type(tensor).__name__}, not a tensor.")
    report = ClientReport.from_metrics(metrics)
    extra = {k: float(v) for k, v in metrics.items() if k not in _UPDATE_KEYS and isinstance(v, int | float)}
    scalars = {f.name: getattr(report, f.name) for f in fields(ClientReport)}
    return ClientUpdate(weights=dict(arrays), **scalars, metrics=extra)


def record_to_wire(record: Mapping) -> tuple[dict, tuple[Tensor, ...]]:
    """Flatten a record for `wire.encode`: header {"arrays": [names], other sections...} + tensors in name order.

    Sections other than "arrays" (e.g. "metrics", "config") must be msgpack-able dicts of scalars/strings.
    """
    arrays = record.get(ARRAYS, {})
    names = list(arrays)
    header = {key: value for key, value in record.items() if key != ARRAYS}
    header[ARRAYS] = names
    return header, tuple(arrays[name].detach().contiguous() for name in names)


def record_from_wire(header: Mapping, tensors: Sequence[Tensor]) -> dict:
    """Inverse of `record_to_wire`; FLError when the names and the tensors disagree."""
    names = header.get(ARRAYS)
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise FLError(f"A record header needs {ARRAYS!r}: a list of parameter names.")
    if len(names) != len(tensors) or len(set(names)) != len(names):
        raise FLError(
            f"A record names {len(names)} arrays (unique: {len(set(names))}) but carries {len(tensors)}."
        )
    record = {key: value for key, value in header.items() if key != ARRAYS}
    record[ARRAYS] = dict(zip(names, tensors, strict=True))
    return record


def clone_weights(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A detached copy, so that callers never share storage with a model being trained."""
    return {name: tensor.detach().clone() for name, tensor in weights.items()}


def weights_of(module: torch.nn.Module) -> dict[str, Tensor]:
    """The module's state dict, detached and copied (parameters and buffers)."""
    return clone_weights(module.state_dict())
