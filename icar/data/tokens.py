"""Token encodings of docs/PAPER_NOTES.md §1.4, and the real view of complex sequences."""

from __future__ import annotations

import torch

from icar.config import Tokens


def realify(s: torch.Tensor) -> torch.Tensor:
    """Complex (..., d) -> real (..., 2d) as (Re, Im); real tensors pass through unchanged.

    A unitary diag(exp(i theta)) acting on complex coordinates is a 2x2 rotation on each (Re_j, Im_j) pair,
    so this is the real 2x2-block picture of the unitary family (with the pairs' coordinates regrouped).
    """
    return torch.cat([s.real, s.imag], dim=-1) if s.is_complex() else s


def encode_tokens(s: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """Tokens e_1..e_T from s_1..s_T (n, T, d): raw e_t = s_t, or augmented e_t = (0_d, s_t, s_{t-1}), s_0 = 0."""
    if tokens == Tokens.raw:
        return s
    if tokens == Tokens.augmented:
        prev = torch.nn.functional.pad(s, (0, 0, 1, 0))[:, :-1]  # (n, T, d): s_0 = 0, s_1, ..., s_{T-1}
        return torch.cat([torch.zeros_like(s), s, prev], dim=-1)  # (n, T, 3d)
    raise ValueError(f"unknown token encoding {tokens!r}; allowed: {[t.value for t in Tokens]}")


def token_width(d: int, tokens: Tokens) -> int:
    return 3 * d if tokens == Tokens.augmented else d
