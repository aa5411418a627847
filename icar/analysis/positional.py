"""The learned positional factor P as a (T, T) matrix, and how close its rows are to the paper's optima.

Row tau (1-based prefix length; 0-based row tau - 1) weighs the tokens s_1..s_tau. Proposition 3 (unitary W) puts
all of it on the newest token, p_tau e_tau; claim 3 (rotation blocks) uses p_tau (e_tau - 1/2 e_{tau-1}), from
2 cos(theta) R_theta - I = R_{2 theta}.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from icar import metrics
from icar.config import Positional
from icar.models.diagonal import DiagonalAttention
from icar.models.transformer import Transformer


def positional_matrices(model: nn.Module, T: int) -> dict[str, torch.Tensor]:
    """{"P": (T, T)} for the diagonal model, {"layer{i}/P": (T, T)} per layer of a Transformer with a
    multiplicative P or softmax positional weights (mean over heads); empty when the model has neither."""
    with torch.no_grad():
        if isinstance(model, DiagonalAttention):
            return {"P": model.positional_weights(T).detach().double().cpu()}  # (T, T)
        out: dict[str, torch.Tensor] = {}
        if isinstance(model, Transformer):
            for i, block in enumerate(model.blocks):
                pos = block.attn.positional_weights(T)  # (T, T), (H, T, T) or None
                if pos is None:
                    continue
                if block.attn.positional == Positional.softmax_positional:
                    pos = pos.mean(0)  # (T, T): the heads' average weighting
                out[f"layer{i}/P"] = pos.detach().double().cpu()
        return out


def _row_fit(rows: list[torch.Tensor], templates: list[torch.Tensor]) -> float:
    """Explained energy 1 - sum ||row - alpha row_template||^2 / sum ||row||^2, alpha fitted per row."""
    energy = sum(float(r @ r) for r in rows)
    if energy == 0:
        return math.nan
    explained = sum(float(r @ v) ** 2 / float(v @ v) for r, v in zip(rows, templates))
    return 1.0 - (energy - explained) / energy


def fit_positional_forms(P: torch.Tensor, first_row: int = 1) -> dict[str, float]:
    """Compare the causal rows first_row..T-1 (0-based) of P (T, T) with the "newest" and "rotation" forms:
    P/fit_newest, P/fit_rotation (explained energy, 1 at the form), P/lag1_ratio (median p_{tau,tau-1} / p_{tau,tau}:
    0 unitary, -0.5 rotation), P/two_tap_energy (row energy on the last two taps)."""
    P = P.detach().double().cpu()
    T = P.shape[0]
    rows = [P[r, : r + 1] for r in range(first_row, T)]  # row r weighs s_1..s_{r+1}: its causal part
    if not rows:
        raise ValueError(f"fit_positional_forms needs first_row < T, got first_row={first_row}, T={T}")
    newest = [torch.zeros(r + 1, dtype=P.dtype) for r in range(first_row, T)]
    rotation = [torch.zeros(r + 1, dtype=P.dtype) for r in range(first_row, T)]
    for r, (n, v) in enumerate(zip(newest, rotation), start=first_row):
        n[r] = v[r] = 1.0
        if r >= 1:
            v[r - 1] = -0.5  # row 0 has no older token: its rotation form is e_1
    energy = sum(float(row @ row) for row in rows)
    two_tap = sum(float(row[-2:] @ row[-2:]) for row in rows)
    ratios = torch.tensor([float(row[-2] / row[-1]) for row in rows if len(row) >= 2 and row[-1] != 0])
    return {
        metrics.P_FIT_NEWEST: _row_fit(rows, newest),
        metrics.P_FIT_ROTATION: _row_fit(rows, rotation),
        metrics.P_LAG1_RATIO: ratios.median().item() if len(ratios) else math.nan,
        metrics.P_TWO_TAP_ENERGY: two_tap / energy if energy > 0 else math.nan,
    }
