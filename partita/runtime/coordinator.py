"""deploy = prepare (capture, measure, plan, split) + launch (the transition from nothing, then the Pipeline).

```python
with partita.LocalCluster.from_yaml("examples/clusters/home-edge.yaml") as cluster:
    pipe = partita.deploy(model, (example,), cluster, objective="throughput", planner="optimal")
    y = pipe(x)
```

`prepare` (nothing is deployed yet):

1. says hello to every worker (device, memory, data address);
2. captures the model and times every segment on the devices (`partita.runtime.measure`);
3. plans with those per-segment times (`partita.plan.plan(..., segment_times_s=...)`), or predicts
   a given assignment;
4. splits the graph at the plan's cuts into stage programs.

`launch` then opens the coordinator's result socket, carries out the transition from the empty
deployment to the prepared one (`partita.runtime.transition`: ship, allow, route), opens the
links to the first stage, starts the `Pipeline`, and attaches the supervisor.

By default launching on a cluster replaces the pipelines already deployed there
(`ClusterHandle.pipelines`); `replace=False` deploys alongside them, so that one cluster serves
several models at once (each deployment gets its own slot: its own stage ids, epoch and routes on
the workers it shares).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from partita.errors import DeployError
from partita.runtime.deployment import Deployment
from partita.runtime.handle import ClusterHandle
from partita.runtime.keys import apply_server
from partita.runtime.measure import Measurements, measure
from partita.runtime.pipeline import Pipeline
from partita.runtime.session import Session
from partita.runtime.transition import Sink, next_epoch
from partita.runtime.transition_engine import TransitionEngine

__all__ = ["Measurements", "Prepared", "deploy", "launch", "measure", "prepare"]


@dataclass(frozen=True)
class Prepared:
    """A model ready to launch on a cluster: its graph, what was measured, the plan and its stage programs.

    `objective`, `planner`, `max_stages` and `replicate` are how the plan was chosen (a re-plan
    chooses the same way); `pinned` says the user gave the stages (only failures re-plan).
    `timings` are the real seconds each phase took (capture_s, measure_s, plan_s, split_s).
    """

    graph: Any
    measurements: Measurements
    plan: Any
    programs: tuple[Any, ...]
    objective: str = "throughput"
    planner: str = "optimal"
    max_stages: int | None = None
    replicate: bool = True
    pinned: bool = False
    timings: Mapping[str, float] = field(default_factory=dict)


def prepare(
    model: Any,
    example_inputs: tuple,
    cluster: ClusterHandle,
    *,
    objective: str = "throughput",
    planner: str = "optimal",
    max_stages: int | None = None,
    replicate: bool = True,
    reps: int = 3,
    graph: Any | None = None,
    measurements: Measurements | None = None,
    stages: Sequence[Any] | None = None,
    probe_links: bool | None = None,
    session: Session | None = None,
    tiles: bool = False,
    hop_overhead_s: float | None = None,
) -> Prepared:
    """Capture, measure, plan and split `model` for `cluster` (see `deploy` for the arguments)."""
    from partita.model import capture
    from partita.plan import HOP_OVERHEAD_S, predict
    from partita.plan import plan as make_plan

    hop_s = HOP_OVERHEAD_S if hop_overhead_s is None else hop_overhead_s

    timings: dict[str, float] = {}
    clock = _Stopwatch(timings)
    with clock("capture_s"):
        graph = graph if graph is not None else capture(model, tuple(example_inputs))
    with clock("measure_s"):
        if measurements is None:
            measurements = measure(graph, example_inputs, cluster, session=session, reps=reps, probe_links=probe_links)
    clock.start("plan_s")
    planned_spec = measurements.cluster_spec(cluster.spec)  # the declared links, the probed ones replaced
    if stages is not None:
        chosen = predict(graph, planned_spec, stages, objective=objective, segment_times_s=measurements.segment_times_s,
                         hop_overhead_s=hop_s)
    else:
        chosen = make_plan(graph, planned_spec, objective=objective, planner=planner, max_stages=max_stages,
                           replicate=replicate, segment_times_s=measurements.segment_times_s, tiles=tiles,
                           hop_overhead_s=hop_s)
    clock.start("split_s")
    programs = _programs(graph, chosen)
    clock.stop()
    return Prepared(graph, measurements, chosen, programs, objective, planner, max_stages, replicate,
                    pinned=stages is not None, timings=timings)


def _programs(graph: Any, chosen: Any) -> tuple[Any, ...]:
    """The stage programs of `chosen`: split at its cuts; a tiled first stage gets one program per tile."""
    from partita.model import split
    from partita.model.tiles import tile_programs

    programs: list[Any] = list(split(graph, chosen.cuts()))
    first = chosen.stages[0]
    if first.kind == "tiled":
        programs[0] = tuple(tile_programs(graph, first.start, first.end, [(t.rows, t.cols) for t in first.tiles]))
    return tuple(programs)


def launch(
    prepared: Prepared,
    cluster: ClusterHandle,
    *,
    codec: str = "none",
    window: int = 4,
    supervise: Any = True,
    session: Session | None = None,
    replace: bool = True,
) -> Pipeline:
    """Deploy `prepared` onto `cluster` (the transition from nothing) and return the running `Pipeline`.

    `session` reuses the connections `prepare` measured through (it then belongs to the pipeline);
    `codec`, `window`, `supervise` and `replace` are as `deploy` describes them.
    """
    from partita.model import flatten_inputs, unflatten_outputs
    from partita.runtime.codec import check_codec

    check_codec(codec)
    if window < 1:
        raise DeployError(f"window must be at least 1 credit, got {window}")
    if replace:
        cluster.pipelines.close_all()
    slot = cluster.pipelines.free_slot()
    session = session or Session(cluster)
    timings = dict(prepared.timings)
    clock = _Stopwatch(timings)
    results: zmq.Socket | None = None
    try:
        plan = prepared.plan
        deployment = Deployment(
            epoch=next_epoch(),
            plan=plan,
            programs=prepared.programs,
            placement=tuple(tuple(stage.devices) for stage in plan.stages),
            codec=codec,
            window=window,
            slot=slot,
        )
        if slot == 0:  # an emulated cluster slows its world enough for this plan to run faithfully
            cluster.fit_dilation(plan, prepared.measurements.host_segment_s)
        session.hello()
        results, sink = _open_sink(session, deployment)
        engine = TransitionEngine(session, sink, planned=prepared.measurements.cluster_spec(cluster.spec),
                                  host_segment_s=prepared.measurements.host_segment_s,
                                  host_step_s=prepared.measurements.host_step_s, slot=slot,
                                  exclusive=slot == 0 and len(cluster.pipelines) == 0)
        engine.attach_sink(results)
        with clock("ship_s"):
            transition = engine.plan(deployment)
            engine.apply(transition)
        clock.start("wire_s")
        first_links = engine.open_first_links(deployment)
        clock.stop()
        pipe = Pipeline(
            context=session.context,
            deployment=deployment,
            results_socket=results,
            first_links=first_links,
            collect_worker_stats=session.worker_stats,
            unflatten=unflatten_outputs,
            flatten=flatten_inputs,
            dilation=cluster.dilation,
            predicted_links=list(transition.predicted_links),
            on_close=_closer(engine, session),
            graph=prepared.graph,
            measurements=prepared.measurements,
            deploy_timings=timings,
            registry=cluster.pipelines,
        )
    except BaseException:
        if results is not None:
            results.close(linger=0)
        session.close()
        raise
    if supervise:
        from partita.runtime.supervisor import attach

        attach(pipe, session, engine, supervise, objective=prepared.objective, planner=prepared.planner,
               max_stages=prepared.max_stages, replicate=prepared.replicate, pinned=prepared.pinned)
    return pipe


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
    replace: bool = True,
    tiles: bool = False,
    hop_overhead_s: float | None = None,
) -> Pipeline:
    """Deploy `model` onto `cluster` and return a running `Pipeline`: `prepare`, then `launch`.

    `example_inputs` is the tuple of inputs used for capture and profiling (its batch size is the
    one the figures refer to). `codec` encodes activations between devices ("none" exact, "lz4"
    lossless, "fp16"/"int8" lossy). `window` is the credits each sender holds per receiver.
    `graph` and `measurements` reuse an earlier capture and measurement of the same model on
    the same cluster (`pipe.graph`, `pipe.measurements`), to deploy several plans quickly.
    `stages` deploys a given assignment instead of planning: `(devices, start, end)` per stage, as
    `partita.plan.predict` takes it (the plan's figures are then its predictions).
    `supervise`: True watches the workers and re-plans on failures, joins and drift with the
    defaults of `partita.runtime.supervisor.Supervision` (2 s failure detection; with `stages`
    given, the assignment is pinned: only failures re-plan); a `Supervision` sets them; False: none.
    `probe_links`: None probes the links deploy does not know — real links (a worker at either
    end) that the cluster file does not declare in `pairs` — and plans with what it measured;
    True probes every link, emulated ones included (a LocalCluster: the emulation itself);
    False probes none. Given `measurements`, nothing is probed again.
    `replace`: True (the default) closes the pipelines already on `cluster` first; False deploys
    alongside them (one cluster serving several models; each keeps its own stages on the workers,
    so they must fit in memory together).
    `tiles`: with objective "latency", let the planner split the first conv layers into fused tiles
    over several devices (docs/tiles.md); `stages` may also pin a tiled stage. Re-plans after a
    failure or drift plan chains.
    `hop_overhead_s`: the runtime's per-hop overhead the plan's figures include (seconds; None: the
    measured default `partita.plan.HOP_OVERHEAD_S`; see docs/runtime.md, "The cost model").
    """
    from partita.runtime.codec import check_codec

    check_codec(codec)
    if window < 1:
        raise DeployError(f"window must be at least 1 credit, got {window}")
    if replace:
        cluster.pipelines.close_all()
    session = Session(cluster)
    try:
        prepared = prepare(model, example_inputs, cluster, objective=objective, planner=planner,
                           max_stages=max_stages, replicate=replicate, reps=reps, graph=graph,
                           measurements=measurements, stages=stages, probe_links=probe_links, session=session,
                           tiles=tiles, hop_overhead_s=hop_overhead_s)
    except BaseException:
        session.close()
        raise
    return launch(prepared, cluster, codec=codec, window=window, supervise=supervise, session=session,
                  replace=replace)


def _closer(engine: TransitionEngine, session: Session) -> Callable[[], None]:
    """What a pipeline does last when it closes: release its stages on shared workers, close its connections."""
    def close() -> None:
        engine.release()
        session.close()

    return close


def _open_sink(session: Session, deployment: Deployment) -> tuple[zmq.Socket, Sink]:
    """Bind the coordinator's result socket; only the last stage's workers may connect to it."""
    cluster, keys = session.cluster, session.keys
    public = session.public_keys()
    results = session.context.socket(zmq.ROUTER)
    results.router_handover = 1
    last_keys = [k.encode() for d in deployment.placement[-1] if (k := public.get(d))]
    secret = (keys.public, keys.secret) if keys is not None else None
    apply_server(results, secret, None if keys is None else last_keys, insecure=keys is None)
    results.bind(f"tcp://{cluster.bind_host}:*")
    bound = results.last_endpoint
    port = (bound.decode() if isinstance(bound, bytes) else str(bound)).rsplit(":", 1)[1]
    advertise = cluster.advertise_host or cluster.bind_host
    sink = Sink(cluster.spec.source, f"tcp://{advertise}:{port}", keys.public.decode() if keys else None)
    return results, sink


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
