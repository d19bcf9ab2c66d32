"""Capture and split a Hugging Face causal LM into decoder stages with a KV cache.

A decoder of L layers is a chain of L segments, one per layer; the first segment also owns the
token (and, GPT-2, position) embeddings, the last the final norm and the LM head. A stage holds a
contiguous run of layers [start, end) and is two torch.export programs, both shipped as stage
archives (`StageProgram`):

- **prefill** takes a whole prompt (token ids [1, T] on the first stage, hidden states [1, T, H]
  after it) and returns the next stage's input plus the keys and values of its layers for every
  prompt position, [n, 1, kv_heads, T, head_dim] each (n = end - start);
- **decode** takes one token (ids [1, 1] or hidden [1, 1, H]), its position [1], and the keys and
  values of the positions before it [n, 1, kv_heads, P, head_dim]; it returns the next stage's
  input and the new position's keys and values [n, 1, kv_heads, 1, head_dim].

The programs are functional: the cache is an input and an output, never a buffer inside them, so
one program serves every sequence and the worker keeps each sequence's cache (`DecoderStage`).
The last stage returns the logits of the last position only, [1, 1, vocab], after the final norm
over every position, as transformers' own `generate` computes them, so that the tokens are the
same. Attention runs through the model's own layers (SDPA, no mask: causal in prefill, all
positions in decode), exactly as the unsplit model runs them in `generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from partita.errors import CaptureError, SplitError
from partita.model.capture import Segment
from partita.model.stage import StageProgram, TensorSpec, dtype_name

ROTARY = ("llama", "qwen2", "mistral", "qwen3")  # families whose layers take rotary position embeddings
FAMILIES = (*ROTARY, "gpt2")


@dataclass(frozen=True)
class DecoderSpec:
    """What the stages of one decoder agree on: its shape, dtype and context length.

    context: the most positions a sequence may hold (prompt + new tokens); each stage sizes its
    static per-sequence cache to it. eos_token_ids: the ids that end a sequence (may be empty).
    """

    name: str
    family: str
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype: str
    context: int
    eos_token_ids: tuple[int, ...]

    def kv_bytes_per_layer(self, positions: int) -> int:
        """Bytes of one layer's keys and values for `positions` positions of one sequence."""
        itemsize = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return 2 * self.kv_heads * self.head_dim * positions * itemsize

    def to_json(self) -> dict:
        return {**self.__dict__, "eos_token_ids": list(self.eos_token_ids)}

    @classmethod
    def from_json(cls, data: dict) -> DecoderSpec:
        return cls(**{**data, "eos_token_ids": tuple(int(t) for t in data["eos_token_ids"])})


def decoder_spec(model: Any, *, context: int, name: str = "decoder") -> DecoderSpec:
    """The `DecoderSpec` of a transformers causal LM (`CaptureError` for a family partita does not split)."""
    config = model.config
    family = getattr(config, "model_type", "")
    if family not in FAMILIES:
        raise CaptureError(f"{name}: decoder family {family!r} is not supported; partita splits {', '.join(FAMILIES)}")
    if family == "gpt2":
        heads = config.n_head
        hidden, layers, kv_heads, max_positions = config.n_embd, config.n_layer, heads, config.n_positions
        head_dim = hidden // heads
    else:
        hidden, layers = config.hidden_size, config.num_hidden_layers
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        max_positions = config.max_position_embeddings
    if context < 2 or context > max_positions:
        raise CaptureError(f"{name}: context must be 2 to {max_positions} positions (the model's limit), got {context}")
    eos = model.generation_config.eos_token_id if model.generation_config is not None else config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    dtype = dtype_name(next(model.parameters()).dtype)
    return DecoderSpec(name, family, layers, hidden, kv_heads, head_dim, config.vocab_size, dtype, context,
                       tuple(int(t) for t in eos_ids))


class _PassCache:
    """The cache a layer sees while one stage program is traced: past keys/values in, new ones kept.

    transformers' attention calls `cache.update(keys, values, layer_idx)` and attends over what it
    returns; DynamicCache concatenates the past and the new along the positions, and so does this.
    """

    def __init__(self, start: int, past_k: torch.Tensor | None, past_v: torch.Tensor | None) -> None:
        self.start = start
        self.past_k = past_k
        self.past_v = past_v
        self.new_k: dict[int, torch.Tensor] = {}
        self.new_v: dict[int, torch.Tensor] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        i = layer_idx - self.start
        self.new_k[i] = key_states
        self.new_v[i] = value_states
        if self.past_k is None or self.past_v is None:
            return key_states, value_states
        return torch.cat([self.past_k[i], key_states], dim=-2), torch.cat([self.past_v[i], value_states], dim=-2)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = sorted(self.new_k)
        return torch.stack([self.new_k[i] for i in order]), torch.stack([self.new_v[i] for i in order])


class DecoderStageModule(torch.nn.Module):
    """Layers [start, end) of a transformers causal LM as a function of (x, positions, past keys/values)."""

    def __init__(self, model: Any, family: str, start: int, end: int, layers: int, *, decode: bool) -> None:
        super().__init__()
        self.family, self.start, self.decode = family, start, decode
        self.first, self.last = start == 0, end == layers
        body = model.transformer if family == "gpt2" else model.model
        if self.first:
            self.embed = body.wte if family == "gpt2" else body.embed_tokens
            if family == "gpt2":
                self.positions = body.wpe
        if family != "gpt2":
            self.rotary = body.rotary_emb
        self.layers = torch.nn.ModuleList(list(body.h if family == "gpt2" else body.layers)[start:end])
        if self.last:
            self.norm = body.ln_f if family == "gpt2" else body.norm
            self.head = model.lm_head

    def forward(self, x: torch.Tensor, position: torch.Tensor | None = None, past_k: torch.Tensor | None = None,
                past_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = x.shape[1]
        if position is None:  # prefill: positions 0 .. T-1
            position_ids = torch.arange(tokens, device=x.device).unsqueeze(0)
        else:
            position_ids = position.unsqueeze(0)
        hidden = x
        if self.first:
            hidden = self.embed(x)
            if self.family == "gpt2":
                hidden = hidden + self.positions(position_ids)
        cache = _PassCache(self.start, past_k, past_v)
        if self.family == "gpt2":
            for block in self.layers:
                hidden = block(hidden, cache, None, None, use_cache=True, position_ids=position_ids)
        else:
            rotary = self.rotary(hidden, position_ids=position_ids)
            for layer in self.layers:
                hidden = layer(hidden, attention_mask=None, position_ids=position_ids, cache=cache, use_cache=True,
                               position_embeddings=rotary)
        if self.last:
            hidden = self.head(self.norm(hidden)[:, -1:, :])
        new_k, new_v = cache.stacked()
        return hidden, new_k, new_v


def decoder_segments(spec: DecoderSpec, model: Any, *, sequences: int, prompt_tokens: int = 16) -> list[Segment]:
    """The decoder as a chain of segments (one per layer) for the planner, in decode-step terms.

    Per segment: `flops` of one decode step (2 per weight, plus attention over the context);
    `param_bytes` its weights plus the KV cache of `sequences` sequences at the full context
    (what the worker must hold: the cache is static); `act_bytes` one step's working activations;
    `out_bytes` what crosses the cut after it (a token's hidden state; logits after the last).
    """
    body = model.transformer if spec.family == "gpt2" else model.model
    blocks = list(body.h if spec.family == "gpt2" else body.layers)
    itemsize = torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
    kv = spec.kv_bytes_per_layer(spec.context) * sequences
    segments = []
    for layer, block in enumerate(blocks):
        weights = sum(p.numel() * p.element_size() for p in block.parameters())
        flops = 2 * sum(p.numel() for p in block.parameters()) + 4 * spec.context * spec.kv_heads * spec.head_dim
        if layer == 0:
            embed = body.wte if spec.family == "gpt2" else body.embed_tokens
            weights += sum(p.numel() * p.element_size() for p in embed.parameters())
            if spec.family == "gpt2":
                weights += sum(p.numel() * p.element_size() for p in body.wpe.parameters())
        out_bytes = spec.hidden * itemsize
        if layer == len(blocks) - 1:
            head = model.lm_head
            weights += sum(p.numel() * p.element_size() for p in head.parameters())
            flops += 2 * spec.hidden * spec.vocab
            out_bytes = spec.vocab * 4
        act = 8 * prompt_tokens * max(spec.hidden, spec.vocab if layer == len(blocks) - 1 else 0) * itemsize
        segments.append(Segment(f"layer{layer}", int(flops), int(weights + kv), int(act), int(out_bytes)))
    return segments


def export_stage(model: Any, spec: DecoderSpec, start: int, end: int, *, index: int) -> tuple[StageProgram, StageProgram]:
    """Stage `index` = layers [start, end) of `model`: its (prefill, decode) programs."""
    if not 0 <= start < end <= spec.layers:
        raise SplitError(f"a decoder stage holds layers [start, end) within [0, {spec.layers}), got [{start}, {end})")
    dtype = getattr(torch, spec.dtype)
    first, last = start == 0, end == spec.layers
    n = end - start
    tokens = torch.export.Dim("tokens", min=2, max=spec.context)
    past = torch.export.Dim("past", min=1, max=spec.context - 1)
    prompt = 4
    x_prefill = torch.zeros(1, prompt, dtype=torch.long) if first else torch.zeros(1, prompt, spec.hidden, dtype=dtype)
    x_decode = torch.zeros(1, 1, dtype=torch.long) if first else torch.zeros(1, 1, spec.hidden, dtype=dtype)
    kv_shape = (n, 1, spec.kv_heads, prompt, spec.head_dim)
    out_name, out_shape = ("logits", (1, 1, spec.vocab)) if last else ("hidden", (1, None, spec.hidden))
    x_name = "input_ids" if first else "hidden"
    x_spec = TensorSpec(x_name, (1, None) if first else (1, None, spec.hidden), "int64" if first else spec.dtype)
    kv_spec = TensorSpec("keys", (n, 1, spec.kv_heads, None, spec.head_dim), spec.dtype)
    programs = []
    args: tuple[Any, ...]
    dynamic: tuple[dict[int, Any], ...]
    inputs: tuple[TensorSpec, ...]
    for decode in (False, True):
        module = DecoderStageModule(model, spec.family, start, end, spec.layers, decode=decode).eval()
        if decode:
            args = (x_decode, torch.zeros(1, dtype=torch.long), torch.zeros(kv_shape, dtype=dtype),
                    torch.zeros(kv_shape, dtype=dtype))
            dynamic = ({}, {}, {3: past}, {3: past})
            inputs = (TensorSpec(x_name, (1, 1) if first else (1, 1, spec.hidden), x_spec.dtype),
                      TensorSpec("position", (1,), "int64"), kv_spec,
                      TensorSpec("values", kv_spec.shape, spec.dtype))
        else:
            args = (x_prefill,)
            dynamic = ({1: tokens},)
            inputs = (x_spec,)
        try:
            with torch.no_grad():
                exported = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
        except Exception as exc:  # torch.export raises many types; the message names the failing op
            raise CaptureError(f"{spec.name}: layers [{start}, {end}) do not export: {type(exc).__name__}: {exc}") from exc
        outputs = (TensorSpec(out_name, out_shape if (last or not decode) else (1, 1, spec.hidden),
                              "float32" if last else spec.dtype),
                   TensorSpec("new_keys", kv_spec.shape, spec.dtype), TensorSpec("new_values", kv_spec.shape, spec.dtype))
        out_spec = pytree.treespec_dumps(pytree.tree_flatten(tuple(range(3)))[1]) if last else None
        programs.append(StageProgram(exported, index=index, start=start, end=end, inputs=inputs, outputs=outputs,
                                     out_spec=out_spec))
    return programs[0], programs[1]


def split_decoder(model: Any, spec: DecoderSpec, bounds: Sequence[tuple[int, int]]) -> list[tuple[StageProgram, StageProgram]]:
    """(prefill, decode) programs for each stage's layer range [start, end); the ranges must tile [0, layers)."""
    expected = 0
    for start, end in bounds:
        if start != expected or end <= start:
            raise SplitError(f"decoder stages must cover layers 0..{spec.layers} in order, got {list(bounds)}")
        expected = end
    if expected != spec.layers:
        raise SplitError(f"decoder stages must cover layers 0..{spec.layers} in order, got {list(bounds)}")
    return [export_stage(model, spec, start, end, index=k) for k, (start, end) in enumerate(bounds)]
