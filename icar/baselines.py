"""In-context baselines with the model's interface: sequences s_1..s_T (B, T, d) in, predictions of s_2..s_{T+1} out.

Evaluated on the same validation sequences as the model and logged under the same metric names
(`val/<baseline>/mse`, `val/<baseline>/mse_last`).
"""

from __future__ import annotations

import torch


def predict_zero(s: torch.Tensor) -> torch.Tensor:
    """Predict 0: its MSE is E||s_{t+1}||^2."""
    return torch.zeros_like(s)


def predict_last(s: torch.Tensor) -> torch.Tensor:
    """Predict s_{t+1} = s_t (W = I)."""
    return s


BASELINES = {"zero": predict_zero, "last_token": predict_last}
