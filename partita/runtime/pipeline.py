"""A deployed model: send requests in, get results back in order, read what was measured.

The `Pipeline` is the coordinator's data plane. Its I/O thread owns the sockets: a DEALER to each
first-stage replica (behind an `Outlink`: credits and the emulated source link) and a ROUTER that
receives results from the last stage. User threads only put requests on a queue and wait on
futures; every change to the request book goes through `Ledger.apply` in the I/O thread.

Requests are numbered in submission order; replica `r % n` of a replicated stage serves request
`r` (round-robin), and `map` yields results in request order whatever order they arrive in.
Figures are in device time: real seconds divided by the cluster's dilation.

A switch to a new deployment (`partita.runtime.switch`) uses three calls, each run in the I/O
thread: `hold(epoch)` (every pending request now belongs to the new epoch and waits; the old
first-stage links close), `install(deployment, first_links, predicted_links)` (the new epoch's
links; every pending request is sent again, in request order), and `halt(error)` (fail every
pending request, and every new one until the next `install`, with `error`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any

import torch
import zmq

from partita.errors import PartitaError, RequestError, WireError
from partita.model.tiles import stitch
from partita.runtime.deployment import ChainStage, Deployment, TiledStage
from partita.runtime.figures import link_figures, stage_figures, stream_figures
from partita.runtime.flow import (
    LinkTimes,
    Outlink,
    PeerNames,
    credits_at_once,
    next_wakeup,
    readable,
    recv_frames,
    send_frames,
)
from partita.runtime.ledger import Accepted, Delivered, Dispatched, Failed, Ledger, Record, Replayed
from partita.runtime.wire import Limits, decode, encode

RESULT_KINDS = frozenset({"act", "fail", "echo"})
CREDIT_KINDS = frozenset({"credit", "error"})


class Pipeline:
    """Call it like the model: `pipe(x)`; stream with `pipe.map(batches)`; read `pipe.plan`, `pipe.stats()`."""

    def __init__(
        self,
        *,
        context: zmq.Context,
        deployment: Deployment,
        results_socket: zmq.Socket,
        first_links: list[tuple[zmq.Socket, Outlink]],
        collect_worker_stats: Callable[[], dict[str, dict]],
        unflatten: Callable[[Any, tuple[torch.Tensor, ...]], Any],
        flatten: Callable[..., tuple[torch.Tensor, ...]],
        dilation: float,
        predicted_links: list[dict[str, Any]],
        on_close: Callable[[], None],
        limits: Limits = Limits(),
        graph: Any = None,
        measurements: Any = None,
        deploy_timings: Mapping[str, float] | None = None,
        registry: Any = None,
    ) -> None:
        """`unflatten(program, flat)` rebuilds the model's outputs from the last stage's flat tensors.

        `graph` is the captured ModelGraph, reusable for another deploy; `measurements` what deploy
        measured (`partita.runtime.measure.Measurements`); `deploy_timings` the real seconds of each
        deploy phase. `registry` (a `handle.Deployments`) lists this pipeline until it closes.
        """
        self.deployment = deployment
        self.dilation = dilation
        self.graph = graph
        self.measurements = measurements
        self.deploy_timings: dict[str, float] = dict(deploy_timings or {})
        self._ctx = context
        self._results = results_socket
        self._first_links = first_links
        self._collect_worker_stats = collect_worker_stats
        self._unflatten = unflatten
        self._flatten = flatten
        self._predicted_links = predicted_links
        self._on_close = on_close
        self._limits = limits
        self._registry = registry
        self._holding = False  # a switch is under way: requests wait for the next epoch
        self._halted: PartitaError | None = None  # no plan fits: requests fail with this
        self._ledger = Ledger()
        # A tiled first stage: per request, the tiles' outputs received so far (tile index -> tensor).
        self._tiles_in: dict[int, dict[int, torch.Tensor]] = {}
        # Filled by user threads, emptied by the I/O thread (deque's append and popleft are atomic).
        self._submissions: deque[Accepted] = deque()
        self._next_id = 0
        self._id_lock = threading.Lock()
        self._closing = threading.Event()
        self._closed = False
        self._stream_from = 0
        self._counters = {"malformed": 0, "worker_errors": 0}
        self._link_in = LinkTimes()  # the last stage's hops to this coordinator
        self._credits_owed: dict[bytes, int] = {}  # last-stage sender -> credits not yet returned
        # The Supervisor (failures, drift, joins) attached by deploy, and the calls it runs in this
        # I/O thread (a switch to a new epoch touches the ledger and the sockets).
        self.supervisor: Any = None
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._sender_name = PeerNames()  # a last stage's (or a tile's) device, from its socket identity
        self._wake_addr = f"inproc://pipeline-{id(self)}"
        self._wake_in = context.socket(zmq.PULL)
        self._wake_in.bind(self._wake_addr)
        self._wake_lock = threading.Lock()
        self._wake_sent = False  # a wake-up message is on its way to the I/O thread
        self._wake_out = context.socket(zmq.PUSH)
        self._wake_out.connect(self._wake_addr)
        self._thread = threading.Thread(target=self._loop, name="partita-pipeline", daemon=True)
        self._thread.start()
        if registry is not None:
            registry.add(self)

    # -- the user's side --------------------------------------------------------------------
    @property
    def plan(self) -> Any:
        """The plan this pipeline runs (a `partita.plan.Plan`)."""
        return self.deployment.plan

    @property
    def stages(self) -> tuple[Any, ...]:
        return self.deployment.programs

    def submit(self, *inputs: Any) -> Future:
        """Send one request; the future resolves to the model's output structure (or RequestError)."""
        request, future = self._send(inputs)
        outer: Future = Future()

        def _finish(done: Future) -> None:
            error = done.exception()
            if error is not None:
                outer.set_exception(error)
                return
            try:
                outer.set_result(self._rebuild(request, done.result()))
            except RequestError as exc:  # a callback's exception would be lost; give it to the caller
                outer.set_exception(exc)

        future.add_done_callback(_finish)
        return outer

    def __call__(self, *inputs: Any, timeout_s: float | None = None) -> Any:
        """Run one request through the pipeline and return the model's output."""
        # As submit(...).result(), less a second future: the outputs are rebuilt in this thread.
        request, future = self._send(inputs)
        return self._rebuild(request, future.result(timeout=timeout_s))

    def _send(self, inputs: tuple[Any, ...]) -> tuple[int, Future]:
        """Number one request and queue it for the I/O thread; its future gets the last stage's flat tensors."""
        if self._closing.is_set():
            raise RequestError("this pipeline is closed; deploy again to send more requests")
        tensors = tuple(t.detach().contiguous() for t in self._flatten(*inputs))
        future: Future = Future()
        with self._id_lock:
            request = self._next_id
            self._next_id += 1
            self._submissions.append(Accepted(request, tensors, future, time.monotonic()))
        self._wake()
        return request, future

    def _rebuild(self, request: int, flat: tuple[torch.Tensor, ...]) -> Any:
        """The model's output structure from the last stage's flat tensors (RequestError if that fails)."""
        last = self.deployment.programs[-1]
        if isinstance(last, tuple):  # the tiles end the model: each carries its output structure
            last = last[0].program
        try:
            return self._unflatten(last, flat)
        except Exception as exc:  # noqa: BLE001 - whatever the rebuild raised, the caller gets one RequestError
            raise RequestError(f"request {request}: could not rebuild the model's outputs: {exc}") from exc

    def map(self, batches: Iterable[Any], *, in_flight: int | None = None) -> Iterator[Any]:
        """Stream requests, keeping up to `in_flight` submitted ahead; yield results in order.

        Each item of `batches` is one request: a tensor, or a tuple of the model's inputs.
        `in_flight` None means enough to fill every stage's credit window.
        """
        ahead = in_flight or max(8, 2 * self.deployment.window * (len(self.deployment.placement) + 1))
        self._stream_from = self._ledger.delivered
        window: list[Future] = []
        for item in batches:
            window.append(self.submit(*(item if isinstance(item, tuple) else (item,))))
            if len(window) >= ahead:
                yield window.pop(0).result()
        for future in window:
            yield future.result()

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet answered (a snapshot; the I/O thread changes it)."""
        return len(self._ledger.pending) + len(self._submissions)

    def drain(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the requests in flight to be answered; True if none is left.

        New requests may still be submitted meanwhile (they count too); `close` fails what is left.
        """
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)
        return self.in_flight == 0

    def close(self) -> None:
        """Stop the I/O thread; requests still pending fail with RequestError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.supervisor is not None:  # stop re-planning before the sockets and the session go
            self.supervisor.stop()
        self._closing.set()
        self._wake()
        self._thread.join(10.0)
        self._on_close()
        if self._registry is not None:
            self._registry.remove(self)

    def add_device(self, device: Any, *, timeout_s: float = 120.0) -> dict[str, Any] | None:
        """A device joins the running deployment (a new worker, or one that came back); re-plan if that helps.

        `device` is a `DeviceSpec` (or the name of a device that failed) whose worker the cluster
        handle already lists in `endpoints` (e.g. after `LocalCluster.add_worker`). Returns the
        re-plan record (as in `stats()["replans"]`), or None when the current plan stays.
        """
        if self.supervisor is None:
            raise RequestError("this pipeline is not supervised (deploy(..., supervise=False)); deploy again to add a device")
        return self.supervisor.add_device(device, timeout_s=timeout_s)

    def call_in_loop(self, fn: Callable[[], Any]) -> Future:
        """Run `fn()` in the I/O thread (which owns the ledger and the sockets); its result comes back in the future."""
        future: Future = Future()
        self._calls.append((fn, future))
        self._wake()
        return future

    # -- switching to a new deployment (the supervisor's thread calls these) -----------------
    def hold(self, epoch: int, *, timeout_s: float = 120.0) -> None:
        """Every pending request now belongs to `epoch` and waits; the old first-stage links close.

        Answers still coming from older epochs are stale and dropped by the ledger, so no request
        can be answered twice, or failed by a worker that is being reconfigured.
        """
        def hold() -> None:
            ledger, now = self._ledger, time.monotonic()
            ledger.apply(Replayed(epoch, now))
            self._tiles_in.clear()  # tiles of the old epoch: the requests are sent again whole
            for request in sorted(ledger.pending):
                ledger.apply(Dispatched(request, epoch, now))
            self._holding = True
            self._close_first_links()

        self.call_in_loop(hold).result(timeout=timeout_s)

    def install(self, deployment: Deployment, first_links: list[tuple[zmq.Socket, Outlink]],
                predicted_links: list[dict[str, Any]], *, timeout_s: float = 120.0) -> None:
        """Run `deployment` from now on over `first_links`, and replay every pending request in it, in order."""
        def install() -> None:
            self._close_first_links()
            self.deployment = deployment
            self._first_links = first_links
            self._predicted_links = predicted_links
            self._holding = False
            self._halted = None
            self._credits_owed.clear()  # owed to the old epoch's senders, which are gone
            self.replay()

        self.call_in_loop(install).result(timeout=timeout_s)

    def replay(self) -> None:
        """Send every pending request again in the current epoch, oldest first (I/O thread only)."""
        for record in sorted(self._ledger.pending.values(), key=lambda r: r.request):
            self._dispatch(record)

    def halt(self, error: PartitaError, *, timeout_s: float = 30.0) -> None:
        """Fail every pending request with `error`, and every new one until the next `install`."""
        def halt() -> None:
            self._halted = error
            self._close_first_links()
            for record in sorted(self._ledger.pending.values(), key=lambda r: r.request):
                self._refused(record)

        self.call_in_loop(halt).result(timeout=timeout_s)

    def _close_first_links(self) -> None:
        for sock, _ in self._first_links:
            sock.close(linger=0)
        self._first_links = []

    def _refused(self, record: Record) -> bool:
        """True when `record` must not be dispatched now: held for the next epoch, or failed (halted)."""
        if self._halted is not None:
            if not record.future.done():
                record.future.set_exception(self._halted)
            self._ledger.apply(Failed(record.request, None, str(self._halted), time.monotonic()))
            return True
        return self._holding

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_source_link(self, peer: str, *, bandwidth: float | None = None, latency: float | None = None) -> None:
        """Change the emulated link from the source to `peer` (used by LocalCluster.set_link)."""
        for _, outlink in self._first_links:
            if outlink.name == peer and outlink.shaper is not None and hasattr(outlink.shaper, "set"):
                outlink.shaper.set(bandwidth=bandwidth, latency=latency)

    # -- figures ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Measured per-stage and per-link figures beside the plan's predictions (device seconds)."""
        deployment = self.deployment  # one snapshot: a switch may replace it while this runs
        plan = deployment.plan
        k = self.dilation
        ledger = self._ledger
        workers = self._collect_worker_stats()
        return {
            "epoch": deployment.epoch,
            "dilation": k,
            "requests": self._next_id,
            **ledger.figures(),
            "measured": stream_figures(ledger.delivered_at[self._stream_from:], ledger.latencies_s[self._stream_from:], k),
            "predicted": {"throughput_rps": plan.throughput_rps, "period_s": plan.period_s, "latency_s": plan.latency_s},
            "stages": stage_figures(deployment, workers),
            "links": link_figures(self._predicted_links, self._link_in.figures(), workers, k),
            "counters": dict(self._counters),
            "replans": self.supervisor.replans() if self.supervisor is not None else [],
            "replans_declined": self.supervisor.declined() if self.supervisor is not None else [],
            # Links deploy probed (the plan used these instead of the cluster file's), device time.
            "links_measured": [
                {"from": a, "to": b, "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s, "latency_s": link.latency_s}
                for (a, b), link in (self.measurements.links if self.measurements is not None else {}).items()
            ],
        }

    # -- the I/O thread ---------------------------------------------------------------------
    def _wake(self) -> None:
        # One wake-up message until the I/O thread takes it: the thread clears `_wake_sent` before it
        # reads its queues, so what was queued before this call is read whether or not it sends.
        with self._wake_lock:
            if not self._wake_sent and not self._wake_out.closed:
                self._wake_sent = True
                self._wake_out.send(b"w")

    def _make_poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        for sock in [self._results, self._wake_in, *(s for s, _ in self._first_links)]:
            poller.register(sock, zmq.POLLIN)
        return poller

    def _run_calls(self) -> bool:
        """Run the queued `call_in_loop` calls; True if any ran (the sockets may have changed)."""
        ran = False
        calls = self._calls
        while calls:
            fn, future = calls.popleft()
            ran = True
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - the caller waits on the future and re-raises
                future.set_exception(exc)
        return ran

    def _loop(self) -> None:
        poller = self._make_poller()
        try:
            while not self._closing.is_set():
                self._wake_sent = False
                if self._run_calls():
                    poller = self._make_poller()
                self._accept_submissions()
                delays = [outlink.pump() for _, outlink in self._first_links]
                ready = dict(poller.poll(math.ceil(next_wakeup(delays, 0.1) * 1000)))
                if self._wake_in in ready:
                    while readable(self._wake_in):
                        self._wake_in.recv()
                if self._results in ready:
                    self._on_results()
                for sock, outlink in self._first_links:
                    if sock in ready:
                        self._on_credit(sock, outlink)
        finally:
            self._shutdown()

    def _accept_submissions(self) -> None:
        submissions = self._submissions
        while submissions:
            record = self._ledger.apply(submissions.popleft())
            if record is not None:
                self._dispatch(record)

    def _dispatch(self, record: Record) -> None:
        if self._refused(record):
            return  # held for the next epoch (a switch is under way) or failed (no plan fits)
        deployment = self.deployment
        epoch = deployment.epoch
        first = deployment.stages[0]
        request, tensors, ledger = record.request, record.inputs, self._ledger
        match first:
            case ChainStage():  # one replica serves the request, round-robin (the links are in replica order)
                sends = [(self._first_links[first.devices.index(first.replica_for(request))], tensors)]
            case TiledStage():  # every tile gets its halo'd crop (the links are in tile order)
                self._tiles_in.pop(request, None)
                sends = [(self._first_links[i], (tile.take(tensors[0]),)) for i, tile in enumerate(first.tiles)]

        dispatched = [False]  # shared by the request's messages: tiles leave as each link's credits allow

        def build(payload: tuple[torch.Tensor, ...]) -> Callable[[], list]:
            def message() -> list:
                if not dispatched[0]:  # the first message to leave dispatches the request; latency counts from there
                    dispatched[0] = True
                    ledger.apply(Dispatched(request, epoch, time.monotonic()))
                header = {"r": request, "e": epoch, "s": deployment.stage_id(0), "ts": time.time()}
                return encode("act", header, payload, codec=deployment.codec)

            return message

        for (_, outlink), payload in sends:
            outlink.put(build(payload))

    def _on_results(self) -> None:
        done_id = self.deployment.stage_id(len(self.deployment.placement))  # where the last stage's results go
        owed = self._credits_owed
        while readable(self._results):
            frames = recv_frames(self._results)
            sender = frames[0].bytes
            try:
                # Results go to the user: each tensor owns its memory (one copy, not a view of the frame).
                msg = decode(frames[1:], limits=self._limits, kinds=RESULT_KINDS, own=True)
            except WireError as exc:
                self._counters["malformed"] += 1
                self._results.send_multipart([sender, *encode("error", {"reason": str(exc)})])
                continue
            if msg.kind == "echo":
                self._results.send_multipart([sender, *encode("echo", {})])
                continue
            owed[sender] = owed.get(sender, 0) + 1
            h = msg.header
            if not all(type(h.get(key)) is int for key in ("r", "e", "s")):
                self._counters["malformed"] += 1
                continue
            tiled = self.deployment.tiled
            if tiled is not None and h["s"] == self.deployment.stage_id(1):
                self._on_tile(tiled, sender, msg.kind, h, msg.tensors)
                continue
            if h["s"] != done_id:
                self._counters["malformed"] += 1
                continue
            now = time.monotonic()
            if isinstance(h.get("ts"), float):
                self._link_in.record(self._sender_name(sender), h["ts"], time.time())
            if msg.kind == "fail":
                self._ledger.apply(Failed(h["r"], h["e"], str(h.get("error", "failed in a stage")), now))
            else:
                self._ledger.apply(Delivered(h["r"], h["e"], msg.tensors, now))
        at_once = credits_at_once(self.deployment.window)
        for sender, n in list(owed.items()):  # credits go back half a window at a time (dataplane.credits_at_once)
            if n >= at_once:
                send_frames(self._results, [sender, *encode("credit", {"n": n})])
                del owed[sender]

    def _on_tile(self, tiled: TiledStage, sender: bytes, kind: str, h: dict, tensors: tuple[torch.Tensor, ...]) -> None:
        """One tile's output: keep it; with every tile in, stitch them and send the map on (or deliver it)."""
        request, epoch, now = h["r"], h["e"], time.monotonic()
        record = self._ledger.pending.get(request)
        if record is None or epoch != self.deployment.epoch or record.epoch != epoch:
            self._ledger.stale += 1  # an answer of an older epoch, or of a request already answered
            return
        if kind == "fail":
            self._tiles_in.pop(request, None)
            self._ledger.apply(Failed(request, epoch, str(h.get("error", "failed in a tile")), now))
            return
        tile = tiled.tile_of(self._sender_name(sender))
        if tile is None or len(tensors) != 1:
            self._counters["malformed"] += 1
            return
        received = self._tiles_in.setdefault(request, {})
        received[tile] = tensors[0]  # decoded as owned memory (`_on_results`)
        if len(received) < len(tiled.tiles):
            return
        del self._tiles_in[request]
        stitched = stitch(tiled.tiles, [received[i] for i in range(len(tiled.tiles))])
        if len(self.deployment.stages) == 1:
            self._ledger.apply(Delivered(request, epoch, (stitched,), now))
            return
        deployment = self.deployment
        _, outlink = self._first_links[len(tiled.tiles)]

        def message() -> list:
            header = {"r": request, "e": epoch, "s": deployment.stage_id(1), "ts": time.time()}
            return encode("act", header, (stitched,), codec=deployment.codec)

        outlink.put(message)

    def _on_credit(self, sock: zmq.Socket, outlink: Outlink) -> None:
        while readable(sock):
            try:
                msg = decode(recv_frames(sock), limits=self._limits, kinds=CREDIT_KINDS)
            except WireError:
                self._counters["malformed"] += 1
                continue
            if msg.kind == "credit" and type(msg.header.get("n")) is int:
                outlink.grant(msg.header["n"])
            else:
                self._counters["worker_errors"] += 1

    def _shutdown(self) -> None:
        now = time.monotonic()
        for record in list(self._ledger.pending.values()):
            self._ledger.apply(Failed(record.request, None, "the pipeline was closed before it was answered", now))
        while self._submissions:
            event = self._submissions.popleft()
            event.future.set_exception(RequestError("the pipeline was closed before this request was sent"))
        with self._wake_lock:
            self._wake_out.close(linger=0)
        self._wake_in.close(linger=0)
        self._results.close(linger=0)
        for sock, _ in self._first_links:
            sock.close(linger=0)

