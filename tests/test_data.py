"""Properties of the data code (docs/PAPER_NOTES.md §1): context families, the recursion, starts, noise, tokens,
and the reproducible per-(seed, rank, step) training stream.

Every check compares against an independent computation (explicit algebra, a loop, or a Monte Carlo moment with
a tolerance of several standard errors under a fixed seed), so that a wrong implementation fails it.
"""

import itertools
import math

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError
from torch.utils.data import DataLoader

from icar.config import Basis, ConfigError, DataConfig, Family, Start, Tokens, TrainConfig, validate
from icar.data.contexts import haar_orthogonal, rotation_blocks, sample_contexts
from icar.data.stream import SequenceStream, stream_seed
from icar.training.datamodule import ARDataModule
from icar.data.sequences import SequenceSampler, roll_out
from icar.data.tokens import encode_tokens, realify, token_width

ATOL = 1e-5  # float32 precision for O(1) entries after ~T matmuls

# (family, basis) pairs: the commuting family once in a random shared basis and once in the canonical one.
FAMILIES = [
    (Family.orthogonal, Basis.random),
    (Family.commuting, Basis.random),
    (Family.commuting, Basis.identity),
    (Family.unitary, Basis.random),
]
FAMILY_IDS = ["orthogonal", "commuting-random", "commuting-identity", "unitary"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def sample(seed=0, n=64, **cfg):
    sampler = SequenceSampler(DataConfig(**cfg))
    s, W = sampler.sample(n, gen(seed))
    return sampler, s, W


def apply(W, x):
    """W x for batches: W (n, d, d), x (n, d) -> (n, d), by plain matmul (not the einsum under test)."""
    return (W @ x.unsqueeze(-1)).squeeze(-1)


def block_mask(d):
    """True on the 2x2 diagonal blocks of a d x d matrix."""
    return torch.block_diag(*[torch.ones(2, 2)] * (d // 2)).bool()


def assert_rotation_blocks(M):
    """M (n, d, d) is diag(R_theta_1, ..., R_theta_{d/2}) with R = [[c, -s], [s, c]], c^2 + s^2 = 1."""
    d = M.shape[-1]
    assert M[:, ~block_mask(d)].abs().max() < ATOL
    c, s = M[:, 0::2, 0::2].diagonal(dim1=-2, dim2=-1), M[:, 1::2, 0::2].diagonal(dim1=-2, dim2=-1)  # (n, d/2)
    torch.testing.assert_close(M[:, 1::2, 1::2].diagonal(dim1=-2, dim2=-1), c, atol=ATOL, rtol=0)
    torch.testing.assert_close(M[:, 0::2, 1::2].diagonal(dim1=-2, dim2=-1), -s, atol=ATOL, rtol=0)
    torch.testing.assert_close(c**2 + s**2, torch.ones_like(c), atol=ATOL, rtol=0)


def ks_uniform(x, lo, hi):
    """Kolmogorov-Smirnov distance between the sample x and the uniform law on [lo, hi)."""
    x = torch.sort(x.flatten().double()).values
    n = x.numel()
    cdf = ((x - lo) / (hi - lo)).clamp(0, 1)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())


# ----------------------------------------------------------------------------- recursion and starts


@pytest.mark.parametrize("start", list(Start))
@pytest.mark.parametrize("family,basis", FAMILIES, ids=FAMILY_IDS)
def test_recursion_and_start(family, basis, start):
    """sigma = 0: s_{t+1} = W s_t exactly, s_t = W^{t-1} s_1, shapes/dtypes as documented, s_1 the chosen start."""
    n, d, T = 64, 4, 12
    sampler, s, W = sample(n=n, family=family, basis=basis, start=start, d=d, T=T)
    complex_valued = family == Family.unitary
    dtype = torch.complex64 if complex_valued else torch.float32
    assert s.shape == (n, T + 1, d) and W.shape == (n, d, d)
    assert s.dtype == dtype and W.dtype == dtype
    for t in range(T):
        torch.testing.assert_close(s[:, t + 1], apply(W, s[:, t]), atol=ATOL, rtol=0)
    # Independent check in float64: s_{t+1} = W^t s_1.
    W64, s1 = W.to(torch.complex128), s[:, 0].to(torch.complex128)
    for t in (1, T // 2, T):
        expected = apply(torch.linalg.matrix_power(W64, t), s1)
        torch.testing.assert_close(s[:, t].to(torch.complex128), expected, atol=1e-4, rtol=0)

    s1 = s[:, 0]
    if start == Start.fixed:
        torch.testing.assert_close(s1, torch.full((n, d), 1 / math.sqrt(d), dtype=dtype), atol=1e-7, rtol=0)
    elif start == Start.ones:
        assert torch.equal(s1, torch.ones(n, d, dtype=dtype))
    elif start == Start.sphere:
        torch.testing.assert_close(torch.linalg.vector_norm(s1, dim=-1), torch.ones(n), atol=ATOL, rtol=0)
        assert (s1 - s1[0]).abs().amax(-1)[1:].min() > 1e-3  # a fresh random direction per sequence
    elif start == Start.phase and complex_valued:
        torch.testing.assert_close(s1.abs(), torch.ones(n, d), atol=ATOL, rtol=0)
        assert s1.angle().std() > 1.0  # phases spread over the circle (uniform: std pi / sqrt(3))
    else:  # real phase start: each 2-block of Q^T s_1 has norm sqrt(2), so ||s_1||^2 = d
        Q = sampler.basis if sampler.basis is not None else torch.eye(d)
        blocks = (s1 @ Q).reshape(n, d // 2, 2)  # rows of s1 @ Q are Q^T s_1
        torch.testing.assert_close(blocks.norm(dim=-1), torch.full((n, d // 2), math.sqrt(2)), atol=ATOL, rtol=0)
        torch.testing.assert_close(s1.norm(dim=-1) ** 2, torch.full((n,), float(d)), atol=1e-4, rtol=0)
        assert torch.atan2(blocks[..., 1], blocks[..., 0]).std() > 1.0  # random phases, not a constant vector


def test_sampling_is_a_function_of_the_generator():
    """The same generator seed gives the same (s, W); another seed gives different W, starts and noise."""
    cfg = dict(family=Family.orthogonal, start=Start.sphere, sigma=0.1, d=4, T=5)
    _, s_a, W_a = sample(seed=7, **cfg)
    _, s_b, W_b = sample(seed=7, **cfg)
    _, s_c, W_c = sample(seed=8, **cfg)
    assert torch.equal(s_a, s_b) and torch.equal(W_a, W_b)
    assert not torch.allclose(W_a, W_c) and not torch.allclose(s_a[:, 0], s_c[:, 0])
    noise_a, noise_c = s_a[:, 1] - apply(W_a, s_a[:, 0]), s_c[:, 1] - apply(W_c, s_c[:, 0])
    assert (noise_a - noise_c).abs().max() > 0.1  # the noise, too, comes from the generator


# ----------------------------------------------------------------------------- family properties


@pytest.mark.parametrize("family,basis", FAMILIES, ids=FAMILY_IDS)
def test_contexts_are_orthogonal_and_norm_preserving(family, basis):
    """W^H W = I and |det W| = 1 for every family; ||s_t|| is constant over t when sigma = 0."""
    n, d = 128, 6
    _, s, W = sample(n=n, family=family, basis=basis, start=Start.sphere, d=d, T=15)
    eye = torch.eye(d, dtype=W.dtype).expand(n, d, d)
    torch.testing.assert_close(W.mH @ W, eye, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.linalg.det(W).abs(), torch.ones(n), atol=ATOL, rtol=0)
    norms = torch.linalg.vector_norm(s, dim=-1)  # (n, T+1)
    torch.testing.assert_close(norms, norms[:, :1].expand_as(norms), atol=ATOL, rtol=0)


def test_orthogonal_det_is_plus_or_minus_one_and_commuting_det_is_one():
    """Haar on O(d) reaches both components (det = +-1); rotation blocks in any basis have det = +1."""
    _, _, W = sample(n=256, family=Family.orthogonal, d=5)
    det = torch.linalg.det(W)
    torch.testing.assert_close(det.abs(), torch.ones(256), atol=ATOL, rtol=0)
    assert (det > 0).any() and (det < 0).any()
    for basis in Basis:
        _, _, W = sample(n=256, family=Family.commuting, basis=basis, d=6)
        torch.testing.assert_close(torch.linalg.det(W), torch.ones(256), atol=ATOL, rtol=0)


def test_unitary_is_complex_diagonal():
    """Unitary W = diag(exp(i theta)): complex64, zero off the diagonal, unit-modulus diagonal."""
    _, _, W = sample(n=128, family=Family.unitary, d=5)
    assert W.dtype == torch.complex64
    off = W - torch.diag_embed(W.diagonal(dim1=-2, dim2=-1))
    assert off.abs().max() == 0
    torch.testing.assert_close(W.diagonal(dim1=-2, dim2=-1).abs(), torch.ones(128, 5), atol=ATOL, rtol=0)
    assert W.diagonal(dim1=-2, dim2=-1).imag.abs().max() > 0.5  # genuinely complex, not +-1


def max_commutator(W):
    """max over pairs i != j of ||W_i W_j - W_j W_i||_F."""
    C = W.unsqueeze(1) @ W.unsqueeze(0) - W.unsqueeze(0) @ W.unsqueeze(1)  # (n, n, d, d)
    return torch.linalg.matrix_norm(C).max().item()


@pytest.mark.parametrize("basis", list(Basis))
def test_commuting_family_commutes_and_haar_does_not(basis):
    """Commuting W's share one basis, so W_i W_j = W_j W_i (also across batches); Haar W's do not commute."""
    sampler, _, W = sample(n=32, family=Family.commuting, basis=basis, d=6)
    _, W2 = sampler.sample(8, gen(1))  # another batch, same shared basis
    assert max_commutator(torch.cat([W, W2])) < 1e-5
    _, _, W_haar = sample(n=32, family=Family.orthogonal, d=6)
    assert max_commutator(W_haar) > 0.5  # the check above discriminates


def test_commuting_identity_basis_is_rotation_blocks():
    """basis=identity: W itself is block diagonal with 2x2 rotation blocks (and there is no stored basis)."""
    sampler, _, W = sample(n=64, family=Family.commuting, basis=Basis.identity, d=6)
    assert sampler.basis is None
    assert_rotation_blocks(W)


def test_commuting_random_basis_is_rotation_blocks_in_q():
    """basis=random: Q = sampler.basis is orthogonal, fixed by basis_seed, and Q^T W Q is rotation blocks,
    while W itself is not block diagonal in the canonical basis (so the basis is really applied)."""
    d = 6
    sampler, _, W = sample(n=64, family=Family.commuting, basis=Basis.random, d=d, basis_seed=3)
    Q = sampler.basis
    torch.testing.assert_close(Q.T @ Q, torch.eye(d), atol=ATOL, rtol=0)
    assert_rotation_blocks(Q.T @ W @ Q)
    assert W[:, ~block_mask(d)].abs().max() > 0.1
    same = SequenceSampler(DataConfig(family=Family.commuting, d=d, basis_seed=3)).basis
    other = SequenceSampler(DataConfig(family=Family.commuting, d=d, basis_seed=4)).basis
    assert torch.equal(Q, same) and not torch.allclose(Q, other)


def test_rotation_blocks_matches_explicit_construction():
    """rotation_blocks(theta) places R_theta_j = [[cos, -sin], [sin, cos]] at rows/columns 2j:2j+2."""
    theta = torch.tensor([[0.3, -1.2, 2.5], [1.0, 0.0, -3.0]])
    out = rotation_blocks(theta)
    for i in range(2):
        R = [torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) for a in theta[i].tolist()]
        torch.testing.assert_close(out[i], torch.block_diag(*R), atol=1e-6, rtol=0)


def test_commuting_family_rejects_odd_d():
    with pytest.raises(ValueError, match="even d"):
        sample_contexts(Family.commuting, 2, 5, gen(0))


# ----------------------------------------------------------------------------- Haar distribution


def haar_moment_errors(W):
    """Largest deviations, in standard errors, of Haar moments: E W_ij = 0, E W_ij^2 = 1/d, E tr W = 0,
    E (tr W)^2 = 1 (d >= 2), P(det > 0) = 1/2."""
    n, d, _ = W.shape
    W = W.double()
    z_mean = (W.mean(0) / (W.std(0) / math.sqrt(n))).abs().max()
    sq = W**2
    z_sq = ((sq.mean(0) - 1 / d) / (sq.std(0) / math.sqrt(n))).abs().max()
    tr = W.diagonal(dim1=-2, dim2=-1).sum(-1)
    z_tr = (tr.mean() / (tr.std() / math.sqrt(n))).abs()
    z_tr2 = ((tr**2).mean() - 1).abs() / ((tr**2).std() / math.sqrt(n))
    z_det = ((torch.linalg.det(W) > 0).double().mean() - 0.5).abs() / (0.5 / math.sqrt(n))
    return {"mean": z_mean.item(), "square": z_sq.item(), "trace": z_tr.item(), "trace2": z_tr2.item(),
            "det": z_det.item()}


def test_haar_orthogonal_moments():
    """Monte Carlo (n = 20000, d = 4): the first and second moments of Haar on O(d) hold within 5 standard
    errors, and det = +-1 with about half each. Plain QR of the same Gaussians (no sign fix) fails the same
    check, so this test proves the sign fix."""
    n, d = 20000, 4
    W = haar_orthogonal(n, d, gen(0))
    torch.testing.assert_close(W.mT @ W, torch.eye(d).expand(n, d, d), atol=ATOL, rtol=0)
    z = haar_moment_errors(W)
    assert max(z.values()) < 5, z
    raw, _ = torch.linalg.qr(torch.randn(n, d, d, generator=gen(0)))  # same draws, no sign fix
    z_raw = haar_moment_errors(raw)
    assert z_raw["mean"] > 20 and z_raw["det"] > 20, z_raw


# ----------------------------------------------------------------------------- angle scale mu


@pytest.mark.parametrize("mu", [1.0, 4.0])
def test_unitary_angles_are_uniform_on_scaled_interval(mu):
    """Eigen-angles of the unitary family lie in [-pi/mu, pi/mu] and are uniform there: mean ~ 0, variance ~
    (pi/mu)^2 / 3 (Monte Carlo, 5 standard errors), and a small Kolmogorov-Smirnov distance."""
    n, d = 5000, 4
    _, _, W = sample(n=n, family=Family.unitary, d=d, mu=mu, T=2)
    theta = W.diagonal(dim1=-2, dim2=-1).angle().double().flatten()  # (n d,)
    a, N = math.pi / mu, theta.numel()
    assert theta.abs().max() <= a + 1e-6
    assert theta.abs().max() > 0.99 * a  # the whole interval is used
    assert theta.mean().abs() < 5 * a / math.sqrt(3 * N)
    se_var = a**2 * math.sqrt(1 / 5 - 1 / 9) / math.sqrt(N)  # sqrt(Var(theta^2) / N) for the uniform law
    assert abs(theta.var() - a**2 / 3) < 5 * se_var
    assert ks_uniform(theta, -a, a) < 1.63 / math.sqrt(N) * 1.5  # ~ the 1% KS critical value, with margin


def test_commuting_angles_are_scaled_by_mu():
    """Rotation angles of the commuting family (canonical basis) are uniform on [-pi/mu, pi/mu)."""
    mu, n, d = 3.0, 4000, 4
    _, _, W = sample(n=n, family=Family.commuting, basis=Basis.identity, d=d, mu=mu, T=2)
    theta = torch.atan2(W[:, 1::2, 0::2].diagonal(dim1=-2, dim2=-1), W[:, 0::2, 0::2].diagonal(dim1=-2, dim2=-1))
    a = math.pi / mu
    assert theta.abs().max() <= a + 1e-6
    assert ks_uniform(theta, -a, a) < 1.63 / math.sqrt(theta.numel()) * 1.5


# ----------------------------------------------------------------------------- noise


@pytest.mark.parametrize("family,basis", FAMILIES, ids=FAMILY_IDS)
def test_noise_variance(family, basis):
    """sigma > 0: residuals s_{t+1} - W s_t have mean ~ 0 and variance sigma^2 per real coordinate, or
    E|eps|^2 = sigma^2 per complex coordinate (split equally between real and imaginary parts)."""
    sigma, n, d, T = 0.1, 1000, 4, 10
    _, s, W = sample(n=n, family=family, basis=basis, start=Start.sphere, sigma=sigma, d=d, T=T)
    res = torch.stack([s[:, t + 1] - apply(W, s[:, t]) for t in range(T)], 1).to(
        torch.complex128 if s.is_complex() else torch.float64)  # (n, T, d)
    N = res.numel()
    rel = 5 * math.sqrt(2 / N)  # 5 standard errors of a Gaussian variance estimate, relative
    assert res.abs().pow(2).mean() == pytest.approx(sigma**2, rel=rel)
    assert res.mean().abs() < 5 * sigma / math.sqrt(N)
    if s.is_complex():
        assert res.real.pow(2).mean() == pytest.approx(sigma**2 / 2, rel=rel)
        assert res.imag.pow(2).mean() == pytest.approx(sigma**2 / 2, rel=rel)
    # the noise is fresh at every step: residuals at consecutive steps are uncorrelated
    corr = (res[:, 1:] * res[:, :-1].conj()).mean().abs() / sigma**2
    assert corr < 5 / math.sqrt(N)


# ----------------------------------------------------------------------------- tokens


def test_augmented_tokens():
    """augmented e_t = (0_d, s_t, s_{t-1}) with s_0 = 0, shape (n, T, 3d); raw is the identity."""
    n, T, d = 3, 7, 4
    s = torch.randn(n, T, d, generator=gen(0))
    e = encode_tokens(s, Tokens.augmented)
    assert e.shape == (n, T, 3 * d) == (n, T, token_width(d, Tokens.augmented))
    for t in range(T):
        prev = s[:, t - 1] if t > 0 else torch.zeros(n, d)
        assert torch.equal(e[:, t], torch.cat([torch.zeros(n, d), s[:, t], prev], -1))
    assert encode_tokens(s, Tokens.raw) is s
    assert token_width(d, Tokens.raw) == d


def test_augmented_tokens_of_complex_sequences():
    """The augmented encoding keeps complex dtypes and the same (0, s_t, s_{t-1}) layout."""
    s = torch.randn(2, 5, 3, dtype=torch.complex64, generator=gen(1))
    e = encode_tokens(s, Tokens.augmented)
    assert e.dtype == torch.complex64 and e.shape == (2, 5, 9)
    assert torch.equal(e[:, 1:, 6:], s[:, :-1]) and torch.equal(e[:, :, 3:6], s)
    assert e[:, 0, 6:].abs().max() == 0 and e[..., :3].abs().max() == 0


def test_realify():
    """realify: complex (..., d) -> (Re, Im) of width 2d; real tensors pass through unchanged."""
    z = torch.randn(2, 3, 4, dtype=torch.complex64, generator=gen(0))
    r = realify(z)
    assert r.dtype == torch.float32 and r.shape == (2, 3, 8)
    assert torch.equal(r[..., :4], z.real) and torch.equal(r[..., 4:], z.imag)
    x = torch.randn(2, 3, 4, generator=gen(1))
    assert realify(x) is x


def test_realified_unitary_acts_as_2x2_rotations():
    """With W = diag(exp(i theta)) and R = [[diag cos, -diag sin], [diag sin, diag cos]] (a rotation on each
    (Re_j, Im_j) pair), realify(W s) = R realify(s): the real 2x2-block picture of the unitary family."""
    n, d, T = 32, 4, 6
    sampler, s, W = sample(n=n, family=Family.unitary, start=Start.phase, d=d, T=T)
    assert sampler.out_dim == 2 * d
    lam = W.diagonal(dim1=-2, dim2=-1)  # (n, d)
    c, sn = torch.diag_embed(lam.real), torch.diag_embed(lam.imag)
    R = torch.cat([torch.cat([c, -sn], -1), torch.cat([sn, c], -1)], -2)  # (n, 2d, 2d)
    torch.testing.assert_close(R.mT @ R, torch.eye(2 * d).expand(n, 2 * d, 2 * d), atol=ATOL, rtol=0)
    x = torch.randn(n, d, dtype=torch.complex64, generator=gen(2))
    torch.testing.assert_close(realify(apply(W, x)), apply(R, realify(x)), atol=ATOL, rtol=0)
    r = realify(s)  # (n, T+1, 2d): the real sequences follow the real recursion with R
    for t in range(T):
        torch.testing.assert_close(r[:, t + 1], apply(R, r[:, t]), atol=ATOL, rtol=0)


def test_out_dim_real_families():
    for family, basis in FAMILIES[:3]:
        assert SequenceSampler(DataConfig(family=family, basis=basis, d=4)).out_dim == 4


# ----------------------------------------------------------------------------- streams and the DataModule

STREAM_CFG = DataConfig(family=Family.orthogonal, start=Start.sphere, sigma=0.05, d=3, T=4, batch_size=4)


def stream(seed=0, rank=0, start_step=0):
    return SequenceStream(SequenceSampler(STREAM_CFG), STREAM_CFG.batch_size, seed, rank, start_step)


def take(iterable, k):
    return list(itertools.islice(iter(iterable), k))


def batches_equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def batches_disjoint(a, b):
    """No W (and no sequence) of one list of batches appears in the other."""
    Wa, Wb = torch.cat([W for _, W in a]), torch.cat([W for _, W in b])
    sa, sb = torch.cat([s for s, _ in a]), torch.cat([s for s, _ in b])
    dW = (Wa.unsqueeze(1) - Wb.unsqueeze(0)).abs().flatten(2).amax(-1)
    ds = (sa.unsqueeze(1) - sb.unsqueeze(0)).abs().flatten(2).amax(-1)
    return dW.min() > 1e-3 and ds.min() > 1e-3


def test_stream_is_a_function_of_seed_rank_step():
    """The same (seed, rank) gives the same batches; another rank or another seed gives disjoint ones."""
    ref = take(stream(), 4)
    assert all(s.shape == (4, 5, 3) and W.shape == (4, 3, 3) for s, W in ref)
    assert batches_equal(ref, take(stream(), 4))
    assert batches_equal(ref, [stream().batch(k) for k in range(4)])
    assert batches_disjoint(ref, take(stream(rank=1), 4))
    assert batches_disjoint(ref, take(stream(seed=1), 4))
    assert batches_disjoint(ref[:2], ref[2:])  # consecutive steps differ too


def test_stream_resumes_at_start_step():
    """A stream started at step k yields batch k of the stream started at 0, then k + 1, ..."""
    ref = take(stream(), 6)
    assert batches_equal(take(stream(start_step=3), 3), ref[3:])
    assert batches_equal(take(stream(seed=2, rank=1, start_step=2), 2), take(stream(seed=2, rank=1), 4)[2:])


@pytest.mark.parametrize("start_step", [0, 3])
def test_stream_does_not_depend_on_num_workers(start_step):
    """DataLoader(stream, batch_size=None) yields the same batches in the same order with 0 and 2 workers."""
    ref = take(DataLoader(stream(start_step=start_step), batch_size=None, num_workers=0), 6)
    assert batches_equal(ref, [stream().batch(start_step + k) for k in range(6)])
    multi = take(DataLoader(stream(start_step=start_step), batch_size=None, num_workers=2), 6)
    assert batches_equal(ref, multi)


def test_stream_seed_is_stable_and_distinct():
    """stream_seed is a fixed 63-bit hash of (seed, rank, step): a regression value, and distinct per input."""
    assert stream_seed(0, 0, 0) == 7186151398203649393  # regression: changing it changes every run's data
    assert stream_seed(1, 2, 3) == 5471373977495296956
    seeds = {stream_seed(seed, rank, step) for seed in range(3) for rank in range(3) for step in range(20)}
    assert len(seeds) == 3 * 3 * 20
    assert all(0 <= x < 2**63 for x in seeds)
    assert stream_seed(1, 0, 0) != stream_seed(0, 1, 0) != stream_seed(0, 0, 1)
    assert stream_seed(1, 23, 4) != stream_seed(12, 3, 4)  # no ambiguity from concatenating digits


DM_CFG = DataConfig(family=Family.commuting, start=Start.phase, d=4, T=5, batch_size=8, val_size=20, val_seed=123)


def datamodule(seed=0, **overrides):
    dm = ARDataModule(DataConfig(**{**DM_CFG.__dict__, **overrides}), seed)
    dm.setup("fit")
    return dm


def test_validation_set_depends_on_val_seed_only():
    """The validation set is the same for every training seed, changes with val_seed, and setup is idempotent."""
    a, b, c = datamodule(seed=0), datamodule(seed=1), datamodule(seed=0, val_seed=124)
    s_a, W_a = a.val_set.tensors
    assert s_a.shape == (20, 6, 4) and W_a.shape == (20, 4, 4)
    assert torch.equal(s_a, b.val_set.tensors[0]) and torch.equal(W_a, b.val_set.tensors[1])
    assert batches_disjoint([a.val_set.tensors], [c.val_set.tensors])
    val_set = a.val_set
    a.setup("validate")
    assert a.val_set is val_set


def test_validation_set_is_disjoint_from_training_batches():
    """No validation context matrix (or sequence) appears in the first training batches of any of a few seeds."""
    for seed in range(3):
        dm = datamodule(seed=seed)
        train = take(dm.train_dataloader(), 5)
        assert batches_disjoint([dm.val_set.tensors], train)


def test_train_dataloader_without_trainer_is_rank_zero_stream():
    """Without a trainer, train_dataloader streams rank 0 from step 0 of the module's seed."""
    dm = datamodule(seed=5)
    expected = SequenceStream(SequenceSampler(dm.cfg), dm.cfg.batch_size, seed=5, rank=0)
    assert batches_equal(take(dm.train_dataloader(), 3), take(expected, 3))


def test_val_dataloader_covers_validation_set_once():
    """val_dataloader yields every validation sequence exactly once, in order, in batches of at most batch_size."""
    dm = datamodule()
    batches = list(dm.val_dataloader())
    assert [len(s) for s, _ in batches] == [8, 8, 4]
    s, W = (torch.cat(x) for x in zip(*batches))
    assert torch.equal(s, dm.val_set.tensors[0]) and torch.equal(W, dm.val_set.tensors[1])


# ----------------------------------------------------------------------------- config enums and DataConfig


def test_enums_are_strings_and_parse():
    """The choice enums are str Enums: they compare equal to their values and parse from them."""
    for enum, values in [
        (Family, {"orthogonal", "commuting", "unitary"}),
        (Start, {"fixed", "ones", "sphere", "phase"}),
        (Basis, {"random", "identity"}),
        (Tokens, {"augmented", "raw"}),
    ]:
        assert {m.value for m in enum} == values
        for v in values:
            assert enum(v) == v and enum(v) is getattr(enum, v)
        with pytest.raises(ValueError):
            enum("nonsense")


def test_data_config_schema_rejects_unknown_choices_and_keys():
    """Through OmegaConf (the Hydra schema), strings become enums; a bad choice or a misspelt key fails."""
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), {"family": "unitary"}))
    assert cfg.family is Family.unitary
    with pytest.raises(ValidationError, match="symplectic"):
        OmegaConf.merge(OmegaConf.structured(DataConfig), {"family": "symplectic"})
    with pytest.raises(ValidationError):
        OmegaConf.merge(OmegaConf.structured(DataConfig), {"d": "five"})
    with pytest.raises(ConfigKeyError, match="famliy"):
        OmegaConf.merge(OmegaConf.structured(DataConfig), {"famliy": "unitary"})


@pytest.mark.parametrize(
    "data, key",
    [
        (dict(family=Family.commuting, d=5), "data.d"),
        (dict(family=Family.orthogonal, mu=2.0), "data.mu"),
        (dict(family=Family.orthogonal, start=Start.phase, d=5), "data.start"),
        (dict(sigma=-0.1), "data.sigma"),
        (dict(T=1), "data.T"),
    ],
)
def test_validate_rejects_bad_data_values(data, key):
    """validate names the offending data key; the same config with the default values passes."""
    trainer = dict(accelerator="cpu", devices=1)
    with pytest.raises(ConfigError, match=key):
        validate(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig),
                                                     {"data": data, "trainer": trainer})))
    validate(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), {"trainer": trainer})))


@pytest.mark.parametrize("d", [1, 2, 5, 16, 17])
def test_gram_schmidt_equals_sign_fixed_qr(d):
    """The Gram-Schmidt path (small d) gives the same Q as sign-fixed QR on the same Gaussian draws, orthogonal
    to float32 precision; haar_orthogonal switches to QR above GRAM_SCHMIDT_MAX_D."""
    from icar.data.contexts import GRAM_SCHMIDT_MAX_D, gram_schmidt, qr_positive

    g = torch.randn(500, d, d, generator=torch.Generator().manual_seed(d))
    q_gs, q_qr = gram_schmidt(g), qr_positive(g)
    assert torch.allclose(q_gs, q_qr, atol=2e-4)
    eye = torch.eye(d).expand(500, d, d)
    assert torch.allclose(q_gs.transpose(-1, -2) @ q_gs, eye, atol=1e-5)
    W = haar_orthogonal(3, d, torch.Generator().manual_seed(0))
    ref = (gram_schmidt if d <= GRAM_SCHMIDT_MAX_D else qr_positive)(
        torch.randn(3, d, d, generator=torch.Generator().manual_seed(0))
    )
    assert torch.equal(W, ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("steps", [0, 1, 2, 3, 7, 8, 9, 50])
def test_noiseless_roll_out_by_doubling_equals_the_step_by_step_recursion(steps, dtype):
    """The fast path (powers by doubling) against s_{t+1} = W s_t written as a loop, any step count."""
    g = torch.Generator().manual_seed(steps)
    W = torch.randn(7, 4, 4, generator=g, dtype=dtype) / 2
    s1 = torch.randn(7, 4, generator=g, dtype=dtype)
    expected = [s1]
    for _ in range(steps):
        expected.append(torch.einsum("nij,nj->ni", W, expected[-1]))
    got = roll_out(W, s1, steps)
    assert got.shape == (7, steps + 1, 4)
    torch.testing.assert_close(got, torch.stack(expected, dim=1), rtol=1e-12, atol=1e-12)
