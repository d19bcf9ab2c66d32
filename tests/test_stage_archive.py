"""Stage archives: round trips are exact; anything that could unpickle or run code is refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile

import pytest
import torch
import zoo

from partita.errors import StageFormatError
from partita.model import StageProgram, run_stages, split


@pytest.fixture(scope="module")
def stages():
    _, _, graph = zoo.captured("two_input_dict")
    return split(graph, [1, 4])


class _Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rebuild(data: bytes, replace: dict[str, bytes | None], *, compression=zipfile.ZIP_STORED) -> bytes:
    """A copy of archive `data` with entries (relative to its root folder) replaced, added or removed."""
    source = zipfile.ZipFile(io.BytesIO(data))
    root = source.namelist()[0].split("/")[0]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as target:
        for info in source.infolist():
            rest = info.filename.split("/", 1)[1]
            if rest in replace:
                continue
            target.writestr(info.filename, source.read(info))
        for rest, content in replace.items():
            if content is not None:
                target.writestr(f"{root}/{rest}", content)
    return out.getvalue()


def read_entry(data: bytes, rest: str) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(data))
    root = source.namelist()[0].split("/")[0]
    return source.read(f"{root}/{rest}")


def test_round_trip_gives_identical_outputs_and_metadata(stages):
    model, _, _ = zoo.captured("two_input_dict")
    loaded = [StageProgram.from_bytes(s.to_bytes(), expected_sha256=s.sha256) for s in stages]
    for original, copy in zip(stages, loaded, strict=True):
        assert (copy.index, copy.start, copy.end) == (original.index, original.start, original.end)
        assert copy.inputs == original.inputs and copy.outputs == original.outputs
        assert copy.param_bytes == original.param_bytes
        assert copy.sha256 == original.sha256 == hashlib.sha256(original.to_bytes()).hexdigest()
    inputs = (torch.randn(3, 3, 16, 16), torch.randn(3, 10))  # a batch size never seen before
    with torch.no_grad():
        expected = model(*inputs)
    actual = run_stages(loaded, *inputs)
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_resnet50_stage_round_trip_is_bit_identical():
    model, _, graph = zoo.captured("resnet50")
    stages = [StageProgram.from_bytes(s.to_bytes(), expected_sha256=s.sha256) for s in split(graph, [7])]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(run_stages(stages, x), model(x))


def test_stage_knows_names_shapes_and_dtypes(stages):
    first = stages[0]
    assert [s.shape for s in first.inputs] == [(None, 3, 16, 16), (None, 10)]
    assert all(s.dtype == "float32" and s.name for s in first.inputs + first.outputs)


def test_to_bytes_is_stable(stages):
    assert stages[1].to_bytes() == stages[1].to_bytes()


def test_wrong_sha256_is_refused(stages):
    data = stages[0].to_bytes()
    with pytest.raises(StageFormatError, match="sha256"):
        StageProgram.from_bytes(data, expected_sha256="0" * 64)


def test_truncated_or_foreign_bytes_are_refused(stages):
    data = stages[0].to_bytes()
    for bad in (data[: len(data) // 2], b"", b"hello", json.dumps({"a": 1}).encode()):
        with pytest.raises(StageFormatError):
            StageProgram.from_bytes(bad)


def test_raw_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(str(marker)))
    with pytest.raises(StageFormatError, match="not a zip"):
        StageProgram.from_bytes(payload)
    assert not marker.exists()


def test_pickle_in_archive_sample_inputs_is_refused_and_never_runs(stages, tmp_path):
    marker = tmp_path / "pwned"
    crafted = rebuild(
        stages[0].to_bytes(), {"data/sample_inputs/model.pt": pickle.dumps(_Payload(str(marker)))}
    )
    with pytest.raises(StageFormatError, match="pickled sample inputs"):
        StageProgram.from_bytes(crafted)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torch_export_load_alone_would_run_that_payload(stages, tmp_path):
    # The control for the test above: the danger is real, so the check in from_bytes matters.
    marker = tmp_path / "pwned"
    crafted = rebuild(
        stages[0].to_bytes(), {"data/sample_inputs/model.pt": pickle.dumps(_Payload(str(marker)))}
    )
    with pytest.raises(Exception):  # noqa: B017 - torch fails after unpickling; any error type
        torch.export.load(io.BytesIO(crafted))
    assert marker.exists()


def test_weight_marked_as_pickle_is_refused_and_never_runs(stages, tmp_path):
    marker = tmp_path / "pwned"
    data = stages[0].to_bytes()
    config = json.loads(read_entry(data, "data/weights/model_weights_config.json"))
    fqn = next(iter(config["config"]))
    config["config"][fqn]["use_pickle"] = True
    path = "data/weights/" + config["config"][fqn]["path_name"]
    crafted = rebuild(
        data,
        {
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
            path: pickle.dumps(_Payload(str(marker))),
        },
    )
    with pytest.raises(StageFormatError, match="pickled objects are refused"):
        StageProgram.from_bytes(crafted)
    assert not marker.exists()


def test_opaque_object_constant_is_refused(stages):
    data = stages[0].to_bytes()
    config = {"config": {"evil": {"path_name": "opaque_obj_0", "use_pickle": True, "tensor_meta": None}}}
    crafted = rebuild(
        data,
        {
            "data/constants/model_constants_config.json": json.dumps(config).encode(),
            "data/constants/opaque_obj_0": b"x",
        },
    )
    with pytest.raises(StageFormatError, match="unexpected entry"):
        StageProgram.from_bytes(crafted)


@pytest.mark.parametrize(
    "entry",
    ["data/weights/model.pt", "data/aotinductor/model/model.so", "extra/other.json", "version"],
)
def test_unexpected_entries_are_refused(stages, entry):
    crafted = rebuild(stages[0].to_bytes(), {entry: b"\x80\x04N."})
    with pytest.raises(StageFormatError, match="unexpected entry"):
        StageProgram.from_bytes(crafted)


def test_compressed_archive_is_refused(stages):
    crafted = rebuild(stages[0].to_bytes(), {}, compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(StageFormatError, match="compressed"):
        StageProgram.from_bytes(crafted)


def program_with(data: bytes, edit) -> bytes:
    program = json.loads(read_entry(data, "models/model.json"))
    edit(program)
    return rebuild(data, {"models/model.json": json.dumps(program).encode()})


def test_code_in_a_size_expression_is_refused_and_never_runs(stages, tmp_path):
    marker = tmp_path / "pwned"
    data = stages[0].to_bytes()

    def inject(program):
        found = []

        def walk(value):
            if isinstance(value, dict):
                for key, inner in value.items():
                    if key == "expr_str":
                        value[key] = f"__import__('os').system('touch {marker}')"
                        found.append(key)
                    else:
                        walk(inner)
            elif isinstance(value, list):
                for inner in value:
                    walk(inner)

        walk(program)
        assert found, "the stage program has a dynamic batch, so it must hold size expressions"

    with pytest.raises(StageFormatError, match="size expression"):
        StageProgram.from_bytes(program_with(data, inject))
    assert not marker.exists()


def test_guard_code_is_refused(stages):
    crafted = program_with(stages[0].to_bytes(), lambda p: p.update(guards_code=["__import__('os')"]))
    with pytest.raises(StageFormatError, match="guard code"):
        StageProgram.from_bytes(crafted)


@pytest.mark.parametrize(
    "target",
    ["torch.load", "builtins.exec", "torch.ops.aten.from_file.default", "torch.serialization.pickle.loads"],
)
def test_call_of_anything_but_aten_operators_is_refused(stages, target):
    def retarget(program):
        program["graph_module"]["graph"]["nodes"][0]["target"] = target

    with pytest.raises(StageFormatError, match="may only call aten operators"):
        StageProgram.from_bytes(program_with(stages[0].to_bytes(), retarget))


def test_missing_metadata_is_refused(stages):
    crafted = rebuild(stages[0].to_bytes(), {"extra/partita_stage.json": None})
    with pytest.raises(StageFormatError, match="missing"):
        StageProgram.from_bytes(crafted)
