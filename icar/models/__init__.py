"""Models: the configurable causal Transformer and the diagonal (A, B, P) model of Figure 3."""

from __future__ import annotations

from torch import nn

from icar.config import Attention, DataConfig, DiagonalConfig, Family, ModelConfig, Tokens
from icar.data.tokens import token_width
from icar.models.diagonal import DiagonalAttention
from icar.models.transformer import Transformer

__all__ = ["DiagonalAttention", "Transformer", "build_model"]


def build_model(cfg: ModelConfig, data: DataConfig) -> nn.Module:
    """The model a config asks for, sized for its data (complex data doubles a real model's widths)."""
    if isinstance(cfg, DiagonalConfig):
        return DiagonalAttention(data.d, cfg.n_heads, data.T, cfg.init_std, pe_only=cfg.pe_only,
                                 softmax_positional=cfg.attention == Attention.softmax)
    d = 2 * data.d if data.family == Family.unitary else data.d
    return Transformer(cfg, token_width(d, data.tokens), d, data.T, data.tokens == Tokens.augmented)
