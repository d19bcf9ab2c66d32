"""deploy: measure the cluster, plan with what was measured, split, ship the stages, wire the workers.

```python
with partita.LocalCluster.from_yaml("examples/clusters/home-edge.yaml") as cluster:
    pipe = partita.deploy(model, (example,), cluster, objective="throughput", planner="optimal")
    y = pipe(x)
```

In order, `deploy`:

1. says hello to every worker (device, memory, data address);
2. captures the model and times every segment on the devices (`measure`): workers on this host
   (a `LocalCluster`) share one host profile scaled by each device's emulated speed; a worker
   elsewhere times the segments itself;
3. plans with those per-segment times (`partita.plan.plan(..., segment_times_s=...)`);
4. splits the graph at the plan's cuts and ships each stage archive to its device(s), where it
   is sha256-checked and memory-checked;
5. tells every worker where its outputs go (next stage's replicas, or back to the coordinator)
   and which peers may send it activations, then opens the coordinator's own sockets.

One cluster runs one pipeline at a time: deploying again closes the previous pipeline.
"""

from __future__ import annotations

import itertools
import math
import time
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from partita.cluster import ClusterSpec, LinkSpec
from partita.errors import DeployError, WorkerError
from partita.runtime.control import ControlClient
from partita.runtime.flow import Outlink, socket_sender
from partita.runtime.handle import ClusterHandle
from partita.runtime.keys import apply_client, apply_server, stop_auth
from partita.runtime.pipeline import Deployment, Pipeline
from partita.runtime.wire import blob_tensor

_epochs = itertools.count(1)
_live: weakref.WeakKeyDictionary[Any, Pipeline] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Measurements:
    """What `measure` found: seconds per segment per device (device time), the host profile, the links.

    `host_segment_s` is this host's time per segment (the basis of emulated devices), None when
    no device is emulated here. `device_info` is each worker's hello reply. `links` are the links
    that were probed, keyed (prober, probed) — the source's are probed from the coordinator — in
    device time; links not probed are as the cluster declares them (`cluster_spec`).
    """

    segment_times_s: Mapping[str, tuple[float, ...]]
    host_segment_s: tuple[float, ...] | None
    device_info: Mapping[str, Mapping[str, Any]]
    links: Mapping[tuple[str, str], LinkSpec] = field(default_factory=dict)

    def cluster_spec(self, declared: ClusterSpec) -> ClusterSpec:
        """`declared` with the probed links in place of what it says (what deploy plans with)."""
        spec = declared
        for (a, b), link in self.links.items():
            spec = spec.with_link(a, b, link)
        return spec


def deploy(
    model: Any,
    example_inputs: tuple,
    cluster: ClusterHandle,
    *,
    objective: str = "throughput",
    planner: str = "optimal",
    codec: str = "none",
    window: int = 4,
    max_stages: int | None = None,
    replicate: bool = True,
    reps: int = 3,
    graph: Any | None = None,
    measurements: Measurements | None = None,
    stages: Sequence[Any] | None = None,
    supervise: Any = True,
    probe_links: bool | None = None,
) -> Pipeline:
    """Deploy `model` onto `cluster` and return a running `Pipeline`.

    `example_inputs` is the tuple of inputs used for capture and profiling (its batch size is the
    one the figures refer to). `codec` encodes activations between devices ("none" exact, "lz4"
    lossless, "fp16"/"int8" lossy). `window` is the credits each sender holds per receiver.
    `graph` and `measurements` reuse an earlier capture and measurement of the same model on
    the same cluster (`pipe.graph`, `pipe.measurements`), to deploy several plans quickly.
    `stages` deploys a given assignment instead of planning: `(devices, start, end)` per stage, as
    `partita.plan.predict` takes it (the plan's figures are then its predictions).
    `supervise` (issue 5): True watches the workers and re-plans on failures, joins and drift with
    the defaults of `partita.runtime.supervisor.Supervision` (2 s failure detection; with `stages`
    given, the assignment is pinned: only failures re-plan); a `Supervision` sets them; False: none.
    `probe_links`: None probes the links deploy does not know — real links (a worker at either
    end) that the cluster file does not declare in `pairs` — and plans with what it measured;
    True probes every link, emulated ones included (a LocalCluster: the emulation itself);
    False probes none. Given `measurements`, nothing is probed again.
    """
    from partita.model import capture, flatten_inputs, split, unflatten_outputs
    from partita.plan import plan as make_plan
    from partita.plan import predict
    from partita.runtime.codec import check_codec

    check_codec(codec)
    if window < 1:
        raise DeployError(f"window must be at least 1 credit, got {window}")
    previous = _live.pop(cluster, None)
    if previous is not None:
        previous.close()
    session = _Session(cluster)
    timings: dict[str, float] = {}
    clock = _Stopwatch(timings)
    try:
        with clock("capture_s"):
            graph = graph if graph is not None else capture(model, tuple(example_inputs))
        with clock("measure_s"):
            if measurements is None:
                measurements = measure(graph, example_inputs, cluster, session=session, reps=reps,
                                       probe_links=probe_links)
        clock.start("plan_s")
        planned_spec = measurements.cluster_spec(cluster.spec)  # the declared links, the probed ones replaced
        if stages is not None:
            chosen = predict(graph, planned_spec, stages, objective=objective, segment_times_s=measurements.segment_times_s)
        else:
            chosen = make_plan(
                graph,
                planned_spec,
                objective=objective,
                planner=planner,
                max_stages=max_stages,
                replicate=replicate,
                segment_times_s=measurements.segment_times_s,
            )
        clock.start("split_s")
        programs = tuple(split(graph, chosen.cuts()))
        clock.stop()
        deployment = Deployment(
            epoch=next(_epochs),
            plan=chosen,
            programs=programs,
            placement=tuple(tuple(stage.devices) for stage in chosen.stages),
            codec=codec,
            window=window,
        )
        fit = getattr(cluster, "fit_dilation", None)
        if fit is not None:  # an emulated cluster slows its world enough for this plan to run faithfully
            fit(chosen, measurements.host_segment_s)
        with clock("ship_s"):
            _ship(session, deployment, measurements)
        with clock("wire_s"):
            pipe = _wire(session, deployment, measurements, flatten_inputs, unflatten_outputs)
    except BaseException:
        session.close()
        raise
    pipe.graph = graph
    pipe.measurements = measurements
    pipe.deploy_timings = timings
    _live[cluster] = pipe
    if supervise:
        from partita.runtime.supervisor import attach

        attach(pipe, session, supervise, objective=objective, planner=planner, max_stages=max_stages,
               replicate=replicate, pinned=stages is not None)
    return pipe


def measure(
    graph: Any,
    example_inputs: tuple,
    cluster: ClusterHandle,
    *,
    session: _Session | None = None,
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
    session = session or _Session(cluster)
    try:
        infos = session.hello()
        segments = split(graph, list(range(len(graph.segments) - 1)))
        inputs = tuple(flatten_inputs(*example_inputs))
        speeds = dict(getattr(cluster, "host_speeds", {}) or {})
        remote = [name for name in cluster.spec.names if name not in speeds]
        archives = [blob_tensor(s.to_bytes()) for s in segments] if remote else []
        header = {"programs": [s.sha256 for s in segments], "reps": reps}
        times: dict[str, tuple[float, ...]] = {}
        host_s: tuple[float, ...] | None = None
        if speeds:
            # Emulated devices share this host: time the segments once, here, on as many torch threads
            # as an emulated worker uses, and scale by each device's speed.
            host_s = _host_profile(segments, inputs, reps=reps, threads=getattr(cluster, "threads_per_worker", 1))
            for name, speed in speeds.items():
                times[name] = tuple(t / speed for t in host_s)

        def profile(name: str) -> tuple[str, tuple[float, ...]]:
            reply = session.clients[name].call("profile", header, [*archives, *inputs], timeout_s=600)
            return name, tuple(float(t) for t in reply.header["device_s"])

        with ThreadPoolExecutor(max_workers=max(1, len(remote))) as pool:
            times.update(dict(pool.map(profile, remote)))
        # After the profiles, one at a time: probes that overlap would share (and halve) the network.
        links = _probe(session, _links_to_probe(cluster, probe_links))
        return Measurements(times, host_s, infos, links)
    finally:
        if own:
            session.close()


def _links_to_probe(cluster: ClusterHandle, probe_links: bool | None) -> list[tuple[str, str]]:
    """(prober, probed) pairs to measure: the source's links are probed from the coordinator (the source).

    None: links with a real device at either end (not emulated here) that the spec does not
    declare in its pairs (it only has them from `default`). True: all links. False: none.
    """
    if probe_links is False:
        return []
    spec = cluster.spec
    nodes = [*spec.names, *([] if spec.source in spec.names else [spec.source])]
    emulated = getattr(cluster, "emulated_link", spec.link) if cluster.emulated_links else None
    out = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            real = emulated is None or emulated(a, b) is None
            if probe_links or (real and frozenset((a, b)) not in spec.pair_links):
                out.append((b, a) if b == spec.source else (a, b))  # the source is last in `nodes`
    return out


def _probe(session: _Session, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], LinkSpec]:
    """Measure each (prober, probed) link; the source's from this process, the others by the prober's worker."""
    from partita.runtime.profile import measure_link

    if not pairs:
        return {}
    cluster, infos = session.cluster, session.hello()
    source = cluster.spec.source
    public = {name: (ep.public_key.decode() if ep.public_key else None) for name, ep in cluster.endpoints.items()}
    probers: dict[str, list[str]] = {}
    for a, b in pairs:
        if a != source and public.get(a):
            probers.setdefault(b, []).append(public[a])
    for b, keys in probers.items():  # the probed data socket must accept the prober's key
        session.clients[b].call("allow", {"peers": keys})
    links = {}
    for a, b in pairs:
        setting = _link_setting(cluster, a, b)
        if a == source:
            sock = session.context.socket(zmq.DEALER)
            keys = session.keys
            plain = keys is None or not public[b]
            apply_client(sock, None if plain else (keys.public, keys.secret), None if plain else public[b].encode(),
                         insecure=plain)
            try:
                sock.connect(infos[b]["data"])
                result = measure_link(sock, emulate=(setting["bandwidth_bytes_per_s"], setting["latency_s"]),
                                      dilation=cluster.dilation)
            finally:
                sock.close(linger=0)
        else:
            header = {"address": infos[b]["data"], "public_key": public[b], **setting}
            try:
                result = session.clients[a].call("probe", header, timeout_s=120).header
            except WorkerError as exc:
                raise DeployError(f"could not probe the link {a}-{b}: {exc}") from None
        links[(a, b)] = LinkSpec(float(result["bandwidth_bytes_per_s"]), float(result["latency_s"]))
    return links


def _host_profile(segments: Sequence[Any], inputs: tuple, *, reps: int, threads: int) -> tuple[float, ...]:
    """Seconds per segment on this host with `threads` torch threads (the basis of emulated devices)."""
    from partita.runtime.profile import time_programs

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return tuple(time_programs(segments, inputs, reps=reps))
    finally:
        torch.set_num_threads(previous)


class _Session:
    """The coordinator's connections for one deployment: a zmq context and a control client per worker."""

    def __init__(self, cluster: ClusterHandle) -> None:
        self.cluster = cluster
        self.context = zmq.Context()
        self.keys = cluster.coordinator_keys
        missing = [name for name in cluster.spec.names if name not in cluster.endpoints]
        if missing:
            self.context.term()
            raise DeployError(f"no running worker for device(s) {missing}; start them or emulate them in a LocalCluster")
        self.clients = {name: ControlClient(self.context, ep, self.keys) for name, ep in cluster.endpoints.items()}
        self.infos: dict[str, Mapping[str, Any]] = {}
        self._closed = False

    def hello(self) -> dict[str, Mapping[str, Any]]:
        if not self.infos:
            with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
                replies = pool.map(lambda c: (c.endpoint.name, c.call("hello", timeout_s=20).header), self.clients.values())
                self.infos = {name: _routable(info, self.cluster.endpoints[name].control) for name, info in replies}
        return self.infos

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


def _ship(session: _Session, deployment: Deployment, measurements: Measurements) -> None:
    """Load every stage onto its device(s); a refusal (memory, checksum) becomes a DeployError."""
    session.hello()
    used = sorted({d for devices in deployment.placement for d in devices})
    for name in used:
        session.clients[name].call("unload", {"stages": None})
    host_s = measurements.host_segment_s
    speeds = getattr(session.cluster, "host_speeds", {}) or {}
    jobs = []
    for index, (program, devices) in enumerate(zip(deployment.programs, deployment.placement, strict=True)):
        stage_plan = deployment.plan.stages[index]
        reference = sum(host_s[stage_plan.start:stage_plan.end]) if host_s is not None else None
        archive = blob_tensor(program.to_bytes())
        for device in devices:
            header = {
                "stage": index,
                "sha256": program.sha256,
                "memory_bytes": float(stage_plan.memory_bytes),
                "reference_host_s": reference if device in speeds else None,
            }
            jobs.append((device, header, archive))

    def load(job: tuple[str, dict, torch.Tensor]) -> None:
        device, header, archive = job
        try:
            session.clients[device].call("load", header, [archive], timeout_s=300)
        except WorkerError as exc:
            raise DeployError(f"could not deploy stage {header['stage']} to {device}: {exc}") from None

    with ThreadPoolExecutor(max_workers=max(1, len(used))) as pool:
        list(pool.map(load, jobs))


def _link_setting(cluster: ClusterHandle, a: str, b: str) -> dict[str, float | None]:
    """The emulated link a -> b as route fields (None: not shaped, a real link)."""
    link = getattr(cluster, "emulated_link", cluster.spec.link)(a, b) if cluster.emulated_links and a != b else None
    if link is None:
        return {"bandwidth_bytes_per_s": None, "latency_s": None}
    bandwidth = None if math.isinf(link.bandwidth_bytes_per_s) else link.bandwidth_bytes_per_s
    return {"bandwidth_bytes_per_s": bandwidth, "latency_s": link.latency_s or None}


def _shaper(setting: Mapping[str, float | None], dilation: float) -> Any:
    if setting["bandwidth_bytes_per_s"] is None and setting["latency_s"] is None:
        return None
    from partita.runtime.emulation import LinkShaper

    bandwidth = setting["bandwidth_bytes_per_s"]
    return LinkShaper(bandwidth if bandwidth is not None else math.inf, setting["latency_s"] or 0.0, dilation=dilation)


def _wire(session: _Session, deployment: Deployment, measurements: Measurements, flatten: Any, unflatten: Any) -> Pipeline:
    """Route every worker, open the coordinator's sockets, and start the Pipeline."""
    cluster, infos, ctx = session.cluster, session.infos, session.context
    source = cluster.spec.source
    keys = session.keys
    secret = (keys.public, keys.secret) if keys is not None else None
    insecure = keys is None
    public = {name: (ep.public_key.decode() if ep.public_key else None) for name, ep in cluster.endpoints.items()}
    placement, epoch = deployment.placement, deployment.epoch
    n = len(placement)

    results = ctx.socket(zmq.ROUTER)
    results.router_handover = 1
    last_keys = [public[d].encode() for d in placement[-1] if public[d]]
    apply_server(results, None if insecure else secret, None if insecure else last_keys, insecure=insecure)
    results.bind(f"tcp://{cluster.bind_host}:*")
    port = results.last_endpoint.decode().rsplit(":", 1)[1]
    advertise = getattr(cluster, "advertise_host", None) or cluster.bind_host
    sink = {"name": source, "address": f"tcp://{advertise}:{port}", "public_key": keys.public.decode() if keys else None}

    planned = measurements.cluster_spec(cluster.spec)  # what the plan assumed: the probed links replaced
    predicted_links: list[dict[str, Any]] = []
    routes: dict[str, dict[str, Any]] = {}
    for index, devices in enumerate(placement):
        stage_plan = deployment.plan.stages[index]
        senders = placement[index - 1] if index > 0 else (source,)
        for device in devices:
            route = routes.setdefault(device, {"epoch": epoch, "window": deployment.window, "codec": deployment.codec,
                                               "stages": [], "peers": []})
            route["peers"] += [public[u] for u in senders if u in public and public[u]]
            if index + 1 < n:
                nexts = [{"name": d, "address": infos[d]["data"], "public_key": public[d], **_link_setting(cluster, device, d)}
                         for d in placement[index + 1]]
            else:
                nexts = [{**sink, **_link_setting(cluster, device, source)}]
            route["stages"].append({"stage": index, "next": nexts})
            for sender in senders:
                link = planned.link(sender, device)
                predicted_links.append(_predicted_link(sender, device, stage_plan.in_bytes, link, to_source=False))
        if index + 1 == n:
            for device in devices:
                link = planned.link(device, source)
                predicted_links.append(_predicted_link(device, source, stage_plan.out_bytes, link, to_source=True))
    for name, route in routes.items():  # authorize every sender before any of them connects
        session.clients[name].call("allow", {"peers": route["peers"]})
    for name, route in routes.items():
        session.clients[name].call("route", route)

    first_links = []
    for device in placement[0]:
        sock = ctx.socket(zmq.DEALER)
        sock.identity = f"{source}/{epoch}".encode()
        sock.sndhwm = 0
        plain = insecure or not public[device]
        apply_client(sock, None if plain else secret, None if plain else public[device].encode(), insecure=plain)
        sock.connect(infos[device]["data"])
        shaper = _shaper(_link_setting(cluster, source, device), cluster.dilation)
        outlink = Outlink(device, socket_sender(sock), deployment.window, shaper)
        first_links.append((sock, outlink))

    return Pipeline(
        context=ctx,
        deployment=deployment,
        results_socket=results,
        first_links=first_links,
        collect_worker_stats=session.worker_stats,
        unflatten=lambda flat: unflatten(deployment.programs[-1], flat),
        flatten=flatten,
        dilation=cluster.dilation,
        predicted_links=predicted_links,
        on_close=session.close,
    )


def _predicted_link(a: str, b: str, nbytes: int, link: Any, *, to_source: bool) -> dict[str, Any]:
    occupancy_s = 0.0 if math.isinf(link.bandwidth_bytes_per_s) else nbytes / link.bandwidth_bytes_per_s
    return {
        "from": a,
        "to": b,
        "to_source": to_source,
        "bytes": int(nbytes),
        "predicted_occupancy_s": occupancy_s,
        "predicted_transfer_s": link.latency_s + occupancy_s,
    }


def close_pipelines(cluster: Any) -> None:
    """Close the pipeline deployed on `cluster`, if any (LocalCluster.close calls this)."""
    pipe = _live.pop(cluster, None)
    if pipe is not None:
        pipe.close()


def _routable(info: Mapping[str, Any], control: str) -> dict[str, Any]:
    """A worker's hello, its data address made reachable: a wildcard bind host becomes its control host."""
    out = dict(info)
    host, port = str(info["data"]).removeprefix("tcp://").rsplit(":", 1)
    if host in ("0.0.0.0", "*", "[::]", "::"):
        out["data"] = f"tcp://{control.removeprefix('tcp://').rsplit(':', 1)[0]}:{port}"
    return out


class _Stopwatch:
    """Real seconds of each deploy phase, for `pipe.deploy_timings`."""

    def __init__(self, into: dict[str, float]) -> None:
        self._into = into
        self._current: tuple[str, float] | None = None

    def start(self, name: str) -> None:
        self.stop()
        self._current = (name, time.perf_counter())

    def stop(self) -> None:
        if self._current is not None:
            name, began = self._current
            self._into[name] = self._into.get(name, 0.0) + time.perf_counter() - began
            self._current = None

    def __call__(self, name: str) -> _Stopwatch:
        self.start(name)
        return self

    def __enter__(self) -> _Stopwatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
