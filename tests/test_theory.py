"""icar.theory against Monte Carlo of the actual models and against the closed forms of docs/PAPER_NOTES.md §3:
the exact population loss of the diagonal model (claims 2 and 3), its minimisers, Proposition 2's one-step GD
formulas, and the distance-to-optimum / head-balance diagnostics.

Monte Carlo runs in float64 / complex128 from explicit generator seeds; "agrees" means within 5 standard errors,
and each such check is shown to discriminate (a perturbed value is more than 5 standard errors off).
"""

from __future__ import annotations

import math

import pytest
import torch

from icar.baselines import Spectral, gd_predictions
from icar.config import Family
from icar.data.contexts import random_angles, rotation_blocks
from icar.data.sequences import roll_out
from icar.models import DiagonalAttention
from icar.theory import (
    distance_to_optimum,
    head_balance,
    l_unitary_row,
    minimal_loss,
    optimal_C,
    optimal_P,
    population_loss,
    prop2_last_token_loss,
    prop2_min_loss,
    prop2_step_size,
    training_loss,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread avoids thread-pool stalls on a busy shared CPU (10-30x here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sequences(family: Family, n: int, d: int, T: int, seed: int, mu: float = 1.0) -> torch.Tensor:
    """s_1..s_{T+1} (n, T+1, d), s_1 = 1_d, in float64 / complex128 from the sampler's angle convention."""
    g = _gen(seed)
    if family == Family.unitary:
        lam = torch.polar(torch.ones(n, d, dtype=F64), random_angles(n, d, mu, g, "cpu").double())
        return roll_out(torch.diag_embed(lam), torch.ones(n, d, dtype=torch.complex128), T)
    W = rotation_blocks(random_angles(n, d // 2, mu, g, "cpu").double())  # canonical 2x2 blocks
    return roll_out(W, torch.ones(n, d, dtype=F64), T)


def _model(A: torch.Tensor, B: torch.Tensor, P: torch.Tensor) -> DiagonalAttention:
    H, d = A.shape
    model = DiagonalAttention(d, H, P.shape[0]).double()
    with torch.no_grad():
        model.A.copy_(A)
        model.B.copy_(B)
        model.P.copy_(P)
    return model


def _random_params(d: int, T: int, seed: int, H: int | None = None) -> tuple[torch.Tensor, ...]:
    """A, B (H, d) with positive mean entries (so ||C 1||^2 != ||C||_F^2 and blocks interact), P (T, T) Gaussian."""
    g = _gen(seed)
    H = d if H is None else H
    A = 0.4 + 0.4 * torch.randn(H, d, generator=g, dtype=F64)
    B = 0.4 + 0.4 * torch.randn(H, d, generator=g, dtype=F64)
    P = 0.5 * torch.randn(T, T, generator=g, dtype=F64)
    return A, B, P


# ---------------------------------------------------------------------------------------------------------------
# population_loss: Monte Carlo of DiagonalAttention, the closed form l_U, dtypes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "d", "mu"), [(Family.unitary, 3, 1.0), (Family.commuting, 4, 1.0), (Family.commuting, 4, 2.5)]
)
def test_population_loss_matches_monte_carlo(family: Family, d: int, mu: float) -> None:
    """Per tau = 2..T the exact loss is within 5 se of the model's Monte Carlo squared error; with P rescaled by 5%
    it is not (at any tau)."""
    T, n = 6, 40_000
    A, B, P = _random_params(d, T, seed=10 + d)
    model = _model(A, B, P)
    s = _sequences(family, n, d, T, seed=11 + d, mu=mu)
    with torch.no_grad():
        err = (model(s[:, :T]) - s[:, 1:]).abs().pow(2).sum(-1)[:, 1:]  # (n, T-1): tau = 2..T
    mean, se = err.mean(0), err.std(0) / math.sqrt(n)
    exact = population_loss(model.C.detach(), P, family, mu)
    assert exact.shape == (T - 1,)
    z = (mean - exact).abs() / se
    assert (z < 5).all(), f"{family.value}: z-scores {z.tolist()}"
    wrong = population_loss(model.C.detach(), 1.05 * P, family, mu)
    assert ((mean - wrong).abs() / se > 5).all(), "the Monte Carlo check cannot tell a 5% error in P"
    # training_loss is the mean over tau: what the pipeline's validation MSE estimates for this model.
    assert abs(training_loss(model.C.detach(), P, family, mu) - err.mean().item()) < 5 * err.mean(1).std() / n**0.5


def test_population_loss_equals_l_U_for_unitary() -> None:
    """Unitary family: population_loss reproduces the closed form l_U(C, P[tau-1, :tau]) at every tau (Prop. 3)."""
    d, T = 10, 15
    A, B, P = _random_params(d, T, seed=20, H=7)
    C = B.T @ A
    exact = population_loss(C, P, Family.unitary)
    closed = torch.tensor([l_unitary_row(C, P[tau - 1, :tau]) for tau in range(2, T + 1)], dtype=F64)
    torch.testing.assert_close(exact, closed, rtol=1e-12, atol=1e-10)


def test_population_loss_dtypes_and_gl_rule() -> None:
    """float32 inputs give the float64 answer; the Gauss-Legendre rule (mu != 1) meets the exact grid (mu = 1)."""
    d, T = 6, 10
    A, B, P = _random_params(d, T, seed=21)
    C = B.T @ A
    for family in (Family.unitary, Family.commuting):
        ref = population_loss(C, P, family)
        assert ref.dtype == F64
        torch.testing.assert_close(population_loss(C.float(), P.float(), family), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(population_loss(C, P, family, mu=1.0 + 1e-12), ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="no exact loss"):
        population_loss(C, P, Family.orthogonal)
    with pytest.raises(ValueError, match="even d"):
        population_loss(torch.eye(5), P, Family.commuting)


def test_population_loss_is_differentiable() -> None:
    """Autograd through population_loss matches a central finite difference in one entry of C and of P."""
    d, T = 4, 5
    A, B, P = _random_params(d, T, seed=22)
    C = (B.T @ A).requires_grad_()
    P = P.clone().requires_grad_()
    population_loss(C, P, Family.commuting).sum().backward()
    h = 1e-6

    def total(C_: torch.Tensor, P_: torch.Tensor) -> float:
        return population_loss(C_, P_, Family.commuting).sum().item()

    E_C, E_P = torch.zeros(d, d, dtype=F64), torch.zeros(T, T, dtype=F64)
    E_C[1, 2], E_P[3, 2] = h, h
    C0, P0 = C.detach(), P.detach()
    fd_C = (total(C0 + E_C, P0) - total(C0 - E_C, P0)) / (2 * h)
    fd_P = (total(C0, P0 + E_P) - total(C0, P0 - E_P)) / (2 * h)
    assert abs(fd_C - C.grad[1, 2].item()) < 1e-5 * max(1.0, abs(fd_C))
    assert abs(fd_P - P.grad[3, 2].item()) < 1e-5 * max(1.0, abs(fd_P))
    assert abs(fd_P) > 1e-2  # not trivially zero


# ---------------------------------------------------------------------------------------------------------------
# Minimisers of claims 2 and 3
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [Family.unitary, Family.commuting])
def test_optimal_parameters_have_zero_loss(family: Family) -> None:
    """C* = c optimal_C, P* = optimal_P(c): loss 0 at every tau (H >= d unitary, H >= d/2 rotations)."""
    d, T, c = 10, 15, 0.7
    loss = population_loss(optimal_C(family, d, c), optimal_P(family, T, c), family)
    assert loss.abs().max() < 1e-12
    assert minimal_loss(family, d, d) == 0.0
    assert minimal_loss(family, d, d // 2) == (0.0 if family == Family.commuting else d - d // 2)


def test_unitary_with_fewer_heads_loses_d_minus_H() -> None:
    """Unitary, H < d: C = c diag(1_H, 0), P = I/c gives d - H per row, the minimum of Proposition 3."""
    d, T, c, H = 10, 15, 2.0, 6
    C = c * torch.diag(torch.cat([torch.ones(H), torch.zeros(d - H)])).double()
    loss = population_loss(C, optimal_P(Family.unitary, T, c), Family.unitary)
    torch.testing.assert_close(loss, torch.full((T - 1,), float(d - H), dtype=F64), rtol=0, atol=1e-12)
    assert minimal_loss(Family.unitary, d, H) == d - H
    assert minimal_loss(Family.commuting, d, d // 2 - 1) is None


def test_claim2_solution_is_not_optimal_on_rotations() -> None:
    """C = cI, P = I/c (exact for unitary) loses clearly on rotation blocks; the claim-3 pair does not."""
    d, T, c = 10, 15, 1.0
    wrong = population_loss(optimal_C(Family.unitary, d, c), optimal_P(Family.unitary, T, c), Family.commuting)
    assert wrong.min() > 1.0
    right = population_loss(optimal_C(Family.commuting, d, c), optimal_P(Family.commuting, T, c), Family.commuting)
    assert right.abs().max() < 1e-12


def test_population_loss_small_perturbation_is_second_order() -> None:
    """At the optimum the loss is stationary: a perturbation of size h raises it by O(h^2), positively."""
    d, T = 6, 8
    g = _gen(23)
    for family in (Family.unitary, Family.commuting):
        C0, P0 = optimal_C(family, d), optimal_P(family, T)
        dC, dP = torch.randn(d, d, generator=g, dtype=F64), torch.randn(T, T, generator=g, dtype=F64)
        l1 = training_loss(C0 + 1e-3 * dC, P0 + 1e-3 * dP, family)
        l2 = training_loss(C0 + 2e-3 * dC, P0 + 2e-3 * dP, family)
        assert l1 > 0 and abs(l2 / l1 - 4) < 0.05


# ---------------------------------------------------------------------------------------------------------------
# Proposition 2: one gradient step, augmented tokens, last token
# ---------------------------------------------------------------------------------------------------------------


def _phase_sequences(family: Family, n: int, d: int, T: int, seed: int) -> torch.Tensor:
    """s_1..s_{T+1} (n, T+1, d) in float64 / complex128 with random-phase starts (`Start.phase`, mu = 1): unitary
    |s_1j| = 1; commuting: W = Q blockdiag(R_theta) Q^T with one Haar Q, s_1 = Q sqrt(2) (cos phi_j, sin phi_j)."""
    g = _gen(seed)
    if family == Family.unitary:
        lam = torch.polar(torch.ones(n, d, dtype=F64), random_angles(n, d, 1.0, g, "cpu").double())
        s1 = torch.polar(torch.ones(n, d, dtype=F64), 2 * math.pi * torch.rand(n, d, generator=g, dtype=F64))
        return roll_out(torch.diag_embed(lam), s1, T)
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    Q = Q * torch.sign(torch.diagonal(R))  # Haar
    W = Q @ rotation_blocks(random_angles(n, d // 2, 1.0, g, "cpu").double()) @ Q.T  # (n, d, d)
    phi = 2 * math.pi * torch.rand(n, d // 2, generator=g, dtype=F64)
    s1 = math.sqrt(2) * torch.stack([torch.cos(phi), torch.sin(phi)], -1).reshape(n, d) @ Q.T
    return roll_out(W, s1, T)


@pytest.mark.parametrize(("family", "d"), [(Family.unitary, 4), (Family.commuting, 6)])
def test_prop2_formulas_against_monte_carlo(family: Family, d: int) -> None:
    """Random-phase starts: the last-token MSE of eta * (sum_{t<T} s_{t+1} s_t^*) s_T matches prop2_last_token_loss
    for several eta; eta* = 1/(T+d-2) minimises it, to d(d-1)/(T+d-2). Unitary (complex) and real rotation blocks
    in a random basis (the augmented_gd_step experiment's data; d = real dimension)."""
    T, n = 8, 100_000
    s = _phase_sequences(family, n, d, T, seed=40 + d)  # (n, T+1, d): s_1..s_{T+1}
    Y = torch.einsum("nti,ntj->nij", s[:, 1:T], s[:, : T - 1].conj())  # sum_{t<T} s_{t+1} s_t^*
    G = torch.einsum("nij,nj->ni", Y, s[:, T - 1])  # one-step direction applied to s_T
    target = s[:, T]
    eta_star = prop2_step_size(T, d)
    assert eta_star == pytest.approx(1 / (T + d - 2))
    for eta in (0.0, 0.5 * eta_star, eta_star, 2 * eta_star):
        err = (eta * G - target).abs().pow(2).sum(-1)
        mean, se = err.mean().item(), max(err.std().item() / math.sqrt(n), 1e-12)
        assert abs(mean - prop2_last_token_loss(eta, T, d)) < 5 * se, f"eta={eta}: MC {mean} vs formula"
        if eta > 0:  # discriminates: the formula without its noise term is far off
            assert abs(mean - d * (eta * (T - 1) - 1) ** 2) > 5 * se
    # eta* minimises: the Monte Carlo least-squares step, and the formula's stationarity and value.
    eta_mc = ((G.conj() * target).real.sum() / G.abs().pow(2).sum()).item()
    assert eta_mc == pytest.approx(eta_star, rel=0.01)
    h = 1e-4
    assert prop2_last_token_loss(eta_star - h, T, d) > prop2_min_loss(T, d) < prop2_last_token_loss(eta_star + h, T, d)
    assert prop2_last_token_loss(eta_star, T, d) == pytest.approx(prop2_min_loss(T, d), rel=1e-12)
    assert prop2_min_loss(T, d) == pytest.approx(d * (d - 1) / (T + d - 2))
    # rho = ||s_1||^2: the same sequences scaled by sqrt(rho/d) have eta* (d/rho)/(T+d-2) and loss times rho/d.
    rho = 2.5
    r = rho / d
    eta_rho = prop2_step_size(T, d, rho)
    err = (eta_rho * r**1.5 * G - r**0.5 * target).abs().pow(2).sum(-1)
    assert abs(err.mean().item() - prop2_min_loss(T, d, rho)) < 5 * err.std().item() / math.sqrt(n)
    # The pipeline's gd1 baseline at the last position is this one-step prediction.
    k = 64
    gd = gd_predictions(Spectral(s[:k, :T]), torch.full((1, T), eta_star, dtype=F64))[0, :, -1]  # (k, d)
    torch.testing.assert_close(gd, eta_star * G[:k], rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Distance to the optimum and head balance
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [Family.unitary, Family.commuting])
def test_distance_to_optimum(family: Family) -> None:
    """0 at the optimum (any scale c), invariant under (C, P) -> (a C, P / a), positive away from it."""
    d, T = 6, 8
    at = distance_to_optimum(optimal_C(family, d, 1.7), optimal_P(family, T, 1.7), family)
    assert at["c"] == pytest.approx(1.7)
    for key in ("C_rel_dist", "P_rel_dist", "loss", "loss_at_optimum_gap"):
        assert abs(at[key]) < 1e-12, key
    A, B, P = _random_params(d, T, seed=50)
    C = B.T @ A
    base = distance_to_optimum(C, P, family)
    for a in (3.0, -0.5):
        moved = distance_to_optimum(a * C, P / a, family)
        assert moved["c"] == pytest.approx(a * base["c"], rel=1e-12)
        for key in ("C_rel_dist", "P_rel_dist", "loss", "loss_at_optimum_gap"):
            assert moved[key] == pytest.approx(base[key], rel=1e-9), key
    near = distance_to_optimum(optimal_C(family, d) + 0.01 * C, optimal_P(family, T) + 0.01 * P, family)
    assert near["C_rel_dist"] > 1e-3 and near["P_rel_dist"] > 1e-3 and near["loss_at_optimum_gap"] > 0
    assert base["C_rel_dist"] > 0.1 and base["loss"] > 1.0
    # A missing head: the unitary gap is measured from d - H.
    few = distance_to_optimum(optimal_C(family, d), optimal_P(family, T), family, n_heads=2)
    assert math.isnan(few["loss_at_optimum_gap"]) if family == Family.commuting else few["loss_at_optimum_gap"] < 0


def test_head_balance_and_its_conservation() -> None:
    """head_balance is 0 for A = B and positive otherwise; gradient descent on the exact loss keeps A A^T - B B^T
    (conserved by gradient flow on a function of B^T A, claim 2) while A A^T itself moves."""
    d, T, H = 4, 5, 4
    g = _gen(60)
    A0, B0 = (0.5 * torch.randn(H, d, generator=g, dtype=F64) for _ in range(2))
    assert head_balance(A0, A0) == 0.0
    assert head_balance(A0, 2 * A0) == pytest.approx(0.75)
    assert head_balance(A0, B0) > 0.1
    A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    P = (0.3 * torch.randn(T, T, generator=g, dtype=F64)).requires_grad_()
    opt = torch.optim.SGD([A, B, P], lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        population_loss(B.T @ A, P, Family.unitary).mean().backward()
        opt.step()
    A, B = A.detach(), B.detach()
    gram_moved = torch.linalg.norm(A @ A.T - A0 @ A0.T)
    drift = torch.linalg.norm((A @ A.T - B @ B.T) - (A0 @ A0.T - B0 @ B0.T))
    assert gram_moved > 0.1 * torch.linalg.norm(A0 @ A0.T)
    assert drift < 0.02 * gram_moved  # discrete steps: O(lr^2) per step
