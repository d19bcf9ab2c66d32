"""load_ref: every reference form loads; every bad reference names the valid forms; the CLI says one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from partita.commands.inspect import parse_input_shapes
from partita.errors import ModelRefError
from partita.model import load_ref
from partita.model.ref import FORMS

ZOO = Path(__file__).with_name("zoo.py")
ROOT = Path(__file__).resolve().parents[1]
PARTITA = ROOT / ".venv" / "bin" / "partita"


def test_torchvision_reference_gives_eval_module():
    module = load_ref("torchvision:resnet18")
    assert type(module).__name__ == "ResNet" and not module.training


def test_torchvision_weights_come_from_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    reference = load_ref("torchvision:resnet18")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    loaded = load_ref(f"torchvision:resnet18?weights={path}")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_file_factory_reference():
    module = load_ref(f"{ZOO}:factory_unet")
    assert type(module).__name__ == "UNet" and not module.training


def test_module_factory_reference():
    module = load_ref("torch.nn:Identity")
    assert isinstance(module, torch.nn.Identity)


def test_pt2_reference_runs_the_saved_program(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(2, 4)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    with torch.no_grad():
        assert torch.equal(load_ref(str(path))(x), model(x))


@pytest.mark.parametrize(
    "ref",
    [
        "nonsense:thing",
        "justaword",
        "",
        "torchvision:no_such_net",
        "torchvision:resnet18?weights=missing.safetensors",
        "torchvision:resnet18?weights=weights.pt",
        "torchvision:resnet18?color=blue",
        f"{ZOO}:no_such_factory",
        "missing_file.py:factory",
        "missing_model.pt2",
        "collections:OrderedDict",
        "torch.nn:not-an-identifier",
    ],
)
def test_bad_reference_raises_model_ref_error_listing_valid_forms(ref):
    with pytest.raises(ModelRefError) as info:
        load_ref(ref)
    assert all(form in str(info.value) for form in FORMS)


def test_shapes_parse_repeated_or_semicolon_separated():
    assert parse_input_shapes(None) == [(1, 3, 224, 224)]
    assert parse_input_shapes(["1,16;1,8"]) == [(1, 16), (1, 8)]
    assert parse_input_shapes(["1,16", "1,8"]) == [(1, 16), (1, 8)]
    with pytest.raises(ModelRefError):
        parse_input_shapes(["1,a"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [str(PARTITA)] if PARTITA.exists() else [sys.executable, "-m", "partita.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=240, cwd=ROOT)


@pytest.mark.slow
def test_cli_bad_reference_prints_one_line_and_exits_2():
    result = run_cli("inspect", "nonsense:thing")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Valid forms" in result.stderr


@pytest.mark.slow
def test_cli_inspect_json_prints_the_profile_of_a_two_input_model():
    result = run_cli("inspect", f"{ZOO}:factory_two_input", "--input-shape", "2,3,16,16;2,10", "--json")
    assert result.returncode == 0, result.stderr
    profile = json.loads(result.stdout)
    assert set(profile) == {"model", "input_bytes", "segments"}
    assert profile["input_bytes"] == (2 * 3 * 16 * 16 + 2 * 10) * 4
    assert len(profile["segments"]) >= 3
