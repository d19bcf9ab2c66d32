"""Model factories the benchmarks reference as `benchmarks/models.py:NAME` (no downloads)."""

from __future__ import annotations

import torch


def bert_base() -> torch.nn.Module:
    """A BERT-base-sized encoder: 12 layers, d_model 768, 12 heads, FFN 3072, GELU; input (batch, 128, 768).

    Embeddings are left out: the input is the embedded sequence, as a float tensor, so the profile
    covers the encoder's compute and the activations that cross its layer boundaries.
    """
    layer = torch.nn.TransformerEncoderLayer(
        d_model=768, nhead=12, dim_feedforward=3072, activation="gelu", batch_first=True, dropout=0.0
    )
    return torch.nn.TransformerEncoder(layer, num_layers=12, enable_nested_tensor=False).eval()
