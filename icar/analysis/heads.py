"""Head orthogonality (docs/PAPER_NOTES.md §3.5): cosines between heads' parameters, as matrices and scalar summaries.

At the optimum of claim 2 the rows of A (and of B) are orthogonal; for a general layer we compare the per-head
key-query matrices M_h = Q_h^T K_h and value-output matrices O_h V_h by normalised Frobenius inner products.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from icar import metrics
from icar.models.diagonal import DiagonalAttention
from icar.models.transformer import MultiHeadAttention, Transformer


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """(H, ...) -> (H, H) of <x_h, x_h'> / (||x_h|| ||x_h'||); a zero head has cosine 0 with every head."""
    flat = x.detach().reshape(x.shape[0], -1).double()  # (H, n)
    norms = flat.norm(dim=1)  # (H,)
    unit = flat / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]  # (H, n), zero rows stay zero
    return unit @ unit.T  # (H, H)


def mean_abs_offdiag(M: torch.Tensor) -> float:
    """Mean |M_hh'| over h != h': 0 when the heads are orthogonal; NaN for a single head (nothing to compare)."""
    H = M.shape[0]
    if H < 2:
        return math.nan
    off = ~torch.eye(H, dtype=torch.bool, device=M.device)  # (H, H)
    return M[off].abs().mean().item()


def head_matrices(attn: MultiHeadAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head M_h = Wq_h^T Wk_h and O_h V_h = Wo[:, h] Wv_h, each (H, D, D): head h's scores are
    x_t M_h x_t'^T / sqrt(head_dim) and its output is O_h V_h applied to the weighted sum of the tokens. With
    model.bias=true the scores and values also have affine terms; these matrices (and the orthogonality measure)
    leave the biases out."""
    with torch.no_grad():
        w = attn.head_weights()
        return w.Q.transpose(1, 2) @ w.K, w.O @ w.V  # (H, D, D) each


def head_orthogonality(model: nn.Module) -> dict[str, dict]:
    """{"scalars": {heads_offdiag(name): float}, "matrices": {heads_matrix(name): (H, H)}} with names A, B for the
    diagonal model and layer{i}/kq, layer{i}/ov for a Transformer; both empty for other models. A matrix's key with
    `_offdiag` appended is its scalar's name (the figures title their panels with the keys)."""
    mats: dict[str, torch.Tensor] = {}
    if isinstance(model, DiagonalAttention):
        mats["A"] = cosine_matrix(model.A)  # (H, H)
        mats["B"] = cosine_matrix(model.B)  # (H, H)
    elif isinstance(model, Transformer):
        for i, block in enumerate(model.blocks):
            kq, ov = head_matrices(block.attn)  # (H, D, D) each
            mats[metrics.heads_layer(i, "kq")] = cosine_matrix(kq)
            mats[metrics.heads_layer(i, "ov")] = cosine_matrix(ov)
    return {"scalars": {metrics.heads_offdiag(k): mean_abs_offdiag(v) for k, v in mats.items()},
            "matrices": {metrics.heads_matrix(k): v.cpu() for k, v in mats.items()}}
