"""partita.connect: a cluster of workers that are already running at addresses (real devices).

```python
cluster = partita.connect("cluster.yaml", secret_key="keys/coordinator.key_secret")
with cluster:
    pipe = partita.deploy(model, (x,), cluster)
```

Every device in the file must have an `address` (its worker's control endpoint, `partita worker
--listen ...`) and, unless `insecure=True`, a `public_key` (the worker's NAME.key file; a relative
path is taken relative to the cluster file). Links are real: nothing is shaped. A link the file
declares is what the planner believes; deploy probes the real links the file leaves out (or every
link with `probe_links=True`, none with `probe_links=False`).

`MixedCluster` joins such workers with a `LocalCluster` emulating the devices that have no address
(what `partita run` does): links between emulated nodes are emulated, links that touch a real
device are real.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import zmq

from partita.cluster import ClusterSpec, LinkSpec
from partita.errors import AuthError, ClusterSpecError, WorkerError
from partita.runtime.control import ControlClient
from partita.runtime.handle import Deployments, Keypair, WorkerEndpoint
from partita.runtime.keys import load_public_keys, load_secret, stop_auth

if TYPE_CHECKING:
    from partita.runtime.local import LocalCluster


class ConnectedCluster:
    """Workers already running at the addresses of `spec` (see the module docstring)."""

    emulated_links = False
    dilation = 1.0
    threads_per_worker = 1

    def __init__(
        self,
        spec: ClusterSpec,
        endpoints: Mapping[str, WorkerEndpoint],
        coordinator_keys: Keypair | None,
        *,
        bind_host: str = "0.0.0.0",
        advertise_host: str | None = None,
    ) -> None:
        self.spec = spec
        self.endpoints = dict(endpoints)
        self.coordinator_keys = coordinator_keys
        self.bind_host = bind_host
        self.advertise_host: str | None = advertise_host or _route_to(next(iter(self.endpoints.values())).control)
        self.host_speeds: dict[str, float] = {}  # no device is emulated here
        self.pipelines = Deployments()

    def emulated_link(self, a: str, b: str) -> LinkSpec | None:
        """None: every link is real."""
        return None

    def fit_dilation(self, plan: Any, host_segment_s: tuple[float, ...] | None) -> float:
        """Real devices run in real time: the dilation stays 1."""
        return self.dilation

    def worker_exit(self, name: str) -> int | None:
        """None: a worker on another machine is seen only through its heartbeats."""
        return None

    def ping(self, timeout_s: float = 5.0) -> dict[str, dict]:
        """Every worker's hello reply; WorkerError naming the first that does not answer."""
        context = zmq.Context()
        try:
            out = {}
            for name, endpoint in self.endpoints.items():
                client = ControlClient(context, endpoint, self.coordinator_keys, timeout_s=timeout_s)
                try:
                    out[name] = client.call("hello").header
                finally:
                    client.close()
            return out
        finally:
            stop_auth(context)
            context.term()

    def close(self) -> None:
        """Close the pipelines deployed on this cluster (the workers keep running)."""
        self.pipelines.close_all()

    def __enter__(self) -> ConnectedCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    cluster: str | os.PathLike | ClusterSpec,
    *,
    secret_key: str | os.PathLike | None = None,
    insecure: bool = False,
    check: bool = True,
    timeout_s: float = 10.0,
) -> ConnectedCluster:
    """Connect to the running workers of a cluster file (or spec) whose devices all have addresses.

    `secret_key` is the coordinator's NAME.key_secret (the workers were given its public key);
    `insecure=True` talks to `--insecure` workers. `check` says hello to every worker now, so a
    wrong address or key fails here rather than at deploy.
    """
    spec, origin = spec_and_origin(cluster)
    missing = [d.name for d in spec.devices if not d.address]
    if missing:
        raise ClusterSpecError(
            f"{origin}: device(s) {missing} have no address; start `partita worker` there and add "
            "`address: tcp://HOST:PORT`, or run them emulated with LocalCluster / `partita run`"
        )
    keys = coordinator_keypair(secret_key, insecure)
    connected = ConnectedCluster(spec, remote_endpoints(spec, origin, insecure=insecure), keys)
    if check:
        connected.ping(timeout_s)
    return connected


def worker_status(
    cluster: str | os.PathLike | ClusterSpec,
    *,
    secret_key: str | os.PathLike | None = None,
    insecure: bool = False,
    timeout_s: float = 2.0,
) -> dict[str, dict[str, Any]]:
    """What each device of a cluster file is doing now, without deploying anything.

    A device with an address is `up` (its worker's `hello`: device, memory, threads, version, the
    stages it holds) or `down` (`error` says why: no answer within `timeout_s`, a refused key). A
    device without one is `emulated`: `partita run` would start it on this machine.
    """
    spec, origin = spec_and_origin(cluster)
    keys = coordinator_keypair(secret_key, insecure)
    endpoints = remote_endpoints(spec, origin, insecure=insecure)
    out: dict[str, dict[str, Any]] = {}
    context = zmq.Context()
    try:
        for device in spec.devices:
            endpoint = endpoints.get(device.name)
            if endpoint is None:
                out[device.name] = {"state": "emulated"}
                continue
            client = ControlClient(context, endpoint, keys, timeout_s=timeout_s)
            try:
                out[device.name] = {"state": "up", "address": device.address, **client.call("hello").header}
            except WorkerError as exc:
                out[device.name] = {"state": "down", "address": device.address, "error": str(exc)}
            finally:
                client.close()
    finally:
        stop_auth(context)
        context.term()
    return out


def remote_endpoints(spec: ClusterSpec, origin: str, *, insecure: bool) -> dict[str, WorkerEndpoint]:
    """Endpoints of the devices of `spec` that have an address (their public keys loaded)."""
    base = Path(origin).parent if origin and Path(origin).exists() else Path.cwd()
    out = {}
    for device in spec.devices:
        if not device.address:
            continue
        key = None
        if not insecure:
            if not device.public_key:
                raise ClusterSpecError(
                    f"{origin}: device {device.name!r} has an address but no public_key; give the worker's .key file "
                    "(or use --insecure for workers started with --insecure)"
                )
            path = Path(device.public_key)
            key = load_public_keys(path if path.is_absolute() or path.exists() else base / path)[0]
        out[device.name] = WorkerEndpoint(device.name, device.address, key)
    return out


class MixedCluster:
    """Real workers (devices with addresses) plus a LocalCluster emulating the rest, as one cluster."""

    def __init__(self, spec: ClusterSpec, remote: Mapping[str, WorkerEndpoint], local: LocalCluster | None,
                 coordinator_keys: Keypair | None) -> None:
        self.spec = spec
        self.local = local
        self.endpoints = dict(remote)
        self.coordinator_keys = coordinator_keys
        self.dilation = local.dilation if local is not None else 1.0
        self.host_speeds = dict(local.host_speeds) if local is not None else {}
        self.threads_per_worker = local.threads_per_worker if local is not None else 1
        self.pipelines = Deployments()
        self.emulated_links = True
        self._remote = set(remote)
        self.bind_host = "0.0.0.0" if remote else "127.0.0.1"
        self.advertise_host: str | None = _route_to(next(iter(remote.values())).control) if remote else "127.0.0.1"

    def emulated_link(self, a: str, b: str) -> LinkSpec | None:
        """The emulated link a-b, or None when a real device is at either end (the real network)."""
        if a in self._remote or b in self._remote:
            return None
        return self.local.emulated_link(a, b) if self.local is not None else self.spec.link(a, b)

    def fit_dilation(self, plan: Any, host_segment_s: tuple[float, ...] | None) -> float:
        """Real devices take part: the dilation the emulated part started with stays."""
        return self.dilation

    def worker_exit(self, name: str) -> int | None:
        """An emulated worker's exit code once it ended; None for a running or a real worker."""
        return self.local.worker_exit(name) if self.local is not None and name not in self._remote else None

    def close(self) -> None:
        self.pipelines.close_all()
        if self.local is not None:
            self.local.close()

    def start(self) -> MixedCluster:
        """Start the emulated workers (if any) and take their endpoints and keys."""
        if self.local is not None:
            self.local.start()
            self.endpoints = {**self.local.endpoints, **self.endpoints}
            self.dilation = self.local.dilation
            self.host_speeds = dict(self.local.host_speeds)
            if self.coordinator_keys is None:
                self.coordinator_keys = self.local.coordinator_keys
        return self

    def __enter__(self) -> MixedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def spec_and_origin(cluster: str | os.PathLike | ClusterSpec) -> tuple[ClusterSpec, str]:
    """The cluster of a file (or a spec as it is) and where it came from, for messages and relative key paths."""
    if isinstance(cluster, ClusterSpec):
        return cluster, "<cluster>"
    return ClusterSpec.from_yaml(cluster), str(cluster)


def coordinator_keypair(secret_key: str | os.PathLike | None, insecure: bool) -> Keypair | None:
    """The coordinator's key pair from its secret key file; None with `insecure`; AuthError when neither or both."""
    if insecure:
        if secret_key is not None:
            raise AuthError("both a secret key and insecure=True were given; choose one")
        return None
    if secret_key is None:
        raise AuthError(
            "connecting to real workers needs the coordinator's secret key (secret_key=... / --secret-key FILE, "
            "made with `partita keys new DIR coordinator`), or an explicit insecure=True / --insecure"
        )
    return Keypair(*load_secret(secret_key))


def _route_to(address: str) -> str:
    """This machine's IP address on the route to a worker's `tcp://host:port` (for workers to call back)."""
    host = urlparse(address).hostname or "127.0.0.1"
    if host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))  # UDP connect sends nothing; it only picks the outgoing interface
            return probe.getsockname()[0]
        except OSError:
            # No route (offline, unresolvable): fall back to the loopback; workers elsewhere will not reach it.
            return "127.0.0.1"


def open_cluster(
    path: str | os.PathLike | ClusterSpec,
    *,
    secret_key: str | os.PathLike | None = None,
    insecure: bool = False,
    dilation: float | None = None,
) -> Any:
    """The cluster of a file as `partita run` sees it (LocalCluster or MixedCluster), not yet started (use it as a context manager).

    Devices with an address are connected (they need the coordinator's `secret_key` unless
    `insecure`); the others are emulated on this machine in a LocalCluster (throwaway keys, or
    the coordinator's own key when real workers are involved). A file with no addresses runs
    entirely here.
    """
    from partita.runtime.local import LocalCluster

    spec, origin = spec_and_origin(path)
    remote_names = [d.name for d in spec.devices if d.address]
    if not remote_names:
        return LocalCluster(spec, dilation=dilation, secure=not insecure)
    keys = coordinator_keypair(secret_key, insecure)
    remote = remote_endpoints(spec, origin, insecure=insecure)
    local_names = [d.name for d in spec.devices if not d.address]
    local = None
    if local_names:
        local = LocalCluster(spec.without(*remote_names), dilation=dilation, secure=not insecure, coordinator_keys=keys)
    return MixedCluster(spec, remote, local, keys)
