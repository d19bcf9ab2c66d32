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

from partita.errors import FLError
from partita.fl.local import serve_train_request
from partita.fl.tasks import Task, get_task
from partita.fl.update import CONFIG, record_from_wire, record_to_wire
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
    speed = emulation.get("speed")
    dilation = float(emulation.get("dilation") or 1.0)
    config = {**config, "speed": float(speed) if speed is not None else 1.0}
    pace = worker_pace(speed, dilation, config.get("step_time_s"))
    reply = serve_train_request({**record, CONFIG: config}, get_task=cached_task, pace=pace)
    reply_header, tensors = record_to_wire(reply)
    return UPDATE_KIND, reply_header, tensors
