"""The serving pieces without workers: model signatures, the v2 infer codec, the dynamic batcher, and
the whole HTTP stack over the unsplit model in this process (`LocalModel`) for a model with two
inputs and a dict of outputs.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future

import httpx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from zoo import TwoInputDict, mlp

from partita.errors import InferRequestError, RequestError, ServeError
from partita.serve.batcher import DynamicBatcher
from partita.serve.local import LocalModel
from partita.serve.protocol import encode_response, parse_request
from partita.serve.server import InferenceServer, ServeOptions, Service, check_bind
from partita.serve.signature import DATATYPES, read_signature

# -- signatures ---------------------------------------------------------------------------------


def test_a_signature_names_inputs_after_forward_and_outputs_after_dict_keys():
    torch.manual_seed(0)
    model = TwoInputDict().eval()
    signature = read_signature(model, (torch.randn(2, 3, 16, 16), torch.randn(2, 10)))
    assert [m.to_json() for m in signature.inputs] == [
        {"name": "image", "datatype": "FP32", "shape": [-1, 3, 16, 16]},
        {"name": "features", "datatype": "FP32", "shape": [-1, 10]},
    ]
    assert {m.name for m in signature.outputs} == {"logits", "embedding"}
    assert all(m.shape[0] == -1 for m in signature.outputs)


def test_a_model_whose_outputs_drop_the_batch_dimension_cannot_be_served():
    class Total(torch.nn.Module):
        def forward(self, x):
            return x.sum()

    with pytest.raises(ServeError, match="batch dimension"):
        read_signature(Total(), (torch.randn(4, 3),))


# -- the infer codec ------------------------------------------------------------------------------

SIGNATURE = read_signature(mlp(), (torch.randn(2, 64),))


def _body(x: torch.Tensor, **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.tolist()}], **extra}).encode()


def test_json_data_may_be_flat_or_nested():
    x = torch.randn(3, 64)
    nested = parse_request(_body(x), None, SIGNATURE, max_rows=8)
    flat = json.loads(_body(x))
    flat["inputs"][0]["data"] = x.flatten().tolist()
    assert nested.rows == 3 and torch.equal(nested.inputs[0], x)
    assert torch.equal(parse_request(json.dumps(flat).encode(), None, SIGNATURE, max_rows=8).inputs[0], x)


@settings(max_examples=40, deadline=None)
@given(datatype=st.sampled_from(sorted(DATATYPES)), rows=st.integers(1, 4), cols=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_binary_tensors_round_trip_bit_for_bit_in_every_datatype(datatype, rows, cols, seed):
    from partita.serve.signature import ModelSignature, TensorMeta

    dtype = DATATYPES[datatype]
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=generator) * 50).to(dtype)
    meta = TensorMeta("x", datatype, (-1, cols))
    signature = ModelSignature((meta,), (TensorMeta("y", datatype, (-1, cols)),), None, None)
    raw = _raw(x, datatype)
    header = json.dumps({"inputs": [{"name": "x", "shape": [rows, cols], "datatype": datatype,
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    request = parse_request(header + raw, str(len(header)), signature, max_rows=4)
    assert request.inputs[0].dtype == dtype and torch.equal(request.inputs[0], x)
    body, headers = encode_response("m", request, signature, (x,))
    length = int(headers["Inference-Header-Content-Length"])
    [out] = json.loads(body[:length])["outputs"]
    assert out["parameters"]["binary_data_size"] == len(raw) and body[length:] == raw


def _raw(x: torch.Tensor, datatype: str) -> bytes:
    if datatype == "BF16":
        return x.view(torch.int16).numpy().astype("<i2").tobytes()
    return x.numpy().tobytes()


def test_outputs_come_back_as_json_unless_binary_is_asked_for():
    x = torch.randn(2, 64)
    request = parse_request(_body(x, id="7"), None, SIGNATURE, max_rows=8)
    body, headers = encode_response("mlp", request, SIGNATURE, (torch.ones(2, 5),))
    assert headers == {} and json.loads(body) == {
        "model_name": "mlp", "id": "7",
        "outputs": [{"name": "OUTPUT__0", "datatype": "FP32", "shape": [2, 5], "data": [1.0] * 10}]}
    binary = parse_request(_body(x, parameters={"binary_data_output": True}), None, SIGNATURE, max_rows=8)
    assert binary.outputs == (("OUTPUT__0", True),)


@pytest.mark.parametrize("body, words", [
    (b"\xff\xfe", "not valid JSON"),
    (json.dumps({"inputs": [{"name": "input", "shape": [0, 64], "datatype": "FP32", "data": []}]}).encode(),
     "at least 1"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32"}]}).encode(),
     "neither data nor"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [[[1]] * 63]}]}).encode(),
     "needs 64"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [None] * 64}]}).encode(),
     "FP32 values"),
    (json.dumps({"inputs": [{"name": "input", "shape": "1,64", "datatype": "FP32", "data": []}]}).encode(),
     "expected [-1, 64]"),
    (json.dumps({"inputs": [1]}).encode(), "must be a JSON object"),
])
def test_malformed_requests_raise_one_clear_error(body, words):
    with pytest.raises(InferRequestError) as caught:
        parse_request(body, None, SIGNATURE, max_rows=8)
    assert words in str(caught.value)


def test_deeply_nested_data_is_refused_without_recursion():
    data = "[" * 200 + "0" + "]" * 200
    body = ('{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ' + data + "}]}").encode()
    with pytest.raises(InferRequestError, match="list of numbers"):
        parse_request(body, None, SIGNATURE, max_rows=8)
    with pytest.raises(InferRequestError, match="too deeply"):
        parse_request(b"[" * 100_000 + b"]" * 100_000, None, SIGNATURE, max_rows=8)


def test_public_binds_need_a_key_or_an_explicit_no_auth():
    check_bind("127.0.0.1", None, False)
    check_bind("::1", None, False)
    check_bind("0.0.0.0", "k", False)
    check_bind("0.0.0.0", None, True)
    with pytest.raises(ServeError, match="--api-key"):
        check_bind("0.0.0.0", None, False)
    with pytest.raises(ServeError, match="contradict"):
        check_bind("127.0.0.1", "k", True)


# -- the batcher --------------------------------------------------------------------------------

class Recorder:
    """A batch submitter that runs the model here and remembers each batch's rows."""

    def __init__(self, model, delay_s: float = 0.0) -> None:
        self.model, self.delay_s, self.batches = model, delay_s, []

    def __call__(self, inputs):
        self.batches.append(inputs[0].shape[0])
        future: Future = Future()

        def run() -> None:
            time.sleep(self.delay_s)
            with torch.no_grad():
                future.set_result((self.model(*inputs),))

        threading.Thread(target=run).start()
        return future


def test_requests_within_the_window_share_a_batch_and_get_their_own_rows_back():
    torch.set_num_threads(1)
    model = mlp()
    recorder = Recorder(model)
    batcher = DynamicBatcher(recorder, max_rows=16, window_s=0.2)
    inputs = [torch.randn(4, 64) for _ in range(6)]
    futures = [batcher.submit((x,), 4) for x in inputs]
    outputs = [f.result(10)[0] for f in futures]
    assert batcher.close(10)
    assert recorder.batches == [16, 8]  # 4 requests fill the first batch; the 5th starts the next
    with torch.no_grad():
        assert all(torch.equal(y, model(x)) for y, x in zip(outputs, inputs, strict=True))


def test_while_the_pipeline_is_full_requests_wait_and_leave_as_one_full_batch():
    recorder = Recorder(mlp(), delay_s=0.3)
    batcher = DynamicBatcher(recorder, max_rows=16, window_s=0.0, max_batches=1)
    first = batcher.submit((torch.randn(2, 64),), 2)
    time.sleep(0.1)  # the first batch (one request) is in the pipeline; the next ones must wait for it
    rest = [batcher.submit((torch.randn(2, 64),), 2) for _ in range(8)]
    [f.result(10) for f in [first, *rest]]
    batcher.close(10)
    assert recorder.batches == [2, 16]


def test_max_rows_one_sends_every_request_alone():
    recorder = Recorder(mlp())
    batcher = DynamicBatcher(recorder, max_rows=1, window_s=0.05)
    futures = [batcher.submit((torch.randn(1, 64),), 1) for _ in range(5)]
    [f.result(10) for f in futures]
    batcher.close(10)
    assert recorder.batches == [1] * 5
    with pytest.raises(RequestError, match="cannot fit"):
        batcher.submit((torch.randn(2, 64),), 2)


def test_a_failed_batch_fails_each_of_its_requests_and_close_waits_for_answers():
    def failing(inputs):
        future: Future = Future()
        threading.Timer(0.1, lambda: future.set_exception(RequestError("stage 1 failed"))).start()
        return future

    batcher = DynamicBatcher(failing, max_rows=8, window_s=0.05)
    futures = [batcher.submit((torch.randn(2, 64),), 2) for _ in range(3)]
    assert batcher.close(10)  # returns only once every request has its answer
    assert all(isinstance(f.exception(0), RequestError) for f in futures)
    with pytest.raises(RequestError, match="shutting down"):
        batcher.submit((torch.randn(2, 64),), 2)


# -- the HTTP stack over the unsplit model --------------------------------------------------------

def test_two_inputs_and_dict_outputs_follow_the_models_structure_over_http():
    torch.manual_seed(0)
    model = TwoInputDict().eval()
    example = (torch.randn(8, 3, 16, 16), torch.randn(8, 10))
    local = LocalModel(model, example)
    service = Service(local, read_signature(model, example), local.cluster_spec,
                      ServeOptions(name="two", port=0, max_rows=8, window_s=0.01, poll_s=0.2))
    image, features = torch.randn(2, 3, 16, 16), torch.randn(2, 10)
    raw = features.numpy().tobytes()
    header = json.dumps({
        "inputs": [
            {"name": "image", "shape": [2, 3, 16, 16], "datatype": "FP32", "data": image.flatten().tolist()},
            {"name": "features", "shape": [2, 10], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}},
        ],
        "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}, {"name": "logits"}],
    }).encode()
    with InferenceServer(service) as server:
        response = httpx.post(f"{server.url}/v2/models/two/infer", content=header + raw,
                              headers={"Inference-Header-Content-Length": str(len(header))})
        state = httpx.get(f"{server.url}/api/state").json()
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    embedding_meta, logits_meta = json.loads(response.content[:length])["outputs"]
    embedding = torch.from_numpy(np.frombuffer(response.content[length:], dtype="<f4").copy()).reshape(2, 32)
    logits = torch.tensor(logits_meta["data"]).reshape(logits_meta["shape"])
    with torch.no_grad():
        expected = model(image, features)
    assert torch.equal(embedding, expected["embedding"]) and torch.equal(logits, expected["logits"])
    assert embedding_meta["parameters"]["binary_data_size"] == 2 * 32 * 4
    assert state["plan"]["planner"] == "single-process" and state["devices"][0]["name"] == "local"
