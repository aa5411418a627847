"""A Transformer block recomputed from scratch in numpy from `MultiHeadAttention.head_weights()` (and the raw P,
positional embeddings and LayerNorm parameters): the independent reference for the public layer API."""

from __future__ import annotations

import numpy as np
import torch

from icar.config import Attention, Positional
from icar.models.transformer import Block


def _numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy()


def _causal_softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis restricted to t' <= t: scores (..., T, T)."""
    T = scores.shape[-1]
    masked = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    e = np.exp(masked - masked.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_block(block: Block, x_query: torch.Tensor, x_context: torch.Tensor) -> torch.Tensor:
    """The block's output (B, T, D) with queries (and the residual) from x_query, keys and values from x_context."""
    attn = block.attn
    w = {k: _numpy(v) for k, v in attn.head_weights()._asdict().items()}
    xq, xc = _numpy(x_query), _numpy(x_context)  # (B, T, D) each
    T, dh = xq.shape[1], w["Q"].shape[1]
    causal = np.tril(np.ones((T, T)))

    def project(M: np.ndarray, b: np.ndarray | None, x: np.ndarray) -> np.ndarray:  # -> (..., H, T, dh)
        y = np.einsum("hij,...tj->...hti", M, x)
        return y if b is None else y + b[:, None, :]

    q, k, v = project(w["Q"], w["bq"], xq), project(w["K"], w["bk"], xc), project(w["V"], w["bv"], xc)
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(dh)  # (B, H, T, T)
    weights = _causal_softmax(scores) if attn.kind == Attention.softmax else scores * causal
    if attn.positional == Positional.multiplicative:
        weights = weights * _numpy(attn.P)[:T, :T] * causal
    elif attn.positional == Positional.softmax_positional:
        pe = _numpy(attn.pos_emb)[:T]  # (T, D)
        qp, kp = project(w["Q"], w["bq"], pe), project(w["K"], w["bk"], pe)  # (H, T, dh) each
        weights = weights * _causal_softmax(qp @ kp.swapaxes(-1, -2) / np.sqrt(dh))
    y = np.einsum("hjd,bhtd->btj", w["O"], weights @ v)  # (B, T, D): sum over heads of O_h y_h
    if w["bo"] is not None:
        y = y + w["bo"]
    if isinstance(block.norm, torch.nn.LayerNorm):
        mean, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
        y = (y - mean) / np.sqrt(var + block.norm.eps) * _numpy(block.norm.weight) + _numpy(block.norm.bias)
    return torch.from_numpy(xq + y if block.residual else y)
