"""The reduced diagonal multi-head linear attention of Figure 3 (docs/PAPER_NOTES.md §2.6).

s_hat_{tau+1} = sum_{t <= tau} P[tau, t] sum_h <a_h * s_{tau-1}, s_t> (b_h * s_t),  <x, y> = sum_i conj(x_i) y_i,
with A, B in R^{H x d} and one positional matrix P (row tau serves the prediction from the prefix s_1..s_tau).
The query is the second-to-last token s_{tau-1}, so the first prediction (tau = 1, s_0 = 0) is always 0 and the
loss counts tau = 2..T. Works on complex sequences directly (the unitary family); no residual, norm or softmax.
With pe_only, C = B^T A is fixed to I (A = B = I, H = d) and only P is trained, from P = 0: the authors'
positional-only experiment (docs/PAPER_NOTES.md §3.6 and §4.6, Figure 6). With softmax_positional, row tau's weights are a softmax of
P over t <= tau (non-negative, summing to 1) instead of P itself: claim 7's softmax positional weighting, which
cannot carry the opposite-sign taps of the rotation-block optimum (claim 3).
"""

from __future__ import annotations

import torch
from torch import nn


class DiagonalAttention(nn.Module):
    """(A, B, P) model; input s_1..s_T (B, T, d), real or complex -> predictions of s_2..s_{T+1} (B, T, d)."""

    accepts_complex = True
    first_position = 2  # tau = 1 has no query token

    def __init__(self, d: int, n_heads: int, max_len: int, init_std: float = 0.1, pe_only: bool = False,
                 softmax_positional: bool = False) -> None:
        super().__init__()
        self.softmax_positional = softmax_positional
        if pe_only:
            if n_heads != d:
                raise ValueError(f"pe_only fixes A = B = I: it needs n_heads == d, got n_heads={n_heads}, d={d}")
            self.register_buffer("A", torch.eye(d))  # fixed: C = B^T A = I
            self.register_buffer("B", torch.eye(d))
            self.P = nn.Parameter(torch.zeros(max_len, max_len))
        else:
            self.A = nn.Parameter(init_std * torch.randn(n_heads, d))  # key-query diagonals a_h
            self.B = nn.Parameter(init_std * torch.randn(n_heads, d))  # value diagonals b_h
            self.P = nn.Parameter(init_std * torch.randn(max_len, max_len))
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len)), persistent=False)

    @property
    def C(self) -> torch.Tensor:
        """C = B^T A (d, d): the loss depends on (A, B) only through it."""
        return self.B.T @ self.A

    def positional_weights(self, T: int) -> torch.Tensor:
        """(T, T) causal weights p_{tau, t}: P itself, or its row-wise softmax over t <= tau."""
        if self.softmax_positional:
            return torch.softmax(self.P[:T, :T].masked_fill(self.causal[:T, :T] == 0, float("-inf")), dim=-1)
        return self.P[:T, :T] * self.causal[:T, :T]

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        T = s.shape[1]
        query = torch.nn.functional.pad(s, (0, 0, 1, 0))[:, :-1]  # (B, T, d): s_{tau-1}, with s_0 = 0
        A, Bv = self.A.to(s.dtype), self.B.to(s.dtype)
        scores = torch.einsum("btk,hk,bsk->bhts", query.conj(), A, s)  # (B, H, T, T): <a_h * s_{tau-1}, s_t>
        weights = scores * self.positional_weights(T).to(s.dtype)  # (B, H, T, T)
        return torch.einsum("bhts,hi,bsi->bti", weights, Bv, s)  # (B, T, d)
