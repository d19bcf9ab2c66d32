"""The model layer: load a model, capture it with torch.export, split it into stage programs.

graph = capture(load_ref("torchvision:resnet50"), (torch.randn(1, 3, 224, 224),))
stages = split(graph, cuts=[5, 11])
y = run_stages(stages, x)          # torch.equal to the model's own output
"""

from partita.model.capture import ModelGraph, Segment, capture
from partita.model.ref import load_ref
from partita.model.split import flatten_inputs, run_stages, split, unflatten_outputs
from partita.model.stage import StageProgram, TensorSpec

__all__ = [
    "ModelGraph",
    "Segment",
    "StageProgram",
    "TensorSpec",
    "capture",
    "flatten_inputs",
    "load_ref",
    "run_stages",
    "split",
    "unflatten_outputs",
]
