"""`partita run --check`: bit-identity where it is expected, closeness where devices differ, an honest verdict."""

from __future__ import annotations

import torch
from torch import nn

from partita.commands.run import check_failed, check_outputs, check_verdict, close_enough


def model_and_inputs():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    inputs = [(torch.randn(2, 16),) for _ in range(3)]
    with torch.no_grad():
        exact = [module(*x) for x in inputs]
    return module, inputs, exact


def test_exact_outputs_match_and_pass_everywhere():
    module, inputs, exact = model_and_inputs()
    for bits_expected in (True, False):
        result = check_outputs(module, inputs, exact, "none", bits_expected=bits_expected)
        assert result["outputs_match"] and result["outputs_close"] and result["max_abs_error"] == 0.0
        assert not check_failed(result) and check_verdict(result) == "bit-identical"


def test_a_few_ulps_off_is_close_passes_on_real_devices_and_fails_where_bits_are_expected():
    module, inputs, exact = model_and_inputs()
    reordered = [y * (1 + 2e-7) for y in exact]  # what another summation order does
    on_devices = check_outputs(module, inputs, reordered, "none", bits_expected=False)
    assert on_devices["outputs_match"] is False and on_devices["outputs_close"] is True
    assert 0 < on_devices["max_abs_error"] < 1e-5
    assert not check_failed(on_devices)
    assert "bits can differ because stages ran on other devices" in check_verdict(on_devices)
    here = check_outputs(module, inputs, reordered, "none", bits_expected=True)
    assert check_failed(here) and "this is a bug" in check_verdict(here)


def test_a_real_error_is_not_close_and_fails():
    module, inputs, exact = model_and_inputs()
    wrong = [y + 0.01 * y.abs().max() for y in exact]
    result = check_outputs(module, inputs, wrong, "none", bits_expected=False)
    assert result["outputs_close"] is False and check_failed(result)
    assert check_verdict(result).startswith("NOT close")


def test_a_lossy_codec_reports_its_error_and_never_fails():
    module, inputs, exact = model_and_inputs()
    wrong = [y.half().float() for y in exact]
    result = check_outputs(module, inputs, wrong, "fp16", bits_expected=True)
    assert result["lossy_codec"] and not check_failed(result)
    assert "lossy codec" in check_verdict(result)


def test_tolerance_scales_with_the_outputs_magnitude():
    big = torch.full((4,), 1e4)
    assert close_enough(big, big + 0.5)  # 5e-5 of the magnitude
    assert not close_enough(big, big + 5.0)  # 5e-4
    small = torch.full((4,), 1e-3)
    assert not close_enough(small, small + 0.5)
    assert not close_enough(torch.tensor([1, 2]), torch.tensor([1, 3]))  # integers must be equal
