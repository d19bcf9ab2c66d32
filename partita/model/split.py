"""Cut a captured model into a linear chain of stage programs with bit-identical outputs.

`split(graph, cuts)` assigns every op of the captured graph to the stage holding its segment and
lets `torch.fx.passes.split_module` build one submodule per stage. Two things split_module does
not do, we add around it:

- **A linear chain.** split_module feeds a value straight from the stage that makes it to every
  stage that reads it. We wrap each submodule so that stage k takes exactly the tensors crossing
  the cut before it (the ones `capture` measured as `out_bytes`) and returns those crossing the
  cut after it, passing through whatever it does not use.
- **No sizes across stages.** With a dynamic batch the graph computes sizes (`sym_size(x, 0)` and
  arithmetic on it). split_module would send such a SymInt from one stage to another; a stage
  program cannot take one. Each stage recomputes the sizes it needs from a tensor it holds whose
  shape has the same symbolic size.

Each wrapped stage is then exported again with torch.export (batch dimension dynamic when the
capture was), which makes it a self-contained program that `torch.export.save` can ship.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.passes.split_module import split_module

from partita.errors import SplitError, StageInputError
from partita.model.capture import ModelGraph
from partita.model.measure import compute_nodes, get_attr, is_symbolic
from partita.model.stage import StageProgram, TensorSpec


def split(graph: ModelGraph, cuts: Sequence[int]) -> list[StageProgram]:
    """Cut `graph` into stages; stage k+1 starts after segment cuts[k].

    cuts: indices of segments after which a new stage starts, e.g. [] (one stage) or [3, 9];
    each in [0, len(segments) - 2], strictly increasing. SplitError otherwise.
    Returns len(cuts) + 1 stages; run_stages(stages, *x) equals module(*x) exactly.
    """
    from partita.model.decoder_stage import DecoderGraph

    if isinstance(graph, DecoderGraph):  # a decoder splits into stages with a KV cache (prefill + decode)
        return graph.split_stages(_check_cuts(cuts, len(graph.segments)))  # type: ignore[return-value]
    layout = graph.layout
    if layout is None:
        raise SplitError(
            "this ModelGraph carries no captured graph (it was built from a profile); capture the model"
        )
    n_segments = len(graph.segments)
    cuts = _check_cuts(cuts, n_segments)
    bounds = [0, *[c + 1 for c in cuts], n_segments]
    ranges = list(zip(bounds[:-1], bounds[1:], strict=True))
    stage_of_segment = {s: k for k, (a, b) in enumerate(ranges) for s in range(a, b)}

    gm = _working_copy(layout.graph_module)
    nodes = compute_nodes(gm)
    stage_of = {n: stage_of_segment[layout.node_segment[n.name]] for n in nodes}
    stage_inputs = [layout.input_names] + [layout.crossings[b - 1] for b in bounds[1:-1]]
    stage_outputs = [layout.crossings[b - 1] for b in bounds[1:]]
    _localize_sizes(gm, nodes, stage_of, stage_inputs)

    def partition(node: torch.fx.Node) -> int:
        if node not in stage_of:
            raise SplitError(f"internal: op {node.name} ({node.target}) was not assigned to a stage")
        return stage_of[node]

    parts = split_module(
        gm,
        None,
        partition,
        keep_original_order=True,
        keep_original_node_name=True,
        keep_original_input_name=True,
    )
    submodules = dict(parts.named_children())
    # split_module hands weights to its submodules as inputs; each stage holds its own instead.
    weights = {
        n.name: get_attr(gm, n.target)
        for n in gm.graph.nodes
        if n.op == "get_attr" and isinstance(get_attr(gm, n.target), torch.Tensor)
    }

    out_spec = pytree.treespec_dumps(layout.out_spec)
    stages = []
    for k, (start, end) in enumerate(ranges):
        submodule = submodules.get(f"submod_{k}")
        if submodule is None:
            raise SplitError(
                f"internal: split_module produced no submodule for stage {k} (segments {start}..{end})"
            )
        wrapper = _StageModule(submodule, stage_inputs[k], stage_outputs[k], weights)
        exported = _export_stage(wrapper, [layout.specs[v] for v in stage_inputs[k]], layout, k)
        stages.append(
            StageProgram(
                exported,
                index=k,
                start=start,
                end=end,
                inputs=[layout.specs[v] for v in stage_inputs[k]],
                outputs=[layout.specs[v] for v in stage_outputs[k]],
                out_spec=out_spec if k == len(ranges) - 1 else None,
            )
        )
    return stages


def run_stages(stages: Sequence[StageProgram], *inputs: Any) -> Any:
    """Run the stages in order on the model's inputs; returns what the model returns."""
    if not stages:
        raise StageInputError("run_stages needs at least one stage")
    flat = flatten_inputs(*inputs)
    for stage in stages:
        flat = stage.run(*flat)
    return unflatten_outputs(stages[-1], flat)


def flatten_inputs(*inputs: Any) -> tuple[torch.Tensor, ...]:
    """The flat tensors stage 0 takes, from the model's positional inputs (nested tuples/lists/dicts)."""
    leaves = pytree.tree_leaves(inputs)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise StageInputError(
                f"model inputs must be tensors (nested in tuples, lists, dicts); got {type(leaf).__name__}"
            )
    return tuple(leaves)


def unflatten_outputs(last_stage: StageProgram, flat: Sequence[torch.Tensor]) -> Any:
    """The model's output structure (tensor, tuple, dict …) from the last stage's flat outputs."""
    if last_stage.out_spec is None:
        raise StageInputError(
            f"stage {last_stage.index} is not the last stage of its pipeline (it has no output structure)"
        )
    spec = pytree.treespec_loads(last_stage.out_spec)
    if spec.num_leaves != len(flat):
        raise StageInputError(f"the model returns {spec.num_leaves} tensors, got {len(flat)}")
    return pytree.tree_unflatten(list(flat), spec)


# ------------------------------------------------------------------------------------- internals


def _check_cuts(cuts: Sequence[int], n_segments: int) -> list[int]:
    try:
        cuts = [int(c) for c in cuts]
    except (TypeError, ValueError) as exc:
        raise SplitError(f"cuts must be segment indices (integers), got {cuts!r}") from exc
    for c in cuts:
        if not 0 <= c <= n_segments - 2:
            raise SplitError(
                f"cut after segment {c} is out of range: the model has {n_segments} segments, "
                f"so cuts are in 0..{n_segments - 2}"
            )
    if any(b <= a for a, b in zip(cuts, cuts[1:], strict=False)):
        raise SplitError(f"cuts must be strictly increasing, got {cuts}")
    return cuts


def _working_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule sharing `gm`'s weights with its own copy of the graph (we rewrite it)."""
    graph = copy.deepcopy(gm.graph)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)  # torch.export's input guard: stages check their own inputs
    return torch.fx.GraphModule(gm, graph)


def _localize_sizes(
    gm: torch.fx.GraphModule,
    nodes: list[torch.fx.Node],
    stage_of: dict[torch.fx.Node, int],
    stage_inputs: Sequence[Sequence[str]],
) -> None:
    """Give every stage its own copies of the size computations it uses (see module docstring)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    inputs = [[by_name[v] for v in names] for names in stage_inputs]
    memo: dict[tuple[torch.fx.Node, int], torch.fx.Node] = {}

    def held(tensor: torch.fx.Node, stage: int) -> bool:
        return stage_of.get(tensor) == stage or tensor in inputs[stage]

    def local(sym: torch.fx.Node, stage: int, user: torch.fx.Node) -> torch.fx.Node:
        key = (sym, stage)
        if key in memo:
            return memo[key]
        if sym.op != "call_function":
            raise SplitError(
                f"internal: size value {sym.name} comes from a {sym.op} and cannot be recomputed"
            )
        with gm.graph.inserting_before(user):
            if sym.target is torch.ops.aten.sym_size.int:
                tensor, dim = _size_source(sym, stage, user, held, inputs[stage])
                clone = gm.graph.call_function(sym.target, (tensor, dim))
            else:

                def remap(arg: Any) -> Any:
                    if isinstance(arg, torch.fx.Node) and is_symbolic(arg):
                        return local(arg, stage, user)
                    if isinstance(arg, torch.fx.Node) and not held(arg, stage):
                        raise SplitError(
                            f"stage {stage} needs {sym.name} = {sym.target}({arg.name}, ...), but "
                            f"{arg.name} belongs to another stage; choose other cuts"
                        )
                    return arg

                clone = gm.graph.call_function(
                    sym.target,
                    torch.fx.node.map_aggregate(sym.args, remap),
                    torch.fx.node.map_aggregate(sym.kwargs, remap),
                )
        clone.meta = dict(sym.meta)
        stage_of[clone] = stage
        memo[key] = clone
        return clone

    for node in nodes:
        stage = stage_of[node]
        for arg in node.all_input_nodes:
            if arg.op != "placeholder" and is_symbolic(arg):
                node.replace_input_with(arg, local(arg, stage, node))
    # The original size nodes have no users left.
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "call_function" and is_symbolic(node) and not node.users and node not in stage_of:
            gm.graph.erase_node(node)
    gm.recompile()


def _size_source(
    sym: torch.fx.Node, stage: int, user: torch.fx.Node, held, stage_inputs: list[torch.fx.Node]
) -> tuple[torch.fx.Node, int]:
    """A tensor the stage holds, and a dim of it, whose size equals `sym` (a sym_size node)."""
    tensor, dim = sym.args[0], int(sym.args[1])
    if held(tensor, stage):
        return tensor, dim
    want = sym.meta["val"].node.expr
    for candidate in [*user.all_input_nodes, *stage_inputs]:
        val = candidate.meta.get("val")
        if isinstance(val, torch.Tensor) and held(candidate, stage):
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and size.node.expr == want:
                    return candidate, d
    raise SplitError(
        f"stage {stage} needs the size {want} (of {tensor.name}) but holds no tensor of that size; "
        "choose other cuts"
    )


class _StageModule(torch.nn.Module):
    """Stage k of the linear chain: takes the values crossing into it, returns those crossing out."""

    def __init__(
        self,
        submodule: torch.fx.GraphModule,
        input_names: Sequence[str],
        output_names: Sequence[str],
        weights: dict[str, torch.Tensor],
    ):
        super().__init__()
        self.stage = submodule
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.sub_inputs = tuple(n.name for n in submodule.graph.nodes if n.op == "placeholder")
        output = next(n for n in submodule.graph.nodes if n.op == "output")
        produced = output.args[0]
        self.single_output = isinstance(produced, torch.fx.Node)
        produced = (produced,) if self.single_output else tuple(produced)
        self.sub_outputs = tuple(n.name for n in produced)
        for name in self.sub_inputs:
            if name in weights and name not in self.input_names:
                self.register_buffer(name, weights[name].detach())
        available = set(self.input_names) | set(self.sub_outputs)
        missing = [n for n in self.sub_inputs if n not in self.input_names and n not in weights] + [
            n for n in self.output_names if n not in available
        ]
        if missing:
            raise SplitError(
                f"internal: stage values {missing} are neither stage inputs nor computed by the stage"
            )

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env = dict(zip(self.input_names, tensors, strict=True))
        result = self.stage(*[env[n] if n in env else getattr(self, n) for n in self.sub_inputs])
        if self.single_output:
            result = (result,)
        env.update(zip(self.sub_outputs, result, strict=True))
        return tuple(env[n] for n in self.output_names)


def _export_stage(
    wrapper: _StageModule, specs: list[TensorSpec], layout, index: int
) -> torch.export.ExportedProgram:
    """torch.export one stage, the batch dimension dynamic wherever the spec says None."""
    examples = []
    dynamic = []
    batch = torch.export.Dim("batch")
    for spec in specs:
        shape = layout.trace_shapes[spec.name]
        examples.append(torch.zeros(shape, dtype=getattr(torch, spec.dtype)))
        dims = {d: batch for d, size in enumerate(spec.shape) if size is None}
        dynamic.append(dims or None)
    try:
        with torch.no_grad():
            return torch.export.export(wrapper, tuple(examples), dynamic_shapes=(tuple(dynamic),))
    except Exception as exc:  # any export failure of a stage is a split failure the user should see
        raise SplitError(
            f"stage {index} could not be exported: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from exc
