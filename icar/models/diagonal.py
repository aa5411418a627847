"""The reduced diagonal multi-head linear attention of Figure 3 (PAPER.md section 3).

s_hat_{tau+1} = sum_{t <= tau} P[tau, t] sum_h <a_h * s_{tau-1}, s_t> (b_h * s_t),  <x, y> = sum_i conj(x_i) y_i,
with A, B in R^{H x d} and one positional matrix P (row tau serves the prediction from the prefix s_1..s_tau).
The query is the second-to-last token s_{tau-1}, so the first prediction (tau = 1, s_0 = 0) is always 0 and the
loss counts tau = 2..T. Works on complex sequences directly (the unitary family); no residual, norm or softmax.
"""

from __future__ import annotations

import torch
from torch import nn


class DiagonalAttention(nn.Module):
    """(A, B, P) model; input s_1..s_T (B, T, d), real or complex -> predictions of s_2..s_{T+1} (B, T, d)."""

    accepts_complex = True
    first_position = 2  # tau = 1 has no query token

    def __init__(self, d: int, n_heads: int, max_len: int, init_std: float = 0.1) -> None:
        super().__init__()
        self.A = nn.Parameter(init_std * torch.randn(n_heads, d))  # key-query diagonals a_h
        self.B = nn.Parameter(init_std * torch.randn(n_heads, d))  # value diagonals b_h
        self.P = nn.Parameter(init_std * torch.randn(max_len, max_len))
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len)), persistent=False)

    @property
    def C(self) -> torch.Tensor:
        """C = B^T A (d, d): the loss depends on (A, B) only through it."""
        return self.B.T @ self.A

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        T = s.shape[1]
        query = torch.nn.functional.pad(s, (0, 0, 1, 0))[:, :-1]  # (B, T, d): s_{tau-1}, with s_0 = 0
        A, Bv = self.A.to(s.dtype), self.B.to(s.dtype)
        scores = torch.einsum("btk,hk,bsk->bhts", query.conj(), A, s)  # (B, H, T, T): <a_h * s_{tau-1}, s_t>
        weights = scores * (self.P[:T, :T] * self.causal[:T, :T]).to(s.dtype)  # (B, H, T, T)
        return torch.einsum("bhts,hi,bsi->bti", weights, Bv, s)  # (B, T, d)
