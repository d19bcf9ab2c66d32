"""capture: segments follow the model's blocks; sizes and FLOPs are right; failures are named."""

from __future__ import annotations

import json
import re

import pytest
import torch
import zoo

from partita.errors import CaptureError
from partita.model import capture, split
from partita.model.segments import SegmentationLimits


@pytest.mark.slow
def test_resnet50_segments_are_stem_16_bottlenecks_head():
    _, _, graph = zoo.captured("resnet50")
    names = [s.name for s in graph.segments]
    blocks = [f"layer{i}.{j}" for i, n in zip((1, 2, 3, 4), (3, 4, 6, 3), strict=True) for j in range(n)]
    assert names == ["stem", *blocks, "head"]


@pytest.mark.slow
def test_resnet50_totals_match_its_known_size():
    model, inputs, graph = zoo.captured("resnet50")
    # 4.09 GMACs per 224x224 image (torchvision's model card), counted as 2 FLOPs per MAC.
    gflops_per_image = sum(s.flops for s in graph.segments) / inputs[0].shape[0] / 1e9
    assert 8.1 < gflops_per_image < 8.3
    read_state = [t for name, t in model.state_dict().items() if not name.endswith("num_batches_tracked")]
    assert sum(s.param_bytes for s in graph.segments) == sum(t.numel() * t.element_size() for t in read_state)
    assert graph.input_bytes == inputs[0].numel() * 4
    assert graph.segments[-1].out_bytes == inputs[0].shape[0] * 1000 * 4


@pytest.mark.slow
def test_vit_segments_are_stem_12_encoder_layers_head():
    _, _, graph = zoo.captured("vit_b_16")
    names = [s.name for s in graph.segments]
    assert names[0] == "stem" and names[-1] == "head"
    assert names[1:-1] == [f"encoder.layers.encoder_layer_{i}" for i in range(12)]


def test_transformer_encoder_gives_one_segment_per_layer():
    _, _, graph = zoo.captured("transformer")
    layers = [s.name for s in graph.segments if s.name.startswith("encoder.layers.")]
    assert layers == [f"encoder.layers.{i}" for i in range(4)]
    assert all(s.flops > 0 for s in graph.segments)


def test_transformer_capture_records_the_fused_kernel_eager_runs():
    model, inputs, graph = zoo.captured("transformer")
    ops = {str(n.target) for n in graph._layout.graph_module.graph.nodes if n.op == "call_function"}
    assert "aten._transformer_encoder_layer_fwd.default" in ops
    with torch.no_grad():
        assert torch.equal(graph._layout.graph_module(*inputs), model(*inputs))


def test_unet_keeps_cuts_where_several_tensors_cross():
    _, _, graph = zoo.captured("unet")
    stages = split(graph, list(range(len(graph.segments) - 1)))
    assert sorted(len(s.inputs) for s in stages)[-2:] == [2, 3]


def test_cut_limit_merges_away_cuts_crossed_by_many_tensors():
    model, inputs = zoo.make("unet")
    graph = capture(model, inputs, limits=SegmentationLimits(max_cut_tensors=1))
    stages = split(graph, list(range(len(graph.segments) - 1)))
    assert all(len(s.inputs) == 1 for s in stages)
    assert len(graph.segments) < len(zoo.captured("unet")[2].segments)


def test_profile_json_has_exactly_the_contract_fields():
    _, inputs, graph = zoo.captured("two_input_dict")
    profile = json.loads(json.dumps(graph.to_profile()))
    assert set(profile) == {"model", "input_bytes", "segments"}
    assert profile["input_bytes"] == sum(t.numel() * t.element_size() for t in inputs)
    for segment in profile["segments"]:
        assert set(segment) == {"name", "flops", "param_bytes", "act_bytes", "out_bytes"}
        assert all(isinstance(segment[k], int) for k in segment if k != "name")


def test_act_bytes_cover_the_segment_inputs():
    _, inputs, graph = zoo.captured("unet")
    assert graph.segments[0].act_bytes >= inputs[0].numel() * 4
    for before, segment in zip(graph.segments, graph.segments[1:], strict=False):
        assert segment.act_bytes >= before.out_bytes


def test_uncapturable_model_raises_capture_error_naming_the_line():
    model, inputs = zoo.make("data_dependent")
    with pytest.raises(CaptureError) as info:
        capture(model, inputs)
    message = str(info.value)
    assert "DataDependent" in message and re.search(r"zoo\.py:\d+", message)
    assert "x.mean() > 0" in message and "torch.cond" in message


def test_model_with_fixed_batch_is_captured_static_with_a_warning():
    model, inputs = zoo.make("fixed_batch")
    with pytest.warns(UserWarning, match="static batch"):
        graph = capture(model, inputs)
    assert not graph.dynamic_batch
    stages = split(graph, [0])
    assert all(None not in spec.shape for s in stages for spec in s.inputs)


def test_non_tensor_inputs_raise_capture_error():
    model, _ = zoo.make("unet")
    with pytest.raises(CaptureError, match="tensors"):
        capture(model, (3,))
