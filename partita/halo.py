"""Halo arithmetic of fused tiles: which input region each output tile of a conv/pool block needs.

A *fused block* is a run of layers that each read a neighbourhood of positions (convolutions,
pooling: a `Window`) or a single position (ReLU, eval-mode BatchNorm, a residual add: pointwise).
Its output feature map is split into tiles; each tile is computed from a halo'd crop of the
block's input, independently of the other tiles (overlapping halos are recomputed, as DeepThings
does). This module is the pure geometry both sides share: the model layer builds tile programs
from it, the planner prices tiles with it. It imports neither torch nor anything of partita but its errors.

Coordinates are absolute positions in a layer's own feature map; intervals are half-open
[a, b). Along one axis, a window with kernel k, stride s, padding p and dilation d computes output
o from inputs o*s - p + t*d for t in [0, k). So outputs [a, b) read inputs

    lo = a*s - p        hi = (b - 1)*s - p + (k - 1)*d + 1

of which only [max(lo, 0), min(hi, n)) exist: the rest is the map's real border padding (zeros
for a convolution, -inf for max pooling), present only where a tile touches the border. A layer
read by several others (a residual block's input) computes the bounding box of what they need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from partita.errors import TileError

__all__ = ["Block", "Layer", "TileCost", "Window", "block_regions", "split_axis", "tile_cost", "tile_grid"]

Interval = tuple[int, int]
Region = tuple[Interval, Interval]  # (rows, cols), each half-open


@dataclass(frozen=True)
class Window:
    """A convolution's or pooling's spatial window: (rows, cols) pairs of kernel, stride, padding, dilation.

    ceil_mode: pooling's ceil mode (the last window may hang over the padded border; the missing
    inputs count as padding).
    """

    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False

    def span(self, axis: int, out: Interval, in_size: int) -> tuple[Interval, int, int]:
        """The inputs outputs `out` read along `axis` (0 rows, 1 cols): (existing inputs, pad before, pad after).

        The existing inputs are clipped to [0, in_size); the pads count the positions outside it
        (real border padding, or the overhang of a ceil-mode window).
        """
        a, b = out
        if b <= a:
            raise TileError(f"empty output interval [{a}, {b})")
        k, s, p, d = self.kernel[axis], self.stride[axis], self.padding[axis], self.dilation[axis]
        lo = a * s - p
        hi = (b - 1) * s - p + (k - 1) * d + 1
        start, stop = max(lo, 0), min(hi, in_size)
        if stop <= start:
            raise TileError(f"outputs [{a}, {b}) read no input of a map of size {in_size}")
        return (start, stop), start - lo, hi - stop

    def to_json(self) -> dict[str, Any]:
        return {"kernel": list(self.kernel), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "ceil_mode": self.ceil_mode}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Window:
        def pair(key: str, default: int) -> tuple[int, int]:
            value = data.get(key, [default, default])
            return int(value[0]), int(value[1])

        window = cls(pair("kernel", 1), pair("stride", 1), pair("padding", 0), pair("dilation", 1),
                     bool(data.get("ceil_mode", False)))
        if min(window.kernel + window.stride + window.dilation) < 1 or min(window.padding) < 0:
            raise TileError(f"bad window {data!r}: kernel, stride, dilation >= 1 and padding >= 0")
        return window


@dataclass(frozen=True)
class Layer:
    """One layer of a fused block.

    inputs: indices of the earlier layers it reads; -1 is the block's input.
    shape: (channels, height, width) of its output, per sample.
    window: its spatial window; None for a pointwise layer (output position = input position).
    flops_per_px: FLOPs per output position for the whole batch (2 * C_in/groups * kh * kw * C_out
        * batch for a convolution; 0 for what `torch.utils.flop_counter` does not count).
    """

    name: str
    inputs: tuple[int, ...]
    shape: tuple[int, int, int]
    window: Window | None = None
    flops_per_px: int = 0

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "inputs": list(self.inputs), "shape": list(self.shape),
                                "flops_per_px": self.flops_per_px}
        if self.window is not None:
            data["window"] = self.window.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layer:
        window = data.get("window")
        return cls(
            name=str(data["name"]),
            inputs=tuple(int(i) for i in data["inputs"]),
            shape=(int(data["shape"][0]), int(data["shape"][1]), int(data["shape"][2])),
            window=None if window is None else Window.from_json(window),
            flops_per_px=int(data.get("flops_per_px", 0)),
        )


@dataclass(frozen=True)
class Block:
    """A fused block: its input's (channels, height, width), its layers in order (the last one is the output).

    batch: the batch size shapes and FLOPs are at; itemsize: bytes per element.
    """

    in_shape: tuple[int, int, int]
    layers: tuple[Layer, ...]
    batch: int = 1
    itemsize: int = 4

    def __post_init__(self) -> None:
        if not self.layers:
            raise TileError("a fused block needs at least one layer")
        for i, layer in enumerate(self.layers):
            if not layer.inputs or any(not -1 <= j < i for j in layer.inputs):
                raise TileError(f"layer {i} ({layer.name}) must read the block input (-1) or earlier layers")

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return self.layers[-1].shape

    def shape_of(self, index: int) -> tuple[int, int, int]:
        return self.in_shape if index == -1 else self.layers[index].shape

    def then(self, other: Block) -> Block:
        """This block followed by `other` (whose input is this block's output) as one fused block."""
        if other.in_shape != self.out_shape:
            raise TileError(f"blocks do not chain: {self.out_shape} then a block taking {other.in_shape}")
        offset = len(self.layers)
        shifted = tuple(
            Layer(layer.name, tuple(offset - 1 if j == -1 else j + offset for j in layer.inputs), layer.shape,
                  layer.window, layer.flops_per_px)
            for layer in other.layers
        )
        return Block(self.in_shape, self.layers + shifted, self.batch, self.itemsize)

    def to_json(self) -> dict[str, Any]:
        return {"in_shape": list(self.in_shape), "batch": self.batch, "itemsize": self.itemsize,
                "layers": [layer.to_json() for layer in self.layers]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Block:
        try:
            return cls(
                in_shape=(int(data["in_shape"][0]), int(data["in_shape"][1]), int(data["in_shape"][2])),
                layers=tuple(Layer.from_json(layer) for layer in data["layers"]),
                batch=int(data.get("batch", 1)),
                itemsize=int(data.get("itemsize", 4)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise TileError(f"malformed fused block: {type(exc).__name__}: {exc}") from exc


def block_regions(block: Block, out: Region) -> tuple[Region, list[Region]]:
    """(input region, region each layer computes) for the block's output region `out`.

    Walks the layers backwards: a layer computes the bounding box of what its readers need (the
    last layer: `out`); a windowed layer needs `Window.span` of it, a pointwise one the same region.
    Every region is clipped to its map; what lies outside is border padding.
    """
    n = len(block.layers)
    need: list[Region | None] = [None] * n
    need_in: Region | None = None
    need[n - 1] = _check_region(out, block.out_shape)
    for i in range(n - 1, -1, -1):
        region = need[i]
        if region is None:
            raise TileError(f"layer {i} ({block.layers[i].name}) is not read by the block's output")
        layer = block.layers[i]
        for j in layer.inputs:
            wanted = input_region(layer, region, block.shape_of(j))[0]
            if j == -1:
                need_in = wanted if need_in is None else _hull(need_in, wanted)
            else:
                before = need[j]
                need[j] = wanted if before is None else _hull(before, wanted)
    if need_in is None:
        raise TileError("no layer of the block reads its input")
    return need_in, [r for r in need if r is not None]


def input_region(layer: Layer, out: Region, in_shape: tuple[int, int, int]) -> tuple[Region, tuple[int, int, int, int]]:
    """(region of the input `layer` reads for outputs `out`, pads (top, bottom, left, right)).

    A pointwise layer reads `out` itself and needs no padding.
    """
    if layer.window is None:
        return out, (0, 0, 0, 0)
    rows, top, bottom = layer.window.span(0, out[0], in_shape[1])
    cols, left, right = layer.window.span(1, out[1], in_shape[2])
    return (rows, cols), (top, bottom, left, right)


def split_axis(size: int, weights: list[float]) -> list[Interval]:
    """Split [0, size) into len(weights) consecutive non-empty intervals with lengths proportional to weights."""
    if not weights or len(weights) > size:
        raise TileError(f"cannot split {size} positions into {len(weights)} non-empty parts")
    if any(w <= 0 for w in weights):
        raise TileError(f"split weights must be > 0, got {weights}")
    total = sum(weights)
    bounds = [0]
    acc = 0.0
    for k, w in enumerate(weights[:-1]):
        acc += w
        cut = round(size * acc / total)
        cut = max(cut, bounds[-1] + 1)  # every part keeps at least one position
        cut = min(cut, size - (len(weights) - 1 - k))
        bounds.append(cut)
    bounds.append(size)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def tile_grid(height: int, width: int, rows: int, cols: int, row_weights: list[float] | None = None,
              col_weights: list[float] | None = None) -> list[Region]:
    """The R x C tiles of a height x width map, row-major; part sizes proportional to the weights (even by default)."""
    row_parts = split_axis(height, row_weights or [1.0] * rows)
    col_parts = split_axis(width, col_weights or [1.0] * cols)
    if len(row_parts) != rows or len(col_parts) != cols:
        raise TileError(f"a {rows}x{cols} grid needs {rows} row weights and {cols} column weights")
    return [(r, c) for r in row_parts for c in col_parts]


@dataclass(frozen=True)
class TileCost:
    """What one tile of a block costs: FLOPs, input crop bytes, output tile bytes, peak activation bytes."""

    flops: int
    in_bytes: int
    out_bytes: int
    act_bytes: int


def tile_cost(block: Block, out: Region) -> TileCost:
    """The cost of computing output region `out` of the block from its halo'd input crop.

    act_bytes is the peak of live tensors (the crop, each layer's region while a later layer still
    reads it), counted at the block's batch size and item size; with `out` the whole map this is the
    untiled block's peak, the same arithmetic.
    """
    in_region, regions = block_regions(block, out)
    per_px = block.batch * block.itemsize

    def nbytes(index: int) -> int:
        region = in_region if index == -1 else regions[index]
        return _area(region) * block.shape_of(index)[0] * per_px

    flops = sum(layer.flops_per_px * _area(regions[i]) for i, layer in enumerate(block.layers))
    last_use = {-1: 0}
    for i, layer in enumerate(block.layers):
        for j in layer.inputs:
            last_use[j] = i
    last_use[len(block.layers) - 1] = len(block.layers)
    peak = 0
    for i in range(len(block.layers)):
        live = nbytes(i) + sum(nbytes(j) for j, end in last_use.items() if j < i and end >= i)
        peak = max(peak, live)
    return TileCost(int(flops), nbytes(-1), nbytes(len(block.layers) - 1), int(peak))


def _area(region: Region) -> int:
    return (region[0][1] - region[0][0]) * (region[1][1] - region[1][0])


def _hull(a: Region, b: Region) -> Region:
    return ((min(a[0][0], b[0][0]), max(a[0][1], b[0][1])), (min(a[1][0], b[1][0]), max(a[1][1], b[1][1])))


def _check_region(region: Region, shape: tuple[int, int, int]) -> Region:
    (r0, r1), (c0, c1) = region
    if not (0 <= r0 < r1 <= shape[1] and 0 <= c0 < c1 <= shape[2]):
        raise TileError(f"tile rows [{r0}, {r1}) cols [{c0}, {c1}) are not inside the {shape[1]}x{shape[2]} map")
    return region
