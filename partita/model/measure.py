"""Measure an exported graph as a chain of ops: FLOPs, live bytes, and what crosses each cut.

The chain is the graph's compute ops in graph order. Cutting "before op b" splits it into ops
[0, b) and [b, end); the values crossing that cut are those defined before b (graph inputs count
as defined before op 0) and read at or after b (the graph's outputs are read at the end). Size
computations (SymInt nodes) are not in the chain and never cross: every stage recomputes them.

The graph is run once on fake tensors at the user's batch size (shapes and strides only, no
arithmetic) under torch.utils.flop_counter, so measuring costs about as much as tracing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.flop_counter import FlopCounterMode

from partita.model.fastpath import FUSED_FLOP_FORMULAS


def is_symbolic(node: torch.fx.Node) -> bool:
    """A node computing a size (SymInt/SymFloat/SymBool or a Python number); stages recompute these."""
    val = node.meta.get("val")
    return isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def compute_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The ops that make up the chain, in graph order (no inputs, weights, sizes or guards)."""
    nodes = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if node.op == "call_module" and node.target == "_guards_fn":
            continue  # torch.export's input-shape guard: it checks inputs, it computes nothing
        if is_symbolic(node):
            continue
        nodes.append(node)
    return nodes


class _Recorder(torch.fx.Interpreter):
    """Runs the graph op by op, recording FLOPs, live activation bytes and each value's layout."""

    def __init__(self, gm: torch.fx.GraphModule, counter: FlopCounterMode, activation_names: set[str]):
        super().__init__(gm)
        self.counter = counter
        self.activation_names = activation_names
        self.flops: dict[str, int] = {}
        self.live_bytes: dict[str, int] = {}
        self.nbytes: dict[str, int] = {}
        self.contiguous: dict[str, bool] = {}
        self.storage: dict[str, int] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        before = self.counter.get_total_flops()
        out = super().run_node(n)
        self.flops[n.name] = self.counter.get_total_flops() - before
        if isinstance(out, torch.Tensor):
            self.nbytes[n.name] = out.numel() * out.element_size()
            self.contiguous[n.name] = out.is_contiguous()
            self.storage[n.name] = StorageWeakRef(out.untyped_storage()).cdata
        if n.name in self.activation_names:
            self.live_bytes[n.name] = self._live_bytes(out)
        return out

    def _live_bytes(self, out: Any) -> int:
        """Bytes of distinct storages alive right after this op (views share their base's storage)."""
        storages: dict[int, int] = {}
        live = [value for node, value in self.env.items() if node.name in self.activation_names]
        for t in pytree.tree_leaves([*live, out]):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                storages[StorageWeakRef(storage).cdata] = storage.nbytes()
        return sum(storages.values())


class Chain:
    """The measured chain of one exported graph module (see the module docstring)."""

    def __init__(self, gm: torch.fx.GraphModule, flat_inputs: list[torch.Tensor]):
        self.gm = gm
        self.nodes = compute_nodes(gm)
        self.by_name = {n.name: n for n in gm.graph.nodes}
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        output = next(n for n in gm.graph.nodes if n.op == "output")
        self.outputs: list[Any] = pytree.tree_leaves(output.args[0])
        self.batch_expr = _batch_expr(self.placeholders)
        self._liveness()
        self._run(flat_inputs)
        self._param_reads = _param_reads(gm)

    @property
    def end(self) -> int:
        return len(self.nodes)

    def _liveness(self) -> None:
        self.defined: dict[str, int] = {n.name: -1 for n in self.placeholders}
        self.defined.update({n.name: i for i, n in enumerate(self.nodes)})
        self.last_use: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for arg in node.all_input_nodes:
                if arg.name in self.defined:
                    self.last_use[arg.name] = max(self.last_use.get(arg.name, -1), i)
        for out in self.outputs:
            self.last_use[out.name] = self.end
        for ph in self.placeholders:
            self.last_use.setdefault(ph.name, 0)  # every input enters stage 0, even an unused one

    def _run(self, flat_inputs: list[torch.Tensor]) -> None:
        activation_names = {n.name for n in self.placeholders} | {n.name for n in self.nodes}
        counter = FlopCounterMode(display=False, custom_mapping=FUSED_FLOP_FORMULAS)
        self.recorder = _Recorder(self.gm, counter, activation_names)
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_inputs = [fake_mode.from_tensor(t) for t in flat_inputs]
        with torch.no_grad(), fake_mode, counter:
            self.recorder.run(*fake_inputs)

    # ------------------------------------------------------------------ cuts (before op index b)

    def crossing(self, b: int) -> list[str]:
        """Names of the values crossing the cut before op b, in definition order (b == end: outputs)."""
        if b >= self.end:
            return [o.name for o in self.outputs]
        names = [v for v, d in self.defined.items() if d < b <= self.last_use.get(v, -2)]
        return sorted(names, key=lambda v: self.defined[v])

    def cut_bytes(self, b: int) -> int:
        return sum(self.recorder.nbytes.get(v, 0) for v in self.crossing(b))

    def cut_ok(self, b: int) -> bool:
        """Whether what crosses can travel as plain tensors: contiguous, sized by the batch or constants,
        and no two of them views of one memory (an in-place op after the cut would see them diverge)."""
        crossing = self.crossing(b)
        if len({self.recorder.storage.get(v) for v in crossing}) < len(crossing):
            return False
        for v in crossing:
            val = self.by_name[v].meta.get("val")
            if not isinstance(val, torch.Tensor) or not self.recorder.contiguous.get(v, False):
                return False
            if any(isinstance(d, torch.SymInt) and d.node.expr != self.batch_expr for d in val.shape):
                return False
        return True

    # ------------------------------------------------------------------ spans of ops [a, b)

    def flops(self, a: int, b: int) -> int:
        return sum(self.recorder.flops.get(n.name, 0) for n in self.nodes[a:b])

    def param_bytes(self, a: int, b: int) -> int:
        """Bytes of the weights, buffers and constants ops [a, b) read (each counted once)."""
        used: dict[str, int] = {}
        for node in self.nodes[a:b]:
            used.update(self._param_reads.get(node.name, {}))
        return sum(used.values())

    def act_bytes(self, a: int, b: int) -> int:
        return max(self.recorder.live_bytes.get(n.name, 0) for n in self.nodes[a:b])

    def input_bytes(self) -> int:
        return sum(self.recorder.nbytes.get(n.name, 0) for n in self.placeholders)


def _batch_expr(placeholders: list[torch.fx.Node]) -> Any:
    """The symbol of the dynamic batch dimension, or None when the capture is static."""
    for ph in placeholders:
        val = ph.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 0 and isinstance(val.shape[0], torch.SymInt):
            return val.shape[0].node.expr
    return None


def _param_reads(gm: torch.fx.GraphModule) -> Mapping[str, dict[str, int]]:
    """For each op, the weights/buffers/constants it reads: {qualified name: bytes}."""
    sizes: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = get_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                sizes[node.name] = value.numel() * value.element_size()
    reads: dict[str, dict[str, int]] = {}
    for node in gm.graph.nodes:
        used = {a.target: sizes[a.name] for a in node.all_input_nodes if a.name in sizes}
        if used:
            reads[node.name] = used
    return reads


def get_attr(root: torch.nn.Module, qualname: str) -> Any:
    """The attribute `a.b.c` of `root`."""
    value: Any = root
    for part in qualname.split("."):
        value = getattr(value, part)
    return value
