"""split + run_stages: bit-identical to the unsplit model, at 1 cut, 3 cuts and every cut."""

from __future__ import annotations

import pytest
import torch
import zoo

from partita.errors import SplitError, StageInputError
from partita.model import flatten_inputs, run_stages, split, unflatten_outputs


def assert_same(actual, expected) -> None:
    """torch.equal leaf by leaf, and the same structure (tensor, tuple or dict)."""
    assert type(actual) is type(expected)
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert torch.equal(actual[key], expected[key]), key
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e)
    else:
        assert torch.equal(actual, expected)


def cut_sets(n_segments: int) -> dict[str, list[int]]:
    last = n_segments - 2
    return {
        "1 cut": [n_segments // 2 - 1],
        "3 cuts": sorted({max(0, n_segments // 4 - 1), n_segments // 2, min(last, 3 * n_segments // 4)}),
        "every cut": list(range(n_segments - 1)),
    }


def check_bit_identical(name: str, inputs) -> None:
    model, _, graph = zoo.captured(name)
    with torch.no_grad():
        expected = model(*inputs)
        for label, cuts in cut_sets(len(graph.segments)).items():
            stages = split(graph, cuts)
            assert len(stages) == len(cuts) + 1, label
            assert_same(run_stages(stages, *inputs), expected)


@pytest.mark.parametrize("name", ["unet", "two_input_dict", "transformer"])
def test_small_models_split_bit_identical(name):
    _, inputs, _ = zoo.captured(name)
    check_bit_identical(name, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "vgg16", "vit_b_16"])
def test_torchvision_models_split_bit_identical_at_batch_1(name):
    torch.manual_seed(1)
    check_bit_identical(name, (torch.randn(1, 3, 224, 224),))


@pytest.mark.slow
def test_stages_captured_at_batch_2_run_at_batch_1_and_3():
    model, _, graph = zoo.captured("resnet50")
    assert graph.dynamic_batch
    stages = split(graph, [4, 9])
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.randn(batch, 3, 224, 224)
            assert torch.equal(run_stages(stages, x), model(x))


def test_small_model_stages_run_at_other_batch_sizes():
    model, _, graph = zoo.captured("two_input_dict")
    stages = split(graph, [1, 4])
    with torch.no_grad():
        for batch in (1, 5):
            inputs = (torch.randn(batch, 3, 16, 16), torch.randn(batch, 10))
            assert_same(run_stages(stages, *inputs), model(*inputs))


def test_torch_export_checks_each_new_input_signature_once_and_outputs_stay_exact():
    # StageProgram.run skips torch.export's per-call input check for a signature that passed it
    # once: a new batch size is still checked, and every output is still the unsplit model's.
    model, _, graph = zoo.captured("two_input_dict")
    stages = split(graph, [1, 4])
    stage = stages[0]
    checked: list[bool] = []
    stage.run(torch.randn(1, 3, 16, 16), torch.randn(1, 10))  # builds the module
    stage._module.register_forward_pre_hook(lambda module, args: checked.append(module.validate_inputs))
    checked.clear()
    for batch in (3, 3, 5, 3, 5):
        inputs = (torch.randn(batch, 3, 16, 16), torch.randn(batch, 10))
        assert_same(run_stages(stages, *inputs), model(*inputs))
    assert checked == [True, False, True, False, False]


@pytest.mark.parametrize("name", ["unet", "two_input_dict", "transformer"])
def test_chain_is_linear_each_stage_takes_what_the_previous_returns(name):
    _, inputs, graph = zoo.captured(name)
    stages = split(graph, list(range(len(graph.segments) - 1)))
    assert len(stages[0].inputs) == len(flatten_inputs(*inputs))
    for before, after in zip(stages, stages[1:], strict=False):
        assert before.outputs == after.inputs
        assert before.end == after.start
    assert stages[0].start == 0 and stages[-1].end == len(graph.segments)
    assert [s.index for s in stages] == list(range(len(stages)))


def test_value_used_late_passes_through_intermediate_stages():
    # `features` (input 1) is read only by the last segments, so every stage before carries it.
    _, _, graph = zoo.captured("two_input_dict")
    stages = split(graph, list(range(len(graph.segments) - 1)))
    carriers = [s for s in stages[1:] if any(spec.shape == (None, 10) for spec in s.inputs)]
    assert len(carriers) >= 3


def test_unet_stage_takes_several_tensors():
    _, _, graph = zoo.captured("unet")
    stages = split(graph, list(range(len(graph.segments) - 1)))
    assert max(len(s.inputs) for s in stages) >= 3


def test_out_bytes_equal_bytes_of_tensors_crossing_the_cut():
    _, inputs, graph = zoo.captured("unet")
    batch = inputs[0].shape[0]
    stages = split(graph, list(range(len(graph.segments) - 1)))
    for segment, stage in zip(graph.segments, stages[1:], strict=False):
        crossing = 0
        for spec in stage.inputs:
            numel = 1
            for size in spec.shape:
                numel *= batch if size is None else size
            crossing += numel * torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
        assert segment.out_bytes == crossing


def test_unflatten_outputs_rebuilds_the_dict():
    model, inputs, graph = zoo.captured("two_input_dict")
    stages = split(graph, [2])
    flat = flatten_inputs(*inputs)
    for stage in stages:
        flat = stage.run(*flat)
    with torch.no_grad():
        assert_same(unflatten_outputs(stages[-1], flat), model(*inputs))


@pytest.mark.parametrize("cuts", [[-1], [99], [3, 3], [4, 2], ["a"]])
def test_bad_cuts_raise_split_error(cuts):
    _, _, graph = zoo.captured("unet")
    with pytest.raises(SplitError):
        split(graph, cuts)


def test_stage_refuses_inputs_of_the_wrong_shape_or_count():
    _, inputs, graph = zoo.captured("unet")
    stage = split(graph, [])[0]
    with pytest.raises(StageInputError, match="must be float32"):
        stage.run(torch.randn(2, 3, 31, 32))
    with pytest.raises(StageInputError, match="takes 1 tensors"):
        stage.run(*inputs, *inputs)
