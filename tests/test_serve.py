"""`partita serve` against the real thing: an HTTP server over a LocalCluster of worker processes.

One server serves the module: the zoo MLP deployed on four emulated devices (a chain, so a killed
worker forces a re-plan), batches of up to 32 rows, an API key. Clients are httpx, tritonclient
(the protocol's reference client) and, last, a headless Chromium on the dashboard. Requests carry
4 rows: on CPU a Linear layer computes 4 rows bit-identically whether they are alone or inside a
larger batch (fewer rows take a matrix-vector kernel, see docs/serve.md), so every answer is
compared with the unbatched model with torch.equal. Tests run in file order; the last two kill
workers.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from zoo import mlp

import partita
from partita.cluster import ClusterSpec
from partita.runtime.supervisor import Supervision
from partita.serve.server import InferenceServer, ServeOptions, Service, deploy_for_serving
from partita.serve.state import plan_line

pytestmark = pytest.mark.slow

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROWS = 4
MAX_ROWS = 32
BODY_LIMIT = 1 << 20
BROWSER = Path("/usr/bin/chromium")
PLAN_LINES: list[str] = []  # what the server reported on each plan change (the CLI prints these)


@pytest.fixture(scope="module")
def served():
    """(server, model, cluster): the MLP served over four emulated devices."""
    torch.set_num_threads(1)  # the workers run one torch thread; so does the reference here
    spec = ClusterSpec.from_dict({
        "source": "client",
        "devices": [{"name": n, "flops_per_s": 1e9, "memory_bytes": 2**30, "speed": 0.02} for n in "abcd"],
        "links": {"default": {"bandwidth": "100MB/s", "latency": "0.5ms"}},
    })
    model = mlp()
    with partita.LocalCluster(spec) as cluster:
        pipe, signature = deploy_for_serving(model, [(ROWS, 64)], cluster, max_rows=MAX_ROWS, replicate=False,
                                             reps=1, supervise=Supervision(detection_s=1.0, drift=False))
        options = ServeOptions(name="mlp", port=0, max_rows=MAX_ROWS, window_s=0.002, api_key=KEY,
                               max_body_bytes=BODY_LIMIT, poll_s=0.5)
        service = Service(pipe, signature, cluster.spec, options, on_plan_change=PLAN_LINES.append)
        with InferenceServer(service) as server:
            yield server, model, cluster


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served[0].url, headers=AUTH, timeout=60) as c:
        yield c


def infer_body(x: torch.Tensor) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()}]}


def output_of(response: httpx.Response) -> torch.Tensor:
    [out] = response.json()["outputs"]
    return torch.tensor(out["data"], dtype=torch.float32).reshape(out["shape"])


def reference(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# -- endpoints ----------------------------------------------------------------------------------

def test_health_metadata_and_readiness_endpoints_answer_as_the_protocol_says(served, client):
    server = served[0]
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}  # probes need no key
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    meta = client.get("/v2/models/mlp").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "OUTPUT__0", "datatype": "FP32", "shape": [-1, 5]}]
    assert client.get("/v2/models/mlp/ready").json() == {"name": "mlp", "ready": True}


def test_a_json_infer_request_is_answered_with_the_models_output(served, client):
    model = served[1]
    x = torch.randn(ROWS, 64)
    response = client.post("/v2/models/mlp/infer", json={**infer_body(x), "id": "r-1"})
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "r-1" and response.json()["model_name"] == "mlp"
    assert torch.equal(output_of(response), reference(model, x))


def test_state_events_metrics_and_dashboard_endpoints(served, client):
    state = client.get("/api/state").json()
    assert [d["name"] for d in state["devices"]] == ["a", "b", "c", "d"]
    assert all(d["status"] == "up" for d in state["devices"])
    assert state["plan"]["stages"] and state["plan"]["predicted_period_s"] > 0
    assert {link["from"] for link in state["links"]} >= {"client"}
    assert state["events"][0]["kind"] == "deployed"
    with client.stream("GET", "/api/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        assert next(lines) == "event: state"
        first = json.loads(next(lines).removeprefix("data: "))
    assert first["model"] == "mlp" and first["plan"]["epoch"] == state["plan"]["epoch"]
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'partita_device_up{device="a"} 1.0' in metrics.text
    page = httpx.get(served[0].url + "/")
    assert page.status_code == 200 and "dashboard.js" in page.text
    script = httpx.get(served[0].url + "/static/dashboard.js")
    assert script.status_code == 200 and "EventSource" in script.text
    assert "http" not in script.text.replace("http://www.w3.org/2000/svg", "")  # nothing from a CDN


# -- the protocol's reference client ----------------------------------------------------------

@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infers_with_json_and_binary_tensors(served, binary):
    import tritonclient.http as triton

    server, model, _ = served
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready(headers=dict(AUTH))
        assert client.get_model_metadata("mlp", headers=dict(AUTH))["inputs"][0]["name"] == "input"
        x = torch.randn(ROWS, 64)
        given = triton.InferInput("input", [ROWS, 64], "FP32")
        given.set_data_from_numpy(x.numpy(), binary_data=binary)
        wanted = [triton.InferRequestedOutput("OUTPUT__0", binary_data=binary)]
        result = client.infer("mlp", [given], outputs=wanted, headers=dict(AUTH))
        got = torch.from_numpy(result.as_numpy("OUTPUT__0").copy())
        # All outputs come back binary when none is named (tritonclient asks binary_data_output).
        everything = client.infer("mlp", [given], headers=dict(AUTH))
        assert everything.get_response()["outputs"][0]["parameters"]["binary_data_size"] == ROWS * 5 * 4
    finally:
        client.close()
    assert got.dtype == torch.float32 and torch.equal(got, reference(model, x))
    assert torch.equal(torch.from_numpy(everything.as_numpy("OUTPUT__0").copy()), got)


# -- bad requests -------------------------------------------------------------------------------

def _bad_cases(x: torch.Tensor) -> list[tuple[str, dict, bytes, int, str]]:
    good = infer_body(x)
    entry = good["inputs"][0]
    raw = x.numpy().tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": [ROWS, 64], "datatype": "FP32",
                                      "parameters": {"binary_data_size": len(raw) - 4}}]}).encode()
    return [
        ("wrong shape", {}, json.dumps({"inputs": [{**entry, "shape": [ROWS, 63]}]}).encode(), 400,
         "expected [-1, 64]"),
        ("data count", {}, json.dumps({"inputs": [{**entry, "data": entry["data"][:-1]}]}).encode(), 400,
         f"needs {ROWS * 64}"),
        ("wrong dtype", {}, json.dumps({"inputs": [{**entry, "datatype": "FP64"}]}).encode(), 400, "expected FP32"),
        ("strings for numbers", {}, json.dumps({"inputs": [{**entry, "data": ["1"] * ROWS * 64}]}).encode(), 400,
         "FP32 values"),
        ("unknown input", {}, json.dumps({"inputs": [{**entry, "name": "image"}]}).encode(), 400,
         "the model takes input (FP32[-1, 64])"),
        ("missing input", {}, json.dumps({"inputs": []}).encode(), 400, "missing input"),
        ("malformed JSON", {}, b'{"inputs": [', 400, "not valid JSON"),
        ("not an object", {}, b"[1, 2]", 400, '"inputs"'),
        ("batch over --max-batch", {}, json.dumps(infer_body(torch.randn(MAX_ROWS + 1, 64))).encode(), 400,
         f"at most {MAX_ROWS}"),
        ("binary size", {"Inference-Header-Content-Length": str(len(header))}, header + raw, 400,
         "needs 1024 bytes"),
        ("header length", {"Inference-Header-Content-Length": "99999999"}, header + raw, 400,
         "Inference-Header-Content-Length"),
        ("unknown output", {}, json.dumps({**good, "outputs": [{"name": "logits"}]}).encode(), 400,
         "the model gives OUTPUT__0"),
        ("body over the limit", {}, b" " * (BODY_LIMIT + 1), 400, f"{BODY_LIMIT:,} bytes"),
    ]


def test_every_bad_request_gets_one_clear_error_and_the_server_keeps_serving(served, client):
    model = served[1]
    x = torch.randn(ROWS, 64)
    for what, headers, body, status, words in _bad_cases(x):
        response = client.post("/v2/models/mlp/infer", content=body, headers=headers)
        assert response.status_code == status, (what, response.text)
        assert set(response.json()) == {"error"} and words in response.json()["error"], (what, response.text)
    unknown = client.post("/v2/models/resnet/infer", json=infer_body(x))
    assert unknown.status_code == 404 and "serves 'mlp'" in unknown.json()["error"]
    for headers in ({"Authorization": "Bearer wrong"}, {}):
        refused = httpx.post(served[0].url + "/v2/models/mlp/infer", json=infer_body(x), headers=headers)
        assert refused.status_code == 400 and "Authorization: Bearer KEY" in refused.json()["error"]
    assert httpx.get(served[0].url + "/metrics").status_code == 400
    assert httpx.get(served[0].url + "/api/state?key=wrong").status_code == 400
    after = client.post("/v2/models/mlp/infer", json=infer_body(x))
    assert after.status_code == 200 and torch.equal(output_of(after), reference(model, x))
    metrics = client.get("/metrics").text
    assert 'partita_requests_total{outcome="bad_request"} 12.0' in metrics
    assert 'partita_requests_total{outcome="too_large"} 1.0' in metrics


# -- load ---------------------------------------------------------------------------------------

async def _blast(url: str, inputs: list[torch.Tensor], clients: int, answered: list | None = None) -> list:
    """Send every input as one binary-tensor request from `clients` concurrent clients (aiohttp: an
    httpx client costs several times the CPU per request, taken from the server in this process).

    Returns (status, output or None) in input order.
    """
    import aiohttp

    responses: list = [None] * len(inputs)
    cursor = iter(range(len(inputs)))

    async def one_client(session: aiohttp.ClientSession) -> None:
        for i in cursor:
            raw = inputs[i].numpy().tobytes()
            header = json.dumps({"inputs": [{"name": "input", "shape": list(inputs[i].shape), "datatype": "FP32",
                                             "parameters": {"binary_data_size": len(raw)}}],
                                 "parameters": {"binary_data_output": True}}).encode()
            async with session.post(f"{url}/v2/models/mlp/infer", data=header + raw,
                                    headers={**AUTH, "Inference-Header-Content-Length": str(len(header))}) as r:
                body = await r.read()
                length = r.headers.get("Inference-Header-Content-Length")
                responses[i] = (r.status, None if r.status != 200 else _binary_output(body, int(length)))
            if answered is not None:
                answered.append(i)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=180)) as session:
        await asyncio.gather(*(one_client(session) for _ in range(clients)))
    return responses


def _binary_output(body: bytes, length: int) -> torch.Tensor:
    [out] = json.loads(body[:length])["outputs"]
    assert out["parameters"]["binary_data_size"] == len(body) - length
    return torch.frombuffer(bytearray(body[length:]), dtype=torch.float32).reshape(out["shape"])


def _check_all_answered_exactly(model, inputs: list[torch.Tensor], responses: list) -> None:
    statuses = [status for status, _ in responses]
    assert statuses.count(200) == len(inputs), {s: statuses.count(s) for s in set(statuses)}
    wrong = [i for i, (x, (_, y)) in enumerate(zip(inputs, responses, strict=True))
             if not torch.equal(y, reference(model, x))]
    assert not wrong, f"{len(wrong)} answers differ from the unbatched model, e.g. request {wrong[0]}"


def test_a_thousand_requests_from_64_concurrent_clients_are_all_answered_exactly_and_batched(served, client):
    server, model, _ = served
    inputs = [torch.randn(ROWS, 64) for _ in range(1000)]
    responses = asyncio.run(_blast(server.url, inputs, clients=64))
    _check_all_answered_exactly(model, inputs, responses)
    metrics = client.get("/metrics").text
    batches = _sample(metrics, "partita_batch_requests_count")
    rows = _sample(metrics, "partita_batch_rows_sum")
    assert rows >= 1000 * ROWS and batches < 1000  # requests were coalesced: fewer batches than requests
    assert _sample(metrics, "partita_request_latency_seconds_count") >= 1000
    assert 'partita_stage_compute_seconds{devices="' in metrics and "partita_link_bytes_total" in metrics


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


def _wait_for(predicate, timeout_s: float = 60.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _load_in_background(url: str, inputs: list[torch.Tensor], clients: int):
    answered: list[int] = []
    result: dict = {}

    def run() -> None:
        result["responses"] = asyncio.run(_blast(url, inputs, clients, answered))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, answered, result


def _kill(cluster, name: str) -> None:
    cluster.processes[name].send_signal(signal.SIGKILL)


def test_a_worker_killed_mid_load_delays_answers_but_fails_none(served, client):
    server, model, cluster = served
    before = client.get("/api/state").json()
    victim = before["plan"]["stages"][1]["devices"][0]
    inputs = [torch.randn(ROWS, 64) for _ in range(600)]
    thread, answered, result = _load_in_background(server.url, inputs, clients=32)
    _wait_for(lambda: len(answered) >= 100, what="the first answers")
    _kill(cluster, victim)
    thread.join(180)
    _check_all_answered_exactly(model, inputs, result["responses"])
    _wait_for(lambda: client.get("/api/state").json()["plan"]["epoch"] > before["plan"]["epoch"], what="the re-plan")
    state = client.get("/api/state").json()
    assert {d["name"]: d["status"] for d in state["devices"]}[victim] == "down"
    assert victim not in {d for s in state["plan"]["stages"] for d in s["devices"]}
    assert {"failed", "replan", "plan"} <= {e["kind"] for e in state["events"]}
    assert PLAN_LINES and PLAN_LINES[-1] == plan_line(server.service.pipe.plan)  # reported the new plan
    metrics = client.get("/metrics").text
    assert f'partita_device_up{{device="{victim}"}} 0.0' in metrics
    assert 'partita_switches_total{cause="failure"} 1.0' in metrics
    assert 'partita_requests_total{outcome="failed"} 0.0' in metrics


# -- the dashboard in a real browser ------------------------------------------------------------

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_the_dashboard_shows_devices_plan_traffic_and_a_failure_live_in_a_real_browser(served, client):
    if not BROWSER.exists():
        pytest.skip(f"no browser: {BROWSER} is not installed (make test installs Debian's chromium where it can)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    server, model, cluster = served
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(BROWSER), args=BROWSER_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on("console", lambda msg: errors.append(f"console {msg.type}: {msg.text}")
                    if msg.type == "error" else None)
            page.goto(f"{server.url}/?key={KEY}")
            page.wait_for_selector("#devices tbody tr[data-device='a']", timeout=20_000)
            assert page.locator("#devices tbody tr").count() == 4
            assert page.locator("#graph .node").count() == 5  # the source and four devices
            assert page.locator("#plan .stage").count() >= 1
            epoch = int(page.locator("#plan").get_attribute("data-epoch"))
            alive = [s["devices"][0] for s in client.get("/api/state").json()["plan"]["stages"]]
            start = int(page.locator("#requests-total").inner_text())
            inputs = [torch.randn(ROWS, 64) for _ in range(400)]
            thread, answered, result = _load_in_background(server.url, inputs, clients=16)
            page.wait_for_function(f"Number(document.getElementById('requests-total').textContent) > {start}",
                                   timeout=30_000)
            seen = int(page.locator("#requests-total").inner_text())
            _wait_for(lambda: len(answered) >= 100, what="answers before the kill")
            victim = alive[-1]
            _kill(cluster, victim)
            page.wait_for_selector(f"#devices tr[data-device='{victim}'][data-status='down']", timeout=60_000)
            page.wait_for_selector(f"#graph .node[data-device='{victim}'].down", timeout=10_000)
            page.wait_for_function(f"Number(document.getElementById('plan').dataset.epoch) > {epoch}", timeout=60_000)
            placed = [stage.get_attribute("data-devices").split(",") for stage in page.locator("#plan .stage").all()]
            assert placed and all(victim not in devices for devices in placed)
            thread.join(180)
            page.wait_for_function(f"Number(document.getElementById('requests-total').textContent) > {seen}",
                                   timeout=30_000)
            assert page.locator("#events li[data-kind='failed']").count() >= 1
            assert int(page.locator("#throughput-chart").get_attribute("data-points")) >= 2
        finally:
            browser.close()
    _check_all_answered_exactly(model, inputs, result["responses"])
    assert not errors, errors



def test_when_no_plan_can_run_the_server_says_not_ready_and_refuses_with_the_reason(served, client):
    server, _, cluster = served
    for name, process in cluster.processes.items():
        if process.poll() is None:
            _kill(cluster, name)
    _wait_for(lambda: httpx.get(server.url + "/v2/health/ready").status_code == 503, what="not ready")
    refused = client.post("/v2/models/mlp/infer", json=infer_body(torch.randn(ROWS, 64)))
    assert refused.status_code == 503 and "no plan can run" in refused.json()["error"]
    assert httpx.get(server.url + "/v2/health/live").status_code == 200  # the server itself stays up
    state = client.get("/api/state").json()
    assert not state["ready"] and "halted" in {e["kind"] for e in state["events"]}
