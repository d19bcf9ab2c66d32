"""measure: time every segment of a captured model on every device of a cluster, then probe links.

Workers on this host (a `LocalCluster`) share one host profile scaled by each device's emulated
speed; a worker elsewhere times the segments itself (the `profile` command): workers on different
machines at once, workers that report the same machine (`host` in hello) one after another, and
workers on the same hardware (machine, device, threads) get the median of their times. Links the cluster
does not declare (or all of them, on request) are probed: a worker probes its peers' data sockets
(`probe`), the coordinator probes the source's links. Everything is in device time.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from partita.cluster import ClusterSpec, LinkSpec
from partita.errors import DeployError, WorkerError
from partita.runtime.handle import ClusterHandle
from partita.runtime.keys import apply_client
from partita.runtime.protocol import Allow, Probe, Probed, Profile, Profiled
from partita.runtime.session import Session
from partita.runtime.transition import LinkSetting, link_setting
from partita.runtime.wire import blob_tensor

PROFILE_TIMEOUT_S = 600.0
PROBE_TIMEOUT_S = 120.0
#: A measured link's directions are planned apart when one is more than this many times the other.
ASYMMETRY = 1.5


@dataclass(frozen=True)
class Measurements:
    """What `measure` found: seconds per segment per device (device time), the host profile, the links.

    `host_segment_s` is this host's time per segment (the basis of emulated devices), None when
    no device is emulated here. `device_info` is each worker's hello reply. `links` are the links
    that were probed, keyed (prober, probed) — the source's are probed from the coordinator — in
    device time; links not probed are as the cluster declares them (`cluster_spec`). `host_step_s`:
    for a model whose steps differ in size (a decoder), this host's seconds per segment per kind of
    step at one or two sizes, {kind: ((size, per-segment seconds), ...)}: the basis emulated
    devices pace each step by (`TransitionEngine`); None otherwise.
    """

    segment_times_s: Mapping[str, tuple[float, ...]]
    host_segment_s: tuple[float, ...] | None
    device_info: Mapping[str, Mapping[str, Any]]
    links: Mapping[tuple[str, str], LinkSpec] = field(default_factory=dict)
    host_step_s: Mapping[str, tuple[tuple[float, tuple[float, ...]], ...]] | None = None

    def cluster_spec(self, declared: ClusterSpec) -> ClusterSpec:
        """`declared` with the probed links in place of what it says, and what it leaves unknown filled in.

        A device given by address alone gets the compute and memory its worker reported in `hello`
        (a matmul benchmark with its spread; the memory it may use), marked `measured`; figures the
        file declares are kept. This is what deploy plans with (its compute comes from the measured
        segment times where it has them).
        """
        spec = declared
        for device in declared.devices:
            info = self.device_info.get(device.name, {})
            changes = measured_device_figures(device, info)
            if changes:
                spec = spec.replace_device(device.name, **changes)
        for (a, b), link in self.links.items():
            spec = spec.with_link(a, b, link)
        return spec


def measured_device_figures(device: Any, info: Mapping[str, Any]) -> dict[str, Any]:
    """The `replace_device` changes that fill a device's unknown compute and memory from its `hello`."""
    changes: dict[str, Any] = {}
    basis, spread = dict(device.basis), dict(device.spread)
    if device.flops_per_s is None and float(info.get("flops_per_s") or 0) > 0:
        changes["flops_per_s"] = float(info["flops_per_s"])
        basis["flops_per_s"], spread["flops_per_s"] = "measured", float(info.get("flops_spread") or 0.0)
    if device.memory_bytes is None and float(info.get("memory_bytes") or 0) > 0:
        changes["memory_bytes"] = float(info["memory_bytes"])
        basis["memory_bytes"], spread["memory_bytes"] = "measured", 0.0
    if changes:
        changes.update(basis=basis, spread=spread)
    return changes


def probed_link(prober: str, probed: str, figures: Mapping[str, Any]) -> LinkSpec:
    """The measured LinkSpec of a probe's figures (`measure_link`'s dict) from `prober` to `probed`.

    Directions that differ by more than `ASYMMETRY` times become the link's `directions`, each
    planned with its own bandwidth; closer ones are one link at the slower figure. A probe is held
    to within 20% of a link's rate each way (the real-network tests' band), so the two directions
    of a link shaped the same both ways may read up to 1.5x apart, and a plan should not follow
    that noise. `measured` keeps both directions, named by the ends in name order, with the
    RTT and the spreads.
    """
    forward = float(figures["bandwidth_bytes_per_s"])
    backward = float(figures.get("bandwidth_back_bytes_per_s") or forward)
    a, b = sorted((prober, probed))
    ab, ba = (forward, backward) if a == prober else (backward, forward)
    spreads = [float(figures.get(k) or 0.0) for k in ("bandwidth_spread", "bandwidth_back_spread")]
    measured = {
        "bandwidth_a_to_b": ab,
        "bandwidth_b_to_a": ba,
        "rtt_s": float(figures.get("rtt_s") or 2 * float(figures["latency_s"])),
        "bandwidth_spread": max(spreads),
        "latency_spread": float(figures.get("latency_spread") or 0.0),
        "samples": int(figures.get("samples") or 1),
        "stable": bool(figures.get("stable", True)),
    }
    directions = (ab, ba) if max(ab, ba) > ASYMMETRY * min(ab, ba) else None
    return LinkSpec(min(forward, backward), float(figures["latency_s"]), "measured", measured, directions)


def measure(
    graph: Any,
    example_inputs: tuple,
    cluster: ClusterHandle,
    *,
    session: Session | None = None,
    reps: int = 3,
    probe_links: bool | None = None,
) -> Measurements:
    """Time every segment of `graph` on every device of `cluster` (seconds, device time), then probe links.

    `probe_links` (see `deploy`): None probes the real links the cluster does not declare, True
    every link, False none. A worker probes its peers' data sockets (`probe`), so each probed
    worker first allows the probing workers' keys; the coordinator probes the source's links.
    """
    from partita.model import flatten_inputs, split

    own = session is None
    session = session or Session(cluster)
    try:
        infos = session.hello()
        segments = split(graph, list(range(len(graph.segments) - 1)))
        inputs = tuple(flatten_inputs(*example_inputs))
        speeds = dict(cluster.host_speeds)
        remote = [name for name in cluster.spec.names if name not in speeds]
        archives = [blob_tensor(s.to_bytes()) for s in segments] if remote else []
        shas = tuple(s.sha256 for s in segments)
        times: dict[str, tuple[float, ...]] = {}
        host_s: tuple[float, ...] | None = None
        if speeds:
            # Emulated devices share this host: time the segments once, here, on as many torch threads
            # as an emulated worker uses, and scale by each device's speed.
            host_s = host_profile(segments, inputs, reps=reps, threads=cluster.threads_per_worker)
            for name, speed in speeds.items():
                times[name] = tuple(t / speed for t in host_s)

        def profile(name: str) -> tuple[str, tuple[float, ...]]:
            command = Profile(shas, tuple(archives), inputs, reps)
            reply = session.clients[name].send(command, timeout_s=PROFILE_TIMEOUT_S)
            if not isinstance(reply, Profiled):
                raise DeployError(f"worker {name} answered profile with {reply.KIND!r}")
            return name, reply.device_s

        def profile_machine(names: list[str]) -> list[tuple[str, tuple[float, ...]]]:
            return [profile(name) for name in names]  # one at a time: they share the machine's cores

        machines: dict[str, list[str]] = {}
        for name in remote:
            machines.setdefault(str(infos[name].get("host", name)), []).append(name)
        with ThreadPoolExecutor(max_workers=max(1, len(machines))) as pool:
            for timed in pool.map(profile_machine, machines.values()):
                times.update(dict(timed))
        times.update(pool_same_hardware({name: times[name] for name in remote}, infos))
        # After the profiles, one at a time: probes that overlap would share (and halve) the network.
        links = probe(session, links_to_probe(cluster, probe_links))
        return Measurements(times, host_s, infos, links)
    finally:
        if own:
            session.close()


def same_hardware(infos: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Groups of workers that run on the same hardware: one machine (`host`), device, threads and speed.

    Their compute is the same, so what tells them apart in a measurement is only noise (on a busy
    machine, a lot of it); groups of one are left out.
    """
    groups: dict[tuple, list[str]] = {}
    for name, info in infos.items():
        if info.get("host") is None:
            continue  # a worker that does not say where it runs is its own hardware
        key = (info["host"], info.get("device_name"), info.get("threads"), info.get("speed"))
        groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def pool_same_hardware(times: Mapping[str, tuple[float, ...]],
                       infos: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[float, ...]]:
    """Segment times of workers on the same hardware replaced by their per-segment median.

    Without it, noise decides which of two equal devices looks faster, and a plan flips between
    them from one deploy to the next.
    """
    out = dict(times)
    for names in same_hardware({n: infos[n] for n in times}):
        pooled = tuple(statistics.median(times[n][k] for n in names) for k in range(len(times[names[0]])))
        out.update({n: pooled for n in names})
    return out


def links_to_probe(cluster: ClusterHandle, probe_links: bool | None) -> list[tuple[str, str]]:
    """(prober, probed) pairs to measure: the source's links are probed from the coordinator (the source).

    None: links with a real device at either end (not emulated here) that the spec does not
    declare in its pairs (it only has them from `default`). True: all links. False: none.
    """
    if probe_links is False:
        return []
    spec = cluster.spec
    nodes = [*spec.names, *([] if spec.source in spec.names else [spec.source])]
    out = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            real = not cluster.emulated_links or cluster.emulated_link(a, b) is None
            if probe_links or (real and frozenset((a, b)) not in spec.pair_links):
                out.append((b, a) if b == spec.source else (a, b))  # the source is last in `nodes`
    return out


def probe(session: Session, pairs: Sequence[tuple[str, str]], *,
          on_link: Callable[[tuple[str, str], LinkSpec], None] | None = None) -> dict[tuple[str, str], LinkSpec]:
    """Measure each (prober, probed) link; the source's from this process, the others by the prober's worker.

    One link at a time: probes that overlapped would share a device's access link and halve each
    other's figures. `on_link` is called after each (for a progress display). An emulated link
    slower one way is probed twice, once shaped as each direction (an emulated probe shapes both of
    its directions alike), and keeps each run's figure for its own direction.
    """
    if not pairs:
        return {}
    cluster = session.cluster
    source = cluster.spec.source
    public = session.public_keys()
    probers: dict[str, list[str]] = {}
    for a, b in pairs:
        if a != source and (prober_key := public.get(a)):
            probers.setdefault(b, []).append(prober_key)
    for b, prober_keys in probers.items():  # the probed data socket must accept the prober's key
        session.clients[b].send(Allow(tuple(prober_keys)))
    links = {}
    for a, b in pairs:
        setting, back = link_setting(cluster, a, b), link_setting(cluster, b, a)
        figures = _probe_one(session, a, b, setting)
        if back != setting:
            returned = _probe_one(session, a, b, back)
            figures.update({key: returned[key] for key in ("bandwidth_back_bytes_per_s", "bandwidth_back_spread")})
        links[(a, b)] = probed_link(a, b, figures)
        if on_link is not None:
            on_link((a, b), links[(a, b)])
    return links


def _probe_one(session: Session, a: str, b: str, setting: LinkSetting) -> dict[str, Any]:
    """`measure_link`'s figures of the link from a to b, shaped (when emulated) as `setting`."""
    from partita.runtime.profile import measure_link

    cluster, infos, key = session.cluster, session.hello(), session.public_keys().get(b)
    if a == cluster.spec.source:
        sock = session.context.socket(zmq.DEALER)
        keys = session.keys
        plain = keys is None or not key
        apply_client(sock, None if plain or keys is None else (keys.public, keys.secret),
                     None if plain or key is None else key.encode(), insecure=plain)
        try:
            sock.connect(str(infos[b]["data"]))
            return measure_link(sock, emulate=(setting.bandwidth_bytes_per_s, setting.latency_s),
                                dilation=cluster.dilation)
        finally:
            sock.close(linger=0)
    command = Probe(str(infos[b]["data"]), key, setting.bandwidth_bytes_per_s, setting.latency_s)
    try:
        reply = session.clients[a].send(command, timeout_s=PROBE_TIMEOUT_S)
    except WorkerError as exc:
        raise DeployError(f"could not probe the link {a}-{b}: {exc}") from None
    if not isinstance(reply, Probed):
        raise DeployError(f"worker {a} answered probe with {reply.KIND!r}")
    return {**reply.fields, "bandwidth_bytes_per_s": reply.bandwidth_bytes_per_s, "latency_s": reply.latency_s}


def host_profile(segments: Sequence[Any], inputs: tuple, *, reps: int, threads: int) -> tuple[float, ...]:
    """Seconds per segment on this host with `threads` torch threads (the basis of emulated devices)."""
    from partita.runtime.profile import time_programs

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return tuple(time_programs(segments, inputs, reps=reps))
    finally:
        torch.set_num_threads(previous)
