"""The runtime layer: wire format, codecs, CURVE keys, emulation, workers, coordinator, local cluster.

Foundations (no process or socket state of their own): `wire` (message framing and validation),
`codec` (tensor payload encodings), `keys` (ZeroMQ CURVE certificates and authorization),
`emulation` (link shaping and device-speed emulation with time dilation).

Processes and their pieces: `worker` (the worker process: sockets and its I/O loop), `executor`
(stage execution and speed emulation), `flow` (credits and the emulated link per hop), `control`
(the coordinator's client of a worker's control socket), `coordinator` (`deploy`, `measure`),
`pipeline` (`Pipeline`: requests in, results out, figures), `ledger` (the request book),
`local` (`LocalCluster`), `connect` (`connect`: workers already running at addresses),
`profile` (device and link measurements).

The public names below load lazily, so importing this package does not import torch.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "deploy": "partita.runtime.coordinator",
    "measure": "partita.runtime.coordinator",
    "Measurements": "partita.runtime.coordinator",
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
