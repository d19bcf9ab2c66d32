"""partita's FedAvg, FedProx and FedNova as Flower strategies, and a ClientApp that reports a_norm.

Flower (flwr >= 1.42, `pip install 'partita[flower]'`) has no FedNova. `FlowerStrategy(partita_strategy)` is a
Flower message-API strategy (`flwr.serverapp.strategy.Strategy`, usable in a `ServerApp` with
`strategy.start(grid, initial_arrays, num_rounds)`) that samples, configures and evaluates like Flower's
FedAvg but aggregates with partita's rule, so FedAvg, FedProx and FedNova normalise exactly as in
`partita.fl` (p_i renormalised over the replies, FedNova's A_i from the reply's metrics). Shortcuts:
`FedNova(...)`, `FedAvg()`, `FedProx(mu)` below.

A reply's records use the names partita already uses (`partita.fl.update`): "arrays" (the client's weights
after training) and "metrics" with "num-examples", "local-steps", "lr", "momentum", "prox-mu", "a-norm"
(the learning-rate-weighted ||a_i||_1; `client_app` always sends it) and "work" (the realised work that
`train_local` measures, FedNova's default normaliser), plus "client-id" so that replies are
aggregated in a fixed order whatever order they arrive in.

`client_app(task, profiles)` is the matching ClientApp: node i (its `partition-id`) trains client i of the
task with `partita.fl.local.train_local` and its `ClientProfile`; the round's config carries
"server-round", "seed" and, for FedProx, "prox-mu".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from partita.errors import FLError
from partita.fl.fedavg import FedAvg as _PartitaFedAvg
from partita.fl.fednova import FedNova as _PartitaFedNova
from partita.fl.fednova import lr_weighted_norm
from partita.fl.fedprox import FedProx as _PartitaFedProx
from partita.fl.local import TrainConfig, train_local
from partita.fl.server import ClientProfile
from partita.fl.strategy import Strategy
from partita.fl.tasks.base import Task
from partita.fl.update import ARRAYS, CONFIG, METRICS, update_from_record

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg as _FlowerFedAvg
except ImportError as exc:  # flwr is an optional extra; say how to get it
    raise FLError("partita.fl.flower needs Flower: pip install 'partita[flower]' (flwr >= 1.42).") from exc


class FlowerStrategy(_FlowerFedAvg):
    """A Flower strategy that aggregates with a partita strategy (FedAvg, FedProx, FedNova).

    strategy: the partita strategy (its server state, e.g. FedNova's momentum, lives across rounds).
    seed:     sent to clients in every round's config (minibatch seeds, as `FLServer(seed=...)`).
    Other keyword arguments go to Flower's FedAvg (fraction_train, min_train_nodes, ...).
    """

    def __init__(self, strategy: Strategy, *, seed: int = 0, **flower_options) -> None:
        super().__init__(**flower_options)
        self.partita = strategy
        self.seed = int(seed)
        self._global: dict | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        config["seed"] = self.seed
        prox_mu = self.partita.configure_train(TrainConfig()).prox_mu
        if prox_mu:
            config["prox-mu"] = prox_mu
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid or self._global is None:
            return None, None
        updates = []
        for message in valid:
            metrics = dict(message.content[METRICS])
            record = {ARRAYS: message.content[ARRAYS].to_torch_state_dict(), METRICS: metrics}
            updates.append((int(metrics.get("client-id", 0)), update_from_record(record)))
        updates.sort(key=lambda pair: pair[0])
        weights = self.partita.aggregate(self._global, [u for _, u in updates])
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return ArrayRecord(weights), metrics

    def summary(self) -> None:
        super().summary()


def FedNova(  # noqa: N802
    server_lr: float = 1.0, server_momentum: float = 0.5, tau_eff: str = "bounded", work: str = "realised", **options
):
    """partita's FedNova as a Flower strategy (see `partita.fl.fednova.FedNova` for the arguments)."""
    return FlowerStrategy(_PartitaFedNova(server_lr, server_momentum, tau_eff, work), **options)


def FedAvg(**options):  # noqa: N802 - named like the strategy it builds
    """partita's FedAvg as a Flower strategy."""
    return FlowerStrategy(_PartitaFedAvg(), **options)


def FedProx(mu: float, **options):  # noqa: N802
    """partita's FedProx as a Flower strategy (clients get "prox-mu" in the config)."""
    return FlowerStrategy(_PartitaFedProx(mu), **options)


def client_app(task: Task, profiles: Mapping[int, ClientProfile]) -> ClientApp:
    """A ClientApp: node `partition-id` i trains client i of `task` with profile i and reports a_norm."""
    app = ClientApp()
    models: dict[int, object] = {}

    @app.train()
    def train(message: Message, context: Context) -> Message:
        client_id = int(context.node_config["partition-id"])
        config = message.content[CONFIG]
        profile = profiles.get(client_id, ClientProfile())
        train_config = profile.config(int(config["server-round"]), None, int(config.get("seed", 0)))
        if "prox-mu" in config:
            train_config = TrainConfig(**{**train_config.to_dict(), "prox_mu": float(config["prox-mu"])})
        model = models.setdefault(client_id, task.model())
        weights = message.content[ARRAYS].to_torch_state_dict()
        update = train_local(task, client_id, weights, train_config, model=model)
        if update is None:
            raise FLError(f"client {client_id} ran no local step")
        metrics = {key: value for key, value in update.report.to_metrics().items() if value is not None}
        metrics["a-norm"] = lr_weighted_norm(update.report)
        metrics["client-id"] = client_id
        content = RecordDict({ARRAYS: ArrayRecord(update.weights), METRICS: MetricRecord(metrics)})
        return Message(content, reply_to=message)

    return app
