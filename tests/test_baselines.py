"""The in-context baselines against exact algebra: GD steps, least squares, the tuned step size, the oracle."""

from __future__ import annotations

import math

import pytest
import torch

import icar.baselines as baselines
from icar.baselines import (
    InContextBaselines,
    Spectral,
    context_moments,
    gd_predictions,
    predict_gd,
    predict_ols,
    predict_true,
    tune_gd_step_sizes,
)
from icar.config import DataConfig, Family, Start, Tokens
from icar.data.contexts import haar_orthogonal
from icar.data.sequences import SequenceSampler, roll_out


def _orthogonal_sequences(n: int, d: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 s_1..s_{T+1} (n, T+1, d) of Haar W with starts on the sphere, and W (n, d, d)."""
    g = torch.Generator().manual_seed(seed)
    W = haar_orthogonal(n, d, g).double()
    s1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    return roll_out(W, s1 / s1.norm(dim=-1, keepdim=True), T), W


def _explicit_gd(s: torch.Tensor, eta: float, steps: int) -> torch.Tensor:
    """W'_k at every position by iterating W' <- W' - eta grad L(W'), the gradient taken by autograd."""
    W = torch.zeros(*s.shape[:2], s.shape[-1], s.shape[-1], dtype=s.dtype)  # (n, T, d, d)
    T = s.shape[1]
    for _ in range(steps):
        W = W.detach().requires_grad_(True)
        loss = 0.0
        for t in range(T):  # position t uses the pairs (s_j, s_{j+1}), j < t
            resid = s[:, 1 : t + 1] - torch.einsum("nij,ntj->nti", W[:, t], s[:, :t])
            loss = loss + 0.5 * resid.square().sum()
        (grad,) = torch.autograd.grad(loss, W)
        W = W - eta * grad
    return W.detach()


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_gd_matches_explicit_steps_and_closed_form(steps: int) -> None:
    """k GD steps from W' = 0: autograd iteration == W - W (I - eta S_t)^k (orthogonal W) == the baseline's output."""
    n, d, T, eta = 6, 4, 9, 0.25
    s, W = _orthogonal_sequences(n, d, T, seed=steps)
    ctx = s[:, :T]
    W_k = _explicit_gd(ctx, eta, steps)  # (n, T, d, d)
    _, S = context_moments(ctx)
    I = torch.eye(d, dtype=torch.float64)
    closed = W[:, None] - W[:, None] @ torch.linalg.matrix_power(I - eta * S, steps)  # W'_k - W = -W (I - eta S)^k
    torch.testing.assert_close(W_k, closed, rtol=0, atol=1e-12)
    pred = predict_gd(ctx, eta, steps)
    torch.testing.assert_close(pred, torch.einsum("ntij,ntj->nti", W_k, ctx), rtol=0, atol=1e-12)
    assert pred[:, 0].abs().max() == 0  # no pair at t = 1
    assert (pred - ctx).abs().max() > 0.1


def test_gd_with_a_step_per_count_and_position() -> None:
    """gd_predictions with eta (K, T) equals K separate runs, each with its own per-position step."""
    s, _ = _orthogonal_sequences(5, 3, 7, seed=3)
    ctx = s[:, :7]
    eta = 0.05 + 0.4 * torch.rand(3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = gd_predictions(Spectral(ctx), eta)  # (3, n, T, d)
    for k in range(3):
        for t in range(7):
            ref = predict_gd(ctx, eta[k, t].item(), k + 1)[:, t]
            torch.testing.assert_close(out[k, :, t], ref, rtol=0, atol=1e-12)


def test_gd_filter_is_exact_for_tiny_and_large_steps() -> None:
    """The spectral filter matches the direct sum at eta * lambda near 0 (cancellation) and beyond 2 (divergence)."""
    lam = torch.tensor([0.0, 1e-14, 1e-3, 0.7, 3.0, 40.0], dtype=torch.float64).view(1, 1, -1)
    for eta in (1e-3, 0.1, 1.0):
        f = baselines.gd_step_filter(lam, torch.full((8, 1, 1, 1), eta, dtype=torch.float64), 8)  # (8, 1, 1, 6)
        for k in range(1, 9):
            direct = eta * sum((1 - eta * lam) ** i for i in range(k))
            torch.testing.assert_close(f[k - 1], direct, rtol=1e-12, atol=0)


def test_ols_is_exact_once_the_pairs_span_the_space() -> None:
    """Least squares W_hat_t = Y_t S_t^+: error at machine precision for t > d (t pairs from t+1 tokens), not before."""
    n, d, T = 32, 5, 12
    s, _ = _orthogonal_sequences(n, d, T, seed=7)
    err = (predict_ols(s[:, :T]) - s[:, 1:]).square().sum(-1)  # (n, T)
    # position t (1-based) has t - 1 pairs; they span R^d from t - 1 = d on
    assert err[:, d:].max() < 1e-24, err[:, d:].max()
    assert err[:, 1:d].mean(0).min() > 1e-3  # under-determined before: the minimum-norm estimate misses


def test_ols_on_float32_pipeline_data() -> None:
    """On the sampler's float32 sequences the pseudo-inverse threshold keeps OLS at float32 precision for t > d."""
    data = DataConfig(family=Family.orthogonal, d=5, T=15, tokens=Tokens.raw, start=Start.sphere)
    s, _ = SequenceSampler(data).sample(64, torch.Generator().manual_seed(1))
    err = (predict_ols(s[:, :-1]) - s[:, 1:]).abs().square().sum(-1)
    assert err[:, data.d :].mean() < 1e-8, err[:, data.d :].mean()


def test_true_w_is_exact_and_complex_aware() -> None:
    data = DataConfig(family=Family.unitary, d=4, T=6, tokens=Tokens.raw, start=Start.phase)
    s, W = SequenceSampler(data).sample(8, torch.Generator().manual_seed(2))
    torch.testing.assert_close(predict_true(s[:, :-1], W), s[:, 1:])


def test_tuned_step_is_the_minimum() -> None:
    """At the tuned eta, a scan of the held-out MSE (0.1x to 10x, and +-0.5% around it) finds nothing lower, for
    every step count k and every position t."""
    s, _ = _orthogonal_sequences(256, 3, 10, seed=11)
    eta = tune_gd_step_sizes(s, 4)  # (4, T)
    assert eta.shape == (4, 10) and (eta[:, 0] == 0).all() and (eta[:, 1:] > 0).all()
    spec, target = Spectral(s[:, :-1]), s[:, 1:]

    def mse(step: torch.Tensor) -> torch.Tensor:  # (4, T) step sizes -> (4, T) held-out MSE
        return (gd_predictions(spec, step) - target).square().sum(-1).mean(1)

    at_best = mse(eta)
    factors = torch.cat([torch.logspace(-1, 1, 81, dtype=torch.float64), torch.tensor([0.995, 1.005], dtype=torch.float64)])
    scan = torch.stack([mse(eta * f) for f in factors])  # (n_factors, 4, T)
    assert (at_best[:, 1:] <= scan.min(0).values[:, 1:] * (1 + 1e-9)).all()
    assert (scan.max(0).values[:, 1:] > at_best[:, 1:] * 1.01).all()  # the scan does move the MSE


def test_complex_gd_matches_the_matrix_recursion() -> None:
    """Complex data (unitary W): k steps W' <- W' + eta (Y - W' S) with conjugate transposes; W'_k - W = -W (I - eta S)^k."""
    d, T, eta = 3, 8, 0.2
    data = DataConfig(family=Family.unitary, d=d, T=T, tokens=Tokens.raw, start=Start.phase)
    s, W = SequenceSampler(data).sample(5, torch.Generator().manual_seed(12))
    ctx = s[:, :T].to(torch.complex128)
    Y, S = context_moments(ctx)
    I = torch.eye(d, dtype=torch.complex128)
    W64 = W.to(torch.complex128)[:, None]
    for steps in (1, 3, 6):
        Wk = torch.zeros_like(Y)
        for _ in range(steps):
            Wk = Wk + eta * (Y - Wk @ S)
        torch.testing.assert_close(Wk, W64 - W64 @ torch.linalg.matrix_power(I - eta * S, steps), rtol=0, atol=1e-5)
        ref = torch.einsum("ntij,ntj->nti", Wk, ctx)
        torch.testing.assert_close(predict_gd(ctx, eta, steps), ref, rtol=0, atol=1e-12)


def test_tuned_one_step_reproduces_proposition_2() -> None:
    """Unitary W, random-phase starts: tuned eta* ~ 1/(T + d - 2) and last-token MSE ~ d (d - 1) / (T + d - 2)."""
    d, T = 3, 10
    data = DataConfig(family=Family.unitary, d=d, T=T, tokens=Tokens.raw, start=Start.phase)
    sampler = SequenceSampler(data)
    s, _ = sampler.sample(8192, torch.Generator().manual_seed(5))
    eta = tune_gd_step_sizes(s, 1)[0, -1].item()
    assert abs(eta - 1 / (T + d - 2)) < 0.03 / (T + d - 2), eta
    s2, W2 = sampler.sample(8192, torch.Generator().manual_seed(6))
    err = (predict_gd(s2[:, :-1], eta, 1)[:, -1] - s2[:, -1]).abs().square().sum(-1)
    mean, se = err.mean().item(), err.std().item() / math.sqrt(len(err))
    assert abs(mean - d * (d - 1) / (T + d - 2)) < 5 * se + 1e-3, (mean, se)


def test_in_context_baselines_module() -> None:
    """Names, the untuned error, and that batch chunking does not change the predictions."""
    data = DataConfig(family=Family.orthogonal, d=4, T=8, tokens=Tokens.raw)
    s, W = SequenceSampler(data).sample(40, torch.Generator().manual_seed(9))
    module = InContextBaselines(3, data.T)
    assert module.names == ["zero", "last_token", "true_w", "ols", "gd1", "gd2", "gd3"]
    with pytest.raises(RuntimeError, match="tune"):
        module(s[:, :-1], W)
    module.tune(s)
    full = module(s[:, :-1], W)
    assert set(full) == set(module.names) and all(v.shape == s[:, :-1].shape for v in full.values())
    old = baselines.CHUNK_ELEMENTS
    try:
        baselines.CHUNK_ELEMENTS = 1  # one sequence per chunk
        chunked = module(s[:, :-1], W)
    finally:
        baselines.CHUNK_ELEMENTS = old
    for name in module.names:
        torch.testing.assert_close(chunked[name], full[name])
