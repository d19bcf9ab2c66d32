"""`partita serve` as a user runs it: a real subprocess, stopped with SIGTERM while requests are in flight.

The cluster is two slow emulated devices, so a burst of requests is still being answered when
the signal arrives: every one must be answered (200, exact), the process must exit 0, and the
worker processes it started must be gone.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from zoo import mlp

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = """\
source: client
devices:
  - {name: a, flops_per_s: 1e9, memory_bytes: 1GiB, speed: 0.01}
  - {name: b, flops_per_s: 1e9, memory_bytes: 1GiB, speed: 0.01}
links:
  default: {bandwidth: 100MB/s, latency: 1ms}
"""


def _partita(*args: str, **popen: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "partita.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_binding_beyond_loopback_without_a_key_is_refused_in_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text(CLUSTER)
    process = _partita("serve", "tests/zoo.py:mlp", "--cluster", str(tmp_path / "c.yaml"), "--host", "0.0.0.0")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert stderr.strip().count("\n") == 0 and "--api-key" in stderr and "--no-auth" in stderr, stderr


def test_sigterm_answers_every_request_in_flight_then_stops_the_workers_it_started(tmp_path):
    torch.set_num_threads(1)
    (tmp_path / "c.yaml").write_text(CLUSTER)
    process = _partita("serve", "tests/zoo.py:mlp", "--cluster", str(tmp_path / "c.yaml"), "--input-shape", "4,64",
                       "--port", "0", "--max-batch", "4", "--batch-window-ms", "0", "--name", "mlp", "--standby")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        url = _wait_for_url(lines, process)
        _wait_for_event(url, "standby")  # --standby pre-shipped the failure plans' stages
        workers = [p.pid for p in psutil.Process(process.pid).children(recursive=True)]
        assert len(workers) >= 2
        inputs = [torch.randn(4, 64) for _ in range(64)]
        signalled: dict[str, float] = {}

        def terminate_soon() -> None:
            # Once every request has been read by the server, while some still wait for the pipeline.
            _wait_until_all_accepted(url, len(inputs))
            signalled["at"] = time.monotonic()
            process.send_signal(signal.SIGTERM)

        threading.Thread(target=terminate_soon, daemon=True).start()
        answers = asyncio.run(_send_all(url, inputs))
        process.wait(120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    reader.join(10)
    model = mlp()
    with torch.no_grad():
        assert all(status == 200 for status, _, _ in answers), [a[0] for a in answers]
        assert all(torch.equal(out, model(x)) for (_, out, _), x in zip(answers, inputs, strict=True))
    assert sum(done > signalled["at"] for _, _, done in answers) > 0, "no request was still in flight at SIGTERM"
    assert process.returncode == 0, "".join(lines)
    assert any("stopped: 64 request(s) answered, 0 failed" in line for line in lines), "".join(lines)
    assert not [pid for pid in workers if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def _wait_for_event(url: str, kind: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [e for e in httpx.get(url + "/api/state").json()["events"] if e["kind"] == kind]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no {kind!r} event in /api/state")


def _wait_until_all_accepted(url: str, count: int, timeout_s: float = 120.0) -> None:
    """Until the server holds every request: accepted (in flight) or answered, at least one in flight."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metrics = httpx.get(url + "/metrics").text
        in_flight = _sample(metrics, "partita_requests_in_flight")
        answered = _sample(metrics, 'partita_requests_total{outcome="ok"}')
        if in_flight + answered >= count:
            assert in_flight > 0, "every request was answered before the signal: make the cluster slower"
            return
        time.sleep(0.05)
    raise AssertionError("the server never held every request")


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


def _wait_for_url(lines: list[str], process: subprocess.Popen, timeout_s: float = 180.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in list(lines):
            found = re.search(r"API:\s+(http://\S+?)/v2/models/mlp/infer", line)
            if found:
                return found.group(1)
        if process.poll() is not None:
            raise AssertionError("partita serve exited early:\n" + "".join(lines))
        time.sleep(0.1)
    raise AssertionError("partita serve printed no URL:\n" + "".join(lines))


async def _send_all(url: str, inputs: list[torch.Tensor]) -> list[tuple[int, torch.Tensor | None, float]]:
    """One client per input, all at once: (status, output, monotonic time answered)."""

    async def one(client: httpx.AsyncClient, x: torch.Tensor) -> tuple[int, torch.Tensor | None, float]:
        body = {"inputs": [{"name": "input", "shape": [4, 64], "datatype": "FP32", "data": x.flatten().tolist()}]}
        response = await client.post("/v2/models/mlp/infer", json=body)
        if response.status_code != 200:
            return response.status_code, None, time.monotonic()
        [out] = response.json()["outputs"]
        return 200, torch.tensor(out["data"]).reshape(out["shape"]), time.monotonic()

    limits = httpx.Limits(max_connections=len(inputs), max_keepalive_connections=len(inputs))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(one(client, x) for x in inputs))
