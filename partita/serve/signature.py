"""What a served model takes and gives, in the Open Inference Protocol's terms.

A `ModelSignature` names every flat input and output tensor of the model, with its protocol
datatype (`FP32`, `INT64`, ...) and its shape, where -1 marks the batch dimension (dimension 0,
any size). It is read once from the example inputs and one run of the model, and it carries the
pytree specs that rebuild the model's own structure: positional inputs (nested tuples, lists and
dicts of tensors) from the flat tensors of a request, and flat named outputs from what the model
returns (a tensor, a tuple or a dict).

Names: a model whose positional inputs are plain tensors names them after `forward`'s
parameters (`x`, `image`, `features`); nested inputs are `INPUT__0`, `INPUT__1`, ... in flat
order. A tensor output is `OUTPUT__0`; a dict's outputs are its keys (nested keys joined by
`.`); a tuple's are `OUTPUT__0`, `OUTPUT__1`, ...
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from partita.errors import ServeError

# Protocol datatype <-> torch dtype (the numeric types of the Open Inference Protocol; BYTES is not
# a tensor type partita can run).
DATATYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
DATATYPE_OF: dict[torch.dtype, str] = {dtype: name for name, dtype in DATATYPES.items()}


@dataclass(frozen=True)
class TensorMeta:
    """One flat tensor of the model: `shape[0]` is -1 (the batch dimension, any size >= 1)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelSignature:
    """The flat inputs and outputs of a served model, and how to rebuild its own structures."""

    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    in_spec: Any  # pytree spec of the positional arguments tuple
    out_spec: Any  # pytree spec of what the model returns

    def args(self, flat: tuple[torch.Tensor, ...]) -> tuple:
        """The model's positional arguments, rebuilt from flat input tensors (in `inputs` order)."""
        return tuple(pytree.tree_unflatten(list(flat), self.in_spec))

    def flat_outputs(self, result: Any) -> tuple[torch.Tensor, ...]:
        """What the model returned, as flat tensors in `outputs` order."""
        leaves, spec = pytree.tree_flatten(result)
        if spec != self.out_spec:
            raise ServeError(f"the model returned {spec}, not the structure it was served with ({self.out_spec})")
        return tuple(leaves)


def read_signature(module: Any, example_inputs: tuple) -> ModelSignature:
    """Run `module` once on `example_inputs` (batch at dimension 0) and name its inputs and outputs.

    Raises ServeError when an input or output is not a tensor with the example's batch size at
    dimension 0 (requests could not be batched and split back), or has a type the protocol lacks.
    """
    flat_in, in_spec = pytree.tree_flatten(example_inputs)
    batch = _batch_of(flat_in, "input")
    with torch.no_grad():
        result = module(*example_inputs)
    flat_out, out_spec = pytree.tree_flatten(result)
    if _batch_of(flat_out, "output") != batch:
        raise ServeError(f"the model's outputs do not keep the batch dimension (inputs have {batch} rows at "
                         f"dimension 0, outputs {[tuple(t.shape) for t in flat_out]}); partita serve batches "
                         "requests along dimension 0 and needs the outputs to follow it")
    in_names = _input_names(module, example_inputs, len(flat_in))
    out_names = _output_names(result, len(flat_out))
    return ModelSignature(
        inputs=tuple(_meta(n, t) for n, t in zip(in_names, flat_in, strict=True)),
        outputs=tuple(_meta(n, t) for n, t in zip(out_names, flat_out, strict=True)),
        in_spec=in_spec,
        out_spec=out_spec,
    )


def _batch_of(flat: list, what: str) -> int:
    if not flat or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in flat):
        raise ServeError(f"every model {what} must be a tensor with a batch dimension; got "
                         f"{[type(t).__name__ if not isinstance(t, torch.Tensor) else tuple(t.shape) for t in flat]}")
    sizes = {t.shape[0] for t in flat}
    if len(sizes) != 1:
        raise ServeError(f"the model's {what}s disagree on the batch size (dimension 0): {sorted(sizes)}")
    return sizes.pop()


def _meta(name: str, t: torch.Tensor) -> TensorMeta:
    datatype = DATATYPE_OF.get(t.dtype)
    if datatype is None:
        raise ServeError(f"tensor {name!r} has dtype {t.dtype}, which the Open Inference Protocol cannot carry")
    return TensorMeta(name, datatype, (-1, *t.shape[1:]))


def _input_names(module: Any, example_inputs: tuple, count: int) -> list[str]:
    if len(example_inputs) == count and all(isinstance(t, torch.Tensor) for t in example_inputs):
        try:  # a module loaded from a .pt2 may have no Python signature: fall back to positional names
            params = [p.name for p in inspect.signature(module.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            params = []
        if len(params) >= count and len(set(params[:count])) == count:
            return params[:count]
    return [f"INPUT__{i}" for i in range(count)]


def _output_names(result: Any, count: int) -> list[str]:
    if isinstance(result, dict):
        paths, _ = pytree.tree_flatten_with_path(result)
        names = [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in paths]
        if len(set(names)) == count:
            return names
    return [f"OUTPUT__{i}" for i in range(count)]
