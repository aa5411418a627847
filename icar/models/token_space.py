"""Linear attention evaluated in a low-rank token space: the fast kernel for batch-independent positional weights.

When a layer's input is `x_t = basis s_t (+ offset)` with few token coordinates s_t (a first layer on raw d = 5
tokens: r = d + 1 with the bias), linear attention with positional weights pos_h that are the same for every
sequence is a fixed trilinear map of the tokens (derivation in docs/PAPER_NOTES.md, "The token-space kernel"):

    y_t = b_o + sum_h sum_{t'} pos_h[t, t'] (s_t^T M_h s_t') U_h s_t',   M_h = A_q,h^T A_k,h / sqrt(dh),  U_h = W_o,h A_v,h
        = b_o + sum_e s_t[e] sum_{t', p} O_{t'}[p] K[(t', p), (t, e, :)],  O_{t'} = upper triangle of s_t' s_t'^T,
    K[(t', p), (t, e, i)] = sum_h pos_h[t, t'] Zsym_h[p, e, i]   (batch-independent: built once per step).

So the whole batch costs one GEMM (B, T r(r+1)/2) @ (T r(r+1)/2, T r D), no (B, H, T, T) tensor, and the backward
pass needs no gradient for the tokens of a first layer. Causality is used by splitting the query positions into
blocks: block [t0, t1) reads only key positions t' < t1.
"""

from __future__ import annotations

import torch

QUERY_BLOCKS = 4  # causal blocks of query positions: (QUERY_BLOCKS + 1) / (2 QUERY_BLOCKS) of the full GEMM


def pair_index(r: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (c_p, a_p) of the r (r + 1) / 2 pairs c <= a of token coordinates."""
    c, a = torch.triu_indices(r, r, device=device)
    return c, a


def token_space_attention(s: torch.Tensor, Aq: torch.Tensor, Ak: torch.Tensor, Av: torch.Tensor, Wo: torch.Tensor,
                          bo: torch.Tensor | None, pos: torch.Tensor, blocks: int = QUERY_BLOCKS) -> torch.Tensor:
    """Linear multi-head attention on token coordinates.

    s: (B, T, r) token coordinates (a constant-1 coordinate included where the projections have a bias);
    Aq, Ak, Av: (H, dh, r) per-head projections of s (1 / sqrt(dh) already in Aq); Wo: (H, D, dh) the heads'
    columns of the output projection; bo: (D,) or None; pos: (Hp, T, T) with Hp = 1 (shared by the heads) or H,
    zero above the diagonal. Returns (B, T, D).
    """
    B, T, r = s.shape
    D = Wo.shape[1]
    M = Aq.transpose(1, 2) @ Ak  # (H, r, r): M[h, e, c], the key-query form in token space
    U = Wo @ Av  # (H, D, r): U[h, i, a], the value-output map in token space
    c, a = pair_index(r, s.device)
    # Z[h, p, e, i] = M[h, e, c_p] U[h, i, a_p] + (c_p != a_p) M[h, e, a_p] U[h, i, c_p]: the symmetrised pair form
    Z = torch.einsum("hep,hip->hpei", M[:, :, c], U[:, :, a])
    Z = Z + torch.einsum("hep,hip->hpei", M[:, :, a], U[:, :, c]) * (c != a).to(s.dtype)[None, :, None, None]
    if pos.shape[0] == 1 and M.shape[0] > 1:  # a positional factor shared by the heads: the heads add up first
        Z = Z.sum(0, keepdim=True)
    n_pairs = c.numel()
    # K[(t', p), (t, e, i)] = sum_h pos[h, t, t'] Z[h, p, e, i]
    K = torch.einsum("htu,hx->utx", pos, Z.reshape(Z.shape[0], -1))  # (T', T, P r D)
    K = K.view(T, T, n_pairs, r * D).transpose(1, 2).reshape(T * n_pairs, T * r * D)
    O = (s[..., c] * s[..., a]).reshape(B, T * n_pairs)  # (B, T' P): pair products of each token
    width = r * D
    bounds = [round(i * T / blocks) for i in range(blocks + 1)]
    F = torch.cat([O[:, : t1 * n_pairs] @ K[: t1 * n_pairs, t0 * width : t1 * width]
                   for t0, t1 in zip(bounds, bounds[1:]) if t1 > t0], dim=1)  # (B, T r D)
    y = (F.view(B, T, r, D) * s.unsqueeze(-1)).sum(2)  # (B, T, D)
    return y if bo is None else y + bo
