"""Carrying out a re-plan on a running pipeline: a new epoch, only changed stages shipped, requests replayed.

`Switcher.switch(decision)` runs in three steps, so the pipeline's I/O thread (which owns the
ledger and the sockets) is never blocked while stages travel:

1. *hold* (I/O thread): every pending request now belongs to the new epoch — answers still
   coming from older epochs are stale and dropped by the ledger, so no request can be answered
   twice or failed by a worker that is being reconfigured — and the old first-stage links close.
   New requests are accepted but held.
2. *ship and route* (the supervisor's thread): a device gets a stage archive only if it does not
   already hold that exact stage (same index and sha256); devices the new plan leaves idle are
   unloaded; every live worker is routed for the new epoch.
3. *resume* (I/O thread): new links to the first stage open and every pending request is sent
   again, in request order.

A worker keys its stages by index, so a device keeping its segments under a new stage index is
shipped its stage again (the worker has no rename command). If step 2 fails, requests stay held
for the next decision. `halt(error)` fails every pending request, and every later one until the
next switch, with `error` (no plan fits the devices left).

This module reaches into `Pipeline` internals (`_ledger`, `_first_links`, `_results`, ...): it is
the pipeline's own switching code, kept apart so the data plane stays readable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import zmq

from partita.errors import DeployError, PartitaError, WorkerError
from partita.runtime.flow import Outlink, socket_sender
from partita.runtime.keys import apply_client, set_authorized
from partita.runtime.ledger import Dispatched, Failed, Replayed
from partita.runtime.pipeline import Deployment
from partita.runtime.wire import blob_tensor

SWITCH_TIMEOUT_S = 120.0


class Switcher:
    """Switches `pipe` to new deployments on the workers of `session` (see the module docstring)."""

    def __init__(self, pipe: Any, session: Any, busy: Callable[[str], AbstractContextManager] | None = None) -> None:
        self._pipe = pipe
        self._session = session
        self._busy = busy or (lambda name: nullcontext())  # marks long control calls (Heartbeat.busy)
        deployment = pipe.deployment
        # What each device holds now: (stage index, sha256). Tracked here so a switch ships only changes.
        self._held: dict[str, tuple[int, str]] = {
            device: (index, deployment.programs[index].sha256)
            for index, devices in enumerate(deployment.placement)
            for device in devices
        }
        self._holding = False
        self._halted: PartitaError | None = None
        self.last_shipped: tuple[tuple[str, int], ...] = ()  # (device, stage) sent by the last switch
        self.last_renumbered: tuple[tuple[str, int], ...] = ()  # (device, new stage) only renumbered

    # -- called in the pipeline's I/O thread ------------------------------------------------------
    def holds(self, record: Any) -> bool:
        """True when `record` must not be dispatched now: held for the next epoch, or failed (halted)."""
        if self._halted is not None:
            if not record.future.done():
                record.future.set_exception(self._halted)
            self._pipe._ledger.apply(Failed(record.request, None, str(self._halted), time.monotonic()))
            return True
        return self._holding

    def halt(self, error: PartitaError) -> None:
        """Fail every pending request with `error`, and every new one until the next switch."""
        self._halted = error
        self._close_first_links()
        for record in sorted(self._pipe._ledger.pending.values(), key=lambda r: r.request):
            self.holds(record)

    # -- called in the supervisor's thread -------------------------------------------------------
    def forget(self, device: str) -> None:
        """`device` restarted (or joined): it holds nothing."""
        self._held.pop(device, None)

    def switch(self, decision: Any) -> Deployment:
        """Deploy `decision.plan` as a new epoch and replay every pending request in it."""
        from partita.model import split
        from partita.runtime.coordinator import _epochs

        pipe = self._pipe
        old = pipe.deployment
        plan = decision.plan
        # A stage that keeps its segments keeps its program (renumbered if its index moved): a fresh split
        # would write new archive bytes (torch.export.save embeds a random id), a new sha256, and ship again.
        kept = {(p.start, p.end): p for p in old.programs}
        programs = tuple(
            p if (p.start, p.end) not in kept
            else kept[p.start, p.end] if kept[p.start, p.end].index == p.index
            else kept[p.start, p.end].renumbered(p.index)
            for p in split(pipe.graph, plan.cuts())
        )
        deployment = Deployment(
            epoch=next(_epochs),
            plan=plan,
            programs=programs,
            placement=tuple(tuple(stage.devices) for stage in plan.stages),
            codec=old.codec,
            window=old.window,
        )
        pipe.call_in_loop(lambda: self._hold(deployment.epoch)).result(timeout=SWITCH_TIMEOUT_S)
        self._ship(deployment)
        predicted = self._route(deployment)
        pipe.call_in_loop(lambda: self._resume(deployment, predicted)).result(timeout=SWITCH_TIMEOUT_S)
        return deployment

    # -- the steps --------------------------------------------------------------------------------
    def _hold(self, epoch: int) -> None:
        ledger = self._pipe._ledger
        now = time.monotonic()
        ledger.apply(Replayed(epoch, now))
        for request in sorted(ledger.pending):
            ledger.apply(Dispatched(request, epoch, now))
        self._holding = True
        self._close_first_links()

    def _close_first_links(self) -> None:
        for sock, _ in self._pipe._first_links:
            sock.close(linger=0)
        self._pipe._first_links = []

    def _ship(self, deployment: Deployment) -> None:
        session = self._session
        cluster = session.cluster
        host_s = self._pipe.measurements.host_segment_s
        speeds = getattr(cluster, "host_speeds", {}) or {}
        want = {device: (index, deployment.programs[index].sha256)
                for index, devices in enumerate(deployment.placement) for device in devices}
        missing = sorted(d for d in want if d not in session.clients)
        if missing:
            raise DeployError(f"the new plan uses {missing}, which have no live worker")
        for device in [d for d in self._held if d not in want and d in session.clients]:
            session.clients[device].call("unload", {"stages": None}, timeout_s=10)
            del self._held[device]
        # A device that holds the wanted archive under another index only renumbers it.
        moves = {device: (self._held[device][0], index) for device, (index, sha) in want.items()
                 if device in self._held and self._held[device][1] == sha and self._held[device][0] != index}
        for device, (was, index) in sorted(moves.items()):
            try:
                session.clients[device].call("renumber", {"moves": [[was, index]]}, timeout_s=10)
            except WorkerError as exc:
                raise DeployError(f"could not renumber stage {was} to {index} on {device}: {exc}") from None
            self._held[device] = (index, self._held[device][1])
        self.last_renumbered = tuple(sorted((device, index) for device, (_, index) in moves.items()))
        jobs = [(device, index) for device, (index, sha) in want.items() if self._held.get(device) != (index, sha)]

        def load(job: tuple[str, int]) -> None:
            device, index = job
            program, stage_plan = deployment.programs[index], deployment.plan.stages[index]
            reference = sum(host_s[stage_plan.start:stage_plan.end]) if host_s is not None else None
            header = {"stage": index, "sha256": program.sha256, "memory_bytes": float(stage_plan.memory_bytes),
                      "reference_host_s": reference if device in speeds else None}
            client = session.clients[device]
            self._held.pop(device, None)
            try:
                with self._busy(device):
                    client.call("unload", {"stages": None}, timeout_s=10)
                    client.call("load", header, [blob_tensor(program.to_bytes())], timeout_s=SWITCH_TIMEOUT_S)
            except WorkerError as exc:
                raise DeployError(f"could not ship stage {index} to {device}: {exc}") from None
            self._held[device] = (index, program.sha256)

        with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
            list(pool.map(load, jobs))
        self.last_shipped = tuple(sorted(jobs))

    def _route(self, deployment: Deployment) -> list[dict[str, Any]]:
        """Route every live worker for the new epoch; return the predicted links (as deploy reports them)."""
        from partita.runtime.coordinator import _link_setting, _predicted_link

        session, pipe = self._session, self._pipe
        cluster, infos = session.cluster, session.infos
        source = cluster.spec.source
        planned = pipe.measurements.cluster_spec(cluster.spec)  # as the policy plans: probed links in place
        public = {name: (ep.public_key.decode() if ep.public_key else None) for name, ep in cluster.endpoints.items()}
        port = pipe._results.last_endpoint.decode().rsplit(":", 1)[1]
        advertise = getattr(cluster, "advertise_host", None) or cluster.bind_host
        sink = {"name": source, "address": f"tcp://{advertise}:{port}",
                "public_key": session.keys.public.decode() if session.keys else None}
        placement, n = deployment.placement, len(deployment.placement)
        routes: dict[str, dict[str, Any]] = {
            name: {"epoch": deployment.epoch, "window": deployment.window, "codec": deployment.codec,
                   "stages": [], "peers": []}
            for name in session.clients
        }
        predicted: list[dict[str, Any]] = []
        for index, devices in enumerate(placement):
            stage_plan = deployment.plan.stages[index]
            senders = placement[index - 1] if index > 0 else (source,)
            for device in devices:
                route = routes[device]
                route["peers"] += [public[u] for u in senders if public.get(u)]
                if index + 1 < n:
                    nexts = [{"name": d, "address": infos[d]["data"], "public_key": public[d],
                              **_link_setting(cluster, device, d)} for d in placement[index + 1]]
                else:
                    nexts = [{**sink, **_link_setting(cluster, device, source)}]
                route["stages"].append({"stage": index, "next": nexts})
                for sender in senders:
                    link = planned.link(sender, device)
                    predicted.append(_predicted_link(sender, device, stage_plan.in_bytes, link, to_source=False))
                if index + 1 == n:
                    link = planned.link(device, source)
                    predicted.append(_predicted_link(device, source, stage_plan.out_bytes, link, to_source=True))
        if session.keys is not None:  # whichever workers now hold the last stage may return results
            set_authorized(pipe._results, [k.encode() for k in public.values() if k])
        try:
            for name, route in routes.items():  # authorize every sender before any of them connects
                session.clients[name].call("allow", {"peers": route["peers"]}, timeout_s=10)
            for name, route in routes.items():
                session.clients[name].call("route", route, timeout_s=10)
        except WorkerError as exc:
            raise DeployError(f"could not route the new epoch {deployment.epoch}: {exc}") from None
        return predicted

    def _resume(self, deployment: Deployment, predicted: list[dict[str, Any]]) -> None:
        from partita.model import unflatten_outputs
        from partita.runtime.coordinator import _link_setting, _shaper

        pipe, session = self._pipe, self._session
        cluster, keys = session.cluster, session.keys
        source = cluster.spec.source
        public = {name: ep.public_key for name, ep in cluster.endpoints.items()}
        links = []
        for device in deployment.placement[0]:
            sock = pipe._ctx.socket(zmq.DEALER)
            sock.identity = f"{source}/{deployment.epoch}".encode()
            sock.sndhwm = 0
            plain = keys is None or not public.get(device)
            apply_client(sock, None if plain else (keys.public, keys.secret), None if plain else public[device],
                         insecure=plain)
            sock.connect(session.infos[device]["data"])
            shaper = _shaper(_link_setting(cluster, source, device), cluster.dilation)
            outlink = Outlink(device, socket_sender(sock), deployment.window, shaper)
            links.append((sock, outlink))
        last = deployment.programs[-1]
        pipe.deployment = deployment
        pipe._first_links = links
        pipe._predicted_links = predicted
        pipe._unflatten = lambda flat: unflatten_outputs(last, flat)
        self._holding = False
        self._halted = None
        for record in sorted(pipe._ledger.pending.values(), key=lambda r: r.request):
            pipe._dispatch(record)
