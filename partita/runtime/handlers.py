"""A worker's control plane: one handler per control command, found in a table by the command's type.

`ControlHandlers.handle(command)` looks the command's class up in `table` and returns the typed
reply (`partita.runtime.protocol`); a handler raises `WorkerError` (or another `PartitaError`) to
refuse, and the worker turns that into an `error` reply. Commands in `SLOW` take seconds (loading
an archive, timing segments, probing a link): the worker runs them off its I/O thread so that it
keeps answering heartbeats and moving activations meanwhile.

The handlers change the worker through two narrow doors: the `StageExecutor` (stages, speed) and
the `DataPlane` (routes, allowed peers, emulated links). They never touch a socket of the data plane.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from partita.errors import WorkerError
from partita.runtime.archives import ArchiveCache
from partita.runtime.dataplane import DataPlane
from partita.runtime.executor import StageExecutor
from partita.runtime.keys import apply_client
from partita.runtime.protocol import (
    Allow,
    Benchmark,
    Benchmarked,
    Command,
    Drain,
    Emulate,
    Figures,
    Hello,
    Info,
    Load,
    Ok,
    Ping,
    Pong,
    Probe,
    Probed,
    Profile,
    Profiled,
    Renumber,
    Reply,
    Route,
    Stash,
    Stats,
    Unload,
)
from partita.runtime.wire import Limits, blob_bytes

SLOW: frozenset[type[Command]] = frozenset({Load, Stash, Profile, Probe})


@dataclass(frozen=True)
class WorkerIdentity:
    """What a worker says about itself: its name, addresses, keys and limits."""

    name: str
    data_address: str
    secret: tuple[bytes, bytes] | None  # None: insecure
    limits: Limits
    flops_per_s: float
    flops_spread: float = 0.0  # relative spread of the repeated matmul windows behind flops_per_s


class ControlHandlers:
    """The handlers of one worker's control commands (see the module docstring)."""

    def __init__(self, identity: WorkerIdentity, executor: StageExecutor, data: DataPlane, context: zmq.Context,
                 *, counters: Callable[[], dict[str, int]], stop: Callable[[], None]) -> None:
        self.identity = identity
        self._executor = executor
        self._data = data
        self._ctx = context
        self._counters = counters
        self._stop = stop
        # Archives sit beside the loaded stages in the worker's memory: together they fit its capacity.
        self.archives = ArchiveCache(lambda: executor.capacity_bytes - executor.used_bytes())
        self.table: dict[type[Command], Callable[[Any], Reply]] = {
            Hello: self.hello,
            Ping: self.ping,
            Load: self.load,
            Stash: self.stash,
            Unload: self.unload,
            Renumber: self.renumber,
            Allow: self.allow,
            Route: self.route,
            Emulate: self.emulate,
            Profile: self.profile,
            Probe: self.probe,
            Benchmark: self.benchmark,
            Stats: self.stats,
            Drain: self.drain,
        }

    def handle(self, command: Command) -> Reply:
        handler = self.table.get(type(command))
        if handler is None:
            raise WorkerError(f"worker {self.identity.name} does not serve {command.KIND!r}")
        return handler(command)

    # -- the handlers -----------------------------------------------------------------------------
    def hello(self, command: Hello) -> Info:
        device = self._executor.device
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        return Info(self.identity.name, self.identity.data_address, {
            "device": device.type,
            "device_name": device_name,
            "memory_bytes": self._executor.capacity_bytes,
            "used_bytes": self._executor.used_bytes(),
            # In device time: an emulated worker (--emulate) runs `speed` times as fast as this host.
            "flops_per_s": self.identity.flops_per_s * (self._executor.speed or 1.0),
            "flops_spread": self.identity.flops_spread,
            "dtype": str(torch.get_default_dtype()).removeprefix("torch."),
            "speed": self._executor.speed,
            "dilation": self._executor.dilation,
            "pid": os.getpid(),
            "host": socket.gethostname(),  # workers on one machine share its cores: measure them one at a time
            "torch": torch.__version__,
            "version": _partita_version(),
            "threads": self._executor.threads,
            "stages": self._executor.stage_indices(),
            "archives": self.archives.digests(),
            "secure": self.identity.secret is not None,
            "max_frame_bytes": self.identity.limits.max_frame_bytes,
        })

    def ping(self, command: Ping) -> Pong:
        return Pong(time.time(), self._executor.pending, self._data.epoch)

    def load(self, command: Load) -> Ok:
        """Load the archive sent, or the cached one of `sha256` (`missing: true` when none is cached)."""
        from partita.model.decoder_stage import load_stage_archive

        cached = command.archive is None
        data = self.archives.get(command.sha256) if cached else blob_bytes(command.archive)
        if data is None:
            return Ok({"stage": command.stage, "missing": True})
        executor = self._executor
        # Refuse an archive that cannot fit before deserializing it (which would materialize its weights).
        free = executor.capacity_bytes - executor.used_bytes(excluding=command.stage)
        if len(data) > free:
            raise WorkerError(
                f"stage {command.stage} needs {len(data) / 2**20:.1f} MiB (its archive) but worker "
                f"{self.identity.name} has {max(free, 0) / 2**20:.1f} MiB free of "
                f"{executor.capacity_bytes / 2**20:.1f} MiB; "
                "choose a plan that fits this device's memory or give it more (--memory)"
            )
        program = load_stage_archive(data, expected_sha256=command.sha256)  # a plain stage or a decoder stage
        executor.load(command.stage, program, memory_bytes=command.memory_bytes,
                      reference_host_s=command.reference_host_s, owner=self.identity.name,
                      reference_steps=command.reference_steps)
        if not cached:
            self.archives.put(data, command.sha256)
        self.archives.shrink()  # the stage now takes memory the cache may have used
        return Ok({"stage": command.stage, "param_bytes": int(getattr(program, "param_bytes", 0)), "cached": cached})

    def stash(self, command: Stash) -> Ok:
        """Keep a standby archive (sha256-checked) without loading it."""
        return Ok({"cached": self.archives.put(blob_bytes(command.archive), command.sha256)})

    def unload(self, command: Unload) -> Ok:
        self._executor.unload(None if command.stages is None else list(command.stages))
        return Ok()

    def renumber(self, command: Renumber) -> Ok:
        """The stages move together (see StageExecutor.renumber)."""
        self._executor.renumber(dict(command.moves))
        return Ok({"stages": self._executor.stage_indices()})

    def allow(self, command: Allow) -> Ok:
        """Authorize the peers that may send activations, before anyone connects.

        The coordinator allows on every worker first and routes second: a peer that connected
        before it was allowed would fail its handshake and lose what it had queued.
        """
        self._data.allow(command.pipeline, command.peers)
        return Ok()

    def route(self, command: Route) -> Ok:
        self._data.install(command)
        return Ok({"epoch": command.epoch})

    def emulate(self, command: Emulate) -> Ok:
        executor = self._executor
        if command.dilation is not None:
            executor.set_speed(executor.speed, command.dilation)
            self._data.set_dilation(command.dilation)
        if command.set_speed:
            executor.set_speed(command.speed)
        self._data.emulate_links(command.links)
        return Ok()

    def profile(self, command: Profile) -> Profiled:
        from partita.model import StageProgram
        from partita.runtime.profile import time_programs

        programs = [StageProgram.from_bytes(blob_bytes(t), expected_sha256=sha)
                    for sha, t in zip(command.programs, command.archives, strict=True)]
        device = self._executor.device
        if device.type != "cpu":  # time the segments where the stages will run
            programs = [program.to(device) for program in programs]
        host_s = time_programs(programs, command.inputs, reps=command.reps, device=device)
        speed = self._executor.speed or 1.0
        return Profiled(tuple(host_s), tuple(t / speed for t in host_s))

    def probe(self, command: Probe) -> Probed:
        """Measure RTT, latency and bandwidth to a peer's data socket; shaped like activations on an emulated link."""
        from partita.runtime.profile import measure_link

        sock = self._ctx.socket(zmq.DEALER)
        try:
            secret = self.identity.secret
            plain = secret is None or not command.public_key
            apply_client(sock, None if plain else secret,
                         None if plain or command.public_key is None else command.public_key.encode(), insecure=plain)
            sock.connect(command.address)
            result = measure_link(sock, payload_bytes=min(command.payload_bytes, self.identity.limits.max_frame_bytes),
                                  emulate=(command.bandwidth_bytes_per_s, command.latency_s),
                                  dilation=self._executor.dilation)
        finally:
            sock.close(linger=0)
        return Probed(float(result["bandwidth_bytes_per_s"]), float(result["latency_s"]),
                      {k: v for k, v in result.items() if k not in ("bandwidth_bytes_per_s", "latency_s")})

    def benchmark(self, command: Benchmark) -> Benchmarked:
        """This device's fp32 matmul FLOP/s again (device time), repeated until stable; for `cluster probe`."""
        from partita.runtime.profile import matmul_flops

        flops, spread, samples = matmul_flops(self._executor.device, window_s=command.window_s, with_count=True)
        return Benchmarked(flops * (self._executor.speed or 1.0), spread, samples)

    def stats(self, command: Stats) -> Figures:
        links = self._data.figures()
        return Figures(
            self.identity.name,
            self._data.epoch,
            {str(k): v for k, v in self._executor.stats().items()},
            links["links_out"],
            links["links_in"],
            self._counters(),
            self._executor.dilation,
        )

    def drain(self, command: Drain) -> Ok:
        self._stop()
        return Ok()


def _partita_version() -> str:
    """The installed partita's version, for `hello` (0+unknown when run from an uninstalled tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("partita")
    except PackageNotFoundError:  # a source tree that was never pip-installed
        return "0+unknown"
