"""A decoder stage on a worker: its prefill and decode programs, and every sequence's KV cache.

A `DecoderStage` runs like any stage program (`run(*tensors)` on the worker's compute thread) but
keeps state between requests: the keys and values of the sequences it has seen, in a static cache
on the stage's device, one slot of `context` positions per sequence, at most `sequences` slots
(the least recently used slot is reused when a new sequence arrives and all are taken).

A request is `(x, step)`: `x` the token ids (first stage) or hidden states, `step` int64 [2] =
(sequence id, position of x's first token). Position 0 is a prefill (x holds the prompt, or on a
rebuild every token so far): the slot is reset and filled. Position p > 0 is a decode step of one
token: the slot must hold positions 0..p-1 (positions from p on are overwritten, so a replayed step
gives the same result); otherwise the stage fails the step with `CACHE_MISSING` in the message,
and the coordinator rebuilds the sequence by prefill. The reply is `(y, step)`: the next stage's
input (logits [1, 1, vocab] from the last stage) and the same step.

On the wire a decoder stage is one stored zip (`to_bytes`) holding its two stage archives
(`prefill.pt2`, `decode.pt2`, each checked by `archive.check` before torch.export.load reads it),
the stage's tensors once (`weights.safetensors`: raw tensors under a JSON header, no pickle) and
`partita_decoder.json`; `load_stage_archive` tells it from a plain stage archive. The two programs
use the same weights, so both archives are hollow (`StageProgram.hollow_bytes`: each tensor a
one-element placeholder) and `partita_decoder.json` maps each program's tensors to their entry
in `weights.safetensors`: a stage ships (and holds in memory) one copy of its weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from partita.errors import SplitError, StageFormatError, StageInputError
from partita.model.capture import ModelGraph
from partita.model.decoder import DecoderSpec, decoder_segments, split_decoder
from partita.model.stage import StageProgram, TensorSpec

BUNDLE_FILE = "partita_decoder.json"
WEIGHTS_FILE = "weights.safetensors"
_ENTRIES = {"prefill.pt2", "decode.pt2", WEIGHTS_FILE, BUNDLE_FILE}
_PROGRAMS = ("prefill", "decode")
CACHE_MISSING = "kv-cache-missing"
BUNDLE_FORMAT = 2


class DecoderStage:
    """Layers [start, end) of a decoder as stage `index`: (prefill, decode) programs plus per-sequence caches.

    sequences: how many sequences' caches the stage holds at once (each `spec.context` positions).
    """

    def __init__(self, prefill: StageProgram, decode: StageProgram, spec: DecoderSpec, *, index: int,
                 sequences: int, data: bytes | None = None, device: torch.device | str = "cpu") -> None:
        if sequences < 1:
            raise StageFormatError(f"a decoder stage holds at least one sequence, got {sequences}")
        self.prefill, self.decode, self.spec = prefill, decode, spec
        self.index, self.start, self.end = index, prefill.start, prefill.end
        self.sequences = sequences
        self.device = torch.device(device)
        self.last = self.end == spec.layers
        self.out_spec = pytree.treespec_dumps(pytree.tree_flatten((0, 0))[1]) if self.last else None
        self.inputs: tuple[TensorSpec, ...] | None = None  # two shapes (prefill, decode): no warm-up on zeros
        self.cache_bytes = spec.kv_bytes_per_layer(spec.context) * (self.end - self.start) * sequences
        self.param_bytes = prefill.param_bytes + self.cache_bytes
        self._data = data
        self._sha256: str | None = None
        self._slots: OrderedDict[int, list[Any]] = OrderedDict()  # sequence -> [keys, values, length]

    def __repr__(self) -> str:
        return (f"DecoderStage(index={self.index}, layers=[{self.start}, {self.end}), sequences={self.sequences}, "
                f"cache_bytes={self.cache_bytes})")

    # -- running ------------------------------------------------------------------------------
    def run(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of one sequence: (x, step) in, (y, step) out (see the module docstring)."""
        if len(tensors) != 2:
            raise StageInputError(f"decoder stage {self.index} takes (x, step), got {len(tensors)} tensors")
        x, step = tensors
        if step.dtype != torch.int64 or step.shape != (2,):
            raise StageInputError(f"decoder stage {self.index}: step must be int64 [2] (sequence, position)")
        sequence, position = (int(v) for v in step.tolist())
        tokens = x.shape[1] if x.dim() >= 2 else 0
        if position < 0 or tokens < 1 or position + tokens > self.spec.context:
            raise StageInputError(
                f"decoder stage {self.index}: positions {position}..{position + tokens - 1} are outside the context "
                f"of {self.spec.context}"
            )
        if position == 0:
            y, keys, values = self.prefill.run(x)
            slot = self._slot(sequence, fresh=True)
        else:
            held = self._slots.get(sequence)
            if held is None or held[2] < position:
                raise StageInputError(
                    f"{CACHE_MISSING}: decoder stage {self.index} holds {0 if held is None else held[2]} positions of "
                    f"sequence {sequence}, step needs {position}"
                )
            slot = held
            self._slots.move_to_end(sequence)
            y, keys, values = self.decode.run(x, step[1:], slot[0][:, :, :, :position], slot[1][:, :, :, :position])
        slot[0][:, :, :, position:position + tokens] = keys
        slot[1][:, :, :, position:position + tokens] = values
        slot[2] = position + tokens
        return y, step

    def step_work(self, tensors: Sequence[torch.Tensor]) -> tuple[str, float] | None:
        """What a request is, for pacing an emulated device: ("prefill", tokens) or ("decode", position).

        None for input `run` refuses. The worker paces a step by the reference host time of its
        kind at its size (`partita.runtime.emulation.reference_at`).
        """
        if len(tensors) != 2:
            return None
        x, step = tensors
        if step.dtype != torch.int64 or step.shape != (2,) or x.dim() < 2:
            return None
        position = int(step[1])
        return ("prefill", float(x.shape[1])) if position == 0 else ("decode", float(position))

    def holds(self, sequence: int) -> int:
        """Positions of `sequence` this stage holds (0: none)."""
        slot = self._slots.get(sequence)
        return 0 if slot is None else int(slot[2])

    def _slot(self, sequence: int, *, fresh: bool) -> list[Any]:
        slot = self._slots.pop(sequence, None)
        if slot is None:
            if len(self._slots) >= self.sequences:  # reuse the least recently used sequence's buffers
                _, slot = self._slots.popitem(last=False)
            else:
                shape = (self.end - self.start, 1, self.spec.kv_heads, self.spec.context, self.spec.head_dim)
                dtype = getattr(torch, self.spec.dtype)
                slot = [torch.zeros(shape, dtype=dtype, device=self.device),
                        torch.zeros(shape, dtype=dtype, device=self.device), 0]
        if fresh:
            slot[2] = 0
        self._slots[sequence] = slot
        return slot

    # -- placement ----------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> DecoderStage:
        """This stage on `device` (new object, empty caches there; the archive bytes stay the same)."""
        return DecoderStage(self.prefill.to(device), self.decode.to(device), self.spec, index=self.index,
                            sequences=self.sequences, data=self.to_bytes(), device=device)

    def renumbered(self, index: int) -> DecoderStage:
        """This stage (same archive) at another pipeline position; the caches move with it."""
        moved = DecoderStage(self.prefill, self.decode, self.spec, index=index, sequences=self.sequences,
                             data=self.to_bytes(), device=self.device)
        moved._slots = self._slots
        return moved

    # -- archive I/O --------------------------------------------------------------------------
    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.to_bytes()).hexdigest()
        return self._sha256

    def to_bytes(self) -> bytes:
        if self._data is None:
            archives, weights, names = _hollow_programs((self.prefill, self.decode))
            meta = {"format": BUNDLE_FORMAT, "index": self.index, "sequences": self.sequences,
                    "spec": self.spec.to_json(), "tensors": names}
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as bundle:
                for program, archive_bytes in zip(_PROGRAMS, archives, strict=True):
                    bundle.writestr(f"{program}.pt2", archive_bytes)
                bundle.writestr(WEIGHTS_FILE, weights)
                bundle.writestr(BUNDLE_FILE, json.dumps(meta))
            self._data = buffer.getvalue()
        return self._data

    @classmethod
    def from_bytes(cls, data: bytes, *, expected_sha256: str | None = None) -> DecoderStage:
        """Load a decoder stage bundle; StageFormatError before anything is unpickled (see the module docstring)."""
        data = bytes(data)
        if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256.lower():
            raise StageFormatError("decoder stage archive sha256 does not match: the bytes were changed; deploy again")
        parts = _bundle_parts(data)
        try:
            meta = json.loads(parts[BUNDLE_FILE])
            if meta.get("format") != BUNDLE_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, this partita reads {BUNDLE_FORMAT}")
            spec = DecoderSpec.from_json(meta["spec"])
            index, sequences = int(meta["index"]), int(meta["sequences"])
            names = {program: dict(meta["tensors"][program]) for program in _PROGRAMS}
            if not all(isinstance(k, str) and isinstance(v, str) for m in names.values() for k, v in m.items()):
                raise ValueError("tensor names must be strings")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StageFormatError(f"malformed {BUNDLE_FILE} in decoder stage archive: {exc}") from exc
        stored = _load_weights(parts[WEIGHTS_FILE])
        programs = []
        for program in _PROGRAMS:
            missing = sorted(entry for entry in names[program].values() if entry not in stored)
            if missing:
                raise StageFormatError(f"decoder stage archive: {WEIGHTS_FILE} lacks {missing[:3]} ({program})")
            tensors = {name: stored[entry] for name, entry in names[program].items()}
            programs.append(StageProgram.from_bytes(parts[f"{program}.pt2"], tensors=tensors))
        prefill, decode = programs
        if (prefill.start, prefill.end) != (decode.start, decode.end):
            raise StageFormatError("decoder stage archive: prefill and decode programs hold different layers")
        return cls(prefill, decode, spec, index=index, sequences=sequences, data=data)


def is_decoder_archive(data: bytes) -> bool:
    """True when `data` is a decoder stage bundle (a zip naming partita_decoder.json), not a plain stage archive."""
    try:
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as bundle:
            return BUNDLE_FILE in bundle.namelist()
    except (zipfile.BadZipFile, ValueError, OSError):
        return False


def load_stage_archive(data: bytes, *, expected_sha256: str | None = None) -> StageProgram | DecoderStage:
    """A stage from the wire: a decoder stage bundle or a plain stage archive, checked before loading."""
    if is_decoder_archive(data):
        return DecoderStage.from_bytes(data, expected_sha256=expected_sha256)
    return StageProgram.from_bytes(data, expected_sha256=expected_sha256)


def _bundle_parts(data: bytes) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as bundle:
            infos = bundle.infolist()
            names = [info.filename for info in infos]
            if sorted(names) != sorted(_ENTRIES) or any(info.compress_type != zipfile.ZIP_STORED for info in infos):
                raise StageFormatError(f"decoder stage archive must hold exactly {sorted(_ENTRIES)}, stored; got {names}")
            return {name: bundle.read(name) for name in names}
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise StageFormatError(f"not a decoder stage archive: {exc}") from exc


def _hollow_programs(programs: Sequence[StageProgram]) -> tuple[list[bytes], bytes, dict[str, dict[str, str]]]:
    """Each program's hollow archive, their tensors once (safetensors bytes), and each program's name -> entry.

    A tensor is stored once when it is the same view of the same memory as one stored before (tied
    weights, and the two programs' weights, which come from one module), or equal to the tensor of
    the same name in an earlier program.
    """
    from safetensors.torch import save

    archives: list[bytes] = []
    stored: dict[str, torch.Tensor] = {}
    by_view: dict[tuple[Any, ...], str] = {}
    by_name: dict[str, str] = {}
    names: dict[str, dict[str, str]] = {}
    storages: set[int] = set()
    for program, label in zip(programs, _PROGRAMS, strict=True):
        archive_bytes, tensors = program.hollow_bytes()
        archives.append(archive_bytes)
        mapping = names[label] = {}
        for name, tensor in tensors.items():
            t = tensor.detach()
            view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            entry = by_view.get(view)
            if entry is None and name in by_name:
                earlier = stored[by_name[name]]
                if earlier.shape == t.shape and earlier.dtype == t.dtype and torch.equal(earlier, t):
                    entry = by_name[name]
            if entry is None:
                entry = f"t{len(stored)}"
                kept = t.contiguous()
                if kept.untyped_storage().data_ptr() in storages:  # safetensors stores no two views of one memory
                    kept = kept.clone()
                storages.add(kept.untyped_storage().data_ptr())
                stored[entry] = kept
            by_view.setdefault(view, entry)
            by_name.setdefault(name, entry)
            mapping[name] = entry
    return archives, save(stored), names


def _load_weights(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a bundle's weights.safetensors (raw tensors: no pickle); StageFormatError when malformed."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error types for a bad header or size
        raise StageFormatError(f"decoder stage archive's {WEIGHTS_FILE} is malformed: {type(exc).__name__}: {exc}") from exc


def decoder_stages(model: Any, spec: DecoderSpec, bounds: Sequence[tuple[int, int]], *,
                   sequences: int) -> list[DecoderStage]:
    """Split `model` into decoder stages over the layer ranges `bounds`, each holding `sequences` caches."""
    return [DecoderStage(prefill, decode, spec, index=k, sequences=sequences)
            for k, (prefill, decode) in enumerate(split_decoder(model, spec, bounds))]


@dataclass
class DecoderGraph(ModelGraph):
    """A decoder as the planner sees it (one segment per layer, see `decoder_segments`), and how to split it.

    `split(graph, cuts)` on a DecoderGraph returns `DecoderStage`s, so a re-plan (failover) splits
    a decoder as a first deploy does. `decoder`: the transformers model; `sequences`: the caches
    each stage holds.
    """

    decoder: Any = field(default=None, repr=False)
    spec: DecoderSpec | None = None
    sequences: int = 1

    @classmethod
    def of(cls, model: Any, spec: DecoderSpec, *, sequences: int) -> DecoderGraph:
        segments = decoder_segments(spec, model, sequences=sequences)
        return cls(spec.name, segments, input_bytes=8, dynamic_batch=False, decoder=model, spec=spec,
                   sequences=sequences)

    def split_stages(self, cuts: Sequence[int]) -> list[DecoderStage]:
        """Stages starting after each segment in `cuts` (as `split` takes them)."""
        if self.spec is None:
            raise SplitError("this DecoderGraph has no decoder to split")
        bounds = [0, *[int(c) + 1 for c in cuts], len(self.segments)]
        return decoder_stages(self.decoder, self.spec, list(zip(bounds[:-1], bounds[1:], strict=True)),
                              sequences=self.sequences)
