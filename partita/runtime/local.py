"""LocalCluster: a heterogeneous cluster emulated on this machine, one worker process per device.

```python
with partita.LocalCluster.from_yaml("examples/clusters/home-edge.yaml") as cluster:
    pipe = partita.deploy(model, (x,), cluster)
```

Each device of the cluster file becomes a `partita worker` process on loopback, started with
throwaway CURVE keys (written to a private temporary directory, removed on close) and emulated
as design.md describes:

* **speed** — the device's speed relative to this host is `speed` from the file, else its
  `flops_per_s` divided by this host's measured matmul FLOP/s (one thread, as the workers run).
  A stage's calibrated host time is scaled by it and the worker sleeps out the difference.
* **links** — every sender shapes its outgoing messages by the file's link (token bucket for
  bandwidth, then latency), including the coordinator's sends as the source node.
* **memory** — each worker gets the device's `memory_bytes` and refuses a stage that does not fit.
* **time dilation** — when a device is faster than this host, the whole emulated world (compute
  and links) runs `dilation` times slower than real time; every figure is reported in device time.

Workers use one torch thread each, so several emulated devices share the cores fairly; waiting
is sleeping, so slow devices cost no CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zmq

from partita.cluster import ClusterSpec, DeviceSpec, LinkSpec
from partita.errors import EmulationError, WorkerError
from partita.runtime.control import ControlClient
from partita.runtime.handle import Deployments, Keypair, WorkerEndpoint
from partita.runtime.keys import load_secret, new_keypair, stop_auth

# Keep the real stage time below its emulated target: the dilation leaves this much headroom over
# the fastest device's speed (contention on shared cores, Python overhead, sleep granularity).
DILATION_HEADROOM = 1.5
# Cores the emulation may keep busy on average: real compute per request over the dilated period.
# Less than the machine has, so the coordinator, the workers' I/O and other programs fit beside it.
DEFAULT_CPU_BUDGET = max(0.5, 0.3 * (os.cpu_count() or 1))
START_TIMEOUT_S = 120.0


def host_flops_per_s(threads: int = 1) -> float:
    """This host's fp32 matmul FLOP/s on `threads` torch threads (the basis of emulated speeds)."""
    import torch

    from partita.runtime.profile import matmul_flops_per_s

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return matmul_flops_per_s("cpu")
    finally:
        torch.set_num_threads(previous)


class LocalCluster:
    """Worker processes on this machine emulating the devices and links of `spec`.

    `dilation` None picks the smallest safe one (the fastest device's speed times
    DILATION_HEADROOM, at least 1). `host_flops` None measures this host. `secure` False starts
    the workers `--insecure` (no CURVE). `host` is the loopback address workers bind.
    """

    emulated_links = True

    def __init__(
        self,
        spec: ClusterSpec,
        *,
        dilation: float | None = None,
        host_flops: float | None = None,
        secure: bool = True,
        host: str = "127.0.0.1",
        threads_per_worker: int = 1,
        coordinator_keys: Keypair | None = None,
        cpu_budget: float = DEFAULT_CPU_BUDGET,
    ) -> None:
        self.spec = spec
        self.bind_host = host
        self.advertise_host: str | None = None  # workers reach the coordinator at bind_host
        self.pipelines = Deployments()
        self._secure = secure
        self._threads = threads_per_worker
        self.threads_per_worker = threads_per_worker
        self._requested_dilation = dilation
        self._host_flops = host_flops
        self._given_coordinator_keys = coordinator_keys
        self.host_speeds: dict[str, float] = {}
        self.dilation = 1.0
        self.endpoints: dict[str, WorkerEndpoint] = {}
        self.coordinator_keys: Keypair | None = None
        self.processes: dict[str, subprocess.Popen] = {}
        self._dir: Path | None = None
        self._context: zmq.Context | None = None
        self._clients: dict[str, ControlClient] = {}
        self._link_overrides: dict[frozenset[str], LinkSpec] = {}
        self.cpu_budget = cpu_budget
        self._base_dilation = 1.0

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **options: Any) -> LocalCluster:
        """A LocalCluster of every device in a cluster file (devices' `address` fields are ignored)."""
        return cls(ClusterSpec.from_yaml(path), **options)

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> LocalCluster:
        """Start one worker per device and wait until all answer. Idempotent."""
        if self.processes:
            return self
        host_flops = self._host_flops or host_flops_per_s(self._threads)
        self.host_flops = host_flops
        self.host_speeds = {
            d.name: (d.speed if d.speed is not None else d.flops / host_flops) for d in self.spec.devices
        }
        fastest = max(self.host_speeds.values())
        self.dilation = self._requested_dilation or max(1.0, fastest * DILATION_HEADROOM)
        self._base_dilation = self.dilation
        if fastest > self.dilation:
            raise EmulationError(
                f"device speed {fastest:.2f}x this host cannot be emulated at dilation {self.dilation:g}; "
                f"use dilation >= {fastest:.2f} (or None to choose it)"
            )
        self._dir = Path(tempfile.mkdtemp(prefix="partita-local-"))
        try:
            self._start_workers()
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def _start_workers(self) -> None:
        keys_dir = self.workdir / "keys"
        if self._secure:
            if self._given_coordinator_keys is not None:
                self.coordinator_keys = self._given_coordinator_keys
                (keys_dir).mkdir(parents=True)
                (keys_dir / "coordinator.key").write_text(_public_cert(self.coordinator_keys.public))
            else:
                public_path, secret_path = new_keypair(keys_dir, "coordinator")
                self.coordinator_keys = Keypair(*load_secret(secret_path))
        for device in self.spec.devices:
            self._spawn(device.name)

    def _spawn(self, name: str, *, restart: bool = False) -> Path:
        """Start the worker process for device `name` with a new key pair (replaced on a restart); return its ready file."""
        ready = self.workdir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        keys_dir = self.workdir / "keys"
        device = self.spec.device(name)
        args = [
            sys.executable, "-m", "partita.commands.worker",
            "--listen", f"tcp://{self.bind_host}:0",
            "--name", name,
            "--device", "cpu",
            "--emulate", repr(self.host_speeds[name]),
            "--memory", repr(float(device.memory)),
            "--dilation", repr(self.dilation),
            "--threads", str(self._threads),
            "--ready-file", str(ready),
        ]
        if self._secure:
            _public, secret = new_keypair(keys_dir, f"worker-{name}", overwrite=restart)
            args += ["--secret-key", str(secret), "--authorized-keys", str(keys_dir / "coordinator.key")]
        else:
            args += ["--insecure"]
        # A restart appends to the log, so what the killed worker printed stays readable.
        log = open(self.workdir / f"{name}.log", "ab" if restart else "wb")  # noqa: SIM115 - owned by the child
        env = dict(os.environ, OMP_NUM_THREADS=str(self._threads), PYTHONUNBUFFERED="1")
        # A process group of its own: a terminal's Ctrl-C reaches the coordinator alone, which
        # stops the workers in order (close), instead of every worker draining at once beneath it.
        self.processes[name] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, process_group=0
        )
        log.close()
        return ready

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = dict(self.processes)
        while pending:
            for name, proc in list(pending.items()):
                ready = self.workdir / f"{name}.ready"
                if ready.exists():
                    info = json.loads(ready.read_text())
                    key = info["public_key"].encode() if info.get("public_key") else None
                    self.endpoints[name] = WorkerEndpoint(name, info["control"], key)
                    del pending[name]
                elif proc.poll() is not None:
                    raise WorkerError(f"emulated worker {name} exited with code {proc.returncode} while starting:\n"
                                      + self.log_tail(name))
            if time.monotonic() > deadline:
                raise WorkerError(f"emulated workers {sorted(pending)} did not start within {START_TIMEOUT_S:g} s")
            time.sleep(0.05)
        context = self._context = zmq.Context()
        for name, endpoint in self.endpoints.items():
            self._clients[name] = ControlClient(context, endpoint, self.coordinator_keys, timeout_s=20)
            self._clients[name].call("ping")

    @property
    def workdir(self) -> Path:
        """The private directory of this running cluster (keys, ready files, worker logs)."""
        if self._dir is None:
            raise EmulationError("the cluster is not running; start it first")
        return self._dir

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last lines a worker wrote (for error messages)."""
        path = self._dir / f"{name}.log" if self._dir else None
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        """Close any pipeline on this cluster, drain and stop every worker, remove the keys. Idempotent."""
        self.pipelines.close_all()
        for client in self._clients.values():
            client.close()
        self._clients = {}
        if self._context is not None:
            stop_auth(self._context)
            self._context.term()
            self._context = None
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()  # SIGTERM: the worker drains, then exits
        for proc in self.processes.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                # A worker that does not drain in time is killed rather than left behind.
                proc.kill()
                proc.wait(timeout=5)
        self.processes = {}
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- changing the emulation while it runs (a slower device or link, as drift tests need) --
    def set_device(self, name: str, *, speed: float) -> None:
        """Make device `name` emulate `speed` times this host from now on (the spec is unchanged)."""
        if not (isinstance(speed, int | float) and math.isfinite(speed) and speed > 0):
            raise EmulationError(f"speed must be a positive number, got {speed!r}")
        if speed > self.dilation:
            raise EmulationError(f"speed {speed:g} exceeds the dilation {self.dilation:g}; start the cluster with a larger dilation")
        self._client(name).call("emulate", {"speed": float(speed)})
        self.host_speeds[name] = float(speed)

    def set_link(self, a: str, b: str, *, bandwidth: float | None = None, latency: float | None = None) -> None:
        """Change the emulated link between `a` and `b` (bytes/s, seconds; device units), both directions.

        Like `set_device`, this changes the emulation only: `spec` (what the planner believes) stays.
        """
        current = self.emulated_link(a, b)
        changed = LinkSpec(
            float(bandwidth) if bandwidth is not None else current.bandwidth_bytes_per_s,
            float(latency) if latency is not None else current.latency_s,
        )
        change = {k: float(v) for k, v in (("bandwidth", bandwidth), ("latency", latency)) if v is not None}
        for here, there in ((a, b), (b, a)):
            if here in self.endpoints:
                self._client(here).call("emulate", {"links": {there: change}})
            elif here == self.spec.source:
                for pipe in self.pipelines:
                    pipe.set_source_link(there, bandwidth=bandwidth, latency=latency)
            else:
                raise EmulationError(f"no device or source named {here!r} in this cluster")
        self._link_overrides[frozenset((a, b))] = changed

    def set_dilation(self, dilation: float) -> None:
        """Run the emulated world `dilation` times slower than real time from now on (figures stay in device time)."""
        if not (isinstance(dilation, int | float) and math.isfinite(dilation) and dilation >= 1):
            raise EmulationError(f"dilation must be a finite number >= 1, got {dilation!r}")
        for name in self.endpoints:
            self._client(name).call("emulate", {"dilation": float(dilation)})
        self.dilation = float(dilation)

    def fit_dilation(self, plan: Any, host_segment_s: tuple[float, ...] | None) -> float:
        """Choose the dilation a plan needs, and set it (deploy calls this; a fixed `dilation` is kept).

        Two floors: the fastest device must be emulable (speed x headroom), and the real compute a
        request costs on this host, over the plan's dilated period, must fit `cpu_budget` cores,
        or stages running at once would slow each other down and miss their emulated times.
        """
        dilation = self.dilation_for(plan, host_segment_s)
        if abs(dilation - self.dilation) > 1e-9:
            self.set_dilation(dilation)
        return dilation

    def dilation_for(self, plan: Any, host_segment_s: tuple[float, ...] | None) -> float:
        """The dilation `fit_dilation` would choose for `plan` (without setting it)."""
        if self._requested_dilation is not None or host_segment_s is None:
            return self.dilation
        period_s = float(plan.period_s)
        needed = sum(host_segment_s) / (period_s * self.cpu_budget) if period_s > 0 else 1.0
        return max(self._base_dilation, needed)

    def emulated_link(self, a: str, b: str) -> LinkSpec:
        """The link the runtime emulates between `a` and `b` (the spec's, unless `set_link` changed it)."""
        return self._link_overrides.get(frozenset((a, b)), self.spec.link(a, b)) if a != b else self.spec.link(a, b)

    def _client(self, name: str) -> ControlClient:
        client = self._clients.get(name)
        if client is None:
            raise EmulationError(f"no emulated device {name!r}; devices: {sorted(self._clients)}")
        return client

    def worker_exit(self, name: str) -> int | None:
        """The exit code of device `name`'s worker process once it has ended; None while it runs."""
        proc = self.processes.get(name)
        return proc.poll() if proc is not None else None

    def worker_pids(self) -> Mapping[str, int]:
        return {name: proc.pid for name, proc in self.processes.items()}

    def add_worker(self, device: DeviceSpec) -> WorkerEndpoint:
        """Start a worker for `device` while the cluster runs (a device joins, or one comes back).

        A new name is added to `spec`; a known name (e.g. a worker that was killed) is restarted
        with fresh keys at a new port, its spec entry replaced by `device`. Then hand it to a
        running pipeline with `Pipeline.add_device(device)`.
        """
        if self._dir is None:
            raise EmulationError("the cluster is not running; start it first")
        old = self.processes.get(device.name)
        if old is not None and old.poll() is None:
            raise EmulationError(f"worker {device.name} is still running; stop it before starting it again")
        if old is not None:
            old.wait(timeout=5)
        names = self.spec.names
        self.spec = (self.spec.replace_device(device.name, **{f: getattr(device, f) for f in _DEVICE_FIELDS})
                     if device.name in names else dataclasses.replace(self.spec, devices=(*self.spec.devices, device)))
        self.host_speeds[device.name] = device.speed if device.speed is not None else device.flops / self.host_flops
        if self.host_speeds[device.name] > self.dilation:
            raise EmulationError(f"device {device.name} at speed {self.host_speeds[device.name]:g} exceeds the "
                                 f"dilation {self.dilation:g}; start the cluster with a larger dilation")
        ready = self._spawn(device.name, restart=True)
        self.endpoints.pop(device.name, None)
        old_client = self._clients.pop(device.name, None)
        if old_client is not None:
            old_client.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if self.processes[device.name].poll() is not None:
                raise WorkerError(f"emulated worker {device.name} exited while starting:\n" + self.log_tail(device.name))
            if time.monotonic() > deadline:
                raise WorkerError(f"emulated worker {device.name} did not start within {START_TIMEOUT_S:g} s")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        key = info["public_key"].encode() if info.get("public_key") else None
        self.endpoints[device.name] = WorkerEndpoint(device.name, info["control"], key)
        if self._context is None:
            raise EmulationError("the cluster is not running; start it first")
        self._clients[device.name] = ControlClient(self._context, self.endpoints[device.name], self.coordinator_keys,
                                                   timeout_s=20)
        self._clients[device.name].call("ping")
        return self.endpoints[device.name]


_DEVICE_FIELDS = ("flops_per_s", "memory_bytes", "type", "speed")


def _public_cert(public: bytes) -> str:
    """A ZeroMQ public certificate file body for a z85 key (what zmq.auth.load_certificate reads)."""
    return f'metadata\ncurve\n    public-key = "{public.decode()}"\n'

