"""Fused tiles: the first conv/pool layers of one request split over an R x C grid of its feature map.

`fused_block(graph, start, end)` reads segments [start, end) of a captured model from its
torch.export graph and returns their geometry (`partita.halo.Block`): every op must be a
convolution, a pooling with a fixed window, or pointwise (ReLU, eval-mode BatchNorm, a residual
add). Ops that mix positions across the map (global or adaptive pooling, flatten/linear,
attention's matmuls, normalisation over space, reshapes) are refused with a `TileError` naming
the op and its module.

`tile_programs(graph, start, end, tiles)` builds one program per output tile. A tile program
takes the tile's halo'd input crop (`partita.halo.block_regions`) and runs the block's own aten
ops with every convolution and pooling rewritten to padding 0 after an explicit pad that is
non-zero only where the tile touches the map's real border (zeros for convolutions, -inf for max
pooling); inside the map the halo holds the real neighbouring values. Between layers each
value is cropped to the region its reader needs. Each program is exported with torch.export
and travels as an ordinary `StageProgram` archive (no pickle).

`stitch` puts the tiles' outputs back in place. See docs/tiles.md for where stitched outputs are
bit-identical to the unsplit model's and where they are only close.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F  # noqa: N812 - the usual alias

from partita.errors import SplitError, TileError
from partita.halo import Block, Layer, Region, Window, block_regions, input_region
from partita.model.capture import ModelGraph
from partita.model.measure import get_attr, is_symbolic
from partita.model.segments import module_stack_paths
from partita.model.stage import StageProgram, TensorSpec, dtype_name

__all__ = ["TileProgram", "fused_block", "segment_blocks", "stitch", "tile_programs"]

_aten = torch.ops.aten

#: Ops that read one position and write the same position (tensor arguments of the same map size).
_POINTWISE = {
    _aten.relu.default, _aten.relu_.default, _aten.hardtanh.default, _aten.hardtanh_.default,
    _aten.leaky_relu.default, _aten.leaky_relu_.default, _aten.silu.default, _aten.silu_.default,
    _aten.sigmoid.default, _aten.sigmoid_.default, _aten.gelu.default, _aten.clamp.default,
    _aten.add.Tensor, _aten.add_.Tensor, _aten.mul.Tensor, _aten.mul_.Tensor, _aten.sub.Tensor,
    _aten.div.Tensor, _aten.clone.default, _aten.contiguous.default, _aten.dropout.default,
    _aten.hardswish.default, _aten.hardswish_.default, _aten.tanh.default,
}
#: In-place ops and their out-of-place twins (a tile computes on crops, which must not alias).
_OUT_OF_PLACE = {
    _aten.relu_.default: _aten.relu.default, _aten.hardtanh_.default: _aten.hardtanh.default,
    _aten.leaky_relu_.default: _aten.leaky_relu.default, _aten.silu_.default: _aten.silu.default,
    _aten.sigmoid_.default: _aten.sigmoid.default, _aten.add_.Tensor: _aten.add.Tensor,
    _aten.mul_.Tensor: _aten.mul.Tensor, _aten.hardswish_.default: _aten.hardswish.default,
}
_MIXING = {
    "adaptive_avg_pool": "global/adaptive pooling mixes every position of the map",
    "adaptive_max_pool": "global/adaptive pooling mixes every position of the map",
    "mean": "a mean over the map mixes its positions",
    "linear": "a linear layer mixes every position of the flattened map",
    "flatten": "flatten turns positions into features",
    "view": "a reshape moves positions",
    "reshape": "a reshape moves positions",
    "matmul": "a matrix product (attention) mixes positions",
    "bmm": "a matrix product (attention) mixes positions",
    "softmax": "softmax (attention) mixes positions",
    "layer_norm": "normalisation over space mixes positions",
    "group_norm": "normalisation over space mixes positions",
    "instance_norm": "normalisation over space mixes positions",
    "scaled_dot_product_attention": "attention mixes positions",
    "upsample": "upsampling changes the map's geometry (not supported in a fused block)",
    "pad": "an explicit pad op (reflect/replicate padding) is not supported in a fused block",
}


@dataclass(frozen=True)
class _Step:
    """One op of a fused block: what it calls, with block tensors replaced by layer references."""

    node: str
    target: Any
    args: tuple  # _Ref for a block tensor, _Weight for a weight, plain values otherwise
    kwargs: dict
    window: Window | None
    pad_value: float  # value of the real border padding for a windowed op (0 or -inf)


@dataclass(frozen=True)
class _Ref:
    layer: int  # -1: the block input


@dataclass(frozen=True)
class _Weight:
    name: str


@dataclass
class _BlockGraph:
    block: Block
    steps: list[_Step]
    weights: dict[str, torch.Tensor]
    input_spec: TensorSpec
    output_spec: TensorSpec


def fused_block(graph: ModelGraph, start: int, end: int) -> Block:
    """The geometry of segments [start, end) as one fused block; TileError when they cannot be tiled."""
    return _read_block(graph, start, end).block


def segment_blocks(graph: ModelGraph) -> list[Block | None]:
    """Per segment, its geometry as a fused block of its own, or None when it cannot be tiled."""
    blocks: list[Block | None] = []
    for s in range(len(graph.segments)):
        try:
            blocks.append(fused_block(graph, s, s + 1))
        except TileError:
            blocks.append(None)
    return blocks


@dataclass
class TileProgram:
    """One tile of a tiled stage: the stage program computing output region `out` from input crop `crop`.

    crop, out: (rows, cols) half-open intervals in the block's input and output maps.
    """

    program: StageProgram
    crop: Region
    out: Region

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This tile's halo'd crop of the block's full input map (N, C, H, W), contiguous."""
        (r0, r1), (c0, c1) = self.crop
        return x[:, :, r0:r1, c0:c1].contiguous()

    def run(self, crop: torch.Tensor) -> torch.Tensor:
        return self.program.run(crop)[0]


def tile_programs(graph: ModelGraph, start: int, end: int, tiles: Sequence[Region], *,
                  index: int = 0) -> list[TileProgram]:
    """One exported program per output tile of segments [start, end) (tiles: output regions).

    index: the stage index the programs carry. The batch dimension stays dynamic when the capture's was.
    When the block ends the model, each program carries the model's output structure (`out_spec`),
    so the stitched map is the model's output.
    """
    block_graph = _read_block(graph, start, end)
    layout = graph.layout
    out_spec = None
    if end == len(graph.segments) and layout is not None:
        import torch.utils._pytree as pytree

        out_spec = pytree.treespec_dumps(layout.out_spec)
    programs = []
    for out in tiles:
        crop, regions = block_regions(block_graph.block, out)
        module = _TileModule(block_graph, crop, regions)
        program = _export_tile(module, block_graph, crop, out, graph, start, end, index)
        program.out_spec = out_spec
        programs.append(TileProgram(program, crop, out))
    return programs


def stitch(tiles: Sequence[TileProgram], outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The block's full output map from its tiles' outputs (in the order of `tiles`)."""
    if len(tiles) != len(outputs) or not tiles:
        raise TileError(f"stitch needs one output per tile: {len(tiles)} tiles, {len(outputs)} outputs")
    height = max(t.out[0][1] for t in tiles)
    width = max(t.out[1][1] for t in tiles)
    first = outputs[0]
    full = first.new_empty((first.shape[0], first.shape[1], height, width))
    for tile, y in zip(tiles, outputs, strict=True):
        (r0, r1), (c0, c1) = tile.out
        full[:, :, r0:r1, c0:c1] = y
    return full


# ------------------------------------------------------------------------------ reading a block


def _read_block(graph: ModelGraph, start: int, end: int) -> _BlockGraph:
    layout = graph.layout
    if layout is None:
        raise SplitError("this ModelGraph carries no captured graph (it was built from a profile); capture the model")
    if not 0 <= start < end <= len(graph.segments):
        raise TileError(f"segments [{start}, {end}) are not a range of the model's {len(graph.segments)} segments")
    entering = layout.input_names if start == 0 else layout.crossings[start - 1]
    leaving = layout.crossings[end - 1]
    if len(entering) != 1 or len(leaving) != 1:
        raise TileError(
            f"segments [{start}, {end}) take {len(entering)} and give {len(leaving)} tensors; a fused block "
            "takes one feature map and gives one (choose a block without skip connections across its ends)"
        )
    by_name = {n.name: n for n in layout.graph_module.graph.nodes}
    source, sink = by_name[entering[0]], by_name[leaving[0]]
    in_shape, batch, dtype = _map_shape(source, layout)
    nodes = [n for n in layout.graph_module.graph.nodes
             if start <= layout.node_segment.get(n.name, -1) < end and not is_symbolic(n)]
    layer_of: dict[str, int] = {source.name: -1}
    layers: list[Layer] = []
    steps: list[_Step] = []
    weights: dict[str, torch.Tensor] = {}
    for node in nodes:
        step, layer = _read_node(node, layer_of, layers, in_shape, layout, weights)
        layer_of[node.name] = len(layers)
        layers.append(layer)
        steps.append(step)
    if layer_of.get(sink.name) != len(layers) - 1:
        raise TileError(f"segments [{start}, {end}) do not end with the value they give ({sink.name})")
    _check_readers(nodes, layer_of)
    out_shape, _, _ = _map_shape(sink, layout)
    block = Block(in_shape, tuple(layers), batch=_example_batch(graph, in_shape, dtype), itemsize=dtype.itemsize)
    return _BlockGraph(
        block, steps, weights,
        TensorSpec(source.name, layout.specs[source.name].shape, dtype_name(dtype)),
        TensorSpec(sink.name, layout.specs[sink.name].shape, dtype_name(dtype)),
    )


def _map_shape(node: torch.fx.Node, layout) -> tuple[tuple[int, int, int], int, torch.dtype]:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        raise TileError(f"{node.name} is not a feature map (N, C, H, W): a fused block reads and writes 4-D maps")
    shape = layout.trace_shapes[node.name] if node.name in layout.trace_shapes else _hints(val.shape)
    return (int(shape[1]), int(shape[2]), int(shape[3])), int(shape[0]), val.dtype


def _hints(shape) -> tuple[int, ...]:
    return tuple(d.node.hint if isinstance(d, torch.SymInt) else int(d) for d in shape)


def _example_batch(graph: ModelGraph, in_shape: tuple[int, int, int], dtype: torch.dtype) -> int:
    """The batch size the profile is measured at (capture traces a batch-1 example at batch 2)."""
    per_sample = math.prod(in_shape) * dtype.itemsize
    layout = graph.layout
    if layout is not None and len(layout.input_names) == 1 and per_sample:
        return max(1, graph.input_bytes // per_sample)
    return 1


def _where(node: torch.fx.Node) -> str:
    paths = module_stack_paths(node.meta)
    return f"{node.name} ({node.target}{', in ' + paths[-1] if paths else ''})"


def _read_node(node, layer_of, layers, in_shape, layout, weights) -> tuple[_Step, Layer]:
    if node.op != "call_function":
        raise TileError(f"{_where(node)} is not a plain op; a fused block holds convolutions, pooling and pointwise ops")
    target = node.target
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        raise TileError(f"{_where(node)} does not give a feature map; {_mixing_reason(target)}")

    def shape_of(j: int) -> tuple[int, int, int]:
        return in_shape if j == -1 else layers[j].shape

    def arg(value: Any) -> Any:
        if isinstance(value, torch.fx.Node):
            if value.name in layer_of:
                return _Ref(layer_of[value.name])
            if value.op == "get_attr":
                weights[value.name] = get_attr(layout.graph_module, value.target)
                return _Weight(value.name)
            raise TileError(f"{_where(node)} reads {value.name}, which is neither a map of the block nor a weight")
        if isinstance(value, (list, tuple)):
            return type(value)(arg(v) for v in value)
        return value

    args = tuple(arg(a) for a in node.args)
    kwargs = {k: arg(v) for k, v in node.kwargs.items()}
    shape = (int(val.shape[1]), int(val.shape[2]), int(val.shape[3]))
    refs = [a.layer for a in args if isinstance(a, _Ref)] + [v.layer for v in kwargs.values() if isinstance(v, _Ref)]
    if not refs:
        raise TileError(f"{_where(node)} reads no map of the block")
    if target is _aten.conv2d.default:
        window, flops = _conv_window(node, args, shape_of(refs[0]), shape)
        return _Step(node.name, target, args, kwargs, window, 0.0), Layer(node.name, (refs[0],), shape, window, flops)
    if target is _aten.max_pool2d.default:
        window = _pool_window(node, args, ceil_index=5)
        return (_Step(node.name, target, args, kwargs, window, -math.inf),
                Layer(node.name, (refs[0],), shape, window, 0))
    if target is _aten.avg_pool2d.default:
        window = _avg_pool_window(node, args)
        return _Step(node.name, target, args, kwargs, window, 0.0), Layer(node.name, (refs[0],), shape, window, 0)
    if target is _aten.batch_norm.default:
        if len(args) > 5 and args[5]:
            raise TileError(f"{_where(node)} is batch norm in training mode (statistics over space); put the model in eval()")
        return _pointwise(node, target, args, kwargs, refs, shape, shape_of)
    if target in _POINTWISE:
        if target is _aten.dropout.default and len(args) > 2 and args[2]:
            raise TileError(f"{_where(node)} is dropout in training mode; put the model in eval()")
        return _pointwise(node, _OUT_OF_PLACE.get(target, target), args, kwargs, refs, shape, shape_of)
    raise TileError(f"{_where(node)} cannot be in a fused block: {_mixing_reason(target)}")


def _pointwise(node, target, args, kwargs, refs, shape, shape_of) -> tuple[_Step, Layer]:
    for j in refs:
        if shape_of(j)[1:] != shape[1:]:
            raise TileError(f"{_where(node)} combines maps of different sizes {shape_of(j)[1:]} and {shape[1:]}")
    return _Step(node.name, target, args, kwargs, None, 0.0), Layer(node.name, tuple(dict.fromkeys(refs)), shape)


def _mixing_reason(target: Any) -> str:
    name = str(target)
    for key, reason in _MIXING.items():
        if key in name:
            return reason + "; end the fused block before it"
    return ("it is not a convolution, a pooling with a fixed window or a pointwise op, so its halo is unknown; "
            "end the fused block before it")


def _pair(value: Any, default: int) -> tuple[int, int]:
    if value is None or value == []:
        return default, default
    if isinstance(value, int):
        return value, value
    values = [int(v) for v in value]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _conv_window(node, args, in_shape, out_shape) -> tuple[Window, int]:
    padding = args[4] if len(args) > 4 else 0
    if isinstance(padding, str):
        raise TileError(f"{_where(node)} uses padding={padding!r}; give the padding as numbers")
    weight = args[1]
    groups = int(args[6]) if len(args) > 6 else 1
    kernel_hw = tuple(int(d) for d in node.args[1].meta["val"].shape[2:])
    window = Window(
        kernel=(kernel_hw[0], kernel_hw[1]),
        stride=_pair(args[3] if len(args) > 3 else 1, 1),
        padding=_pair(padding, 0),
        dilation=_pair(args[5] if len(args) > 5 else 1, 1),
    )
    if not isinstance(weight, _Weight):
        raise TileError(f"{_where(node)} takes its weight from a computed value; a fused block needs fixed weights")
    flops = 2 * out_shape[0] * (in_shape[0] // groups) * kernel_hw[0] * kernel_hw[1]
    return window, flops


def _pool_window(node, args, ceil_index: int) -> Window:
    kernel = _pair(args[1], 1)
    stride = _pair(args[2] if len(args) > 2 else [], 0)
    if stride == (0, 0):
        stride = kernel
    return Window(kernel, stride, _pair(args[3] if len(args) > 3 else 0, 0),
                  _pair(args[4] if len(args) > 4 else 1, 1),
                  bool(args[ceil_index]) if len(args) > ceil_index else False)


def _avg_pool_window(node, args) -> Window:
    kernel = _pair(args[1], 1)
    stride = _pair(args[2] if len(args) > 2 else [], 0)
    padding = _pair(args[3] if len(args) > 3 else 0, 0)
    ceil_mode = bool(args[4]) if len(args) > 4 else False
    count_include_pad = bool(args[5]) if len(args) > 5 else True
    divisor = args[6] if len(args) > 6 else None
    if ceil_mode or divisor is not None or (padding != (0, 0) and not count_include_pad):
        raise TileError(f"{_where(node)}: average pooling with ceil_mode, a divisor override or padding excluded "
                        "from the count divides border windows differently; not supported in a fused block")
    return Window(kernel, stride if stride != (0, 0) else kernel, padding)


def _check_readers(nodes, layer_of) -> None:
    """An in-place op becomes out-of-place in a tile; that is only the same when nobody reads its input after it."""
    for node in nodes:
        if node.target in _OUT_OF_PLACE and isinstance(node.args[0], torch.fx.Node):
            mutated = node.args[0]
            later = [u for u in mutated.users if u is not node and _after(u, node)]
            if later:
                raise TileError(f"{_where(node)} changes {mutated.name} in place, which {later[0].name} reads later")


def _after(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    node = b.next
    while node.op != "root":
        if node is a:
            return True
        node = node.next
    return False


# ---------------------------------------------------------------------------------- tile module


class _TileModule(torch.nn.Module):
    """The block's ops on one tile: crop each value to what its reader needs, pad only at real borders."""

    def __init__(self, block_graph: _BlockGraph, crop: Region, regions: list[Region]):
        super().__init__()
        self.steps = block_graph.steps
        self.block = block_graph.block
        self.crop = crop
        self.regions = regions
        self.weight_names = {}
        for k, (name, tensor) in enumerate(block_graph.weights.items()):
            attr = f"w{k}"
            self.register_buffer(attr, tensor.detach())
            self.weight_names[name] = attr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[int, torch.Tensor] = {-1: x}
        computed: dict[int, Region] = {-1: self.crop}
        for i, step in enumerate(self.steps):
            layer = self.block.layers[i]
            out = self.regions[i]

            def resolve(value: Any, step=step, layer=layer, out=out) -> Any:
                if isinstance(value, _Ref):
                    in_shape = self.block.shape_of(value.layer)
                    wanted, pads = input_region(layer, out, in_shape)
                    tensor = _crop(values[value.layer], computed[value.layer], wanted)
                    if step.window is not None and any(pads):
                        top, bottom, left, right = pads
                        tensor = F.pad(tensor, (left, right, top, bottom), value=step.pad_value)
                    return tensor
                if isinstance(value, _Weight):
                    return getattr(self, self.weight_names[value.name])
                if isinstance(value, (list, tuple)):
                    return type(value)(resolve(v) for v in value)
                return value

            args = list(resolve(a) for a in step.args)
            kwargs = {k: resolve(v) for k, v in step.kwargs.items()}
            if step.window is not None:
                args = _without_padding(step.target, args)
            values[i] = step.target(*args, **kwargs)
            computed[i] = out
        return values[len(self.steps) - 1]


def _crop(tensor: torch.Tensor, have: Region, want: Region) -> torch.Tensor:
    (hr0, hr1), (hc0, hc1) = have
    (wr0, wr1), (wc0, wc1) = want
    if (hr0, hr1, hc0, hc1) == (wr0, wr1, wc0, wc1):
        return tensor
    if wr0 < hr0 or wr1 > hr1 or wc0 < hc0 or wc1 > hc1:
        raise TileError(f"internal: a tile needs rows {want[0]} cols {want[1]} but computed only {have}")
    return tensor[:, :, wr0 - hr0:wr1 - hr0, wc0 - hc0:wc1 - hc0]


def _without_padding(target: Any, args: list) -> list:
    """The op's arguments with its own padding 0 (and floor mode): the explicit pad replaced them."""
    args = list(args)
    if target is _aten.conv2d.default:
        args += [None, [1, 1], [0, 0], [1, 1], 1][len(args) - 2:] if len(args) < 7 else []
        args[4] = [0, 0]
    elif target is _aten.max_pool2d.default:
        args += [[], [0, 0], [1, 1], False][len(args) - 2:] if len(args) < 6 else []
        args[3] = [0, 0]
        args[5] = False
    elif target is _aten.avg_pool2d.default:
        args += [[], [0, 0]][len(args) - 2:] if len(args) < 4 else []
        args[3] = [0, 0]
    return args


def _export_tile(module: _TileModule, block_graph: _BlockGraph, crop: Region, out: Region, graph: ModelGraph,
                 start: int, end: int, index: int) -> StageProgram:
    c_in = block_graph.block.in_shape[0]
    c_out = block_graph.block.out_shape[0]
    dtype = getattr(torch, block_graph.input_spec.dtype)
    (r0, r1), (c0, c1) = crop
    (o0, o1), (p0, p1) = out
    dynamic = graph.dynamic_batch
    example = torch.zeros((2 if dynamic else block_graph.block.batch, c_in, r1 - r0, c1 - c0), dtype=dtype)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    try:
        with torch.no_grad():
            exported = torch.export.export(module, (example,), dynamic_shapes=shapes)
    except Exception as exc:  # any export failure of a tile is a tiling failure the user should see
        raise TileError(f"tile rows {out[0]} cols {out[1]} could not be exported: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0]}") from exc
    batch = None if dynamic else block_graph.block.batch
    inputs = [TensorSpec(block_graph.input_spec.name, (batch, c_in, r1 - r0, c1 - c0), block_graph.input_spec.dtype)]
    outputs = [TensorSpec(block_graph.output_spec.name, (batch, c_out, o1 - o0, p1 - p0), block_graph.output_spec.dtype)]
    return StageProgram(exported, index=index, start=start, end=end, inputs=inputs, outputs=outputs)
