"""Serving benchmark (issue 11): `partita serve`'s HTTP layer and dynamic batching, on one emulated cluster.

One LocalCluster (three devices, each 5x slower than this host, 100 MB/s links with 1 ms latency,
dilation fixed at 1 so that device time is real time and the HTTP clocks agree with the
pipeline's), one model (a 12-layer, 1024-wide MLP), requests of one row. In one run it measures,
with `--clients` concurrent HTTP clients (aiohttp, in a process of their own) sending binary-tensor requests, `--requests` requests each time:

1. the cluster over HTTP without batching (`--max-batch 1`) and with it (`--max-batch 32`,
   2 ms window): throughput and p50 / p99 latency;
2. the same deployments through the Python API (`Pipeline.submit`, the same number in flight;
   with batching, requests pre-batched by 32 rows, what the batcher can at best produce): the HTTP
   layer's cost is the ratio HTTP / Python API;
3. a single-process baseline: the unsplit model in the server's own process (`LocalModel`)
   behind the same HTTP stack, with and without batching.

Every answer is compared with the model run here on the request alone: bit-identical, or the
largest absolute difference (a 1-row Linear takes another CPU kernel than a batched one, see
docs/serve.md). The HTTP clients run on this machine too, so they share its cores with the
server and the workers: on a small machine the clients are part of what is measured.

    .venv/bin/python benchmarks/serve.py [--requests 1500] [--clients 64] [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import partita
from partita.cluster import ClusterSpec
from partita.serve.local import LocalModel
from partita.serve.server import InferenceServer, ServeOptions, Service, deploy_for_serving
from partita.serve.signature import read_signature

ROOT = Path(__file__).resolve().parents[1]
WIDTH, LAYERS, BATCH = 1024, 12, 32
CLUSTER = {
    "source": "client",
    "devices": [{"name": n, "flops_per_s": 1e9, "memory_bytes": 2**31, "speed": 0.2} for n in ("a", "b", "c")],
    "links": {"default": {"bandwidth": "100MB/s", "latency": "1ms"}},
}


def wide_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(LAYERS - 1):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(WIDTH, 10)).eval()


# -- clients --------------------------------------------------------------------------------------

def http_load(url: str, inputs: list[torch.Tensor], clients: int) -> dict:
    """Every input as one request from `clients` concurrent clients, in a process of its own (so the
    clients do not share the server's interpreter lock): figures and outputs."""
    arrays = [x.numpy() for x in inputs]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        result = pool.submit(_client_process, url, arrays, clients).result()
    result["_outputs"] = [None if y is None else torch.from_numpy(y) for y in result["_outputs"]]
    return result


def _client_process(url: str, arrays: list, clients: int) -> dict:
    return asyncio.run(_http_clients(url, arrays, clients))


async def _http_clients(url: str, arrays: list, clients: int) -> dict:
    """Binary tensor requests (what tritonclient sends by default): the JSON header, then raw float32.

    aiohttp, one session with a connection per concurrent sender: httpx costs several times more
    CPU per request, and on a small machine the client's CPU is taken from the server.
    """
    import aiohttp

    outputs: list = [None] * len(arrays)
    latencies: list[float] = []
    failures = 0
    cursor = iter(range(len(arrays)))

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        for i in cursor:
            x = arrays[i]
            raw = x.tobytes()
            header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                             "parameters": {"binary_data_size": len(raw)}}],
                                 "parameters": {"binary_data_output": True}}).encode()
            started = time.perf_counter()
            async with session.post(f"{url}/v2/models/bench/infer", data=header + raw,
                                    headers={"Inference-Header-Content-Length": str(len(header))}) as response:
                content = await response.read()
                status, length = response.status, response.headers.get("Inference-Header-Content-Length")
            latencies.append(time.perf_counter() - started)
            if status != 200:
                failures += 1
                continue
            [out] = json.loads(content[:int(length)])["outputs"]
            outputs[i] = np.frombuffer(content[int(length):], dtype="<f4").reshape(out["shape"]).copy()

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall_s = time.perf_counter() - started
    return _figures(len(arrays), wall_s, latencies, failures) | {"_outputs": outputs}


def api_load(pipe, inputs: list[torch.Tensor], in_flight: int) -> dict:
    """The same requests through `Pipeline.submit`, `in_flight` at a time (each input one request)."""
    latencies: list[float] = []
    outputs: list = []
    window: list = []
    started = time.perf_counter()
    for x in inputs:
        window.append((time.perf_counter(), pipe.submit(x)))
        if len(window) >= in_flight:
            t0, future = window.pop(0)
            outputs.append(future.result())
            latencies.append(time.perf_counter() - t0)
    for t0, future in window:
        outputs.append(future.result())
        latencies.append(time.perf_counter() - t0)
    return _figures(len(inputs), time.perf_counter() - started, latencies, 0) | {"_outputs": outputs}


def _figures(requests: int, wall_s: float, latencies: list[float], failures: int) -> dict:
    ordered = sorted(latencies)
    return {
        "requests": requests,
        "failed": failures,
        "wall_s": wall_s,
        "throughput_rps": requests / wall_s,
        "latency_p50_s": statistics.median(ordered) if ordered else None,
        "latency_p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None,
    }


def check(model, inputs: list[torch.Tensor], outputs: list) -> dict:
    """Each output against the model run on its own request here (one torch thread, as the workers)."""
    worst, identical = 0.0, 0
    with torch.no_grad():
        for x, y in zip(inputs, outputs, strict=True):
            if y is None:
                continue
            expected = model(x)
            identical += bool(torch.equal(y, expected))
            worst = max(worst, (y - expected).abs().max().item())
    return {"bit_identical": identical, "max_abs_error": worst}


# -- one configuration ------------------------------------------------------------------------------

def serve_and_load(pipe, signature, spec, inputs, *, max_rows: int, clients: int) -> dict:
    options = ServeOptions(name="bench", port=0, max_rows=max_rows, window_s=0.002 if max_rows > 1 else 0.0)
    service = Service(pipe, signature, spec, options)
    server = InferenceServer(service)
    try:
        server.start()
        http_load(server.url, inputs[:64], clients)  # warm-up: connections, kernels
        cpu_s = time.process_time()
        result = http_load(server.url, inputs, clients)
        # CPU of this process (HTTP server, batcher, coordinator; the model too in the single-process
        # baseline), not of the workers or the clients: what serving costs per request here.
        result["server_cpu_per_request_s"] = (time.process_time() - cpu_s) / len(inputs)
        text = httpx.get(server.url + "/metrics").text
        result["mean_batch_rows"] = _mean_batch(text)
    finally:
        server.stop()  # closes the pipeline too
    return result


def _mean_batch(metrics: str) -> float | None:
    values = {}
    for line in metrics.splitlines():
        for name in ("partita_batch_rows_sum", "partita_batch_rows_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[-1])
    count = values.get("partita_batch_rows_count")
    return values["partita_batch_rows_sum"] / count if count else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1500, help="requests per configuration")
    parser.add_argument("--clients", type=int, default=64, help="concurrent HTTP clients")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = parser.parse_args()
    console = Console(width=160)
    torch.set_num_threads(1)
    model = wide_mlp()
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1, WIDTH, generator=generator) for _ in range(args.requests)]
    results: dict[str, dict] = {}
    started = time.perf_counter()

    with partita.LocalCluster(ClusterSpec.from_dict(CLUSTER), dilation=1.0) as cluster:
        for rows in (1, BATCH):  # each deploy profiles and plans for its own batch size
            with console.status(f"deploying for batches of {rows}…"):
                pipe, signature = deploy_for_serving(model, [(1, WIDTH)], cluster, max_rows=rows, replicate=False,
                                                     supervise=False)
            console.print(f"plan for batch {rows}: {pipe.plan.period_s * 1e3:.2f} ms period "
                          f"({len(pipe.plan.stages)} stages)")
            if rows == 1:
                api = api_load(pipe, inputs, in_flight=args.clients)
            else:
                batches = [torch.cat(inputs[i:i + rows]) for i in range(0, len(inputs), rows)]
                api = api_load(pipe, batches, in_flight=max(1, args.clients // rows))
                api["_outputs"] = [y for batch in api["_outputs"] for y in torch.split(batch, 1)]
                api["requests"], api["throughput_rps"] = len(inputs), len(inputs) / api["wall_s"]
            results[f"api_{rows}"] = api
            console.print(f"python API, batch {rows}: {api['throughput_rps']:.0f} req/s")
            results[f"http_{rows}"] = serve_and_load(pipe, signature, cluster.spec, inputs, max_rows=rows,
                                                     clients=args.clients)
            console.print(f"HTTP, max batch {rows}: {results[f'http_{rows}']['throughput_rps']:.0f} req/s")

    for rows in (1, BATCH):
        example = (torch.randn(rows, WIDTH),)
        local = LocalModel(model, example)
        results[f"single_{rows}"] = serve_and_load(local, read_signature(model, example), local.cluster_spec, inputs,
                                                   max_rows=rows, clients=args.clients)
        console.print(f"single process, max batch {rows}: {results[f'single_{rows}']['throughput_rps']:.0f} req/s")

    for result in results.values():
        result.update(check(model, inputs, result.pop("_outputs")))
    report(console, results, args)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "cluster": CLUSTER, "results": results,
                               "wall_s": time.perf_counter() - started}, indent=2))
    console.print(f"JSON: {out}")


def report(console: Console, results: dict[str, dict], args: argparse.Namespace) -> None:
    rows = [
        ("single process, HTTP, no batching", "single_1"),
        (f"single process, HTTP, batching ≤{BATCH}", f"single_{BATCH}"),
        ("cluster, HTTP, no batching", "http_1"),
        (f"cluster, HTTP, batching ≤{BATCH}", f"http_{BATCH}"),
        ("cluster, Python API, no batching", "api_1"),
        (f"cluster, Python API, batches of {BATCH}", f"api_{BATCH}"),
    ]
    base = results["single_1"]["throughput_rps"]
    table = Table(title=f"serving {args.requests} one-row requests, {args.clients} concurrent clients")
    for column in ("configuration", "req/s", "p50", "p99", "mean batch", "server CPU/req", "vs single process",
                   "exact", "failed"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for label, key in rows:
        r = results[key]
        batch = r.get("mean_batch_rows")
        table.add_row(label, f"{r['throughput_rps']:.0f}", _ms(r["latency_p50_s"]), _ms(r["latency_p99_s"]),
                      "—" if batch is None else f"{batch:.1f}", _ms(r.get("server_cpu_per_request_s"), 2),
                      f"{r['throughput_rps'] / base:.2f}x",
                      f"{r['bit_identical']}/{r['requests']}", str(r["failed"]))
    console.print(table)
    ratios = Table(title="ratios (measured in this run)")
    ratios.add_column("ratio")
    ratios.add_column("value", justify="right")
    ratios.add_row("HTTP / Python API throughput, no batching",
                   f"{results['http_1']['throughput_rps'] / results['api_1']['throughput_rps']:.2f}")
    ratios.add_row(f"HTTP (batching) / Python API (batches of {BATCH}) throughput",
                   f"{results[f'http_{BATCH}']['throughput_rps'] / results[f'api_{BATCH}']['throughput_rps']:.2f}")
    ratios.add_row("cluster HTTP: batching / no batching throughput",
                   f"{results[f'http_{BATCH}']['throughput_rps'] / results['http_1']['throughput_rps']:.2f}")
    ratios.add_row("cluster / single process throughput, both batching",
                   f"{results[f'http_{BATCH}']['throughput_rps'] / results[f'single_{BATCH}']['throughput_rps']:.2f}")
    console.print(ratios)


def _ms(seconds: float | None, digits: int = 1) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.{digits}f} ms"


if __name__ == "__main__":
    main()
