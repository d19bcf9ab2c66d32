"""Transport benchmark: partita's wire over ZeroMQ against a raw TCP socket, measured in the same run.

What it measures, process to process on loopback (a sender here, a receiver in a child process):

1. Throughput for 1 KiB ... 64 MiB float32 tensors: `wire.encode` -> DEALER `send_multipart(copy=False)`
   -> ROUTER `recv_multipart(copy=False)` -> `wire.decode`, with CURVE off and on; as a fraction of a
   plain `socket.sendmsg` / `recv_into` stream (length-prefixed messages into a preallocated buffer).
   Goal: >= 0.8 of raw TCP for 1 MiB and above (CURVE off; CURVE encrypts every byte, so it is shown
   for the price of security, not held to that goal).
2. Per-hop latency for small messages (a 256-byte tensor): ping-pong, hop = round trip / 2, p50/p99,
   against the same ping-pong over raw TCP.
3. Emulation faithfulness: messages paced by `LinkShaper` (bandwidth + latency, with time dilation)
   through the real transport; measured delivery times in device seconds against their targets.

Run: `.venv/bin/python benchmarks/transport.py` (about a minute; `--quick` for a smoke run).
Writes benchmarks/results/transport.json. Figures on a shared host are noisy: each throughput cell is
the median of `--repeats` runs, interleaved across the three transports so they share the noise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import platform
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy
import torch
import zmq
import zmq.utils.monitor
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from partita.runtime import keys, wire  # noqa: E402
from partita.runtime.emulation import LinkShaper, device_time  # noqa: E402

KIB, MIB = 1024, 1024 * 1024
SIZES = [KIB, 16 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB, 64 * MIB]
RESULTS = Path(__file__).resolve().parent / "results" / "transport.json"
_LEN = struct.Struct("!Q")


# ----------------------------------------------------------------------------- receiver (child process)


def _receiver(conn) -> None:
    """Serve measurement requests from the parent until told to stop (runs in the child process)."""
    logging.getLogger("partita.runtime.keys").setLevel(logging.ERROR)  # insecure runs are chosen explicitly
    torch.set_num_threads(1)
    ctx = zmq.Context()
    try:
        while True:
            cmd, *args = conn.recv()
            if cmd == "stop":
                return
            handler = {
                "raw_sink": _raw_sink,
                "raw_echo": _raw_echo,
                "zmq_sink": _zmq_sink,
                "zmq_echo": _zmq_echo,
                "zmq_stamps": _zmq_stamps,
            }[cmd]
            handler(conn, ctx, *args)
    finally:
        keys.stop_auth(ctx)
        ctx.destroy(linger=0)


def _listen_raw(conn) -> socket.socket:
    server = socket.create_server(("127.0.0.1", 0))
    conn.send(server.getsockname()[1])
    peer, _ = server.accept()
    server.close()
    peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return peer


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("raw peer closed early")
        view = view[n:]


def _raw_sink(conn, ctx, count: int, size: int, fresh: bool) -> None:
    """Receive into one preallocated buffer, or (fresh) into a new, untouched buffer per message.

    A message transport that hands each message to the application in its own buffer (as ZeroMQ
    does) pays for fresh pages on every large message; `fresh` measures that cost over plain TCP.
    """
    peer = _listen_raw(conn)
    head, body = bytearray(_LEN.size), bytearray(size)
    for _ in range(count):
        _recv_exact(peer, memoryview(head))
        n = _LEN.unpack(head)[0]
        target = memoryview(numpy.empty(n, dtype=numpy.uint8)) if fresh else memoryview(body)[:n]
        _recv_exact(peer, target)
    peer.sendall(b"k")
    peer.close()


def _raw_echo(conn, ctx, count: int, size: int) -> None:
    peer = _listen_raw(conn)
    head, body = bytearray(_LEN.size), bytearray(size)
    for _ in range(count):
        _recv_exact(peer, memoryview(head))
        n = _LEN.unpack(head)[0]
        _recv_exact(peer, memoryview(body)[:n])
        peer.sendmsg([head, memoryview(body)[:n]])
    peer.close()


def _bind_zmq(conn, ctx, curve) -> zmq.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    if curve is None:
        keys.apply_server(sock, None, None, insecure=True)
    else:
        server_pair, client_public = curve
        keys.apply_server(sock, server_pair, [client_public])
    sock.bind("tcp://127.0.0.1:0")
    conn.send(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    return sock


def _zmq_sink(conn, ctx, count: int, curve) -> None:
    sock = _bind_zmq(conn, ctx, curve)
    identity = None
    for _ in range(count):
        frames = sock.recv_multipart(copy=False)
        identity = frames[0]
        msg = wire.decode(frames[1:], kinds={"act"})
        _ = msg.tensors[0].shape
    sock.send_multipart([identity, b"k"])
    time.sleep(0.05)  # let the ack leave before the socket closes with linger 0
    sock.close()


def _zmq_echo(conn, ctx, count: int, curve) -> None:
    sock = _bind_zmq(conn, ctx, curve)
    for _ in range(count):
        frames = sock.recv_multipart(copy=False)
        msg = wire.decode(frames[1:], kinds={"act"})
        sock.send_multipart([frames[0], *wire.encode("act", msg.header, msg.tensors)], copy=False)
    time.sleep(0.05)
    sock.close()


def _zmq_stamps(conn, ctx, count: int) -> None:
    sock = _bind_zmq(conn, ctx, None)
    stamps = []
    for _ in range(count):
        frames = sock.recv_multipart(copy=False)
        stamps.append(time.monotonic())  # CLOCK_MONOTONIC is system-wide on Linux: comparable to the parent's
        wire.decode(frames[1:], kinds={"act"})
    conn.send(stamps)
    sock.close()


# ----------------------------------------------------------------------------- sender (this process)


class Bench:
    """The sending side, and one receiver process (spawned: a fresh interpreter) to measure against."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.server_pair, self.client_pair = keys.ephemeral_keypair(), keys.ephemeral_keypair()
        spawn = mp.get_context("spawn")
        self.conn, child = spawn.Pipe()
        self.proc = spawn.Process(target=_receiver, args=(child,), daemon=True)
        self.proc.start()

    def close(self) -> None:
        self.conn.send(("stop",))
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
        self.ctx.destroy(linger=0)

    def _curve(self, on: bool):
        return (self.server_pair, self.client_pair[0]) if on else None

    def _dealer(self, endpoint: str, curve_on: bool) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        if curve_on:
            keys.apply_client(sock, self.client_pair, self.server_pair[0])
        else:
            keys.apply_client(sock, None, None, insecure=True)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sock.connect(endpoint)
        self._handshake(sock, monitor, curve_on)
        return sock

    def _raw_connect(self) -> socket.socket:
        port = self.conn.recv()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def raw_throughput(self, tensor: torch.Tensor, count: int, *, fresh: bool = False) -> float:
        payload = memoryview(tensor.numpy()).cast("B")
        self.conn.send(("raw_sink", count, payload.nbytes, fresh))
        sock = self._raw_connect()
        head = _LEN.pack(payload.nbytes)
        start = time.perf_counter()
        for _ in range(count):
            sock.sendmsg([head, payload])
        if sock.recv(1) != b"k":
            raise ConnectionError("raw receiver did not acknowledge")
        elapsed = time.perf_counter() - start
        sock.close()
        return count * payload.nbytes / elapsed

    def zmq_throughput(self, tensor: torch.Tensor, count: int, curve_on: bool) -> float:
        self.conn.send(("zmq_sink", count, self._curve(curve_on)))
        sock = self._dealer(self.conn.recv(), curve_on)
        start = time.perf_counter()
        for i in range(count):
            sock.send_multipart(wire.encode("act", {"r": i}, [tensor]), copy=False)
        if not sock.poll(120_000) or sock.recv() != b"k":
            raise ConnectionError("zmq receiver did not acknowledge")
        elapsed = time.perf_counter() - start
        sock.close()
        return count * tensor.numel() * tensor.element_size() / elapsed

    @staticmethod
    def _handshake(sock: zmq.Socket, monitor: zmq.Socket, curve_on: bool) -> None:
        """Wait until the connection is up, so connection setup (and the CURVE handshake) is not timed."""
        wanted = zmq.EVENT_HANDSHAKE_SUCCEEDED
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                if monitor.poll(200) and zmq.utils.monitor.recv_monitor_message(monitor)["event"] == wanted:
                    return
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
        raise ConnectionError(f"no handshake with the receiver (curve={curve_on})")

    def raw_pingpong(self, tensor: torch.Tensor, count: int) -> list[float]:
        payload = memoryview(tensor.numpy()).cast("B")
        self.conn.send(("raw_echo", count, payload.nbytes))
        sock = self._raw_connect()
        head, back_head, back = _LEN.pack(payload.nbytes), bytearray(_LEN.size), bytearray(payload.nbytes)
        rtts = []
        for _ in range(count):
            start = time.perf_counter()
            sock.sendmsg([head, payload])
            _recv_exact(sock, memoryview(back_head))
            _recv_exact(sock, memoryview(back))
            rtts.append(time.perf_counter() - start)
        sock.close()
        return rtts

    def zmq_pingpong(self, tensor: torch.Tensor, count: int, curve_on: bool) -> list[float]:
        self.conn.send(("zmq_echo", count, self._curve(curve_on)))
        sock = self._dealer(self.conn.recv(), curve_on)
        rtts = []
        for i in range(count):
            start = time.perf_counter()
            sock.send_multipart(wire.encode("act", {"r": i}, [tensor]), copy=False)
            wire.decode(sock.recv_multipart(copy=False), kinds={"act"})
            rtts.append(time.perf_counter() - start)
        sock.close()
        return rtts

    def shaped_stream(self, shaper: LinkShaper, nbytes: int, count: int) -> list[float]:
        """Send `count` messages ready at once through `shaper`; one-way delivery times in real seconds."""
        tensor = torch.zeros(nbytes // 4)
        self.conn.send(("zmq_stamps", count))
        sock = self._dealer(self.conn.recv(), False)
        frames = [wire.encode("act", {"r": i}, [tensor]) for i in range(count)]
        sizes = [sum(memoryview(f).nbytes for f in fr) for fr in frames]
        ready = time.monotonic()
        departures = [shaper.departure_at(size, now=ready) for size in sizes]
        for fr, departure in zip(frames, departures, strict=True):
            time.sleep(max(0.0, departure - time.monotonic()))
            sock.send_multipart(fr, copy=False)
        stamps = self.conn.recv()
        sock.close()
        return [stamp - ready for stamp in stamps]


def _count_for(size: int, budget_bytes: int) -> int:
    return max(3, min(4000, budget_bytes // size))


def run_throughput(bench: Bench, sizes: list[int], repeats: int, budget_bytes: int) -> list[dict]:
    rows = []
    for size in sizes:
        tensor = torch.randn(size // 4)
        count = _count_for(size, budget_bytes)
        samples: dict[str, list[float]] = {"raw": [], "raw_fresh": [], "zmq": [], "zmq_curve": []}
        for _ in range(repeats):
            samples["raw"].append(bench.raw_throughput(tensor, count))
            samples["raw_fresh"].append(bench.raw_throughput(tensor, count, fresh=True))
            samples["zmq"].append(bench.zmq_throughput(tensor, count, curve_on=False))
            samples["zmq_curve"].append(bench.zmq_throughput(tensor, max(3, count // 4), curve_on=True))
        med = {k: statistics.median(v) for k, v in samples.items()}
        rows.append(
            {
                "size_bytes": size,
                "messages": count,
                "raw_tcp_bytes_per_s": med["raw"],
                "partita_bytes_per_s": med["zmq"],
                "raw_tcp_fresh_buffer_bytes_per_s": med["raw_fresh"],
                "partita_curve_bytes_per_s": med["zmq_curve"],
                "ratio": med["zmq"] / med["raw"],
                "ratio_raw_fresh": med["raw_fresh"] / med["raw"],
                "ratio_curve": med["zmq_curve"] / med["raw"],
                "ratio_best": max(samples["zmq"]) / max(samples["raw"]),
                "samples": samples,
            }
        )
    return rows


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def run_latency(bench: Bench, count: int) -> list[dict]:
    tensor = torch.randn(64)  # 256 bytes
    warm = max(20, count // 20)
    rows = []
    for name, fn in (
        ("raw TCP", lambda: bench.raw_pingpong(tensor, count + warm)),
        ("partita", lambda: bench.zmq_pingpong(tensor, count + warm, False)),
        ("partita + CURVE", lambda: bench.zmq_pingpong(tensor, count + warm, True)),
    ):
        hops = [rtt / 2 for rtt in fn()[warm:]]
        rows.append(
            {"transport": name, "p50_s": _pct(hops, 0.5), "p99_s": _pct(hops, 0.99), "samples": len(hops)}
        )
    raw = rows[0]
    for row in rows:
        row["p50_ratio"] = row["p50_s"] / raw["p50_s"]
        row["p99_ratio"] = row["p99_s"] / raw["p99_s"]
    return rows


def run_emulation(bench: Bench, quick: bool) -> list[dict]:
    """Links at 50 MB/s (device) with 5 ms latency, with and without dilation; several sizes."""
    rows = []
    cases = [(1.0, 8 * KIB, 5), (1.0, 128 * KIB, 5), (1.0, MIB, 5), (4.0, 128 * KIB, 5), (4.0, MIB, 3)]
    if quick:
        cases = cases[:3]
    for dilation, nbytes, count in cases:
        bandwidth, latency = 50e6, 0.005
        shaper = LinkShaper(bandwidth, latency, dilation=dilation)
        delivered = bench.shaped_stream(shaper, nbytes, count)
        wire_bytes = shaper.bytes / shaper.messages
        target_first = latency + wire_bytes / bandwidth
        target_last = latency + count * wire_bytes / bandwidth
        first, last = device_time(delivered[0], dilation), device_time(delivered[-1], dilation)
        rows.append(
            {
                "dilation": dilation,
                "message_bytes": nbytes,
                "messages": count,
                "target_first_s": target_first,
                "measured_first_s": first,
                "target_last_s": target_last,
                "measured_last_s": last,
                "ratio_first": first / target_first,
                "ratio_last": last / target_last,
            }
        )
    return rows


def _human(nbytes: float) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= factor:
            return f"{nbytes / factor:.3g} {unit}"
    return f"{nbytes:g} B"


def _rate(bps: float) -> str:
    return f"{bps / 1e9:.2f} GB/s" if bps >= 1e9 else f"{bps / 1e6:.0f} MB/s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and samples (smoke run, ~15 s)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs per throughput cell (median is reported)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=132)  # piped or logged: keep the tables on one line per row
    sizes = [KIB, 64 * KIB, MIB, 16 * MIB] if args.quick else SIZES
    repeats = 1 if args.quick else args.repeats
    budget = 64 * MIB if args.quick else 128 * MIB
    torch.set_num_threads(1)
    # The insecure (CURVE off) runs are chosen explicitly; one line per socket would drown the tables.
    logging.getLogger("partita.runtime.keys").setLevel(logging.ERROR)

    started = time.perf_counter()
    bench = Bench()
    try:
        throughput = run_throughput(bench, sizes, repeats, budget)
        latency = run_latency(bench, 300 if args.quick else 2000)
        emulation = run_emulation(bench, args.quick)
    finally:
        bench.close()
    wall_s = time.perf_counter() - started

    table = Table(
        title="Throughput, loopback, process to process (median of runs); ratio = / raw TCP",
        caption="raw fresh: raw TCP receiving each message into a new buffer, as ZeroMQ must",
    )
    for col in (
        "size",
        "msgs",
        "raw TCP",
        "partita",
        "ratio",
        "best/best",
        "raw fresh",
        "ratio",
        "+CURVE",
        "ratio",
    ):
        table.add_column(col, justify="right")

    def _ratio(value: float, size: int, goal: bool = True) -> str:
        if not goal or size < MIB:
            return f"{value:.2f}"
        return f"[{'green' if value >= 0.8 else 'red'}]{value:.2f}[/]"

    for row in throughput:
        size = row["size_bytes"]
        table.add_row(
            _human(size),
            str(row["messages"]),
            _rate(row["raw_tcp_bytes_per_s"]),
            _rate(row["partita_bytes_per_s"]),
            _ratio(row["ratio"], size),
            _ratio(row["ratio_best"], size),
            _rate(row["raw_tcp_fresh_buffer_bytes_per_s"]),
            _ratio(row["ratio_raw_fresh"], size, goal=False),
            _rate(row["partita_curve_bytes_per_s"]),
            _ratio(row["ratio_curve"], size, goal=False),
        )
    console.print(table)

    table = Table(title="Per-hop latency, 256-byte tensor (ping-pong / 2)")
    for col in ("transport", "p50", "p99", "p50 / raw", "p99 / raw"):
        table.add_column(col, justify="right")
    for row in latency:
        table.add_row(
            row["transport"],
            f"{row['p50_s'] * 1e6:.0f} µs",
            f"{row['p99_s'] * 1e6:.0f} µs",
            f"{row['p50_ratio']:.2f}",
            f"{row['p99_ratio']:.2f}",
        )
    console.print(table)

    table = Table(title="Emulated link 50 MB/s + 5 ms: delivery time in device seconds vs target")
    for col in (
        "dilation",
        "msg",
        "n",
        "first target",
        "first measured",
        "ratio",
        "last target",
        "last measured",
        "ratio",
    ):
        table.add_column(col, justify="right")
    for row in emulation:
        table.add_row(
            f"{row['dilation']:g}",
            _human(row["message_bytes"]),
            str(row["messages"]),
            f"{row['target_first_s'] * 1e3:.2f} ms",
            f"{row['measured_first_s'] * 1e3:.2f} ms",
            f"{row['ratio_first']:.3f}",
            f"{row['target_last_s'] * 1e3:.2f} ms",
            f"{row['measured_last_s'] * 1e3:.2f} ms",
            f"{row['ratio_last']:.3f}",
        )
    console.print(table)
    console.print(f"wall time {wall_s:.1f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "host": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": mp.cpu_count(),
        },
        "zmq": zmq.zmq_version(),
        "pyzmq": zmq.__version__,
        "quick": args.quick,
        "wall_s": wall_s,
        "throughput": throughput,
        "latency": latency,
        "emulation": emulation,
    }
    args.out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
