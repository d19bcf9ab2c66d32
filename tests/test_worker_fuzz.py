"""A live worker under thousands of random and mutated frames: it answers or drops each, never dies or hangs.

The frames come from the authorized coordinator's key (a stranger's never get past the CURVE
handshake, which tests/test_security.py proves), on the worker's control and data sockets. They
start from valid captured messages whose bytes, frame counts and header fields hypothesis mutates,
plus wholly random frames. Afterwards the worker must still compute a request bit-identically to
the unsplit model.

`PARTITA_FUZZ_EXAMPLES` sets how many messages (default 2,000; a benchmark may push 10,000).
Control commands that legitimately change a worker's state for its coordinator (`drain`,
`emulate`, `route`, `allow`, `unload`, `renumber`, `probe`, `profile`) are not generated as kinds; `load` is,
always with a sha256 that cannot match, so it exercises archive checking without replacing a stage.
"""

from __future__ import annotations

import os
import time

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_security import WorkerProcess, act, next_result, tiny_program

from partita.runtime.wire import blob_tensor, decode, encode

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # workers run one thread

EXAMPLES = int(os.environ.get("PARTITA_FUZZ_EXAMPLES", "2000"))
LIVENESS_EVERY = 250  # messages between pings that must be answered
PING_TIMEOUT_S = 15.0
STATEFUL = {"drain", "emulate", "route", "allow", "unload", "renumber", "probe", "profile"}
KINDS = ["ping", "hello", "stats", "load", "act", "fail", "echo", "credit", "error", "x" * 65, ""]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    proc = WorkerProcess(tmp_path_factory.mktemp("fuzz-worker"), name="fuzz",
                         extra=("--memory", "64MiB", "--max-frame-bytes", str(2**20)))
    proc.deploy()
    yield proc
    proc.close()


def _frames(message: list) -> list[bytes]:
    return [bytes(memoryview(f)) for f in message]


def captured() -> dict[str, list[list[bytes]]]:
    """Valid messages of each socket, as bytes, to mutate."""
    x = torch.randn(2, 16)
    archive = blob_tensor(tiny_program().to_bytes()[:4096])  # a truncated archive keeps examples small
    return {
        "control": [
            _frames(encode("ping", {"id": 1})),
            _frames(encode("hello", {"id": 2})),
            _frames(encode("stats", {"id": 3})),
            _frames(encode("load", {"id": 4, "stage": 7, "sha256": "0" * 64, "memory_bytes": 0.0}, [archive])),
        ],
        "data": [
            _frames(act(x, 1)),
            _frames(encode("echo", {}, [torch.arange(6, dtype=torch.int64)])),
            _frames(encode("fail", {"r": 2, "e": 1, "s": 0, "error": "upstream"})),
            _frames(encode("act", {"r": 3, "e": 1, "s": 0}, [x.to(torch.float16)])),
        ],
    }


_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=12),
              st.binary(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=8,
)
_kinds = st.one_of(st.sampled_from(KINDS), st.text(max_size=70)).filter(lambda k: k not in STATEFUL)


def _mutate(draw, frames: list[bytes]) -> list[bytes]:
    """One to three mutations of bytes, frame counts or header fields."""
    frames = list(frames)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "drop", "repeat", "append", "field", "shape"]))
        i = draw(st.integers(0, len(frames) - 1)) if frames else 0
        if op == "flip" and frames and frames[i]:
            data = bytearray(frames[i])
            for _ in range(draw(st.integers(1, 8))):
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
            frames[i] = bytes(data)
        elif op == "truncate" and frames:
            frames[i] = frames[i][: draw(st.integers(0, len(frames[i])))]
        elif op == "insert" and frames:
            at = draw(st.integers(0, len(frames[i])))
            frames[i] = frames[i][:at] + draw(st.binary(min_size=1, max_size=32)) + frames[i][at:]
        elif op == "drop" and frames:
            del frames[i]
        elif op == "repeat" and frames:
            frames += [frames[i]] * draw(st.sampled_from([1, 2, 255, 300]))
        elif op == "append":
            frames.append(draw(st.binary(max_size=64)))
        elif op in ("field", "shape") and frames:
            frames[0] = _mutate_header(draw, frames[0], op)
    return frames


def _mutate_header(draw, frame: bytes, op: str) -> bytes:
    try:
        head = msgpack.unpackb(frame, raw=False)
    except Exception:  # noqa: BLE001 - an earlier mutation broke the header; leave it broken
        return frame
    if not isinstance(head, dict):
        return frame
    if op == "shape" and isinstance(head.get("t"), list) and head["t"] and isinstance(head["t"][0], dict):
        meta = head["t"][0]
        key = draw(st.sampled_from(["shape", "nbytes", "dtype", "codec", "scale", "extra"]))
        meta[key] = draw(st.one_of(_values, st.lists(st.integers(-2, 2**40), max_size=10),
                                   st.sampled_from(["float32", "int64", "bool", "object", "lz4", "int8"])))
    else:
        where = draw(st.sampled_from(["kind", "v", "h", "t", "h.key", "extra"]))
        if where == "kind":
            head["kind"] = draw(_kinds)
        elif where == "h.key" and isinstance(head.get("h"), dict):
            head["h"][draw(st.sampled_from(["r", "e", "s", "id", "stage", "sha256", "ts", "n"]))] = draw(_values)
        else:
            head[where] = draw(_values)
    try:
        return msgpack.packb(head, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return frame  # msgpack cannot pack the drawn value; keep the previous header


def _drain(sock) -> None:
    """Take whatever replies are waiting (the worker answers or drops; both are fine)."""
    while sock.poll(0):
        sock.recv_multipart(copy=False)


def _drain_sink(worker: WorkerProcess) -> None:
    """Results of fuzzed activations that happened to be valid: take them and return their credits."""
    while worker.sink.poll(0):
        frames = worker.sink.recv_multipart(copy=False)
        if decode(frames[1:]).kind in ("act", "fail"):
            worker.sink.send_multipart([frames[0].bytes, *encode("credit", {"n": 1})])


def test_a_worker_survives_thousands_of_fuzzed_frames_and_still_serves_bit_identically(worker):
    sockets = {
        "control": worker.dealer(worker.info["control"], identity=b"fuzz-control"),
        "data": worker.dealer(worker.info["data"], identity=b"fuzz-data"),
    }
    bases = captured()
    before = worker.counters()
    sent = {"control": 0, "data": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def fuzz(data):
        target = data.draw(st.sampled_from(["control", "data"]))
        if data.draw(st.integers(0, 4)) == 0:
            frames = data.draw(st.lists(st.binary(max_size=256), min_size=1, max_size=4))
        else:
            frames = _mutate(data.draw, data.draw(st.sampled_from(bases[target])))
        if not frames:
            frames = [b""]
        sockets[target].send_multipart(frames)
        sent[target] += 1
        for sock in sockets.values():
            _drain(sock)
        _drain_sink(worker)
        if sum(sent.values()) % LIVENESS_EVERY == 0:
            assert worker.proc.poll() is None, f"the worker died:\n{worker.log.read_text()}"
            assert worker.control.call("ping", timeout_s=PING_TIMEOUT_S).kind == "pong"

    try:
        fuzz()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(s.poll(100) for s in sockets.values()):
            for sock in sockets.values():
                _drain(sock)
            _drain_sink(worker)
    finally:
        for sock in sockets.values():
            sock.close(linger=0)
    after = worker.counters()
    assert sent["control"] > EXAMPLES // 4 and sent["data"] > EXAMPLES // 4
    assert after["malformed"] - before["malformed"] > EXAMPLES // 4, "the fuzzed frames did not reach the worker"
    assert worker.proc.poll() is None, f"the worker died:\n{worker.log.read_text()}"
    assert worker.serves_correctly()
    x = torch.randn(7, 16)
    worker.data.send_multipart(act(x, 99), copy=False)
    from test_security import tiny_model

    assert torch.equal(next_result(worker.sink, request=99).tensors[0], tiny_model()(x))
