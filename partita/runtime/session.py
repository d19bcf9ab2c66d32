"""The coordinator's connections to one cluster's workers: a zmq context and a control client per worker.

`deploy` opens a `Session`, measures and launches through it, and hands it to the pipeline, which
closes it when it closes. The supervisor adds a client when a device joins (`connect`) and drops
one when a device fails (`drop`): both replace the `clients` map instead of editing it, because
other threads may be iterating over it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from partita.errors import DeployError, WorkerError
from partita.runtime.control import ControlClient
from partita.runtime.handle import ClusterHandle, WorkerEndpoint
from partita.runtime.keys import stop_auth

HELLO_TIMEOUT_S = 20.0


def routable(info: Mapping[str, Any], control: str) -> dict[str, Any]:
    """A worker's hello, its data address made reachable: a wildcard bind host becomes its control host."""
    out = dict(info)
    host, port = str(info["data"]).removeprefix("tcp://").rsplit(":", 1)
    if host in ("0.0.0.0", "*", "[::]", "::"):
        out["data"] = f"tcp://{control.removeprefix('tcp://').rsplit(':', 1)[0]}:{port}"
    return out


def public_keys(endpoints: Mapping[str, WorkerEndpoint]) -> dict[str, str | None]:
    """Each worker's CURVE public key as z85 text (what routes and `allow` carry); None for an insecure worker."""
    return {name: (ep.public_key.decode() if ep.public_key else None) for name, ep in endpoints.items()}


class Session:
    """Control clients to every worker of `cluster` (see the module docstring)."""

    def __init__(self, cluster: ClusterHandle) -> None:
        self.cluster = cluster
        self.context = zmq.Context()
        self.keys = cluster.coordinator_keys
        missing = [name for name in cluster.spec.names if name not in cluster.endpoints]
        if missing:
            self.context.term()
            raise DeployError(f"no running worker for device(s) {missing}; start them or emulate them in a LocalCluster")
        self.clients: dict[str, ControlClient] = {
            name: ControlClient(self.context, ep, self.keys, exited=self._exit_of(name))
            for name, ep in cluster.endpoints.items()
        }
        self.infos: dict[str, Mapping[str, Any]] = {}
        self._closed = False

    def hello(self) -> dict[str, Mapping[str, Any]]:
        """Every worker's hello reply (asked once), its data address made reachable."""
        if not self.infos:
            def ask(client: ControlClient) -> tuple[str, Mapping[str, Any]]:
                return client.endpoint.name, client.call("hello", timeout_s=HELLO_TIMEOUT_S).header

            with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
                replies = pool.map(ask, self.clients.values())
                self.infos = {name: routable(info, self.cluster.endpoints[name].control) for name, info in replies}
        return self.infos

    def _exit_of(self, name: str) -> Callable[[], int | None]:
        """How a client learns that worker `name`'s process ended (when this machine started it)."""
        cluster = self.cluster
        return lambda: cluster.worker_exit(name)

    def public_keys(self) -> dict[str, str | None]:
        return public_keys(self.cluster.endpoints)

    def connect(self, name: str, endpoint: WorkerEndpoint) -> ControlClient:
        """A (new) client for worker `name`, which says hello; the old client, if any, is closed."""
        old = self.clients.get(name)
        client = ControlClient(self.context, endpoint, self.keys, timeout_s=HELLO_TIMEOUT_S,
                               exited=self._exit_of(name))
        self.clients = {**self.clients, name: client}  # a new dict: other threads may iterate the old one
        if old is not None:
            old.close()
        return client

    def greet(self, name: str) -> None:
        """Ask worker `name` for its hello again (it restarted, or joined)."""
        endpoint = self.cluster.endpoints[name]
        self.infos[name] = routable(self.clients[name].call("hello", timeout_s=HELLO_TIMEOUT_S).header,
                                    endpoint.control)

    def drop(self, name: str) -> None:
        """Forget worker `name` (it failed): its calls would only time out."""
        client = self.clients.get(name)
        if client is not None:
            self.clients = {k: v for k, v in self.clients.items() if k != name}  # a new dict: see `connect`
            client.close()

    def worker_stats(self) -> dict[str, dict]:
        """Every worker's `stats` reply (a worker that does not answer is left out)."""
        out = {}
        # A copy: add_device may add a client from another thread while this one waits on replies.
        for name, client in list(self.clients.items()):
            try:
                out[name] = client.call("stats", timeout_s=5).header
            except WorkerError:
                # A worker that cannot answer has no figures to give; stats() shows it as missing.
                continue
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for client in self.clients.values():
            client.close()
        stop_auth(self.context)
        self.context.term()
