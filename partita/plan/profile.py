"""A model as the planner sees it: a chain of segments with FLOPs and bytes, no torch needed.

`load_profile` accepts what `partita inspect --json` prints (a dict), a path to that JSON file, or
any object with `.segments` (items with name, flops, param_bytes, act_bytes, out_bytes) and
`.input_bytes`, such as `partita.model.ModelGraph`. Bytes and FLOPs are at the batch size used for
capture; `out_bytes` of segment l is everything that crosses the cut after l (for the last segment:
the model outputs); `input_bytes` is what enters segment 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partita.errors import ProfileError, TileError
from partita.halo import Block

__all__ = ["Profile", "SegmentCost", "load_profile"]

_FIELDS = ("flops", "param_bytes", "act_bytes", "out_bytes")


@dataclass(frozen=True)
class SegmentCost:
    """One segment: FLOPs per request batch, parameter bytes, peak working activation bytes, bytes out."""

    name: str
    flops: int
    param_bytes: int
    act_bytes: int
    out_bytes: int


@dataclass(frozen=True)
class Profile:
    """A model's segments in chain order, and the bytes of its inputs.

    blocks: per segment, its geometry as a fused block (`partita.halo.Block`) when the segment can be
    tiled (convolutions, pooling and pointwise ops only), else None; empty when the profile says
    nothing about tiles (then the planner considers none).
    """

    model: str
    input_bytes: int
    segments: tuple[SegmentCost, ...]
    blocks: tuple[Block | None, ...] = ()

    def block(self, start: int, end: int) -> Block | None:
        """Segments [start, end) as one fused block, or None when one of them cannot be tiled."""
        if len(self.blocks) != len(self.segments) or not 0 <= start < end <= len(self.segments):
            return None
        fused = self.blocks[start]
        for part in self.blocks[start + 1:end]:
            if fused is None or part is None or part.in_shape != fused.out_shape:
                return None
            fused = fused.then(part)
        return fused

    @property
    def total_flops(self) -> int:
        return sum(s.flops for s in self.segments)

    @property
    def total_param_bytes(self) -> int:
        return sum(s.param_bytes for s in self.segments)

    def memory_bytes(self, start: int, end: int) -> int:
        """Memory a stage holding segments [start, end) needs: its weights plus its peak activations."""
        part = self.segments[start:end]
        return sum(s.param_bytes for s in part) + max((s.act_bytes for s in part), default=0)

    def cut_bytes(self, index: int) -> int:
        """Bytes entering segment `index` (index 0: the inputs; index L: the model outputs)."""
        return self.input_bytes if index == 0 else self.segments[index - 1].out_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_bytes": self.input_bytes,
            "segments": [
                {"name": s.name, "flops": s.flops, "param_bytes": s.param_bytes, "act_bytes": s.act_bytes,
                 "out_bytes": s.out_bytes}
                for s in self.segments
            ],
            **({"blocks": [None if b is None else b.to_json() for b in self.blocks]} if self.blocks else {}),
        }


def load_profile(source: Any) -> Profile:
    """A `Profile` from a profile dict, a JSON file path, a `Profile`, or a graph-like object.

    Raises ProfileError naming the field that is missing or wrong.
    """
    if isinstance(source, Profile):
        return source
    if isinstance(source, str | Path):
        return _from_dict(_read_json(Path(source)), origin=str(source))
    if isinstance(source, dict):
        return _from_dict(source, origin="profile")
    if callable(getattr(source, "to_profile", None)):
        return _from_dict(source.to_profile(), origin=str(getattr(source, "name", "model")))
    if hasattr(source, "segments") and hasattr(source, "input_bytes"):
        model = str(getattr(source, "name", None) or getattr(source, "model", None) or "model")
        raw = [{"name": getattr(s, "name", f"seg{i}"), **{f: getattr(s, f, None) for f in _FIELDS}}
               for i, s in enumerate(source.segments)]
        return _from_dict({"model": model, "input_bytes": source.input_bytes, "segments": raw}, origin=model)
    raise ProfileError(
        f"cannot read a model profile from {type(source).__name__}; expected the JSON of "
        "`partita inspect --json` (a dict or a file path) or a ModelGraph"
    )


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read the profile ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a JSON object with model, input_bytes and segments")
    return data


def _count(value: Any, where: str) -> int:
    """A non-negative whole number (floats that are whole are accepted: JSON writers differ)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ProfileError(f"{where}: expected a whole number >= 0, got {value!r}")
    return int(value)


def _from_dict(data: dict, *, origin: str) -> Profile:
    segments = data.get("segments")
    if not isinstance(segments, list) or not segments:
        raise ProfileError(f"{origin}: 'segments' must be a non-empty list of segments")
    if "input_bytes" not in data:
        raise ProfileError(f"{origin}: 'input_bytes' is missing (bytes of the model inputs)")
    parsed = []
    for i, seg in enumerate(segments):
        if not isinstance(seg, dict):
            raise ProfileError(f"{origin}: segments[{i}] must be an object")
        for key in _FIELDS:
            if key not in seg:
                raise ProfileError(f"{origin}: segments[{i}].{key} is missing")
        parsed.append(SegmentCost(
            name=str(seg.get("name", f"seg{i}")),
            **{key: _count(seg[key], f"{origin}: segments[{i}].{key}") for key in _FIELDS},
        ))
    return Profile(
        model=str(data.get("model", "model")),
        input_bytes=_count(data["input_bytes"], f"{origin}: input_bytes"),
        segments=tuple(parsed),
        blocks=_blocks(data.get("blocks"), len(parsed), origin),
    )


def _blocks(raw: Any, n_segments: int, origin: str) -> tuple[Block | None, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) != n_segments:
        raise ProfileError(f"{origin}: 'blocks' must list one fused block or null per segment ({n_segments})")
    try:
        return tuple(None if b is None else Block.from_json(b) for b in raw)
    except (TileError, AttributeError) as exc:
        raise ProfileError(f"{origin}: blocks: {exc}") from exc
