"""The structure of C = B^T A of the diagonal model: its spectrum, rank and distance to the paper's optimal forms
(c I for unitary W, Proposition 3; c blockdiag(J_2, ..., J_2) of rank d/2 for rotation blocks, claim 3)."""

from __future__ import annotations

import math

import torch

from icar import metrics
from icar.config import Family
from icar.theory import optimal_C

C_SINGULAR_VALUES = "C/singular_values"  # the normalised spectrum: a list, drawn but never a scalar metric


def normalised_singular_values(C: torch.Tensor) -> torch.Tensor:
    """Singular values of C divided by the largest (all 0 when C = 0), (d,)."""
    s = torch.linalg.svdvals(C.detach().double().cpu())  # (d,), descending
    return s / s[0] if s[0] > 0 else s


def relative_distance(C: torch.Tensor, G: torch.Tensor) -> float:
    """min_c ||C - c G||_F / ||C||_F: how far C is from the line through the form G (nan when C = 0)."""
    C, G = C.detach().double().cpu(), G.double().cpu()
    c2, g2 = (C * C).sum(), (G * G).sum()
    if c2 == 0 or g2 == 0:
        return math.nan
    residual = c2 - (C * G).sum() ** 2 / g2  # Pythagoras with the least-squares c = <C, G> / ||G||^2
    return math.sqrt(max(residual.item(), 0.0) / c2.item())


def c_structure(C: torch.Tensor, rank_tol: float = 0.05) -> dict[str, float | list[float]]:
    """C/rank (singular values >= rank_tol * the first), C/dist_identity, C/dist_blocks (nan for odd d), and the
    normalised spectrum as a list under C/singular_values (the only non-scalar entry)."""
    d = C.shape[0]
    s = normalised_singular_values(C)  # (d,)
    blocks = optimal_C(Family.commuting, d) if d % 2 == 0 else None  # (d, d)
    return {
        metrics.C_RANK: float((s >= rank_tol).sum()) if s[0] > 0 else 0.0,
        metrics.C_DIST_IDENTITY: relative_distance(C, torch.eye(d)),
        metrics.C_DIST_BLOCKS: relative_distance(C, blocks) if blocks is not None else math.nan,
        C_SINGULAR_VALUES: s.tolist(),
    }
