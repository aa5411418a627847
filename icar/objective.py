"""The objective (docs/PAPER_NOTES.md §1.5): a model's next-token predictions on sequences s_1..s_{T+1}, the per-token
squared error, and the loss over the predicted positions. Training, validation and the analyses all go through here.

MSE is per token: ||s_hat_{t+1} - s_{t+1}||^2 summed over coordinates (complex: squared modulus), averaged over
sequences and over the predicted positions t >= model.first_position.
"""

from __future__ import annotations

import torch
from torch import nn

from icar.config import LossOn, Tokens
from icar.data.tokens import encode_tokens, realify


def predict_sequences(model: nn.Module, s: torch.Tensor, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences s_1..s_{T+1} (B, T+1, d) -> (predictions, targets) of s_2..s_{T+1}, both (B, T, d'): a real model
    sees complex data as (Re, Im) and reads `tokens` (augmented or raw) built from it."""
    inputs, targets = s[:, :-1], s[:, 1:]
    if not model.accepts_complex:
        inputs, targets = realify(inputs), realify(targets)
        return model(encode_tokens(inputs, tokens)), targets
    return model(inputs), targets


def squared_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token squared error (B, T): summed over coordinates."""
    return (pred - target).abs().square().sum(-1)


def loss(err: torch.Tensor, first_position: int, loss_on: LossOn) -> torch.Tensor:
    """The training loss from per-token errors (B, T): the last position only, or the mean over the positions
    t >= first_position (1-based)."""
    return err[:, -1].mean() if loss_on == LossOn.last else err[:, first_position - 1 :].mean()
