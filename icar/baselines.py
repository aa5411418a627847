"""In-context baselines with the model's interface (docs/PAPER_NOTES.md §3.8): sequences s_1..s_T (B, T, d) in, predictions
of s_2..s_{T+1} out, evaluated on the model's validation sequences and logged under the same metric names
(`val/<name>/mse`, `val/<name>/mse_last`, `val/<name>/mse_by_pos`).

The in-context estimates at position t use the pairs (s_j, s_{j+1}), j < t, through
    Y_t = sum_{j<t} s_{j+1} s_j^*,   S_t = sum_{j<t} s_j s_j^*   (complex data: conjugate transposes),
and predict W_hat_t s_t. Every estimate is Y_t f(S_t) for a spectral filter f: k steps of gradient descent on
L(W') = 1/2 sum_{j<t} ||s_{j+1} - W' s_j||^2 from W' = 0 give W'_k = Y eta sum_{i<k} (I - eta S)^i, and least squares
gives Y S^+. With S = U diag(lambda) U^*, the prediction is (Y U) (f(lambda) * U^* s_t): one eigendecomposition
serves every baseline and every step size, in float64.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

PINV_RCOND = 1e-10  # least squares drops eigenvalues of S_t below this fraction of the largest (float32 data)
ETA_SEARCH = (1e-6, 10.0)  # golden-section bracket for eta, in units of 1 / E||s_t||^2
CHUNK_ELEMENTS = 1 << 22  # float64 entries of the per-chunk (K, B, T, d) x d work (32 MB)
GOLDEN_ITERS = 40  # the bracket shrinks to 0.618^40 ~ 4e-9 of its log-width (eta to ~1e-7)


def predict_zero(s: torch.Tensor, W: torch.Tensor | None = None) -> torch.Tensor:
    """Predict 0: its MSE is E||s_{t+1}||^2."""
    return torch.zeros_like(s)


def predict_last(s: torch.Tensor, W: torch.Tensor | None = None) -> torch.Tensor:
    """Predict s_{t+1} = s_t (W = I)."""
    return s


def predict_true(s: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The oracle s_{t+1} = W s_t with each sequence's own W (B, d, d): zero error without noise."""
    return torch.einsum("bij,btj->bti", W.to(s.dtype), s)


def _wide(s: torch.Tensor) -> torch.Tensor:
    return s.to(torch.complex128 if s.is_complex() else torch.float64)


def context_moments(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Y_t and S_t (B, T, d, d) at every position t = 0..T-1 (0-based) of s (B, T, d); both 0 at t = 0."""
    pairs_y = torch.einsum("bti,btj->btij", s[:, 1:], s[:, :-1].conj())  # (B, T-1, d, d): s_{j+1} s_j^*
    pairs_s = torch.einsum("bti,btj->btij", s[:, :-1], s[:, :-1].conj())  # (B, T-1, d, d): s_j s_j^*
    zero = torch.zeros_like(pairs_y[:, :1])  # (B, 1, d, d)
    return torch.cat([zero, pairs_y.cumsum(1)], 1), torch.cat([zero, pairs_s.cumsum(1)], 1)


class Spectral:
    """The pieces of Y_t f(S_t) s_t shared by every filter f: eigenvalues of S_t, Y_t U and U^* s_t (float64)."""

    def __init__(self, s: torch.Tensor) -> None:
        s = _wide(s)  # (B, T, d)
        Y, S = context_moments(s)  # (B, T, d, d) each
        self.lam, U = torch.linalg.eigh(S)  # (B, T, d) ascending, (B, T, d, d)
        self.lam = self.lam.clamp_min(0)  # S_t is PSD; rounding can leave -1e-17
        self.YU = Y @ U  # (B, T, d, d)
        self.a = torch.einsum("btji,btj->bti", U.conj(), s)  # (B, T, d): U^* s_t

    def predict(self, f: torch.Tensor) -> torch.Tensor:
        """Predictions (..., B, T, d) for filter values f (..., B, T, d) on the eigenvalues."""
        return torch.einsum("btij,...btj->...bti", self.YU, f * self.a)


def _chunk_size(T: int, d: int, steps: int) -> int:
    """Sequences per batch chunk so that the (steps, chunk, T, d) x d work stays near CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // (T * d * d * max(1, steps)))


def gd_predictions(spec: Spectral, eta: torch.Tensor) -> torch.Tensor:
    """Predictions of k = 1..K steps of GD from W' = 0 (K, B, T, d); eta (K, T): the step of k steps at position t."""
    K = eta.shape[0]
    return spec.predict(gd_step_filter(spec.lam, eta.to(spec.lam.dtype)[:, None, :, None], K))


def gd_step_filter(lam: torch.Tensor, eta: torch.Tensor, K: int) -> torch.Tensor:
    """f_k(lambda) = eta_k sum_{i<k} (1 - eta_k lambda)^i for k = 1..K; lam (B, T, d), eta (K, 1, T, 1) -> (K, B, T, d).

    f_k = (1 - (1 - x)^k) / lambda with x = eta_k lambda; for |x| < 1/2 it is evaluated as -expm1(k log1p(-x)) / lambda,
    which stays exact as lambda -> 0 (limit k eta), where the null directions of S_t live."""
    k = torch.arange(1, K + 1, dtype=lam.dtype, device=lam.device).view(K, 1, 1, 1)  # (K, 1, 1, 1)
    x = eta * lam  # (K, B, T, d), >= 0
    near_zero = -torch.expm1(k * torch.log1p(-x.clamp(max=0.5)))  # 1 - (1 - x)^k without cancellation
    num = torch.where(x < 0.5, near_zero, 1 - (1 - x) ** k)
    return torch.where(x > 0, eta * num / x, eta * k)  # x = 0 (lambda = 0): k eta


def ols_filter(lam: torch.Tensor, rcond: float = PINV_RCOND) -> torch.Tensor:
    """1 / lambda on the eigenvalues above rcond * the largest, 0 elsewhere: the pseudo-inverse S_t^+."""
    keep = lam > rcond * lam[..., -1:]  # (B, T, d)
    return torch.where(keep, 1 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))


def predict_ols(s: torch.Tensor, W: torch.Tensor | None = None) -> torch.Tensor:
    """Least squares W_hat_t = Y_t S_t^+ applied to s_t: exact once the pairs span R^d (t > d for orthogonal W)."""
    spec = Spectral(s)
    return spec.predict(ols_filter(spec.lam)).to(s.dtype)


def predict_gd(s: torch.Tensor, eta: float | torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` steps of GD with step size eta (scalar, or (T,) per position) from W' = 0, applied to s_t."""
    spec = Spectral(s)
    T = s.shape[1]
    eta_kt = torch.as_tensor(eta, dtype=spec.lam.dtype, device=s.device).expand(T).expand(steps, T)
    return gd_predictions(spec, eta_kt)[-1].to(s.dtype)


def tune_gd_step_sizes(s: torch.Tensor, steps: int) -> torch.Tensor:
    """Step sizes eta (steps, T) minimising the held-out MSE of k = 1..steps GD steps at each position t.

    Golden-section search on log eta for every (k, t) at once. For orthogonal W without noise each sequence's error
    ||(I - eta S_t)^k s_t||^2 is a sum of convex functions of eta, so the search finds the global minimum.
    Position t = 0 has no pairs (prediction 0 for any eta): its eta is reported as 0.
    """
    B, T1, d = s.shape
    T = T1 - 1
    chunk = _chunk_size(T, d, steps)
    parts = [(Spectral(s[i : i + chunk, :-1]), _wide(s[i : i + chunk, 1:])) for i in range(0, B, chunk)]
    scale = _wide(s[:, :-1]).abs().square().sum(-1).mean().item() or 1.0  # E||s_t||^2

    def mse(log_eta: torch.Tensor) -> torch.Tensor:  # (steps, T) -> (steps, T): held-out MSE of each (k, t)
        total = 0
        for spec, target in parts:
            pred = gd_predictions(spec, log_eta.exp())  # (steps, chunk, T, d)
            total = total + (pred - target).abs().square().sum(-1).sum(1)
        return total / B

    a = torch.full((steps, T), math.log(ETA_SEARCH[0] / scale), dtype=torch.float64, device=s.device)
    b = torch.full_like(a, math.log(ETA_SEARCH[1] / scale))
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)  # interior points, c < d
    fc, fd = mse(c), mse(d)
    for _ in range(GOLDEN_ITERS):
        left = fc <= fd  # the minimum lies in [a, d]: drop (d, b]; otherwise drop [a, c)
        a, b = torch.where(left, a, c), torch.where(left, d, b)
        c, d = torch.where(left, b - g * (b - a), d), torch.where(left, c, a + g * (b - a))
        f_new = mse(torch.where(left, c, d))  # each (k, t) evaluates its one new point
        fc, fd = torch.where(left, f_new, fd), torch.where(left, fc, f_new)
    eta = ((a + b) / 2).exp()
    eta[:, 0] = 0.0
    return eta


Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TRIVIAL: dict[str, Predictor] = {"zero": predict_zero, "last_token": predict_last, "true_w": predict_true}


class InContextBaselines:
    """Every baseline of docs/PAPER_NOTES.md §3.8 for one data config: zero, last_token, true_w, ols and gd1..gd{K}
    (`K = max_gd_steps`), with GD's tuned step sizes `gd_eta` (K, T).

    Not an nn.Module on purpose: the step sizes stay float64 on the CPU whatever the model's device and precision
    (MPS has no float64, `precision=16-true` would round them); ICARModule saves them in its checkpoints."""

    def __init__(self, max_gd_steps: int, T: int) -> None:
        self.max_gd_steps = max_gd_steps
        self.gd_eta = torch.full((max_gd_steps, T), math.nan, dtype=torch.float64)  # (K, T)

    @property
    def names(self) -> list[str]:
        return [*TRIVIAL, "ols", *(f"gd{k}" for k in range(1, self.max_gd_steps + 1))]

    @property
    def tuned(self) -> bool:
        return self.max_gd_steps == 0 or not torch.isnan(self.gd_eta).any().item()

    def tune(self, s: torch.Tensor) -> None:
        """Tune eta for each (k, t) on held-out sequences s_1..s_{T+1} (B, T+1, d)."""
        if self.max_gd_steps:
            self.gd_eta = tune_gd_step_sizes(s.cpu(), self.max_gd_steps)

    def __call__(self, s: torch.Tensor, W: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predictions (B, T, d) of every baseline for the contexts s_1..s_T (B, T, d) of contexts W (B, d, d)."""
        if not self.tuned:
            raise RuntimeError("InContextBaselines.tune(...) must run before the GD baselines can predict")
        out = {name: fn(s, W) for name, fn in TRIVIAL.items()}
        device = s.device
        wide = s if device.type != "mps" else s.cpu()  # no float64 on Apple GPUs: the spectral work runs on the CPU
        B, T, d = s.shape
        eta = self.gd_eta[:, :T].to(wide.device)
        chunk = _chunk_size(T, d, self.max_gd_steps)
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, B, chunk):
            spec = Spectral(wide[i : i + chunk])
            parts.setdefault("ols", []).append(spec.predict(ols_filter(spec.lam)))
            if self.max_gd_steps:
                gd = gd_predictions(spec, eta)  # (K, b, T, d)
                for k in range(self.max_gd_steps):
                    parts.setdefault(f"gd{k + 1}", []).append(gd[k])
        out.update({name: torch.cat(p).to(device=device, dtype=s.dtype) for name, p in parts.items()})
        return out
