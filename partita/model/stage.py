"""One stage of a split model: a torch.export program plus what it takes and gives.

A `StageProgram` runs segments [start, end) of a captured model. It takes flat tensors and returns
flat tensors; stage k+1 takes exactly what stage k returns, in order (a value needed later passes
through the stages in between), so a pipeline is a plain chain.

A stage travels as `to_bytes()`: a `torch.export.save` archive (a zip) whose extra file
`partita_stage.json` holds the metadata, checked on arrival by sha256 (`from_bytes`). Loading is
safe on untrusted bytes: see `archive.py` for what is checked before torch.export.load runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from partita.errors import StageFormatError, StageInputError
from partita.model import archive

#: Name of the metadata file inside the archive (stored under the archive's extra/ folder).
METADATA_FILE = "partita_stage.json"
FORMAT_VERSION = 1
MAX_VALIDATED_SIGNATURES = 64  # distinct batch sizes remembered per stage (any others are checked each call)


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the dtype name without the 'torch.' prefix."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype called `name` ('float32'); StageFormatError for anything else."""
    dtype = getattr(torch, name, None) if name.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise StageFormatError(f"unknown dtype {name!r} in stage metadata")
    return dtype


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a tensor a stage takes or gives.

    shape: sizes per dimension; None marks the dynamic batch dimension (any size).
    dtype: torch dtype name without "torch.", e.g. "float32".
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def matches(self, t: torch.Tensor) -> bool:
        if dtype_name(t.dtype) != self.dtype or t.dim() != len(self.shape):
            return False
        return all(want is None or want == got for want, got in zip(self.shape, t.shape, strict=True))

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Any) -> TensorSpec:
        try:
            shape = tuple(None if d is None else int(d) for d in data["shape"])
            spec = cls(name=str(data["name"]), shape=shape, dtype=str(data["dtype"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StageFormatError(f"malformed tensor spec in stage metadata: {data!r}") from exc
        parse_dtype(spec.dtype)
        return spec


class StageProgram:
    """Segments [start, end) of a model as one runnable, shippable torch.export program.

    index: position in the pipeline (0 first). inputs/outputs: what run() takes and returns, in
    order. param_bytes: bytes of the weights, buffers and constants the stage holds.
    out_spec: for the last stage, the pytree structure (treespec JSON) of the model's output.
    sha256: hex digest of to_bytes().
    """

    def __init__(
        self,
        exported: torch.export.ExportedProgram,
        *,
        index: int,
        start: int,
        end: int,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        out_spec: str | None = None,
        data: bytes | None = None,
    ):
        self.index = index
        self.start = start
        self.end = end
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.out_spec = out_spec
        self._exported = exported
        self._module: torch.nn.Module | None = None
        self._validated: set[tuple] = set()  # input signatures torch.export's own input check has passed
        self._data = data
        self._sha256: str | None = None
        self.param_bytes = _state_bytes(exported)

    def __repr__(self) -> str:
        return (
            f"StageProgram(index={self.index}, segments=[{self.start}, {self.end}), "
            f"inputs={len(self.inputs)}, outputs={len(self.outputs)}, param_bytes={self.param_bytes})"
        )

    @property
    def exported_program(self) -> torch.export.ExportedProgram:
        return self._exported

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.to_bytes()).hexdigest()
        return self._sha256

    def run(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the stage: flat tensors in (matching `inputs`), flat tensors out (as `outputs`)."""
        self._check_inputs(tensors)
        if self._module is None:
            self._module = self._exported.module()
        # The exported module checks every call's inputs against the program's shape constraints, in
        # Python: a third of a small stage's time. Those checks look only at shapes, dtypes and
        # devices, so a signature that passed once is not checked again.
        signature = tuple((t.shape, t.dtype, t.device) for t in tensors)
        known = signature in self._validated
        if self._module.validate_inputs == known:  # nn.Module's __setattr__ is slow: set only on a change
            self._module.validate_inputs = not known
        with torch.no_grad():
            result = self._module(*tensors)
        if not known and len(self._validated) < MAX_VALIDATED_SIGNATURES:
            self._validated.add(signature)
        return tuple(result) if isinstance(result, (tuple, list)) else (result,)

    def to(self, device: torch.device | str) -> StageProgram:
        """This stage with its weights, constants and device-bearing ops on `device` ("cpu", "cuda", "mps").

        Returns a new StageProgram; this one is left as it was (torch.export's move_to_device_pass
        changes a program in place, so it runs on a copy). `run` then takes and returns tensors on
        `device`. The archive does not change: `to_bytes()` and `sha256` stay those of the shipped
        (CPU) archive, so a moved stage is still identified by what was sent.
        """
        import copy

        from torch.export.passes import move_to_device_pass

        moved = move_to_device_pass(copy.deepcopy(self._exported), torch.device(device))
        return self._same_archive(moved, self.index)

    def renumbered(self, index: int) -> StageProgram:
        """This stage at another position of a pipeline, as the same archive (same bytes, same sha256).

        A re-plan that only renumbers a stage (an earlier stage merged away) need not ship it again:
        the worker that holds it is told to serve it under the new index. The archive is the stage's
        identity, so its embedded metadata keeps the index it was written with; only `index` here changes.
        """
        return self._same_archive(self._exported, index)

    def _same_archive(self, exported: torch.export.ExportedProgram, index: int) -> StageProgram:
        """A StageProgram running `exported` as stage `index`, identified by this stage's archive bytes."""
        return StageProgram(
            exported,
            index=index,
            start=self.start,
            end=self.end,
            inputs=self.inputs,
            outputs=self.outputs,
            out_spec=self.out_spec,
            data=self.to_bytes(),
        )

    def _check_inputs(self, tensors: Sequence[torch.Tensor]) -> None:
        if len(tensors) != len(self.inputs):
            raise StageInputError(
                f"stage {self.index} takes {len(self.inputs)} tensors "
                f"({', '.join(s.name for s in self.inputs)}), got {len(tensors)}"
            )
        batch_sizes: set[int] = set()
        for spec, t in zip(self.inputs, tensors, strict=True):
            if not isinstance(t, torch.Tensor) or not spec.matches(t):
                got = (
                    f"{dtype_name(t.dtype)}{list(t.shape)}"
                    if isinstance(t, torch.Tensor)
                    else type(t).__name__
                )
                want = f"{spec.dtype}{['batch' if d is None else d for d in spec.shape]}"
                raise StageInputError(f"stage {self.index} input {spec.name!r} must be {want}, got {got}")
            batch_sizes.update(t.shape[d] for d, size in enumerate(spec.shape) if size is None)
        if len(batch_sizes) > 1:
            raise StageInputError(
                f"stage {self.index} inputs disagree on the batch size: {sorted(batch_sizes)}"
            )

    # ------------------------------------------------------------------------------ archive I/O

    def metadata(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "index": self.index,
            "start": self.start,
            "end": self.end,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "out_spec": self.out_spec,
        }

    def to_bytes(self) -> bytes:
        """The stage as a torch.export.save archive (cached: the same bytes every call)."""
        if self._data is None:
            buffer = io.BytesIO()
            exported = _shippable(self._exported)
            torch.export.save(exported, buffer, extra_files={METADATA_FILE: json.dumps(self.metadata())})
            self._data = buffer.getvalue()
        return self._data

    def hollow_bytes(self) -> tuple[bytes, dict[str, torch.Tensor]]:
        """The archive without its tensors' data, and those tensors: ("state/NAME" | "constant/NAME") -> tensor.

        Every weight, buffer and tensor constant is written as a placeholder of its shape and dtype
        that holds one element, so the archive is a few kilobytes whatever the stage's size.
        `from_bytes(archive, tensors=...)` puts the tensors back. Programs that share weights (a
        decoder stage's prefill and decode) ship them once this way (`partita.model.decoder_stage`).
        """
        exported = _shippable(self._exported)
        exported._state_dict = {name: _placeholder(t) for name, t in exported.state_dict.items()}  # noqa: SLF001
        exported._constants = {  # noqa: SLF001 - the clone's own dict; the program keeps its constants
            name: _placeholder(t) if isinstance(t, torch.Tensor) else t for name, t in exported.constants.items()
        }
        buffer = io.BytesIO()
        with warnings.catch_warnings():  # torch warns that a placeholder does not cover its storage: by design
            warnings.filterwarnings("ignore", message="No complete tensor found")
            torch.export.save(exported, buffer, extra_files={METADATA_FILE: json.dumps(self.metadata())})
        tensors = {f"state/{name}": t for name, t in self._exported.state_dict.items()}
        tensors.update({f"constant/{name}": t for name, t in self._exported.constants.items()
                        if isinstance(t, torch.Tensor)})
        return buffer.getvalue(), tensors

    @classmethod
    def from_bytes(cls, data: bytes, *, expected_sha256: str | None = None,
                   tensors: Mapping[str, torch.Tensor] | None = None) -> StageProgram:
        """Load a stage archive; StageFormatError on any problem, before anything is unpickled.

        expected_sha256: hex digest the bytes must have (None skips the check). tensors: the data
        of a hollow archive (`hollow_bytes`): every weight, buffer and tensor constant must be
        given, with the placeholder's shape and dtype.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StageFormatError(f"a stage archive is bytes, got {type(data).__name__}")
        data = bytes(data)
        if expected_sha256 is not None:
            digest = hashlib.sha256(data).hexdigest()
            if digest != expected_sha256.lower():
                raise StageFormatError(
                    f"stage archive sha256 is {digest}, expected {expected_sha256}: the bytes were changed "
                    "or belong to another stage; deploy again"
                )
        archive.check(data)
        extra = {METADATA_FILE: ""}
        try:
            exported = torch.export.load(io.BytesIO(data), extra_files=extra)
        except Exception as exc:  # any failure inside torch.export.load means the archive is unusable
            raise StageFormatError(f"stage archive does not load: {type(exc).__name__}: {exc}") from exc
        meta = _parse_metadata(extra.get(METADATA_FILE))
        if tensors is not None:
            _fill(exported, tensors)
        signature = exported.graph_signature
        if len(signature.user_inputs) != len(meta["inputs"]) or len(signature.user_outputs) != len(
            meta["outputs"]
        ):
            raise StageFormatError(
                f"stage metadata lists {len(meta['inputs'])} inputs and {len(meta['outputs'])} outputs, but the "
                f"program takes {len(signature.user_inputs)} and returns {len(signature.user_outputs)}"
            )
        return cls(
            exported,
            index=meta["index"],
            start=meta["start"],
            end=meta["end"],
            inputs=meta["inputs"],
            outputs=meta["outputs"],
            out_spec=meta["out_spec"],
            data=data,
        )


def _parse_metadata(text: Any) -> dict:
    if not text:
        raise StageFormatError(f"stage archive has no {METADATA_FILE}: it was not written by partita")
    try:
        raw = json.loads(text)
        meta = {
            "index": int(raw["index"]),
            "start": int(raw["start"]),
            "end": int(raw["end"]),
            "inputs": [TensorSpec.from_json(s) for s in raw["inputs"]],
            "outputs": [TensorSpec.from_json(s) for s in raw["outputs"]],
            "out_spec": raw.get("out_spec"),
        }
        format_version = raw.get("format")
    except (ValueError, KeyError, TypeError) as exc:
        raise StageFormatError(f"malformed {METADATA_FILE} in stage archive: {exc}") from exc
    if format_version != FORMAT_VERSION:
        raise StageFormatError(
            f"stage archive format {format_version!r}; this partita reads {FORMAT_VERSION}"
        )
    if meta["out_spec"] is not None:
        if not isinstance(meta["out_spec"], str):
            raise StageFormatError("out_spec in stage metadata must be a treespec JSON string")
        try:
            pytree.treespec_loads(meta["out_spec"])
        except Exception as exc:  # treespec_loads raises several types for bad JSON
            raise StageFormatError(f"bad output structure in stage metadata: {exc}") from exc
    return meta


def _shippable(exported: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program without what a safe loader must refuse: pickled sample inputs and guard code.

    torch.export stores sample inputs as a pickle and guards as Python source compiled on load.
    The only guard a stage has is "all batch dimensions are equal", which `run` checks itself.
    """
    clone = torch.export.ExportedProgram.__new__(torch.export.ExportedProgram)
    clone.__dict__.update(exported.__dict__)  # shallow: graph and weights are shared, not copied
    clone._example_inputs = None  # noqa: SLF001 - torch keeps these private; the loader must not see them
    clone._guards_code = []  # noqa: SLF001 - as above
    return clone


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    """One element of `t`'s dtype seen as `t`'s shape (stride 0): what a hollow archive stores for `t`."""
    hollow = torch.zeros((), dtype=t.dtype).expand(t.shape)
    return torch.nn.Parameter(hollow, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else hollow


def _fill(exported: torch.export.ExportedProgram, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put a hollow archive's tensors in place; StageFormatError when one is missing or of another shape/dtype."""
    for kind, held in (("state", exported.state_dict), ("constant", exported.constants)):
        for name, placeholder in list(held.items()):
            if not isinstance(placeholder, torch.Tensor):
                continue
            given = tensors.get(f"{kind}/{name}")
            if not isinstance(given, torch.Tensor):
                raise StageFormatError(f"stage archive's {kind} tensor {name!r} has no data in the bundle")
            if given.shape != placeholder.shape or given.dtype != placeholder.dtype:
                raise StageFormatError(
                    f"stage archive's {kind} tensor {name!r} is {dtype_name(placeholder.dtype)}"
                    f"{list(placeholder.shape)}, its data {dtype_name(given.dtype)}{list(given.shape)}"
                )
            if isinstance(placeholder, torch.nn.Parameter) and not isinstance(given, torch.nn.Parameter):
                given = torch.nn.Parameter(given, requires_grad=placeholder.requires_grad)
            held[name] = given


def _state_bytes(exported: torch.export.ExportedProgram) -> int:
    storages: dict[int, int] = {}
    values = list(exported.state_dict.values()) + list(exported.constants.values())
    for t in values:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
