"""Federated learning on partita's devices: FedAvg, FedProx and FedNova with correct aggregation when clients
do unequal work. Strategies are pure (tensors in, tensors out); the round loop (`server`) reaches clients
through a pluggable `ClientHandle`; `local` is a client's training; `tasks` holds the built-in tasks;
`secagg` is secure aggregation (optional extra `secure`) and `flower` the Flower adapter (extra `flower`).
"""

from partita.fl.fedavg import FedAvg
from partita.fl.fednova import FedNova, a_norm_l1, normalizing_vector
from partita.fl.fedprox import FedProx
from partita.fl.local import (
    TrainConfig,
    serve_train_request,
    train_local,
    train_request_record,
    update_from_reply,
)
from partita.fl.server import (
    ClientHandle,
    ClientProfile,
    FLServer,
    History,
    InProcessClient,
    RoundRecord,
    run_in_process,
    task_evaluator,
)
from partita.fl.strategy import Strategy
from partita.fl.tasks import LocalData, Task, get_task
from partita.fl.update import (
    ClientReport,
    ClientUpdate,
    record_from_wire,
    record_to_wire,
    update_from_record,
    update_to_record,
)

STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fednova": FedNova}

__all__ = [
    "STRATEGIES",
    "ClientHandle",
    "ClientProfile",
    "ClientReport",
    "ClientUpdate",
    "FLServer",
    "FedAvg",
    "FedNova",
    "FedProx",
    "History",
    "InProcessClient",
    "LocalData",
    "RoundRecord",
    "Strategy",
    "Task",
    "TrainConfig",
    "a_norm_l1",
    "get_task",
    "normalizing_vector",
    "record_from_wire",
    "record_to_wire",
    "run_in_process",
    "serve_train_request",
    "task_evaluator",
    "train_local",
    "train_request_record",
    "update_from_reply",
    "update_from_record",
    "update_to_record",
]
