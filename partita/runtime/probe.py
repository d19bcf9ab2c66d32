"""Probing a cluster of real workers: every figure a plan needs, each with its spread.

`probe_cluster` is what `partita cluster probe` runs: it says hello to every worker of a cluster
file that has an address (memory: what it may use), has each measure its compute again, one
worker at a time (fp32 matmul windows repeated until they agree within ±10%; workers on the same
hardware, one machine with the same device and threads, get the median of their figures), then measures every link with a worker at either end, both ways (bandwidth and RTT,
trains repeated until they agree within ±10%; see `partita.runtime.profile.measure_link`), one
link at a time. The result is a `ClusterSpec` with those figures marked `measured` (declared
figures are kept) that `to_yaml` writes as a normal cluster file, so that `partita plan` and
`partita simulate` repeat plans of the real hardware offline.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from partita.cluster import ClusterSpec, LinkSpec
from partita.errors import ClusterSpecError, DeployError
from partita.runtime.profile import STABLE_SPREAD
from partita.runtime.protocol import Benchmark, Benchmarked

BENCHMARK_TIMEOUT_S = 60.0

__all__ = ["ProbeResult", "probe_cluster"]


@dataclass(frozen=True)
class ProbeResult:
    """The measured cluster, each worker's hello, and the links probed keyed (prober, probed)."""

    cluster: ClusterSpec
    device_info: dict[str, dict[str, Any]]
    links: dict[tuple[str, str], LinkSpec]

    @property
    def unstable(self) -> list[str]:
        """The figures whose repeats did not agree within ±10%: "a-b bandwidth ±23%", ..."""
        out = []
        for d in self.cluster.devices:
            for label, value in d.spread.items():
                if d.basis_of(label) == "measured" and value > STABLE_SPREAD:
                    out.append(f"{d.name} {label} ±{value:.0%}")
        for (a, b), link in self.links.items():
            if not link.measured.get("stable", True):
                out.append(f"{a}-{b} bandwidth ±{link.measured['bandwidth_spread']:.0%}, "
                           f"latency ±{link.measured['latency_spread']:.0%}")
        return out


def probe_cluster(
    cluster: str | os.PathLike | ClusterSpec,
    *,
    secret_key: str | os.PathLike | None = None,
    insecure: bool = False,
    on_link: Callable[[tuple[str, str], LinkSpec | None], None] | None = None,
    on_device: Callable[[str], None] | None = None,
) -> ProbeResult:
    """Measure the devices with addresses of `cluster` and every link with one of them at an end.

    `on_link((prober, probed), link)` is called with None before each link is probed and with
    its figures after, `on_device(name)` before a device's compute is measured (for a progress
    display). Devices without an address (emulated by
    `partita run`) and the links among them and the source keep their declared figures.
    """
    from partita.runtime.connect import (
        ConnectedCluster,
        coordinator_keypair,
        remote_endpoints,
        spec_and_origin,
    )
    from partita.runtime.measure import Measurements, probe, same_hardware
    from partita.runtime.session import Session

    declared, origin = spec_and_origin(cluster)
    local = [d.name for d in declared.devices if not d.address]
    if len(local) == len(declared.devices):
        raise ClusterSpecError(f"{origin}: no device has an address, so there is nothing real to probe; "
                               "start `partita worker` on the devices and add `address: tcp://HOST:PORT`")
    remote_spec = declared.without(*local)
    keys = coordinator_keypair(secret_key, insecure)
    connected = ConnectedCluster(remote_spec, remote_endpoints(declared, origin, insecure=insecure), keys)
    session = Session(connected)
    try:
        infos = {name: dict(info) for name, info in session.hello().items()}
        for name in remote_spec.names:  # one at a time: workers that share a host must not share its cores
            if on_device is not None:
                on_device(name)
            reply = session.clients[name].send(Benchmark(), timeout_s=BENCHMARK_TIMEOUT_S)
            if not isinstance(reply, Benchmarked):
                raise DeployError(f"worker {name} answered benchmark with {reply.KIND!r}")
            infos[name].update(flops_per_s=reply.flops_per_s, flops_spread=reply.spread, flops_samples=reply.samples)
        for names in same_hardware(infos):  # equal hardware: only noise tells their figures apart
            flops = statistics.median(infos[n]["flops_per_s"] for n in names)
            worst = max(infos[n]["flops_spread"] for n in names)
            for n in names:
                infos[n].update(flops_per_s=flops, flops_spread=worst, same_hardware_as=[m for m in names if m != n])
        nodes = [*remote_spec.names, *([] if declared.source in remote_spec.names else [declared.source])]
        pairs = [(b, a) if b == declared.source else (a, b) for i, a in enumerate(nodes) for b in nodes[i + 1:]]
        links: dict[tuple[str, str], LinkSpec] = {}
        for pair in pairs:
            if on_link is not None:
                on_link(pair, None)
            links.update(probe(session, [pair], on_link=on_link))
    finally:
        session.close()
    measured = Measurements({}, None, infos, links).cluster_spec(declared)
    return ProbeResult(measured, infos, links)
