"""The runtime layer: wire format, control protocol, workers, coordinator, transitions, local cluster.

Foundations (no process or socket state of their own): `wire` (message framing and validation),
`codec` (tensor payload encodings), `protocol` (the typed control commands and replies), `keys`
(ZeroMQ CURVE certificates and authorization), `emulation` (link shaping and device-speed
emulation with time dilation), `deployment` (a deployment target and its stage kinds).

The worker: `worker` (the process: sockets and its I/O loop), `dataplane` (activations in, outputs
out), `handlers` (the control commands, dispatched through a table), `executor` (stage execution
and speed emulation), `flow` (credits and the emulated link per hop).

The coordinator: `coordinator` (`deploy` = `prepare` + `launch`), `measure` (device and link
measurements), `session` (control clients to the workers), `transition` (from the deployment the
workers hold to a target: typed actions, and the engine that carries them out), `pipeline`
(`Pipeline`: requests in, results out, figures), `ledger` (the request book), `switch` and
`supervisor` (re-planning on failures, joins and drift), `heartbeat`, `control` (a worker's control
client), `local` (`LocalCluster`), `connect` (`connect`: workers already running at addresses),
`profile` (timing programs, probing links).

Imports go one way: worker pieces never import coordinator pieces, and among the coordinator's,
supervisor -> switch -> transition -> session -> control; nothing imports the supervisor but
`coordinator` (when it attaches one).

The public names below load lazily, so importing this package does not import torch.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "deploy": "partita.runtime.coordinator",
    "prepare": "partita.runtime.coordinator",
    "launch": "partita.runtime.coordinator",
    "Prepared": "partita.runtime.coordinator",
    "measure": "partita.runtime.measure",
    "Measurements": "partita.runtime.measure",
    "Pipeline": "partita.runtime.pipeline",
    "LocalCluster": "partita.runtime.local",
    "connect": "partita.runtime.connect",
    "ConnectedCluster": "partita.runtime.connect",
    "MixedCluster": "partita.runtime.connect",
    "open_cluster": "partita.runtime.connect",
    "WorkerEndpoint": "partita.runtime.handle",
    "Keypair": "partita.runtime.handle",
    "Worker": "partita.runtime.worker",
    "WorkerConfig": "partita.runtime.worker",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'partita.runtime' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
