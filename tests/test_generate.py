"""Generation across devices: decoder stages with per-sequence KV caches, through real workers on loopback.

Tiny random Llama-, Qwen2- and GPT-2-style models are written with `save_tiny` and loaded as
`hf:PATH`; the reference tokens are transformers' own greedy `generate` on the unsplit model, on
this CPU, in float32, on one torch thread (as the workers run).
"""

from __future__ import annotations

import importlib.util
import json
import signal

import pytest
import torch

pytest.importorskip("transformers")

from zoo import local_cluster  # noqa: E402

import partita  # noqa: E402
from partita.cluster import ClusterSpec, DeviceSpec  # noqa: E402
from partita.errors import (  # noqa: E402
    ModelRefError,
    PlanError,
    RequestError,
    StageFormatError,
    StageInputError,
    WorkerError,
)
from partita.model.decoder import decoder_segments, decoder_spec  # noqa: E402
from partita.model.decoder_stage import CACHE_MISSING, DecoderStage, decoder_stages  # noqa: E402
from partita.model.hf import load_hf, save_tiny  # noqa: E402
from partita.plan import plan as make_plan  # noqa: E402
from partita.plan.decode import DecodePrediction, prefill_profile, simulate_decode  # noqa: E402
from partita.runtime.generate import Generator, Sampling, sample  # noqa: E402
from partita.runtime.supervisor import Supervision  # noqa: E402

NEW_TOKENS = 64
PROMPTS = ("the first words of a long story", "we find our way home after school")
FAMILIES = ("gpt2", "llama", "qwen2")
LAYERS, CONTEXT = 2, 80
HIDDEN = {"gpt2": 32, "llama": 32, "qwen2": 64}  # widths whose random weights give varied greedy tokens
DEVICES = ("a", "b", "c")
SPLIT = [("a", 0, 1), ("b", 1, 2)]  # the deployments the tests share
EOS_FAMILY = "gpt2"  # its EOS id is a token its greedy decoding of PROMPTS[0] reaches (see `models`)
# The llama deployment is the one the kill test fails over: its second stage sits on c, which no
# other shared deployment uses, and it is supervised (loading stage archives keeps a busy 2-core
# machine's workers from answering for a while: a worker is failed after 3 s of silence, not 1).
KILLED = "c"
LLAMA_SPLIT = [("a", 0, 1), (KILLED, 1, 2)]
LLAMA_SUPERVISION = Supervision(detection_s=3.0, drift=False, joins=False)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference(lm, prompt: str, eos: int | None = None) -> list[int]:
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_torch_thread):
    """family -> (directory, loaded model, reference tokens per prompt): transformers' greedy `generate`.

    EOS_FAMILY's EOS id (in memory: its generation config) becomes the first token that its greedy
    decoding of PROMPTS[0] produces at step 8 or later, new in that sequence and absent from
    PROMPTS[1]'s 64 tokens; its references are `generate`'s with that EOS. So PROMPTS[0] ends early
    on EOS and PROMPTS[1] runs its 64 tokens; the other families have no EOS (64 tokens each).
    """
    out = {}
    for family in FAMILIES:
        path = save_tiny(tmp_path_factory.mktemp(family), family, layers=LAYERS, hidden=HIDDEN[family])
        lm = load_hf(f"hf:{path}")
        refs = [reference(lm, p) for p in PROMPTS]
        assert all(len(set(r)) >= 8 for r in refs), f"{family}'s greedy tokens barely vary: {refs}"
        if family == EOS_FAMILY:
            eos = next(t for k, t in enumerate(refs[0]) if 8 <= k < NEW_TOKENS - 8 and t not in refs[0][:k]
                       and t not in refs[1])
            lm.model.generation_config.eos_token_id = eos
            refs = [reference(lm, p, eos) for p in PROMPTS]
            assert refs[0][-1] == eos and len(refs[0]) < NEW_TOKENS and len(refs[1]) == NEW_TOKENS
        out[family] = (path, lm, refs)
    return out


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(DEVICES, speed=1.0, latency="0.1ms") as local:
        yield local


@pytest.fixture(scope="module")
def deployed(models, cluster):
    """family -> its deployment over two stages (made on first use, shared by the module's tests).

    The deployments run side by side on the workers (`replace=False`)."""
    made: dict[str, Generator] = {}

    def get(family: str):
        # `partita generate` (the CLI test) deploys as the command does, closing the cluster's pipelines
        if family not in made or made[family].pipe not in list(cluster.pipelines):
            llama = family == "llama"
            made[family] = partita.deploy_generator(
                models[family][1], cluster, context=CONTEXT, sequences=2, stages=LLAMA_SPLIT if llama else SPLIT,
                supervise=LLAMA_SUPERVISION if llama else False, replace=False)
        return made[family]

    yield get
    for generator in made.values():
        generator.close()


# --------------------------------------------------------------------------------- through workers

@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_across_workers_equal_the_unsplit_models_generate(models, deployed, family):
    _, lm, expected = models[family]
    generator = deployed(family)
    results = generator.generate_many(list(PROMPTS), Sampling(max_new_tokens=NEW_TOKENS))
    streamed = [t.token_id for t in generator.generate(PROMPTS[1], max_new_tokens=8, stream=True)]
    assert [r.token_ids for r in results] == expected
    assert len(expected[1]) == NEW_TOKENS  # 64 tokens compared on every architecture
    assert streamed == expected[1][:8]
    assert results[1].finish == "length" and all(r.rebuilds == 0 for r in results)
    if family == EOS_FAMILY:
        assert generator.spec.eos_token_ids == (expected[0][-1],)
        assert results[0].finish == "eos" and len(results[0].token_ids) < NEW_TOKENS
    else:
        assert results[0].finish == "length"


@pytest.mark.slow
def test_a_sequence_ends_on_its_eos_token(models, deployed):
    """EOS_FAMILY's EOS id is a token its greedy decoding reaches at step k >= 8 (`models`): generation
    stops there, with the EOS token last and finish "eos"; without it the sequence would run on."""
    _, lm, expected = models[EOS_FAMILY]
    eos = expected[0][-1]
    result = deployed(EOS_FAMILY).generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
    assert result.finish == "eos" and result.token_ids == expected[0]
    assert 8 < len(result.token_ids) < NEW_TOKENS and eos not in result.token_ids[:-1]
    assert len(reference(lm, PROMPTS[0])) == NEW_TOKENS  # the unsplit model without an EOS goes on past it


@pytest.mark.slow
def test_a_worker_killed_mid_decoding_loses_no_sequence_and_changes_no_token(models, deployed, cluster):
    _, lm, expected = models["llama"]
    generator = deployed("llama")  # supervised, its second stage (layer 1 and its caches) on KILLED
    assert any(KILLED in stage.devices for stage in generator.plan.stages)
    try:
        tokens: dict[int, list[int]] = {0: [], 1: []}
        results = {}
        killed = False
        for event in generator.stream_many(list(PROMPTS), Sampling(max_new_tokens=NEW_TOKENS)):
            if hasattr(event, "token_id"):
                tokens[event.sequence].append(event.token_id)
                if not killed and len(tokens[0]) + len(tokens[1]) == 20:
                    cluster.processes[KILLED].send_signal(signal.SIGKILL)
                    killed = True
            else:
                results[len(results)] = event
        plan_after = generator.plan
    finally:
        cluster.add_worker(DeviceSpec(KILLED, 1e9, 2**30, speed=1.0))
    assert killed
    assert [results[i].token_ids for i in range(2)] == expected
    assert [tokens[0], tokens[1]] == expected  # streamed once each, in order: no token lost or repeated
    assert sum(r.rebuilds for r in results.values()) >= 1
    assert all(KILLED not in stage.devices for stage in plan_after.stages)


@pytest.mark.slow
def test_cli_generate_json_prints_the_contracted_fields(models, cluster, tmp_path, monkeypatch, capsys):
    """The command on the module's workers: the cluster file's devices are those of `cluster`.

    Opening a cluster file (LocalCluster or real workers) is `open_cluster`, shared with `partita
    run` and tested there; here it hands back the running cluster to spare starting three workers.
    """
    import contextlib

    import partita.runtime.connect
    import partita.runtime.generate
    from partita.cli import main

    monkeypatch.setattr(partita.runtime.connect, "open_cluster", lambda *a, **k: contextlib.nullcontext(cluster))
    warmups = []
    generate_many = partita.runtime.generate.Generator.generate_many

    def recorded(self, prompts, sampling=partita.runtime.generate.Sampling()):
        warmups.append((list(prompts), sampling.max_new_tokens))
        return generate_many(self, prompts, sampling)

    monkeypatch.setattr(partita.runtime.generate.Generator, "generate_many", recorded)
    path, _, expected = models["gpt2"]
    with pytest.raises(SystemExit) as info:
        main(["generate", f"hf:{path}", "--cluster", str(tmp_path / "unused.yaml"), "--prompt", PROMPTS[1],
              "--max-new-tokens", "12", "--context", "64", "--json"])
    out, err = capsys.readouterr()
    assert info.value.code in (0, None), err
    assert warmups == [([PROMPTS[1]], 2)], "the workers are warmed by 2 untimed tokens of the prompt"
    assert "warmed the workers" in err
    printed = json.loads(out.strip().splitlines()[-1])
    assert {"token_ids", "text", "plan", "ttft_s", "per_token_s", "tokens_per_s"} <= set(printed)
    assert printed["token_ids"] == expected[1][:12]
    assert printed["text"] == models["gpt2"][1].tokenizer.decode(expected[1][:12])
    assert [d for stage in printed["plan"]["stages"] for d in stage["devices"]] <= list(DEVICES)
    assert printed["ttft_s"] > 0 and printed["per_token_s"] > 0 and printed["tokens_per_s"] > 0


def test_cli_generate_refuses_a_model_that_is_not_hf_with_one_line_and_exit_2(capsys, tmp_path):
    from partita.cli import main

    with pytest.raises(SystemExit) as info:
        main(["generate", "torchvision:resnet18", "--cluster", str(tmp_path / "c.yaml"), "--prompt", "hello world"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "hf:PATH" in err and "Traceback" not in err


# --------------------------------------------------------------------------------- a stage in process

@pytest.fixture(scope="module")
def gpt2_stage(models):
    _, lm, _ = models["gpt2"]
    spec = decoder_spec(lm.model, context=32, name="gpt2")
    (stage,) = decoder_stages(lm.model, spec, [(0, LAYERS)], sequences=2)
    return DecoderStage.from_bytes(stage.to_bytes(), expected_sha256=stage.sha256)


def test_a_decode_step_is_idempotent_and_a_lost_cache_is_named(gpt2_stage):
    prompt = torch.tensor([[5, 6, 7, 8]])
    logits, _ = gpt2_stage.run(prompt, torch.tensor([100, 0]))
    token = torch.tensor([[int(logits.argmax())]])
    first, _ = gpt2_stage.run(token, torch.tensor([100, 4]))
    again, _ = gpt2_stage.run(token, torch.tensor([100, 4]))  # a replayed step overwrites position 4
    assert torch.equal(first, again) and gpt2_stage.holds(100) == 5
    with pytest.raises(StageInputError, match=CACHE_MISSING):
        gpt2_stage.run(token, torch.tensor([101, 4]))  # a sequence this stage never saw
    gpt2_stage.run(prompt, torch.tensor([102, 0]))
    gpt2_stage.run(prompt, torch.tensor([103, 0]))  # two slots: sequence 100's is reused
    with pytest.raises(StageInputError, match=CACHE_MISSING):
        gpt2_stage.run(token, torch.tensor([100, 5]))


def test_decoder_bundles_are_checked_before_loading(gpt2_stage):
    import io
    import zipfile

    data = gpt2_stage.to_bytes()
    with pytest.raises(StageFormatError, match="sha256"):
        DecoderStage.from_bytes(data, expected_sha256="0" * 64)
    extra = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(extra, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
        dst.writestr("payload.pkl", b"\x80\x04")
    with pytest.raises(StageFormatError, match="exactly"):
        DecoderStage.from_bytes(extra.getvalue())


def test_an_emulated_device_paces_each_decoder_step_by_its_reference_time_at_its_size(gpt2_stage):
    """Prefill and decode steps take reference / speed on an emulated device, whatever this host's load.

    A decode step at position 4 is paced on the line through the reference points (10, 0.2 s) and
    (1, 0.02 s): 0.08 s, not the anchor's 0.2 s, nor the few milliseconds it really took here.
    """
    import queue

    from partita.runtime.emulation import reference_at
    from partita.runtime.executor import Done, Job, StageExecutor
    from partita.runtime.protocol import Load

    steps = {"prefill": ((4.0, 0.12), (2.0, 0.06)), "decode": ((10.0, 0.2), (1.0, 0.02))}
    assert reference_at(steps["decode"], 10) == 0.2 and reference_at(steps["decode"], 4) == pytest.approx(0.08)
    assert reference_at(((10.0, 0.2), (1.0, 0.3)), 4) == 0.2  # noisy points: never faster for a larger step
    sent = Load(3, "0" * 64, None, reference_steps=steps)
    assert Load.parse(sent.header(), ()).reference_steps == steps
    with pytest.raises(WorkerError, match="reference steps"):
        Load.parse({**sent.header(), "reference_steps": {"decode": [[1, -2.0]]}}, ())
    done: queue.Queue[Done] = queue.Queue()
    executor = StageExecutor(torch.device("cpu"), capacity_bytes=2**30, on_taken=lambda job: None,
                             on_done=done.put, speed=0.5, dilation=1.0)
    executor.load(0, gpt2_stage, memory_bytes=0.0, reference_host_s=None, owner="test", reference_steps=steps)
    executor.start()
    try:
        executor.submit(Job(0, 1, 1, (torch.tensor([[5, 6, 7, 8]]), torch.tensor([200, 0])), b"peer", 0.0))
        prefill = done.get(timeout=60)
        token = torch.tensor([[int(prefill.outputs[0].argmax())]])
        executor.submit(Job(0, 2, 1, (token, torch.tensor([200, 4])), b"peer", 0.0))
        decode = done.get(timeout=60)
    finally:
        executor.stop()
    assert prefill.error is None and decode.error is None
    assert prefill.host_s < 0.12 and prefill.device_s >= 0.12 / 0.5  # paced: reference / speed
    assert 0.08 / 0.5 <= decode.device_s < 0.2 / 0.5


def test_a_decoder_stage_bundle_carries_each_weight_once(gpt2_stage):
    """The prefill and decode programs share one copy of the stage's tensors, on the wire and in memory.

    Both archives are hollow (placeholders of one element per tensor); weights.safetensors holds
    each tensor once, so the tensor bytes in the whole bundle are one copy of the stage's.
    """
    import io
    import re
    import zipfile

    from safetensors.torch import load, save

    data = gpt2_stage.to_bytes()
    archive_payload = 0
    with zipfile.ZipFile(io.BytesIO(data)) as bundle:
        for name in ("prefill.pt2", "decode.pt2"):
            with zipfile.ZipFile(io.BytesIO(bundle.read(name))) as archive:
                archive_payload += sum(i.file_size for i in archive.infolist()
                                       if re.search(r"/data/(weights/weight|constants/tensor)_\d+$", i.filename))
        stored = load(bundle.read("weights.safetensors")) if "weights.safetensors" in bundle.namelist() else {}
        parts = {name: bundle.read(name) for name in bundle.namelist()}
    programs = (gpt2_stage.prefill.exported_program, gpt2_stage.decode.exported_program)
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for ep in programs
            for t in (*ep.state_dict.values(), *ep.constants.values()) if isinstance(t, torch.Tensor)}
    one_copy = sum(held.values())
    assert one_copy >= gpt2_stage.prefill.param_bytes > 100_000
    stored_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    assert archive_payload + stored_bytes < one_copy + 1024  # not one copy per program
    assert stored_bytes == one_copy and archive_payload < 1024  # the archives hold one-element placeholders
    prefill, decode = (dict(ep.state_dict) for ep in programs)
    assert prefill.keys() == decode.keys()
    assert all(prefill[k].data_ptr() == decode[k].data_ptr() for k in prefill)  # one copy in memory too
    lacking = io.BytesIO()
    with zipfile.ZipFile(lacking, "w") as dst:
        for name, content in parts.items():
            dst.writestr(name, save({}) if name == "weights.safetensors" else content)
    with pytest.raises(StageFormatError, match="lacks"):
        DecoderStage.from_bytes(lacking.getvalue())


def test_an_archive_larger_than_a_frame_travels_in_frames_within_the_limit(monkeypatch):
    """A stage of a large model (SmolLM2-135M whole: 519 MiB) is more than one 512 MiB frame: it goes in several."""
    from partita.runtime import protocol
    from partita.runtime.protocol import commands
    from partita.runtime.wire import Limits, WireError, blob_bytes, blob_tensor, decode, encode

    monkeypatch.setattr(commands, "ARCHIVE_FRAME_BYTES", 1000)
    data = bytes(range(256)) * 10  # 2560 bytes: three frames of at most 1000
    limits = Limits(max_frame_bytes=1000)
    for command in (protocol.Load(0, "0" * 64, blob_tensor(data)), protocol.Stash("0" * 64, blob_tensor(data))):
        frames = encode(command.KIND, command.header(), command.tensors())
        assert len(frames) == 4
        received = protocol.command_from(decode([bytearray(f) for f in frames], limits=limits))
        assert blob_bytes(received.archive) == data
    with pytest.raises(WireError, match="limit"):  # one frame over the limit is still refused
        decode([bytearray(f) for f in encode("load", {"stage": 0, "sha256": "0" * 64}, (blob_tensor(data),))],
               limits=limits)
    with pytest.raises(WorkerError, match="uint8"):
        protocol.Load.parse({"stage": 0, "sha256": "0" * 64}, (blob_tensor(data), torch.zeros(3)))


# --------------------------------------------------------------------------------- sampling, planning

def test_sampling_is_greedy_at_zero_temperature_and_reproducible_with_a_seed():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert sample(logits, Sampling(temperature=0.0), torch.Generator()) == 1
    draws = [[sample(logits, Sampling(temperature=1.5), torch.Generator().manual_seed(7)) for _ in range(5)]
             for _ in range(2)]
    assert draws[0] == draws[1]
    nucleus = {sample(logits, Sampling(temperature=1.0, top_p=0.3), torch.Generator().manual_seed(s)) for s in range(20)}
    assert nucleus == {1}  # token 1 alone holds more than 30% of the mass
    with pytest.raises(RequestError, match="top_p"):
        Sampling(top_p=0.0).check()


def test_a_stages_memory_includes_the_kv_cache_of_every_sequence(models):
    _, lm, _ = models["llama"]
    spec = decoder_spec(lm.model, context=64, name="llama")
    one, eight = decoder_segments(spec, lm.model, sequences=1), decoder_segments(spec, lm.model, sequences=8)
    per_layer = 2 * spec.kv_heads * spec.head_dim * 64 * 4  # keys and values, float32, 64 positions
    assert [b.param_bytes - a.param_bytes for a, b in zip(one, eight, strict=True)] == [7 * per_layer] * LAYERS
    weights = sum(s.param_bytes for s in one) - LAYERS * per_layer + max(s.act_bytes for s in one)
    room = ClusterSpec.from_dict({"source": "client", "devices": [
        {"name": "small", "flops_per_s": 1e9, "memory_bytes": int(weights + 10 * per_layer)}],
        "links": {"default": {"bandwidth": "1GB/s", "latency": "0.1ms"}}})
    make_plan({"model": "m", "input_bytes": 8, "segments": [s.__dict__ for s in one]}, room)
    with pytest.raises(PlanError):
        make_plan({"model": "m", "input_bytes": 8, "segments": [s.__dict__ for s in eight]}, room)


def test_the_decode_simulator_reaches_the_cost_models_latency_and_throughput():
    compute = [0.010, 0.030, 0.020]
    hops = [(0.001, 0.002), (0.0005, 0.002), (0.0005, 0.002), (0.002, 0.002)]
    prediction = DecodePrediction(ttft_s=0.0, per_token_s=sum(compute) + sum(busy + delay for busy, delay in hops),
                                  period_s=max(compute), sequences=8, prompt_tokens=1)
    alone = simulate_decode((compute, hops), (compute, hops), sequences=1, tokens=50)
    assert alone.per_token_s == pytest.approx(prediction.per_token_s)
    assert alone.tokens_per_s == pytest.approx(prediction.tokens_per_s_at(1), rel=0.05)
    many = simulate_decode((compute, hops), (compute, hops), sequences=8, tokens=200)
    assert many.tokens_per_s == pytest.approx(prediction.tokens_per_s_at(8), rel=0.05)
    assert prediction.tokens_per_s_at(8) == pytest.approx(1 / 0.030)


def test_the_decode_cost_model_and_simulator_pay_the_per_hop_overhead_on_every_hop():
    """Two stages (a: 10 ms, b: 20 ms per step) over 1 MB/s, 1 ms links, h = 0.5 ms; figures by hand."""
    from partita.plan import predict
    from partita.plan.decode import chain_terms, predict_decode

    profile = {"model": "m", "input_bytes": 8, "segments": [
        {"name": "s0", "flops": 10**7, "param_bytes": 0, "act_bytes": 0, "out_bytes": 1000},
        {"name": "s1", "flops": 2 * 10**7, "param_bytes": 0, "act_bytes": 0, "out_bytes": 4000}]}
    two = ClusterSpec.from_dict({"source": "client", "devices": [
        {"name": n, "flops_per_s": 1e9, "memory_bytes": 2**30} for n in ("a", "b")],
        "links": {"default": {"bandwidth": "1MB/s", "latency": "1ms"}}})
    plan = predict(profile, two, [("a", 0, 1), ("b", 1, 2)])
    h = 0.0005
    without = predict_decode(profile, two, plan, {}, {}, prompt_tokens=4, sequences=8)
    withh = predict_decode(profile, two, plan, {}, {}, prompt_tokens=4, sequences=8, hop_overhead_s=h)
    # hops: client->a 8 B (1.008 ms), a->b 1000 B (2 ms), b->client 4000 B (5 ms); 3 hops pay h
    assert without.per_token_s == pytest.approx(0.010 + 0.020 + 0.001008 + 0.002 + 0.005)
    assert withh.per_token_s == pytest.approx(0.038008 + 3 * h)
    assert (without.period_s, withh.period_s) == pytest.approx((0.020, 0.020 + h))  # stage b, with its h
    # prefill of 4 tokens: 40 + 80 ms; 32 B, 4000 B, and the last stage's one position (4000 B)
    assert withh.ttft_s == pytest.approx(0.040 + 0.080 + 0.001032 + 0.005 + 0.005 + 3 * h)
    assert withh.tokens_per_s_at(8) == pytest.approx(1 / 0.0205)
    assert withh.tokens_per_s_at(1) == pytest.approx(1 / 0.039508)
    terms = chain_terms(profile, two, plan, None, hop_overhead_s=h)
    assert terms[0] == pytest.approx([0.0105, 0.0205])
    prefill = chain_terms(prefill_profile(profile, 4), two, plan, None, hop_overhead_s=h)
    alone = simulate_decode(terms, prefill, sequences=1, tokens=20)
    assert alone.per_token_s == pytest.approx(withh.per_token_s)
    assert alone.ttft_s == pytest.approx(withh.ttft_s)
    many = simulate_decode(terms, prefill, sequences=8, tokens=200)
    assert many.tokens_per_s == pytest.approx(withh.tokens_per_s_at(8), rel=0.05)


def test_partita_simulate_runs_an_hf_models_decode_plan_through_the_decode_simulator(models, capsys):
    from pathlib import Path

    from partita.cli import main

    path, _, _ = models["llama"]
    home_edge = Path(__file__).resolve().parents[1] / "examples" / "clusters" / "home-edge.yaml"
    with pytest.raises(SystemExit) as info:
        main(["simulate", f"hf:{path}", "--cluster", str(home_edge), "--json", "--context", "32",
              "--sequences", "4", "--max-new-tokens", "100", "--prompt-tokens", "8", "--planner", "memory"])
    out, err = capsys.readouterr()
    assert info.value.code in (0, None), err
    printed = json.loads(out)
    predicted, simulated = printed["predicted"], printed["simulated"]
    assert [(s["start"], s["end"]) for s in printed["plan"]["stages"]] == [(0, 1), (1, 2)]  # laptop, jetson
    assert predicted["sequences"] == 4 and predicted["prompt_tokens"] == 8
    assert simulated["one"]["per_token_s"] == pytest.approx(predicted["per_token_s"])
    assert simulated["one"]["ttft_s"] == pytest.approx(predicted["ttft_s"])
    assert simulated["many"]["tokens_per_s"] == pytest.approx(predicted["tokens_per_s"], rel=0.1)


def test_an_hf_reference_that_is_not_a_model_directory_is_one_clear_error(tmp_path):
    with pytest.raises(ModelRefError, match="not a directory"):
        load_hf(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(ModelRefError, match="config.json"):
        load_hf(f"hf:{tmp_path}")
    with pytest.raises(ModelRefError, match="not a file"):
        load_hf(f"hf:{tmp_path / 'missing.gguf'}")
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    # the gguf extra is not in dev (CI's venv lacks it): without it, the one line says how to install it
    expected = "cannot load model" if importlib.util.find_spec("gguf") else r"needs the gguf package: pip install"
    with pytest.raises(ModelRefError, match=expected):
        load_hf(f"hf:{tmp_path / 'broken.gguf'}")


def test_the_gguf_reader_draws_no_progress_bar_while_partita_loads_and_its_bar_comes_back_after(capsys):
    """transformers' GGUF reader calls tqdm directly (disable_progress_bar does not reach it)."""
    from transformers import modeling_gguf_pytorch_utils as reader

    from partita.model.hf import quiet_gguf_reader

    with quiet_gguf_reader():
        list(reader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "de-quantizing" not in capsys.readouterr().err
    list(reader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "de-quantizing" in capsys.readouterr().err  # restored: only partita's own loads are quiet



# --------------------------------------------------------------------------------- OpenAI-compatible API

@pytest.mark.slow
def test_openai_completions_and_chat_stream_the_same_tokens_as_generate(models, deployed):
    """On EOS_FAMILY's deployment: PROMPTS[0] ends on its EOS token, which the API calls "stop"."""
    from starlette.testclient import TestClient

    from partita.serve.openai import create_openai_app

    _, lm, expected = models[EOS_FAMILY]
    client = TestClient(create_openai_app(deployed(EOS_FAMILY), "tiny", api_key="k"))
    auth = {"Authorization": "Bearer k"}
    assert client.post("/v1/completions", json={"prompt": PROMPTS[0]}).status_code == 401
    full = client.post("/v1/completions", headers=auth,
                       json={"prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0}).json()
    with client.stream("POST", "/v1/completions", headers=auth,
                       json={"prompt": PROMPTS[0], "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True}) as sse:
        lines = [line for line in sse.iter_lines() if line.startswith("data: ")]
    chat = client.post("/v1/chat/completions", headers=auth,
                       json={"messages": [{"role": "user", "content": "the"}], "max_tokens": 3}).json()
    bad = client.post("/v1/completions", headers=auth, json={"prompt": PROMPTS[0], "top_p": 2})
    assert full["choices"][0]["text"] == lm.tokenizer.decode(expected[1][:10])
    assert full["usage"]["completion_tokens"] == 10 and full["choices"][0]["finish_reason"] == "length"
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == lm.tokenizer.decode(expected[0])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"  # PROMPTS[0] ends on EOS
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] == 3
    assert bad.status_code == 400 and "top_p" in bad.json()["error"]["message"]
