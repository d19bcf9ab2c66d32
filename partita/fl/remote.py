"""A federated client that is a runtime worker: `RemoteClient` sends `fl-train` and waits for `fl-update`.

It talks to the worker's control socket (CURVE, with the coordinator's keys, like the coordinator's own
`ControlClient`) on a socket of its own, so that a client training for seconds never blocks other calls.
While it waits it pings the worker every `heartbeat_s`; the worker answers pings while it trains (the
training runs in a background job), so silence means the worker is gone:

* no reply of any kind for `heartbeat_timeout_s` -> WorkerError "stopped answering" (a dead or cut-off worker);
* no `fl-update` within `deadline_s * dilation + grace_s` (the round's emulated deadline in wall-clock
  seconds, plus slack for transfer and start-up), or `timeout_s` without a deadline -> WorkerError;
* an `error` reply (the worker could not build the task, say) -> WorkerError naming the reason.

All are `PartitaError`s, i.e. in `CLIENT_LOST_ERRORS`: `FLServer` leaves the client out of the round and
training goes on. `clients_of(cluster, ...)` makes one client per device of a started cluster.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping

import numpy as np
import torch
import zmq
from torch import Tensor

from partita.errors import FLError, WireError, WorkerError
from partita.fl.local import TrainConfig, train_request_record, update_from_reply
from partita.fl.serve import SECURE_KIND, SECURE_REPLY_KIND, TRAIN_KIND, UPDATE_KIND
from partita.fl.update import ClientReport, ClientUpdate, record_from_wire, record_to_wire
from partita.runtime.handle import Keypair, WorkerEndpoint
from partita.runtime.keys import apply_client
from partita.runtime.wire import Limits, decode, encode

_REPLY_KINDS = frozenset({UPDATE_KIND, SECURE_REPLY_KIND, "pong", "error"})


class RemoteClient:
    """Client `client_id` of `task`, trained on the worker at `endpoint` (see the module docstring).

    task / task_options: what the worker builds (`get_task(task, **task_options)`); the same on every client.
    dilation:            the cluster's time dilation (wall-clock seconds per emulated second).
    grace_s:             wall-clock slack past the deadline before the client counts as lost.
    timeout_s:           the wall-clock bound on a round when there is no deadline.
    heartbeat_s / heartbeat_timeout_s: ping period, and the silence after which the worker counts as gone.
    """

    def __init__(
        self,
        endpoint: WorkerEndpoint,
        keys: Keypair | None,
        client_id: int,
        *,
        task: str,
        task_options: Mapping | None = None,
        context: zmq.Context | None = None,
        dilation: float = 1.0,
        grace_s: float = 10.0,
        timeout_s: float = 600.0,
        heartbeat_s: float = 0.5,
        heartbeat_timeout_s: float = 10.0,
        limits: Limits = Limits(),
    ) -> None:
        self.endpoint = endpoint
        self.client_id = int(client_id)
        self.task = task
        self.task_options = dict(task_options or {})
        self.dilation = float(dilation)
        self.grace_s = grace_s
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.limits = limits
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.bytes_sent = 0  # payload bytes of this client's requests and replies (heartbeats excluded)
        self.bytes_received = 0
        self._socket = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self._socket.linger = 0
        plain = keys is None or endpoint.public_key is None
        secret = None if keys is None or plain else (keys.public, keys.secret)
        apply_client(self._socket, secret, None if plain else endpoint.public_key, insecure=plain)
        self._socket.connect(endpoint.control)

    def train(self, global_weights: Mapping[str, Tensor], config: TrainConfig) -> ClientUpdate | None:
        """One round on the worker: the update, None if the client missed the deadline, WorkerError if lost."""
        record = train_request_record(
            global_weights, config, task=self.task, client_id=self.client_id, task_options=self.task_options
        )
        header, tensors = record_to_wire(record)
        if config.deadline_s is not None:
            wait_s = config.deadline_s * self.dilation + self.grace_s
        else:
            wait_s = self.timeout_s
        reply = self._call(TRAIN_KIND, header, tensors, wait_s)
        reply_header = {k: v for k, v in reply.header.items() if k != "id"}
        return update_from_reply(record_from_wire(reply_header, reply.tensors))

    def evaluate(self, global_weights: Mapping[str, Tensor]) -> dict[str, float] | None:
        """None: the server evaluates on the task's held-out data (the worker's data never leaves it)."""
        return None

    # --- Secure aggregation (`partita.fl.secagg.round`): the worker keeps the change between steps --------

    def secure_train(
        self, global_weights: Mapping[str, Tensor], config: TrainConfig, round_key: bytes
    ):
        """Train on the worker; only the scalars and the round's public keys (a `KeyAdvert`) come back.

        None: the client missed the deadline.
        """
        from partita.fl.secagg.client import KeyAdvert  # needs the optional `cryptography`

        record = train_request_record(
            global_weights, config, task=self.task, client_id=self.client_id, task_options=self.task_options
        )
        header, tensors = record_to_wire(record)
        wait_s = self.timeout_s if config.deadline_s is None else config.deadline_s * self.dilation + self.grace_s
        reply = self._secure("train", {**header, "round-key": round_key}, tensors, wait_s)
        if reply.header.get("missed-deadline"):
            return None
        try:
            return ClientReport.from_metrics(reply.header["report"]), KeyAdvert.from_wire(reply.header["advert"])
        except (KeyError, TypeError, FLError) as exc:  # a malformed reply: the client counts as lost
            raise WorkerError(f"worker {self.endpoint.name} sent a malformed secure train reply: {exc}") from None

    def secure_share(self, round_key: bytes, roster, threshold: int) -> dict[int, bytes]:
        header = {"roster": [a.to_wire() for a in roster], "threshold": int(threshold)}
        reply = self._secure("share", {**header, "round-key": round_key, "client-id": self.client_id})
        return dict(_pairs(reply.header.get("shares"), self.endpoint.name))

    def secure_mask(self, round_key: bytes, shares, scales, u2) -> np.ndarray:
        header = {
            "shares": [[int(v), c] for v, c in shares.items()],
            "scales": [float(w) for w in scales],
            "u2": [int(v) for v in u2],
        }
        reply = self._secure("mask", {**header, "round-key": round_key, "client-id": self.client_id})
        if len(reply.tensors) != 1 or reply.tensors[0].dtype != torch.int64 or reply.tensors[0].dim() != 1:
            raise WorkerError(f"worker {self.endpoint.name} sent no masked input (one int64 vector)")
        return reply.tensors[0].numpy().view(np.uint64).copy()

    def secure_unmask(self, round_key: bytes, survivors, dropped) -> tuple[dict[int, bytes], dict[int, bytes]]:
        header = {"survivors": [int(v) for v in survivors], "dropped": [int(v) for v in dropped]}
        reply = self._secure("unmask", {**header, "round-key": round_key, "client-id": self.client_id})
        name = self.endpoint.name
        return dict(_pairs(reply.header.get("seeds"), name)), dict(_pairs(reply.header.get("keys"), name))

    def _secure(self, step: str, header: dict, tensors=(), wait_s: float | None = None):
        reply = self._call(SECURE_KIND, {**header, "step": step}, tensors, wait_s or self.grace_s + 30.0)
        if reply.kind != SECURE_REPLY_KIND:
            raise WorkerError(f"worker {self.endpoint.name} answered {reply.kind!r} to a secure {step} step")
        return reply

    def _call(self, kind: str, header: dict, tensors, wait_s: float):
        name, address = self.endpoint.name, self.endpoint.control
        with self._lock:
            tag = next(self._ids)
            frames = encode(kind, {**header, "id": tag}, tensors)
            self.bytes_sent += sum(memoryview(f).nbytes for f in frames)
            self._socket.send_multipart(frames, copy=False)
            began = last_heard = last_ping = time.monotonic()
            while True:
                now = time.monotonic()
                if now - began > wait_s:
                    raise WorkerError(
                        f"worker {name} at {address} sent no {UPDATE_KIND!r} within {wait_s:g} s "
                        "(the round's deadline plus grace); left out of this round"
                    )
                if now - last_heard > self.heartbeat_timeout_s:
                    raise WorkerError(
                        f"worker {name} at {address} stopped answering heartbeats for "
                        f"{self.heartbeat_timeout_s:g} s while training; left out of this round"
                    )
                if now - last_ping >= self.heartbeat_s:
                    self._socket.send_multipart(encode("ping", {"id": next(self._ids)}), copy=False)
                    last_ping = now
                if not self._socket.poll(min(self.heartbeat_s, 0.25) * 1000):
                    continue
                try:
                    received = self._socket.recv_multipart(copy=False)
                    reply = decode(received, limits=self.limits, kinds=_REPLY_KINDS)
                except WireError as exc:
                    raise WorkerError(f"worker {name} sent a malformed reply to {kind!r}: {exc}") from None
                last_heard = time.monotonic()
                if reply.kind == "pong" or (
                    reply.header.get("id") != tag and reply.header.get("id") is not None
                ):
                    continue  # a heartbeat, or a late answer to an earlier round that timed out
                self.bytes_received += sum(f.buffer.nbytes for f in received)
                break
        if reply.kind == "error":
            raise WorkerError(f"worker {name} refused {kind!r}: {reply.header.get('reason')}")
        return reply

    def close(self) -> None:
        with self._lock:
            self._socket.close(linger=0)

    def __repr__(self) -> str:
        return f"RemoteClient({self.endpoint.name!r}, client_id={self.client_id})"


def _pairs(items, name: str) -> list[tuple[int, bytes]]:
    if not isinstance(items, list) or not all(
        isinstance(i, list) and len(i) == 2 and isinstance(i[0], int) and isinstance(i[1], bytes) for i in items
    ):
        raise WorkerError(f"worker {name} sent a malformed secure reply (expected [int, bytes] pairs)")
    return [(i[0], i[1]) for i in items]


def clients_of(cluster, *, task: str, task_options: Mapping | None = None, **options) -> list[RemoteClient]:
    """One client per device of a started cluster (`LocalCluster`, `connect(...)`, `open_cluster(...)`).

    Client i is the i-th device of `cluster.spec.devices`, so the task's `num_clients` must be their count.
    `options` go to every `RemoteClient` (grace_s, heartbeat_timeout_s, ...); the dilation is the cluster's.
    """
    options.setdefault("dilation", getattr(cluster, "dilation", 1.0))
    return [
        RemoteClient(
            cluster.endpoints[device.name],
            cluster.coordinator_keys,
            index,
            task=task,
            task_options=task_options,
            **options,
        )
        for index, device in enumerate(cluster.spec.devices)
    ]
