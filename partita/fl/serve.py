"""The worker's side of federated training: answer an `fl-train` message with an `fl-update`.

A worker started by `partita worker` serves `fl-train` through the runtime's job extension point
(`WorkerConfig.jobs`, composed in `partita.commands.worker`): the runtime runs `handle_train` in a
background thread, so the worker keeps answering heartbeats while a client trains, and sends the reply from
its I/O loop.

What crosses the wire is only weights and metrics (Flower record names, see `partita.fl.update`):

    fl-train  header {"arrays": [names], "config": {"task", "task-options", "client-id", ...TrainConfig}}
              + the global weights, one tensor per name
    fl-update header {"arrays": [names], "metrics": {"num-examples", "local-steps", ...}} + the client's weights,
              or {"arrays": [], "metrics": {"missed-deadline": 1}} when not one step fit before the deadline

The client's data is built here, on the worker, from the task's name and options (`task.client_data(id)`);
tasks are deterministic in their options, so nothing else needs to travel.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from partita.errors import FLError
from partita.fl.local import serve_train_request, update_from_reply
from partita.fl.tasks import Task, get_task
from partita.fl.update import ARRAYS, CONFIG, record_from_wire, record_to_wire
from partita.runtime.protocol import FL_TRAIN, FL_UPDATE

# The message kinds are the control protocol's (`partita.runtime.protocol.FlTrain` / `FlUpdate`).
TRAIN_KIND = FL_TRAIN
UPDATE_KIND = FL_UPDATE

# Tasks load or generate data when built: build each (name, options) once per worker process.
_tasks: dict[str, Task] = {}
_tasks_lock = threading.Lock()


def cached_task(name: str, **options) -> Task:
    """`get_task(name, **options)`, built once per process for each distinct name and options."""
    key = json.dumps([name, options], sort_keys=True, default=str)
    with _tasks_lock:
        task = _tasks.get(key)
        if task is None:
            task = _tasks[key] = get_task(name, **options)
    return task


def worker_pace(
    speed: float | None, dilation: float, step_time_s: float | None
) -> Callable[[float], Any] | None:
    """How a worker makes each local step take its emulated time in wall-clock terms (None: no waiting).

    speed:       the worker's emulated speed relative to its host (None: native speed).
    dilation:    how many times slower than device time the emulated world runs (>= 1).
    step_time_s: a fixed emulated step time from the server (None: the measured host time / speed).
    """
    if step_time_s is not None:

        def fixed(host_s: float) -> None:
            wait_s = step_time_s * dilation - host_s
            if wait_s > 0:
                time.sleep(wait_s)

        return fixed
    if speed is None and dilation == 1.0:
        return None
    from partita.runtime.emulation import SpeedEmulator

    emulator = SpeedEmulator(speed if speed is not None else 1.0, dilation)
    return emulator.wait_after


def handle_train(message) -> tuple[str, dict, tuple]:
    """The `fl-train` job (a `partita.runtime.wire.Message`): train, and return the `fl-update` reply.

    The worker sets header "worker" to its emulation ({"name", "speed", "dilation"}); the client's speed
    (`TrainConfig.speed`) is the worker's, whatever the server assumed, so the deadline counts this device's
    emulated time. FLError for a malformed request (the worker turns it into an `error` reply).
    """
    header = dict(message.header)
    header.pop("id", None)
    emulation = header.pop("worker", None) or {}
    record = record_from_wire(header, message.tensors)
    config = record.get(CONFIG)
    if not isinstance(config, Mapping):
        raise FLError(f"An {TRAIN_KIND} request needs a {CONFIG!r} section.")
    reply = _train_here(record, config, emulation)
    reply_header, tensors = record_to_wire(reply)
    return UPDATE_KIND, reply_header, tensors


# --- Secure aggregation (`partita.fl.secagg`): the worker keeps its client's change between the four steps --

SECURE_KIND = "fl-secure"
SECURE_REPLY_KIND = "fl-secure-reply"
_participants: dict = {}  # client id -> partita.fl.secagg.participant.SecureParticipant
_participants_lock = threading.Lock()


def _participant(client_id: int):
    from partita.fl.secagg.participant import SecureParticipant  # needs the optional `cryptography`

    with _participants_lock:
        participant = _participants.get(client_id)
        if participant is None:
            participant = _participants[client_id] = SecureParticipant(client_id, _no_training)
    return participant


def _no_training(weights, config):  # a worker trains in handle_secure's "train" step, not through this
    raise FLError("A worker's secure participant trains only through the 'train' step.")


def handle_secure(message) -> tuple[str, dict, tuple]:
    """The `fl-secure` job: one step ("train", "share", "mask", "unmask") of a secure round for one client.

    Header {"step", "round-key": bytes, ...}; see `partita.fl.remote.RemoteClient` for each step's fields.
    FLError for a malformed request (the worker answers `error`).
    """
    header = dict(message.header)
    header.pop("id", None)
    emulation = header.pop("worker", None) or {}
    step, round_key = header.pop("step", None), header.pop("round-key", None)
    if not isinstance(round_key, bytes) or not 8 <= len(round_key) <= 64:
        raise FLError(f"An {SECURE_KIND} request needs 'round-key' (bytes).")
    if step == "train":
        record = record_from_wire(header, message.tensors)
        config = record.get(CONFIG)
        if not isinstance(config, Mapping) or not isinstance(config.get("client-id"), int):
            raise FLError(f"An {SECURE_KIND} train step needs a {CONFIG!r} section with a client-id.")
        reply = _train_here(record, config, emulation)
        update = update_from_reply(reply)
        if update is None:
            return SECURE_REPLY_KIND, {"missed-deadline": 1}, ()
        report, advert = _participant(config["client-id"]).begin(record[ARRAYS], update, round_key)
        return SECURE_REPLY_KIND, {"report": report.to_metrics(), "advert": advert.to_wire()}, ()
    client_id = header.get("client-id")
    if not isinstance(client_id, int):
        raise FLError(f"An {SECURE_KIND} {step!r} step needs an int 'client-id'.")
    participant = _participant(client_id)
    if step == "share":
        from partita.fl.secagg.client import KeyAdvert

        roster = [KeyAdvert.from_wire(item) for item in _list(header, "roster")]
        shares = participant.secure_share(round_key, roster, _int(header, "threshold"))
        return SECURE_REPLY_KIND, {"shares": [[v, c] for v, c in shares.items()]}, ()
    if step == "mask":
        shares = dict(_pairs(header, "shares"))
        scales = [float(w) for w in _list(header, "scales") if isinstance(w, int | float)]
        masked = participant.secure_mask(round_key, shares, scales, [int(v) for v in _list(header, "u2")])
        return SECURE_REPLY_KIND, {}, (torch.from_numpy(masked.view(np.int64)),)
    if step == "unmask":
        seeds, keys = participant.secure_unmask(
            round_key, [int(v) for v in _list(header, "survivors")], [int(v) for v in _list(header, "dropped")]
        )
        return SECURE_REPLY_KIND, {"seeds": list(map(list, seeds.items())), "keys": list(map(list, keys.items()))}, ()
    raise FLError(f"Unknown {SECURE_KIND} step {step!r}; expected train, share, mask or unmask.")


def _list(header: Mapping, key: str) -> list:
    value = header.get(key)
    if not isinstance(value, list):
        raise FLError(f"An {SECURE_KIND} request needs a list {key!r}.")
    return value


def _int(header: Mapping, key: str) -> int:
    value = header.get(key)
    if not isinstance(value, int):
        raise FLError(f"An {SECURE_KIND} request needs an int {key!r}.")
    return value


def _pairs(header: Mapping, key: str) -> list[tuple[int, bytes]]:
    pairs = []
    for item in _list(header, key):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int) and isinstance(item[1], bytes)):
            raise FLError(f"An {SECURE_KIND} request's {key!r} must be [int, bytes] pairs.")
        pairs.append((item[0], item[1]))
    return pairs


# The control kinds a worker serves for federated learning (`partita worker` registers them as jobs).
def _train_here(record: Mapping[str, Any], config: Mapping[str, Any], emulation: Mapping[str, Any]) -> Any:
    """Run one local training request on this worker, paced as its emulated device (plain and secure rounds)."""
    speed = emulation.get("speed")
    dilation = float(emulation.get("dilation") or 1.0)
    config = {**config, "speed": float(speed) if speed is not None else 1.0}
    pace = worker_pace(speed, dilation, config.get("step_time_s"))
    return serve_train_request({**record, CONFIG: config}, get_task=cached_task, pace=pace)


JOBS = {TRAIN_KIND: handle_train, SECURE_KIND: handle_secure}
