"""Context matrices W of docs/PAPER_NOTES.md §1.2, sampled in batches from an explicit generator.

Conventions (kept here only): rotation angles are theta / mu with theta uniform on [-pi, pi), so a large mu
concentrates W near the identity symmetrically; the unitary family uses complex tensors (complex64), and real
models see it through `icar.data.tokens.realify`, which is the equivalent real 2x2-block picture.
"""

from __future__ import annotations

import math

import torch

from icar.config import Family


GRAM_SCHMIDT_MAX_D = 16  # up to this d, Gram-Schmidt in batched vector ops; above, LAPACK/cuSOLVER QR


def qr_positive(g: torch.Tensor) -> torch.Tensor:
    """Q of the QR decomposition of g (n, d, d) with diag(R) > 0: the sign of diag(R) moved into Q (Mezzadri)."""
    q, r = torch.linalg.qr(g)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))  # (n, d)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)  # scales column j of Q by sign(R_jj)


def gram_schmidt(g: torch.Tensor) -> torch.Tensor:
    """The same Q as `qr_positive` (up to rounding) by Gram-Schmidt applied twice per column, in batched vector
    ops: cuSOLVER factors tiny matrices one by one (39 ms for 1024 5x5 on an H100, against 0.7 ms here)."""
    cols: list[torch.Tensor] = []
    for j in range(g.shape[-1]):
        v = g[..., j]  # (n, d)
        for _ in range(2):  # the second pass restores orthogonality lost to rounding
            for q in cols:
                v = v - (q * v).sum(-1, keepdim=True) * q
        cols.append(v / torch.linalg.vector_norm(v, dim=-1, keepdim=True))
    return torch.stack(cols, dim=-1)


def haar_orthogonal(n: int, d: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """n matrices Haar-distributed on O(d): the Q factor (diag(R) > 0) of a Gaussian matrix."""
    g = torch.randn(n, d, d, generator=generator, device=device)  # (n, d, d)
    return gram_schmidt(g) if d <= GRAM_SCHMIDT_MAX_D else qr_positive(g)


def rotation_blocks(theta: torch.Tensor) -> torch.Tensor:
    """Block-diagonal matrices diag(R_theta_1, ..., R_theta_k) from angles of shape (n, k) -> (n, 2k, 2k)."""
    n, k = theta.shape
    c, s = torch.cos(theta), torch.sin(theta)  # (n, k)
    blocks = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (n, k, 2, 2)
    out = theta.new_zeros(n, k, 2, k, 2)
    idx = torch.arange(k, device=theta.device)
    out[:, idx, :, idx, :] = blocks.transpose(0, 1)  # place block j at rows 2j:2j+2, columns 2j:2j+2
    return out.reshape(n, 2 * k, 2 * k)


def random_angles(n: int, k: int, mu: float, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """Angles theta / mu with theta uniform on [-pi, pi); shape (n, k)."""
    theta = (2 * torch.rand(n, k, generator=generator, device=device) - 1) * math.pi
    return theta / mu


def sample_contexts(
    family: Family,
    n: int,
    d: int,
    generator: torch.Generator,
    *,
    mu: float = 1.0,
    basis: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """n context matrices of one family, shape (n, d, d); complex64 for `unitary`, float32 otherwise.

    `basis` is the shared orthogonal Q of the commuting family (identity when None).
    """
    if family == Family.orthogonal:
        return haar_orthogonal(n, d, generator, device)
    if family == Family.commuting:
        if d % 2:
            raise ValueError(f"the commuting family needs an even d, got {d}")
        W = rotation_blocks(random_angles(n, d // 2, mu, generator, device))  # (n, d, d)
        if basis is not None:
            Q = basis.to(device)
            W = Q @ W @ Q.T
        return W
    if family == Family.unitary:
        lam = torch.polar(torch.ones(n, d, device=device), random_angles(n, d, mu, generator, device))  # (n, d)
        return torch.diag_embed(lam)
    raise ValueError(f"unknown context family {family!r}; allowed: {[f.value for f in Family]}")
