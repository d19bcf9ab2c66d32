"""Capture the kernels eager inference runs, including PyTorch's transformer fast paths.

In eval mode under `torch.no_grad()`, `nn.TransformerEncoderLayer` and `nn.MultiheadAttention`
(batch-first, even head count, ...) skip their Python code and call one fused kernel:
`aten._transformer_encoder_layer_fwd` and `aten._native_multi_head_attention`. The fused kernels
round differently from the unfused ops, so a graph traced through the Python code is not
bit-identical to what the same module computes in eager inference.

The modules decline the fast path while being traced only because of the tracer itself: they see
that a tensor "has a torch function" (export's fake tensors do) or that make_fx is tracing. Both
checks exist to protect tensor subclasses and tracers that cannot handle the fused ops; torch.export
can (the fused ops have fake-tensor kernels). So, while `capture` exports, `eager_fast_paths()`
answers those two checks as eager inference would, for calls from `TransformerEncoderLayer.forward`
and `MultiheadAttention.forward` only (the make_fx check exists only in the latter), and the graph records the fused kernels eager runs. All other fast-path conditions (eval mode,
no grad, shapes, masks, hooks) are still checked by PyTorch's own code.

FlopCounterMode has no formula for the fused kernels; `FUSED_FLOP_FORMULAS` counts them as the
matmuls they contain, the same count the unfused graph would get.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

import torch
import torch.nn.modules.activation as _activation
from torch._subclasses.fake_tensor import FakeTensor

#: The functions whose fast-path checks we answer (not TransformerEncoder.forward: its fast path turns
#: padded batches into nested tensors, which torch.export cannot capture).
_FAST_PATH_CALLERS = frozenset({"TransformerEncoderLayer.forward", "MultiheadAttention.forward"})
_lock = threading.Lock()


@contextlib.contextmanager
def eager_fast_paths() -> Iterator[None]:
    """While active, transformer modules traced on fake tensors take the fast path eager takes."""
    original_has_torch_function = torch.overrides.has_torch_function
    original_is_tracing = _activation._is_make_fx_tracing

    def has_torch_function(relevant_args):
        caller = sys._getframe(1).f_code
        from_torch_nn = caller.co_filename.replace("\\", "/").endswith(
            ("torch/nn/modules/transformer.py", "torch/nn/modules/activation.py")
        )
        tensors = [a for a in relevant_args if isinstance(a, torch.Tensor)]
        if (
            from_torch_nn
            and caller.co_qualname in _FAST_PATH_CALLERS
            and tensors
            and len(tensors) == len(relevant_args)
        ):
            if all(isinstance(t, FakeTensor) for t in tensors):
                return False  # only export's own fake tensors would have sent us down the slow path
        return original_has_torch_function(relevant_args)

    def is_make_fx_tracing() -> bool:
        return False

    with _lock:
        torch.overrides.has_torch_function = has_torch_function
        _activation._is_make_fx_tracing = is_make_fx_tracing
        try:
            yield
        finally:
            torch.overrides.has_torch_function = original_has_torch_function
            _activation._is_make_fx_tracing = original_is_tracing


def _transformer_encoder_layer_flops(
    src, embed_dim, num_heads, qkv_weight, *args, out_shape=None, **kwargs
) -> int:
    """2·B·L·(3E² + E² + 2·E·F) for the projections and FFN, plus 4·B·L²·E for attention."""
    batch, length, embed = src
    ffn_weight_1 = args[
        10
    ]  # schema: qkv_bias, proj_weight, proj_bias, use_gelu, norm_first, eps, 4 norms, ffn_weight_1
    ffn = ffn_weight_1[0]
    projections = 2 * batch * length * (3 * embed * embed + embed * embed + 2 * embed * ffn)
    attention = 4 * batch * length * length * embed
    return projections + attention


def _native_mha_flops(query, key, value, embed_dim, num_heads, *args, out_shape=None, **kwargs) -> int:
    """In-projections of q, k, v, the two attention matmuls, and the out-projection."""
    batch, q_len, embed = query
    kv_len = key[1]
    projections = 2 * batch * embed * embed * (q_len + 2 * kv_len) + 2 * batch * q_len * embed * embed
    attention = 4 * batch * q_len * kv_len * embed
    return projections + attention


FUSED_FLOP_FORMULAS = {
    torch.ops.aten._transformer_encoder_layer_fwd: _transformer_encoder_layer_flops,
    torch.ops.aten._native_multi_head_attention: _native_mha_flops,
}
