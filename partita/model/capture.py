"""Capture a model with torch.export and measure it as a chain of segments.

`capture(module, example_inputs)` exports the module (batch dimension dynamic where the model
allows it), groups the graph's ops into segments (see `segments.py`), and runs the graph once on
the example inputs to measure, per segment, its FLOPs (`torch.utils.flop_counter`), the bytes of
the parameters and buffers it reads, its peak live activation bytes, and the bytes of every tensor
that crosses the cut after it. The result, a `ModelGraph`, is what the planner reads (as
`to_profile()`) and what `split` cuts.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.utils._pytree as pytree

from partita.errors import CaptureError
from partita.model import segments as seg
from partita.model.fastpath import eager_fast_paths
from partita.model.measure import Chain
from partita.model.stage import TensorSpec, dtype_name


@dataclass(frozen=True)
class Segment:
    """One link of the chain of cut points.

    flops: FLOPs of one forward pass at the example batch size (as counted by
        torch.utils.flop_counter: matmuls and convolutions; elementwise ops count 0).
    param_bytes: bytes of the parameters and buffers the segment reads.
    act_bytes: peak bytes of activations alive while the segment runs (its inputs, its
        intermediates, and tensors merely passing by), at the example batch size.
    out_bytes: bytes of every tensor crossing the cut after this segment; for the last segment,
        the bytes of the model's outputs.
    """

    name: str
    flops: int
    param_bytes: int
    act_bytes: int
    out_bytes: int


@dataclass
class _Layout:
    """What split needs besides the segments: which node belongs where, and what crosses each cut."""

    graph_module: torch.fx.GraphModule
    node_segment: dict[str, int]  # compute node name -> segment index
    input_names: tuple[str, ...]  # flat user inputs (placeholder names)
    output_names: tuple[str, ...]  # flat outputs (node names, may repeat)
    crossings: list[tuple[str, ...]]  # crossings[l]: values crossing the cut after segment l
    specs: dict[str, TensorSpec]  # every input, output and crossing value
    trace_shapes: dict[str, tuple[int, ...]]  # concrete shapes at the traced batch size
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec


@dataclass
class ModelGraph:
    """A captured model: the chain of segments plus what `split` needs to cut it.

    input_bytes: bytes of the flat example inputs. dynamic_batch: whether the graph (and the stages
    split from it) accept any batch size; False when the model forced a static batch.
    capture_s: wall seconds capture took (export + measurement).
    """

    name: str
    segments: list[Segment]
    input_bytes: int
    dynamic_batch: bool = False
    capture_s: float = 0.0
    _layout: _Layout | None = field(default=None, repr=False)
    _blocks: list | None = field(default=None, repr=False)

    @property
    def layout(self) -> _Layout | None:
        """The exported graph and its segment boundaries, what `split` cuts; None when not captured here."""
        return self._layout

    def to_profile(self) -> dict:
        """The model profile JSON (contracts.md): what `partita inspect --json` prints.

        "blocks" (present when some segment can be tiled) gives each segment's geometry as a fused
        block, or null (see `partita.model.tiles.segment_blocks`); the planner reads it to price tiles.
        """
        profile = {
            "model": self.name,
            "input_bytes": int(self.input_bytes),
            "segments": [dataclasses.asdict(s) for s in self.segments],
        }
        if self._layout is not None:
            if self._blocks is None:
                # tiles reads a ModelGraph: import it here, not at the top
                from partita.model.tiles import segment_blocks

                self._blocks = [None if b is None else b.to_json() for b in segment_blocks(self)]
            if any(b is not None for b in self._blocks):
                profile["blocks"] = self._blocks
        return profile


def capture(
    module: torch.nn.Module,
    example_inputs: tuple,
    *,
    dynamic_batch: bool = True,
    name: str | None = None,
    limits: seg.SegmentationLimits | None = None,
) -> ModelGraph:
    """Export `module` with torch.export and measure it as a chain of segments.

    example_inputs: the positional arguments of `module(*example_inputs)`, nested tuples, lists
        and dicts of tensors; sizes in the profile are at this batch size.
    dynamic_batch: keep dimension 0 of every input dynamic, so stages run at any batch size. A
        model that fixes its batch size is captured static instead, with a warning.
    limits: the segmentation thresholds (see `segments.SegmentationLimits`).
    Raises CaptureError naming the failing op or module when torch.export cannot capture it.
    """
    started = time.perf_counter()
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    flat_inputs, in_spec = pytree.tree_flatten(example_inputs)
    if not flat_inputs or not all(isinstance(t, torch.Tensor) for t in flat_inputs):
        raise CaptureError(
            "capture needs example inputs made of tensors (nested tuples, lists or dicts of tensors); "
            f"got {[type(t).__name__ for t in flat_inputs]}"
        )
    try:
        module = module.eval()
    except NotImplementedError:
        pass  # a module loaded from a .pt2 cannot switch modes: its mode was fixed when it was exported
    name = name or type(module).__name__
    exported, dynamic = _export(module, example_inputs, dynamic_batch)
    gm = exported.module()
    layout, segments, input_bytes = _measure(module, gm, flat_inputs, in_spec, exported, limits)
    return ModelGraph(
        name=name,
        segments=segments,
        input_bytes=input_bytes,
        dynamic_batch=dynamic,
        capture_s=time.perf_counter() - started,
        _layout=layout,
    )


# ---------------------------------------------------------------------------------------- export


def _export(module: torch.nn.Module, example_inputs: tuple, dynamic_batch: bool):
    """torch.export the module; returns (ExportedProgram, batch_is_dynamic)."""
    # torch logs a failing op at ERROR level before raising it; the raised error becomes our one
    # message, so the log line would only say the same thing twice, with a timestamp.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        return _export_quietly(module, example_inputs, dynamic_batch)
    finally:
        fake_log.setLevel(level)


def _export_quietly(module: torch.nn.Module, example_inputs: tuple, dynamic_batch: bool):
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        shapes = tuple(
            pytree.tree_map(lambda t: {0: batch} if t.dim() > 0 else None, a) for a in example_inputs
        )
        # torch.export specializes a size-1 dimension, so a batch-1 example is traced at batch 2.
        traced_inputs = pytree.tree_map(
            lambda t: torch.cat([t, t]) if t.dim() > 0 and t.shape[0] == 1 else t, example_inputs
        )
        try:
            with torch.no_grad(), eager_fast_paths():
                return torch.export.export(module, traced_inputs, dynamic_shapes=shapes), True
        except Exception as exc:  # a model that pins its batch size is still capturable statically
            if not _is_constraint_violation(exc):
                raise _capture_error(module, exc, example_inputs) from exc
            warnings.warn(
                f"{type(module).__name__} fixes its batch size ({_first_line(exc)}); "
                "captured with a static batch: its stages run only at the example batch size",
                stacklevel=3,
            )
    try:
        with torch.no_grad(), eager_fast_paths():
            return torch.export.export(module, example_inputs), False
    except Exception as exc:  # torch.export raises many types; all mean "cannot capture"
        raise _capture_error(module, exc, example_inputs) from exc


def _is_constraint_violation(exc: Exception) -> bool:
    text = str(exc)
    return "Constraints violated" in text or "specialized it to be a constant" in text


def _first_line(exc: Exception) -> str:
    for line in str(exc).splitlines():
        line = line.strip(" -")
        if line and not line.startswith("Constraints violated"):
            return line[:200]
    return type(exc).__name__


def _capture_error(module: torch.nn.Module, exc: Exception, example_inputs: tuple) -> CaptureError:
    """Name what failed (the user's source line when torch.export reports one) and what to do.

    A model that fails on its example inputs even when run eagerly has no tracing problem: the
    inputs are wrong (most often their rank or channel count), so the message says what the
    model's first layer expects instead of advising a traceable forward.
    """
    eager = _eager_failure(module, example_inputs)
    if eager is not None:
        shapes = ", ".join(str(list(t.shape)) for t in pytree.tree_leaves(example_inputs) if isinstance(t, torch.Tensor))
        return CaptureError(
            f"{type(module).__name__} does not run on example inputs of shape {shapes}: "
            f"{type(eager).__name__}: {_first_line(eager)}.{_expected_input(module)}"
        )
    text = str(exc)
    where = ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)', text)
    if frames:
        path, line, func, code = frames[-1]
        where = f" at {path.rsplit('/', 1)[-1]}:{line} in {func}: `{code.strip()}`"
    reason = _first_line(exc)
    return CaptureError(
        f"torch.export cannot capture {type(module).__name__}{where}: {type(exc).__name__}: {reason}. "
        "Make forward traceable (no Python branching on tensor values: use torch.cond or torch.where; "
        "no .item()/.tolist() feeding shapes), or pass a module that wraps only the traceable part"
    )


def _eager_failure(module: torch.nn.Module, example_inputs: tuple) -> Exception | None:
    """The exception the module raises when simply called on the inputs, or None if it runs."""
    try:
        with torch.no_grad():
            module(*example_inputs)
    except Exception as exc:  # a user's forward can raise anything; here it means "bad inputs"
        return exc
    return None


_CONV_AXES = {torch.nn.Conv1d: ("L",), torch.nn.Conv2d: ("H", "W"), torch.nn.Conv3d: ("D", "H", "W")}


def _expected_input(module: torch.nn.Module) -> str:
    """' Its first layer NAME (TYPE) takes ... (--input-shape EXAMPLE).' from the first convolution
    or linear layer, or a generic hint when the model has neither."""
    for name, layer in module.named_modules():
        label = f"{name or 'the model itself'} ({type(layer).__name__})"
        for kind, axes in _CONV_AXES.items():
            if isinstance(layer, kind):
                dims = ", ".join(["batch", str(layer.in_channels), *axes])
                example = ",".join(["1", str(layer.in_channels), *(["64"] * len(axes))])
                return (
                    f" Its first layer {label} takes {len(axes) + 2}-D input ({dims}):"
                    f" give that shape, batch first (e.g. --input-shape {example})"
                )
        if isinstance(layer, torch.nn.Linear):
            return (
                f" Its first layer {label} takes input whose last dimension is {layer.in_features}:"
                f" give that shape, batch first (e.g. --input-shape 1,{layer.in_features})"
            )
    return " Give the shape the model takes, batch dimension first (e.g. --input-shape 1,3,224,224)"


# ------------------------------------------------------------------------------------- measuring


def _measure(module, gm, flat_inputs, in_spec, exported, limits):
    """Measure the chain, find its segments, and record what split needs."""
    chain = Chain(gm, flat_inputs)
    if not chain.nodes:
        raise CaptureError(
            f"{type(module).__name__} computes nothing torch.export can see (its graph is empty)"
        )
    if not all(
        isinstance(o, torch.fx.Node) and o.op != "get_attr" and o.name in chain.defined for o in chain.outputs
    ):
        raise CaptureError(
            f"{type(module).__name__} returns something other than tensors computed from its inputs "
            "(a constant, None or a Python number); return tensors only (in a tensor, tuple, list or dict)"
        )

    paths = _fill_paths([seg.module_stack_paths(n.meta) for n in chain.nodes])
    starts, names = seg.initial_boundaries(seg.unit_keys(paths, seg.block_paths(module)))
    starts, names = seg.merge_boundaries(
        starts,
        names,
        unit_params=chain.param_bytes,
        unit_flops=chain.flops,
        cut_ok=chain.cut_ok,
        cut_tensors=lambda b: len(chain.crossing(b)),
        cut_bytes=chain.cut_bytes,
        total_nodes=chain.end,
        limits=limits or seg.SegmentationLimits(),
    )

    segments = []
    node_segment: dict[str, int] = {}
    crossings: list[tuple[str, ...]] = []
    for s, (a, b) in enumerate(zip(starts, [*starts[1:], chain.end], strict=True)):
        node_segment.update({node.name: s for node in chain.nodes[a:b]})
        crossings.append(tuple(chain.crossing(b)))
        segments.append(
            Segment(
                name=names[s],
                flops=int(chain.flops(a, b)),
                param_bytes=int(chain.param_bytes(a, b)),
                act_bytes=int(chain.act_bytes(a, b)),
                out_bytes=int(chain.cut_bytes(b)),
            )
        )

    spec_names = {n.name for n in chain.placeholders} | {v for c in crossings for v in c}
    layout = _Layout(
        graph_module=gm,
        node_segment=node_segment,
        input_names=tuple(n.name for n in chain.placeholders),
        output_names=tuple(o.name for o in chain.outputs),
        crossings=crossings,
        specs={v: _spec(chain.by_name[v], chain.batch_expr) for v in spec_names},
        trace_shapes={v: _trace_shape(chain.by_name[v]) for v in spec_names},
        in_spec=in_spec,
        out_spec=exported.call_spec.out_spec,
    )
    return layout, segments, chain.input_bytes()


def _fill_paths(paths: list[list[str]]) -> list[list[str]]:
    """Ops without a module stack (rare bookkeeping ops) belong with the op before them."""
    filled: list[list[str]] = []
    for p in paths:
        filled.append(p if p or not filled else filled[-1])
    return filled


def _spec(node: torch.fx.Node, batch_expr) -> TensorSpec:
    val = node.meta["val"]
    shape = tuple(
        None if isinstance(d, torch.SymInt) and d.node.expr == batch_expr else int(d) for d in val.shape
    )
    return TensorSpec(name=node.name, shape=shape, dtype=dtype_name(val.dtype))


def _trace_shape(node: torch.fx.Node) -> tuple[int, ...]:
    """Concrete shape at the traced batch size (the hint of each symbolic size)."""
    val = node.meta["val"]
    return tuple(d.node.hint if isinstance(d, torch.SymInt) else int(d) for d in val.shape)
