"""What a newcomer meets in the first hour: typos, wrong shapes, switches given values, --version, --debug."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from partita.cli import main, partita_version
from partita.errors import CaptureError, ModelRefError
from partita.model import capture, load_ref


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "mymodels.py"
    path.write_text(
        "import torch\n"
        "def small_net():\n"
        "    return torch.nn.Linear(4, 2)\n"
        "def broken_net():\n"
        "    raise ValueError('weights folder is empty')\n"
    )
    return path


def test_a_mistyped_torchvision_name_gets_a_did_you_mean():
    with pytest.raises(ModelRefError, match=r"did you mean resnet18"):
        load_ref("torchvision:resnt18")


def test_a_missing_factory_names_the_users_file_and_the_closest_factory(user_file):
    with pytest.raises(ModelRefError) as info:
        load_ref(f"{user_file}:smal_net")
    message = str(info.value)
    assert f"{user_file} has no 'smal_net' (did you mean small_net" in message
    assert "partita_user_model" not in message


def test_a_wrong_input_rank_says_what_the_first_layer_expects():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(5, 8, 8),))
    message = str(info.value)
    assert "does not run on example inputs of shape [5, 8, 8]" in message
    assert "takes 4-D input (batch, 3, H, W)" in message
    assert "traceable" not in message


def test_a_wrong_feature_count_names_the_linear_layers_width():
    with pytest.raises(CaptureError, match=r"last dimension is 4: .*--input-shape 1,4"):
        capture(nn.Linear(4, 2).eval(), (torch.randn(1, 5),))


def test_an_untraceable_model_still_gets_the_traceability_advice():
    from tests.zoo import DataDependent

    with pytest.raises(CaptureError, match="traceable"):
        capture(DataDependent().eval(), (torch.randn(2, 4),))


def test_a_switch_given_a_value_is_one_clear_error(capsys):
    code, _, err = run_main(capsys, "inspect", "--json", "true", "torchvision:resnet18")
    assert code == 2
    assert "--json is a switch and takes no value" in err
    assert len(err.strip().splitlines()) == 1


def test_version_prints_the_package_version(capsys):
    code, out, _ = run_main(capsys, "--version")
    assert code == 0
    assert out.strip() == f"partita {partita_version()}"


def test_debug_shows_the_traceback_of_the_users_failing_factory(capsys, user_file):
    ref = f"{user_file}:broken_net"
    code, _, err = run_main(capsys, "inspect", ref)
    assert code == 2 and "Traceback" not in err and "broken_net() failed" in err
    code, _, err = run_main(capsys, "--debug", "inspect", ref)
    assert code == 2
    assert "Traceback" in err
    assert "raise ValueError('weights folder is empty')" in err  # the user's own source line
