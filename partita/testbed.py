"""A real network on one machine: hosts in Linux network namespaces, links shaped by the kernel.

The emulated cluster (`LocalCluster`) shapes links in partita's own sender; this testbed shapes
them where real networks do, in the kernel's queue (`tc qdisc ... tbf`), so that probes, drift
detection and switches meet real queues, real TCP and real `partita worker` processes.

Topology: a hub namespace holds a Linux bridge; every host is a namespace joined to the bridge by
a veth pair, and the machine's own namespace (where the coordinator runs) joins it too. All sit on
one /24, so traffic between two hosts crosses the sender's uplink and the receiver's downlink:

    coordinator (root ns, .1) ──┐
    host a (.11) ── uplink a ───┤ bridge (hub ns) ├── downlink b ── host b (.12)

Each host's `uplink_mbit` shapes the egress of its veth (inside its namespace), and
`downlink_mbit` the egress of its bridge port (toward it). The kernel here has no `netem`, so
links add no artificial delay; their latency is the real (sub-millisecond) one.

Everything is removed on `close()` (and at exit from a `with` block, even on an error): the
processes started inside the namespaces, then the namespaces (which takes their veths with them).
Nothing is sent anywhere but the addresses of the namespaces this object made.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from partita.errors import PartitaError

# Testbeds made by this process so far: the second and later get names of their own (they may coexist).
_made_here = itertools.count()


class TestbedError(PartitaError):
    """The network namespaces could not be built (not root, no iproute2, a kernel without tbf)."""


@dataclass(frozen=True)
class Host:
    """One device of the testbed: its name and its access link in Mbit/s each way (None: unshaped)."""

    name: str
    uplink_mbit: float | None = None
    downlink_mbit: float | None = None


def unavailable_reason() -> str | None:
    """Why this machine cannot build a testbed, or None when it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return None


def _free_subnet() -> str:
    """The first 10.213.x (x from 7) that no interface of this machine's namespace has an address in."""
    shown = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    taken = {line.split()[3].rsplit(".", 1)[0] for line in shown.splitlines() if len(line.split()) > 3}
    for third in range(7, 255):
        if f"10.213.{third}" not in taken:
            return f"10.213.{third}"
    raise TestbedError("every 10.213.x/24 is in use on this machine; close another testbed first")


class Testbed:
    """Hosts in network namespaces joined by a bridge; see the module docstring.

    `subnet` is the first three octets of the testbed's /24 (a private range that this machine
    does not otherwise use; None: the first 10.213.x/24, from 10.213.7, that no interface here
    uses, so that several testbeds can run side by side). Host i gets address
    `{subnet}.{11 + i}`, the coordinator `{subnet}.1`.
    """

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, hosts: list[Host], *, subnet: str | None = None, prefix: str | None = None) -> None:
        reason = unavailable_reason()
        if reason:
            raise TestbedError(f"cannot build a network testbed: {reason}")
        if len({h.name for h in hosts}) != len(hosts):
            raise TestbedError("testbed host names must be distinct")
        self.hosts = {h.name: h for h in hosts}
        subnet = subnet or _free_subnet()
        self.subnet = subnet
        made = next(_made_here)
        # Interface names are at most 15 characters: "pt12345x1c" is the longest the root end gets.
        self.prefix = prefix or f"pt{os.getpid() % 100000}" + (f"x{made}" if made else "")
        self.hub = f"{self.prefix}-hub"
        self.coordinator_address = f"{subnet}.1"
        self._made: list[str] = []
        self._processes: list[subprocess.Popen] = []
        self._root_veth = f"{self.prefix}c"

    # ------------------------------------------------------------------------------ building

    def __enter__(self) -> Testbed:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        self._netns_add(self.hub)
        self._ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.hub, "link", "set", "br0", "up")
        # The coordinator's leg: one end in this (root) namespace, the other on the bridge.
        self._ip("link", "add", self._root_veth, "type", "veth", "peer", "name", "c0", "netns", self.hub)
        self._ip("addr", "add", f"{self.coordinator_address}/24", "dev", self._root_veth)
        self._ip("link", "set", self._root_veth, "up")
        self._ip("-n", self.hub, "link", "set", "c0", "master", "br0", "up")
        for i, host in enumerate(self.hosts.values()):
            ns = self.namespace(host.name)
            self._netns_add(ns)
            port = f"p{i}"
            self._ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.hub)
            self._ip("-n", ns, "addr", "add", f"{self.address(host.name)}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
            self.shape(host.name, uplink_mbit=host.uplink_mbit, downlink_mbit=host.downlink_mbit)

    def _netns_add(self, ns: str) -> None:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # a leftover of a killed run
        self._ip("netns", "add", ns)
        self._made.append(ns)

    @staticmethod
    def _ip(*args: str) -> None:
        _run(["ip", *args])

    # ------------------------------------------------------------------------------ using

    def namespace(self, name: str) -> str:
        """The network namespace of host `name`."""
        if name not in self.hosts:
            raise TestbedError(f"no testbed host {name!r}; hosts are {', '.join(self.hosts)}")
        return f"{self.prefix}-{name}"

    def address(self, name: str) -> str:
        """Host `name`'s IPv4 address on the testbed."""
        self.namespace(name)  # checks the name
        return f"{self.subnet}.{11 + list(self.hosts).index(name)}"

    def shape(self, name: str, *, uplink_mbit: float | None, downlink_mbit: float | None = None) -> None:
        """Set (or, with None, remove) the shaping of host `name`'s access link, each way.

        `downlink_mbit` defaults to the uplink's rate: a symmetric link.
        """
        down = uplink_mbit if downlink_mbit is None else downlink_mbit
        port = f"p{list(self.hosts).index(name)}"
        _set_tbf(["-n", self.namespace(name)], "eth0", uplink_mbit)
        _set_tbf(["-n", self.hub], port, down)

    def popen(self, name: str, args: list[str], *, log: Path | None = None, env: dict | None = None) -> subprocess.Popen:
        """Start `args` inside host `name`'s namespace; the testbed stops it on close."""
        command = ["ip", "netns", "exec", self.namespace(name), *args]
        if log is None:
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        else:
            with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
                proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self._processes.append(proc)
        return proc

    def close(self) -> None:
        """Stop every process started here, then delete every namespace made here. Idempotent."""
        for proc in self._processes:
            _stop(proc)
        self._processes.clear()
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()
        # The root end of the coordinator's veth goes with its peer in the hub; make sure.
        subprocess.run(["ip", "link", "del", self._root_veth], capture_output=True)


def _set_tbf(where: list[str], dev: str, mbit: float | None) -> None:
    subprocess.run(["tc", *where, "qdisc", "del", "dev", dev, "root"], capture_output=True)
    if mbit is None:
        return
    rate_bytes = mbit * 1e6 / 8
    # The bucket must hold at least one timer tick's worth of bytes at the rate (HZ may be 100),
    # or tbf cannot reach its rate; a larger bucket lets short bursts through unshaped.
    burst = max(int(rate_bytes / 100), 16 * 1024)
    _run(["tc", *where, "qdisc", "add", "dev", dev, "root", "tbf",
          "rate", f"{mbit}mbit", "burst", str(burst), "latency", "200ms"])


def _run(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise TestbedError(f"`{' '.join(args)}` failed: {done.stderr.strip() or done.returncode}")


def _stop(proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout_s)
    except ProcessLookupError:
        return  # it exited between the poll and the kill
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class WorkerTestbed:
    """A `Testbed` with a real `partita worker` on every host, and a cluster file naming them.

    Each worker listens on its host's address, port 5555, with its own CURVE key pair; the
    coordinator's key pair is `keys/coordinator.key[_secret]` under `root`. `file` is the cluster
    file: one device per host by `address` and `public_key`, with `device_fields` (YAML flow
    mapping entries, e.g. "compute: 10GFLOPS, memory: 1GiB") and `links` (the file's `links:`
    section, YAML text) added when given.
    """

    def __init__(self, hosts: list[Host], root: Path, *, device_fields: str = "", links: str | None = None,
                 threads: int = 1) -> None:
        from partita.runtime.keys import new_keypair

        self.root = Path(root)
        self.keys = self.root / "keys"
        _, self.coordinator_secret = new_keypair(self.keys, "coordinator", overwrite=True)
        self.testbed = Testbed(hosts)
        self.workers: dict[str, subprocess.Popen] = {}
        self.device_fields = device_fields
        self.links = links
        self.threads = threads
        self.file = self.root / "cluster.yaml"

    def __enter__(self) -> WorkerTestbed:
        self.testbed.__enter__()
        try:
            for name in self.testbed.hosts:
                self.start(name)
            self.wait_ready(*self.testbed.hosts)
            self._write_cluster_file()
        except BaseException:
            self.testbed.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.testbed.close()

    def start(self, name: str) -> None:
        """Start (or restart, with a new key pair) the worker of host `name`; see `wait_ready`."""
        from partita.runtime.keys import new_keypair

        _, secret = new_keypair(self.keys, name, overwrite=True)
        ready = self.root / f"{name}.ready"
        ready.unlink(missing_ok=True)
        self.workers[name] = self.testbed.popen(name, [
            sys.executable, "-m", "partita.commands.worker",
            "--listen", f"tcp://{self.testbed.address(name)}:5555", "--name", name,
            "--secret-key", str(secret), "--authorized-keys", str(self.keys / "coordinator.key"),
            "--device", "cpu", "--threads", str(self.threads), "--ready-file", str(ready),
        ], log=self.root / f"{name}.log")

    def wait_ready(self, *names: str, timeout_s: float = 60.0) -> None:
        """Wait until the workers `names` listen; TestbedError with a worker's log if one does not."""
        deadline = time.monotonic() + timeout_s
        for name in names:
            ready = self.root / f"{name}.ready"
            while not ready.exists():
                if self.workers[name].poll() is not None or time.monotonic() > deadline:
                    log = (self.root / f"{name}.log").read_text(errors="replace")
                    raise TestbedError(f"worker {name} did not start:\n{log}")
                time.sleep(0.05)
            json.loads(ready.read_text())  # complete, not half written

    def kill(self, name: str) -> None:
        """Kill host `name`'s worker at once (SIGKILL), as a device that loses power."""
        self.workers[name].kill()
        self.workers[name].wait()

    def _write_cluster_file(self) -> None:
        lines = []
        for name in self.testbed.hosts:
            fields = f"name: {name}, address: 'tcp://{self.testbed.address(name)}:5555', public_key: keys/{name}.key"
            if self.device_fields:
                fields += f", {self.device_fields}"
            lines.append(f"  - {{{fields}}}")
        text = "source: client\ndevices:\n" + "\n".join(lines) + "\n"
        if self.links:
            text += "links:\n" + self.links
        self.file.write_text(text)

    def connect(self):
        """`partita.connect` to the workers, as the coordinator (not yet entered)."""
        import partita

        return partita.connect(self.file, secret_key=self.coordinator_secret)
