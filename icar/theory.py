"""Closed forms and exact population losses of docs/PAPER_NOTES.md §3 (claims 1-3), to check trained models against.

Conventions (those of `icar.models.DiagonalAttention` and `icar.data`):
- the diagonal model predicts, from the prefix s_1..s_tau,
  s_hat_{tau+1,i} = sum_{t<=tau} P[tau-1, t-1] sum_k C_ik conj(s_{tau-1,k}) s_{t,k} s_{t,i},  C = B^T A (d x d, real),
  P (T x T, only its causal part used; 0-based row tau-1 serves prefix length tau). Row 0 is never used (its query
  s_0 = 0): the loss counts tau = 2..T, squared errors summed over coordinates (complex: squared modulus).
- start s_1 = 1_d; angles theta / mu with theta uniform on [-pi, pi).
- `Family.unitary`: W = diag(exp(i theta_k)), d independent angles, complex coordinates.
- `Family.commuting` here: the canonical basis (`Basis.identity`), W = blockdiag(R_theta_1..R_theta_{d/2}), d even.
Everything is computed in float64 / complex128; float32 inputs are accepted and widened.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from icar.config import Family

__all__ = [
    "l_unitary_row",
    "population_loss",
    "training_loss",
    "optimal_C",
    "optimal_P",
    "minimal_loss",
    "prop2_step_size",
    "prop2_last_token_loss",
    "prop2_min_loss",
    "distance_to_optimum",
    "head_balance",
    "pe_only_gram",
    "pe_only_gd_P",
]

_EXACT_FAMILIES = (Family.unitary, Family.commuting)


def _family(family: Family | str) -> Family:
    fam = Family(family)
    if fam not in _EXACT_FAMILIES:
        raise ValueError(f"no exact loss for family {fam.value!r}; allowed: {[f.value for f in _EXACT_FAMILIES]}")
    return fam


def _f64(x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Claim 2 (Proposition 3): the closed-form row loss for the unitary family
# ---------------------------------------------------------------------------------------------------------------


def l_unitary_row(C: torch.Tensor, p: torch.Tensor) -> float:
    """Proposition 3 (docs/PAPER_NOTES.md §3.3): l_U(C, p) = ||p||^2 ||C||_F^2 + p_{tau-1}^2 (||C 1||^2 - ||C||_F^2)
    - 2 p_tau tr(C) + d, the unitary population loss of one prefix row; p = P[tau-1, :tau] (p[-1] on the newest
    token s_tau, p[-2] on the query token s_{tau-1}), tau = len(p) >= 2."""
    C, p = _f64(C), _f64(p)
    if p.shape[0] < 2:
        raise ValueError(f"l_U needs a prefix of length tau >= 2 (p = P[tau-1, :tau]), got len(p) = {p.shape[0]}")
    d = C.shape[0]
    fro2 = C.pow(2).sum()
    return float(p.pow(2).sum() * fro2 + p[-2] ** 2 * (C.sum(1).pow(2).sum() - fro2) - 2 * p[-1] * C.trace() + d)


# ---------------------------------------------------------------------------------------------------------------
# Exact population loss for unitary and rotation-block contexts
# ---------------------------------------------------------------------------------------------------------------


def _angle_rule(T: int, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes phi_n and weights w_n (sum 1) with sum_n w_n f(phi_n) = E f(theta / mu), theta ~ U[-pi, pi), for every
    trigonometric polynomial f of frequency <= 6T (what the loss's moments contain: products of at most six
    tokens, each of frequency <= T).

    mu = 1: the equispaced grid of N = 6T + 1 points, exact (sum_n exp(i j phi_n) = 0 for 0 < |j| < N).
    mu != 1: Gauss-Legendre on [-pi/mu, pi/mu]; for exp(i j phi), |j| <= 6T, the error falls like
    (e w / 4n)^(2n) with w = 6T pi / mu, so n = ceil(0.75 w) + 32 nodes give machine precision.
    """
    if mu <= 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    if mu == 1.0:
        n = 6 * T + 1
        phi = -math.pi + 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
        return phi, torch.full((n,), 1.0 / n, dtype=torch.float64)
    n = int(math.ceil(0.75 * 6 * T * math.pi / mu)) + 32
    x, w = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy(x * math.pi / mu), torch.from_numpy(w / 2)


def _block_paths(family: Family, T: int, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's trajectory s_1..s_{T+1} at every quadrature node: (N, T+1, m) complex128, and the weights (N,).

    unitary: one complex coordinate per block (m = 1), s_{t+1} = exp(i t phi); rotations: one 2x2 block (m = 2),
    s_{t+1} = R_phi^t (1, 1) = (cos t phi - sin t phi, sin t phi + cos t phi)."""
    phi, w = _angle_rule(T, mu)
    ang = phi[:, None] * torch.arange(T + 1, dtype=torch.float64)  # (N, T+1): t phi
    if family == Family.unitary:
        S = torch.polar(torch.ones_like(ang), ang)[..., None]  # (N, T+1, 1)
    else:
        c, s = torch.cos(ang), torch.sin(ang)
        S = torch.stack([c - s, s + c], -1).to(torch.complex128)  # (N, T+1, 2)
    return S, w.to(torch.complex128)


def population_loss(C: torch.Tensor, P: torch.Tensor, family: Family | str, mu: float = 1.0) -> torch.Tensor:
    """Exact population loss E||s_hat_{tau+1} - s_{tau+1}||^2 of the diagonal model (claims 2 and 3), per prefix
    length tau = 2..T (shape (T-1,), T = P.shape[0]), s_1 = 1_d, family `unitary` or `commuting` (canonical blocks).
    Differentiable in C and P."""
    fam = _family(family)
    C, P = _f64(C), _f64(P)
    d, T = C.shape[0], P.shape[0]
    if C.shape != (d, d) or P.shape != (T, T) or T < 2:
        raise ValueError(f"need C (d, d) and P (T, T) with T >= 2, got C {tuple(C.shape)} and P {tuple(P.shape)}")
    m = 1 if fam == Family.unitary else 2  # coordinates per independent block
    if d % m:
        raise ValueError(f"the commuting family needs an even d, got {d}")
    nb = d // m

    # The contexts of different blocks are independent. With X_ki = sum_t p_t conj(s_{tau-1,k}) s_{t,k} s_{t,i} and
    # y_i = s_{tau+1,i}:  E|s_hat_i - y_i|^2 = sum_{k,k'} C_ik C_ik' E[X_ki conj(X_k'i)]
    # - 2 Re sum_k C_ik E[X_ki conj(y_i)] + E|y_i|^2; each expectation touches at most the blocks of i, k, k' and
    # depends only on which of them coincide and on the coordinates' positions inside their blocks. Below:
    # r = tau - 2 (rows), n = node, a, c = positions of k, k' in their block, b = position of i.
    S, w = _block_paths(fam, T, mu)  # (N, T+1, m), (N,)
    taus = torch.arange(2, T + 1)
    t_idx = torch.arange(T)
    causal = t_idx[:, None] >= t_idx[None, :]  # (T, T) lower triangle, as the model's mask
    Pc = (P * causal)[1:].to(torch.complex128)  # (R, T): row r holds p = P[tau-1, :tau], zeros after
    St = S[:, :T]  # (N, T, m): s_1..s_T
    q = S[:, taus - 2].transpose(0, 1)  # (R, N, m): the query s_{tau-1}
    y = S[:, taus].transpose(0, 1)  # (R, N, m): the target s_{tau+1}

    m1 = torch.einsum("n,rna,nta->rat", w, q.conj(), St)  # E[conj(q_a) s_{t,a}] in one block
    # Z: X_ki when k and i share a block; V: E over k's block of X_ki when they do not (a function of i's block).
    Z = q.conj()[..., None] * torch.einsum("rt,nta,ntb->rnab", Pc, St, St)  # (R, N, m, m)
    V = torch.einsum("rt,rat,ntb->rnab", Pc, m1, St)  # (R, N, m, m)
    E1 = torch.einsum("n,rnab,rncb->racb", w, V, V.conj())  # three distinct blocks
    E3 = torch.einsum("n,rnab,rncb->racb", w, Z, V.conj())  # k with i, k' elsewhere
    E4 = torch.einsum("n,rnab,rncb->racb", w, V, Z.conj())  # k' with i, k elsewhere
    E5 = torch.einsum("n,rnab,rncb->racb", w, Z, Z.conj())  # one block
    Mkk = torch.einsum("n,rna,nta,rnc,nuc->ractu", w, q.conj(), St, q, St.conj())  # k, k' in one block
    M2 = torch.einsum("n,ntb,nub->btu", w, St, St.conj())  # i alone
    E2 = torch.einsum("rt,ru,ractu,btu->racb", Pc, Pc, Mkk, M2)  # k, k' together, i elsewhere
    Fs = torch.einsum("n,rnab,rnb->rab", w, Z, y.conj())  # E[X_ki conj(y_i)], k with i
    Fd = torch.einsum("n,rnab,rnb->rab", w, V, y.conj())  # k elsewhere
    Ey = torch.einsum("n,rnb->rb", w, y.abs().pow(2).to(torch.complex128))

    # Assemble by inclusion-exclusion on the block pattern of (k, k') relative to i's block beta:
    # f = E1 + [k~k'](E2 - E1) + [k~i](E3 - E1) + [k'~i](E4 - E1) + [k~k'~i](E5 - E2 - E3 - E4 + 2 E1).
    idx = torch.arange(d)
    loc, blk = idx % m, idx // m
    C4 = C.to(torch.complex128).view(d, nb, m)  # row i, block kappa, position a
    s = C4.sum(1)  # (d, m): sum over blocks
    cb = C4[idx, blk]  # (d, m): i's own block
    per_i = lambda E: E[..., loc]  # noqa: E731  (R, m, m, m) -> (R, m, m, d): b = loc(i)
    E1i, E2i, E3i, E4i, E5i = map(per_i, (E1, E2, E3, E4, E5))
    quad = (
        torch.einsum("ia,raci,ic->ri", s, E1i, s)
        + torch.einsum("ika,raci,ikc->ri", C4, E2i - E1i, C4)
        + torch.einsum("ia,raci,ic->ri", cb, E3i - E1i, s)
        + torch.einsum("ia,raci,ic->ri", s, E4i - E1i, cb)
        + torch.einsum("ia,raci,ic->ri", cb, E5i - E2i - E3i - E4i + 2 * E1i, cb)
    )
    lin = torch.einsum("ia,rai->ri", s, Fd[..., loc]) + torch.einsum("ia,rai->ri", cb, (Fs - Fd)[..., loc])
    return (quad - 2 * lin + Ey[:, loc]).real.sum(-1)


def training_loss(C: torch.Tensor, P: torch.Tensor, family: Family | str, mu: float = 1.0) -> float:
    """Mean of `population_loss` over tau = 2..T: the pipeline's validation MSE for the diagonal model, in the limit
    of many validation sequences (claims 2 and 3)."""
    return float(population_loss(C, P, family, mu).mean())


# ---------------------------------------------------------------------------------------------------------------
# The global minimisers of claims 2 and 3
# ---------------------------------------------------------------------------------------------------------------


def optimal_C(family: Family | str, d: int, c: float = 1.0) -> torch.Tensor:
    """C* (d, d) float64: c I for unitary (Proposition 3, claim 2); c blockdiag(J_2, ..., J_2) with J_2 the all-ones
    2x2 for canonical rotation blocks (claim 3)."""
    fam = _family(family)
    if fam == Family.unitary:
        return c * torch.eye(d, dtype=torch.float64)
    if d % 2:
        raise ValueError(f"the commuting family needs an even d, got {d}")
    return c * torch.block_diag(*[torch.ones(2, 2, dtype=torch.float64)] * (d // 2))


def optimal_P(family: Family | str, T: int, c: float = 1.0) -> torch.Tensor:
    """P* (T, T) float64 paired with `optimal_C(family, d, c)`: P[tau-1, tau-1] = 1/c, and for rotations also
    P[tau-1, tau-2] = -1/(2c) (tau >= 2); zero elsewhere (claims 2 and 3)."""
    fam = _family(family)
    P = torch.eye(T, dtype=torch.float64) / c
    if fam == Family.commuting:
        P = P - torch.diag_embed(torch.ones(T - 1, dtype=torch.float64), offset=-1) / (2 * c)
    return P


def minimal_loss(family: Family | str, d: int, H: int) -> float | None:
    """Minimal population loss per prefix row with H heads: unitary 0 if H >= d else d - H (Proposition 3);
    rotations 0 if H >= d/2 (claim 3), None (unknown) below."""
    fam = _family(family)
    if fam == Family.unitary:
        return 0.0 if H >= d else float(d - H)
    return 0.0 if 2 * H >= d else None


# ---------------------------------------------------------------------------------------------------------------
# Proposition 2: augmented tokens, one gradient step, last-token loss
# ---------------------------------------------------------------------------------------------------------------
# T is the context length: the model sees s_1..s_T (T - 1 pairs (s_t, s_{t+1})) and predicts s_{T+1} as
# eta * (sum_{t<T} s_{t+1} s_t^*) s_T. Unitary W (angles uniform, mu = 1), |s_{1,j}|^2 = rho / d. Coordinate i of
# that prediction is eta (rho/d) (T-1) s_{T+1,i} plus (d-1)(T-1) uncorrelated terms of modulus eta (rho/d)^(3/2).
# The same formulas hold for real rotation blocks in any shared basis Q (the commuting family, d the real
# dimension) with block random-phase starts (`Start.phase`): in W's complex eigenbasis the coordinates have unit
# modulus and the conjugate eigenvalue pairs still leave the (d-1)(T-1) terms uncorrelated (tests/test_theory.py).


def prop2_step_size(T: int, d: int, rho: float | None = None) -> float:
    """Proposition 2: the optimal one-step size eta* = (d / rho) / (T + d - 2), rho = ||s_1||^2 (default d, i.e.
    unit-modulus coordinates: eta* = 1 / (T + d - 2))."""
    rho = float(d) if rho is None else float(rho)
    return (d / rho) / (T + d - 2)


def prop2_last_token_loss(eta: float, T: int, d: int, rho: float | None = None) -> float:
    """Proposition 2: last-token E||s_hat_{T+1} - s_{T+1}||^2 of one GD step with step eta, unitary W, unit-modulus
    starts: d ((eta (T-1) - 1)^2 + eta^2 (d-1)(T-1)); for ||s_1||^2 = rho: eta -> eta rho/d, the total times rho/d."""
    r = 1.0 if rho is None else float(rho) / d
    e = eta * r
    return d * r * ((e * (T - 1) - 1) ** 2 + e**2 * (d - 1) * (T - 1))


def prop2_min_loss(T: int, d: int, rho: float | None = None) -> float:
    """Proposition 2: the minimal last-token loss, at eta*: d (d - 1) / (T + d - 2) (times rho/d if ||s_1||^2 = rho)."""
    r = 1.0 if rho is None else float(rho) / d
    return r * d * (d - 1) / (T + d - 2)


# ---------------------------------------------------------------------------------------------------------------
# Distance of a trained diagonal model to the optimum, modulo its symmetries
# ---------------------------------------------------------------------------------------------------------------


def distance_to_optimum(
    C: torch.Tensor, P: torch.Tensor, family: Family | str, n_heads: int | None = None, mu: float = 1.0
) -> dict[str, float]:
    """How far (C, P) is from the claim-2 / claim-3 minimiser, modulo (C, P) -> (a C, P / a) (C = B^T A is already
    blind to head permutations and to scales traded between A and B).

    Keys: `c` = <C, C*> / ||C*||^2 (C* = optimal_C(family, d, 1)); `C_rel_dist` = ||C - c C*||_F / ||C||_F;
    `P_rel_dist` = ||P - optimal_P(family, T, c)|| / ||optimal_P(family, T, c)|| over the causal rows tau = 2..T;
    `loss` = training_loss; `loss_at_optimum_gap` = loss - minimal_loss(family, d, n_heads) (n_heads None: as many
    heads as the optimum needs, minimum 0; NaN where the minimum is unknown). inf where c = 0. The optima are exact
    for every angle scale mu (loss 0); the loss is computed for the given mu, and the H < d floor only for mu = 1.
    """
    fam = _family(family)
    C, P = _f64(C).detach(), _f64(P).detach()
    d, T = C.shape[0], P.shape[0]
    Cs = optimal_C(fam, d, 1.0)
    c = float((C * Cs).sum() / Cs.pow(2).sum())
    normC = float(torch.linalg.norm(C))
    C_rel = float(torch.linalg.norm(C - c * Cs)) / normC if normC > 0 else math.inf
    if c != 0:
        rows = torch.tril(torch.ones(T, T, dtype=torch.bool))[1:]  # causal part of rows tau = 2..T
        Ps = optimal_P(fam, T, c)
        P_rel = float(torch.linalg.norm((P - Ps)[1:][rows]) / torch.linalg.norm(Ps[1:][rows]))
    else:
        P_rel = math.inf
    loss = training_loss(C, P, fam, mu)
    floor = minimal_loss(fam, d, 2 * d if n_heads is None else n_heads)
    if mu != 1.0 and floor:  # d - H was derived for uniform angles
        floor = None
    return {
        "c": c,
        "C_rel_dist": C_rel,
        "P_rel_dist": P_rel,
        "loss": loss,
        "loss_at_optimum_gap": loss - floor if floor is not None else math.nan,
    }


def head_balance(A: torch.Tensor, B: torch.Tensor) -> float:
    """||A A^T - B B^T||_F / max(||A A^T||_F, ||B B^T||_F): 0 for balanced heads. Gradient flow on a function of
    B^T A conserves A A^T - B B^T (docs/PAPER_NOTES.md §3.5), so a small initialisation stays near 0."""
    A, B = _f64(A).detach(), _f64(B).detach()
    GA, GB = A @ A.T, B @ B.T
    scale = max(float(torch.linalg.norm(GA)), float(torch.linalg.norm(GB)))
    return float(torch.linalg.norm(GA - GB)) / scale if scale > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Claim 6 (Figure 6): positional encoding only, d = 1, C = 1, W = exp(i theta / mu)
# ---------------------------------------------------------------------------------------------------------------
# With s_t = z^(t-1), z = exp(i theta / mu), the prediction from the prefix s_1..s_tau is
# sum_t p_t conj(s_{tau-1}) s_t^2 = z^tau sum_t p_t z^(2 (t - tau)), so row tau's loss is the quadratic form
# (p - e_tau)^T G_tau (p - e_tau), G[t, t'] = E cos(2 (t - t') theta / mu) = sinc(2 pi (t - t') / mu) for theta
# uniform on [-pi, pi) (p real). Its minimiser e_tau (all weight on the newest token) is exact, but G's eigenvalues
# fall off fast when mu is large: gradient descent from P = 0 learns the well-conditioned directions first.


def pe_only_gram(T: int, mu: float) -> torch.Tensor:
    """G (T, T) float64: G[t, t'] = E cos(2 (t - t') theta / mu), theta ~ U[-pi, pi) (the sinc kernel above)."""
    k = torch.arange(T, dtype=torch.float64)
    x = 2 * math.pi * (k[:, None] - k[None, :]) / mu
    return torch.special.sinc(x / math.pi)  # torch's sinc is sin(pi x) / (pi x)


def pe_only_gd_P(T: int, mu: float, lr: float, steps: int) -> torch.Tensor:
    """P (T, T) after `steps` steps of gradient descent with step `lr` from P = 0 on the exact population training
    loss of the positional-only model (the mean of the row losses over tau = 2..T, as the pipeline trains it), in
    closed form: row tau is e_tau - (I - 2 lr G_tau / (T - 1))^steps e_tau. Row 1 (no query token) stays 0."""
    G = pe_only_gram(T, mu)
    P = torch.zeros(T, T, dtype=torch.float64)
    for tau in range(2, T + 1):
        lam, V = torch.linalg.eigh(G[:tau, :tau])
        decay = (1 - 2 * lr * lam.clamp_min(0) / (T - 1)) ** steps  # (tau,)
        e = torch.zeros(tau, dtype=torch.float64)
        e[-1] = 1.0
        P[tau - 1, :tau] = e - V @ (decay * (V.T @ e))
    return P
