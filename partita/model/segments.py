"""Where a captured graph may be cut: grouping graph nodes into a chain of segments.

The exported graph is a flat list of aten ops. Each op remembers which module called it
(`node.meta["nn_module_stack"]`), and that module hierarchy is what a person means by "a layer":

1. **Blocks.** A module whose class repeats among its siblings (the 16 `Bottleneck`s of a ResNet,
   the 12 `EncoderBlock`s of a ViT, the `Down`s and `Up`s of a U-Net) is a block, and every block
   is one unit. Plain containers (`nn.Sequential`, `nn.ModuleList`, `nn.ModuleDict` themselves, not
   subclasses) are never blocks: we look inside them.
2. **Runs.** Ops outside any block are grouped by their top-level module; when the model has
   blocks, consecutive non-block ops merge into one run (a ResNet's stem, its head).
3. **Tiny units.** A unit whose FLOPs and parameter bytes are both a small share of the
   per-unit average (a ReLU, a pooling or normalisation layer) merges into the unit before it:
   a cut there buys nothing.
4. **Cut points.** The cut after a unit is merged away when what crosses it cannot travel as
   plain tensors (a tuple, a non-contiguous view, a shape with a symbolic size other than the
   batch), when more than `max_cut_tensors` tensors cross it, or when its bytes exceed
   `max_cut_bytes_ratio` times the median crossing of all the model's cut points.

This module is pure bookkeeping over node indices; `capture` measures the nodes and `split`
uses the result.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

#: Module classes that only hold other modules; we look inside them for blocks.
_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)


@dataclass(frozen=True)
class SegmentationLimits:
    """Thresholds of the heuristics above (the defaults suit CNNs and transformers alike).

    max_cut_tensors: a cut that more tensors than this cross is merged away.
    max_cut_bytes_ratio: a cut whose crossing bytes exceed this multiple of the median crossing
        bytes over all candidate cuts is merged away (a ResNet-50's largest cut is 4x its median).
    tiny_ratio: a unit with at most this fraction of the mean unit FLOPs and of the mean unit
        parameter bytes is tiny and merges into its neighbour.
    """

    max_cut_tensors: int = 8
    max_cut_bytes_ratio: float = 16.0
    tiny_ratio: float = 0.05


def block_paths(module: torch.nn.Module) -> set[str]:
    """Qualified names of the repeated blocks of `module` (rule 1 in the module docstring)."""
    blocks: set[str] = set()

    def visit(parent: torch.nn.Module, prefix: str) -> None:
        children = list(parent.named_children())
        counts: dict[type, int] = {}
        for _, child in children:
            counts[type(child)] = counts.get(type(child), 0) + 1
        for name, child in children:
            path = f"{prefix}{name}"
            is_container = type(child) in _CONTAINERS
            if not is_container and counts[type(child)] > 1:
                blocks.add(path)
            elif any(True for _ in child.children()):
                visit(child, path + ".")

    visit(module, "")
    return blocks


def unit_keys(module_paths: Sequence[Sequence[str]], blocks: set[str]) -> list[tuple[bool, str]]:
    """One key per node: (is_block, name). Nodes with equal consecutive keys share a unit.

    `module_paths[i]` is the module stack of node i, outermost first ([] for a root-level op).
    """
    keys: list[tuple[bool, str]] = []
    for stack in module_paths:
        key: tuple[bool, str] | None = None
        for path in stack:
            if path in blocks:
                key = (True, path)
                break
        if key is None:
            top = stack[0].split(".")[0] if stack else ""
            key = (False, top)
        keys.append(key)
    return keys


def initial_boundaries(keys: Sequence[tuple[bool, str]]) -> tuple[list[int], list[str]]:
    """Unit boundaries (node index where a unit starts, first is 0) and unit names.

    With blocks, consecutive non-block ops form one run named "stem" (before the first block),
    "head" (after the last) or by its top-level modules joined with "+". Without blocks, each
    top-level module is a unit; root-level ops (name "") join the unit before them.
    """
    has_blocks = any(is_block for is_block, _ in keys)
    starts: list[int] = []
    members: list[list[str]] = []
    previous: tuple[bool, str] | None = None
    for i, (is_block, name) in enumerate(keys):
        if has_blocks:
            same = previous is not None and (
                (previous == (is_block, name)) or (not is_block and not previous[0])
            )
        else:
            same = previous is not None and (name == previous[1] or name == "")
        if not same:
            starts.append(i)
            members.append([])
        if name and name not in members[-1]:
            members[-1].append(name)
        previous = (is_block, name)
    names: list[str] = []
    block_flags = [keys[s][0] for s in starts]
    for u, parts in enumerate(members):
        if has_blocks and not block_flags[u]:
            if not any(block_flags[:u]):
                names.append("stem")
            elif not any(block_flags[u + 1 :]):
                names.append("head")
            else:
                names.append("+".join(parts) or "ops")
        else:
            names.append("+".join(parts) or "ops")
    return starts, _unique(names)


def merge_boundaries(
    starts: list[int],
    names: list[str],
    *,
    unit_params: Callable[[int, int], int],
    unit_flops: Callable[[int, int], int],
    cut_ok: Callable[[int], bool],
    cut_tensors: Callable[[int], int],
    cut_bytes: Callable[[int], int],
    total_nodes: int,
    limits: SegmentationLimits,
) -> tuple[list[int], list[str]]:
    """Apply rules 3 and 4: drop unit boundaries until every remaining cut is worth offering.

    `starts` are node indices where units begin; the callables measure node ranges [a, b) and
    the cut before node index b. Returns the kept starts and the names of the merged segments.
    """
    starts = list(starts)
    names = list(names)

    def ends() -> list[int]:
        return starts[1:] + [total_nodes]

    # Rule 3: tiny units merge into the unit before them (the first into the next).
    spans = list(zip(starts, ends(), strict=True))
    mean_flops = sum(unit_flops(a, b) for a, b in spans) / max(len(spans), 1)
    mean_params = sum(unit_params(a, b) for a, b in spans) / max(len(spans), 1)
    u = 0
    while len(starts) > 1 and u < len(starts):
        a, b = starts[u], ends()[u]
        tiny_flops = unit_flops(a, b) <= limits.tiny_ratio * mean_flops
        if tiny_flops and unit_params(a, b) <= limits.tiny_ratio * mean_params:
            if u == 0:
                del starts[1]
                del names[1]
            else:
                del starts[u]
                del names[u]
            continue
        u += 1

    # Rule 4: cuts that cannot travel as plain tensors, or cost too much, disappear.
    byte_sizes = [cut_bytes(b) for b in starts[1:] if cut_ok(b)]
    median = statistics.median(byte_sizes) if byte_sizes else 0
    kept_starts = [starts[0]]
    kept_names = [names[0]]
    for b, name in zip(starts[1:], names[1:], strict=True):
        too_big = median > 0 and cut_bytes(b) > limits.max_cut_bytes_ratio * median
        if cut_ok(b) and cut_tensors(b) <= limits.max_cut_tensors and not too_big:
            kept_starts.append(b)
            kept_names.append(name)
        else:
            kept_names[-1] = _join(kept_names[-1], name)
    return kept_starts, _unique(kept_names)


def _join(a: str, b: str) -> str:
    return a if b == a else f"{a}+{b}"


def _unique(names: Sequence[str]) -> list[str]:
    """Make names unique by suffixing repeats with #2, #3 …"""
    seen: dict[str, int] = {}
    out: list[str] = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def module_stack_paths(meta: Mapping) -> list[str]:
    """The module paths of a node's `nn_module_stack`, outermost first ([] for root-level ops)."""
    stack = meta.get("nn_module_stack") or {}
    paths = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        if path:
            paths.append(path)
    return paths
