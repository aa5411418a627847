"""The in-context map read off a one-layer model on augmented tokens, and its comparison with one GD step."""

from __future__ import annotations

import math

import pytest
import torch

from icar.analysis.in_context import aligned_cosine, compare_in_context_maps, implied_maps, real_matrix
from icar.baselines import context_moments
from icar.config import DataConfig, Family, Readout, Start, Tokens, TransformerConfig
from icar.data.contexts import rotation_blocks
from icar.data.sequences import SequenceSampler
from icar.data.tokens import encode_tokens
from icar.models import build_model
from tests.layer_reference import reference_block


def _gd_layer(d: int, T: int, eta: float, gd_blocks: bool = False):
    """Proposition 1's construction: one head whose output at t is eta * sum_{t'<=t} s_{t'} (s_{t'-1} . s_t)."""
    data = DataConfig(family=Family.orthogonal, d=d, T=T, start=Start.sphere, tokens=Tokens.augmented)
    cfg = TransformerConfig(n_heads=1, positional="none", layernorm=False, residual=True, readout=Readout.block,
                            gd_blocks=gd_blocks)
    model = build_model(cfg, data).double()
    D = 3 * d
    zero, mid, prev = slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)
    Wq, Wk, Wv, Wo = (torch.zeros(D, D, dtype=torch.float64) for _ in range(4))
    I = torch.eye(d, dtype=torch.float64)
    Wq[zero, mid], Wk[zero, prev], Wv[zero, mid] = I, I, I
    Wo[zero, zero] = eta * math.sqrt(D) * I
    attn = model.blocks[0].attn
    with torch.no_grad():
        if gd_blocks:  # parametrised: write the unconstrained originals (their masked entries are already 0)
            attn.qkv.parametrizations.weight.original.copy_(torch.cat([Wq, Wk, Wv]))
            attn.out.parametrizations.weight.original.copy_(Wo)
        else:
            attn.qkv.weight.copy_(torch.cat([Wq, Wk, Wv]))
            attn.out.weight.copy_(Wo)
    return model, data


@pytest.mark.parametrize("gd_blocks", [False, True])
def test_implied_map_of_the_gd_construction_is_one_gd_step(gd_blocks: bool) -> None:
    d, T, eta = 3, 7, 0.3
    model, data = _gd_layer(d, T, eta, gd_blocks)
    s, W = SequenceSampler(data).sample(6, torch.Generator().manual_seed(0))
    ctx = s[:, :T].double()
    W_hat, M = implied_maps(model, ctx)
    Y, _ = context_moments(ctx)
    torch.testing.assert_close(W_hat, eta * Y[:, -1], rtol=0, atol=1e-12)
    assert M.abs().max() < 1e-12
    # the map reproduces the model's own prediction of s_{T+1}
    with torch.no_grad():
        out = model(encode_tokens(ctx, Tokens.augmented))[:, -1]
    torch.testing.assert_close(out, torch.einsum("nij,nj->ni", W_hat, ctx[:, -1]), rtol=0, atol=1e-12)
    scores = compare_in_context_maps(model, ctx, W, eta)
    assert scores["icmap/gd1_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert scores["icmap/gd1_scale"] == pytest.approx(1.0, abs=1e-9)
    assert scores["icmap/gd1_rel_err"] < 1e-9
    assert scores["icmap/true_cosine"] < 0.99  # one GD step is not W


def test_implied_map_reproduces_a_random_linear_layer() -> None:
    """Linear attention without LayerNorm is linear in the query: output at T = W_hat s_T + M s_{T-1}, any weights."""
    d, T = 3, 6
    data = DataConfig(family=Family.orthogonal, d=d, T=T, tokens=Tokens.augmented, start=Start.sphere)
    model = build_model(TransformerConfig(n_heads=2, layernorm=False, positional="multiplicative"), data).double()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    s, _ = SequenceSampler(data).sample(4, torch.Generator().manual_seed(1))
    ctx = s[:, :T].double()
    W_hat, M = implied_maps(model, ctx)
    with torch.no_grad():
        out = model(encode_tokens(ctx, Tokens.augmented))[:, -1]
    expected = torch.einsum("nij,nj->ni", W_hat, ctx[:, -1]) + torch.einsum("nij,nj->ni", M, ctx[:, -2])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert M.abs().max() > 1e-3  # random weights use the query's s_{T-1} too


def test_implied_map_runs_on_a_nonlinear_layer() -> None:
    """With LayerNorm and softmax the map is a linearisation: finite, non-zero, one per sequence."""
    data = DataConfig(family=Family.orthogonal, d=3, T=6, tokens=Tokens.augmented)
    model = build_model(TransformerConfig(n_heads=2, attention="softmax", positional="multiplicative"), data).double()
    s, _ = SequenceSampler(data).sample(2, torch.Generator().manual_seed(1))
    W_hat, M = implied_maps(model, s[:, :6].double())
    assert W_hat.shape == M.shape == (2, 3, 3) and torch.isfinite(W_hat).all() and W_hat.abs().max() > 1e-4


def test_implied_map_is_the_derivative_in_the_query_of_the_layer_from_scratch() -> None:
    """On a nonlinear layer (bias, LayerNorm, softmax, P) W_hat and M are the derivatives of the prediction of s_{T+1}
    in the query's s_T and s_{T-1}, keys and values held at the context: central differences of the layer
    recomputed from its head weights in numpy (tests/layer_reference.py)."""
    d, T, n, eps = 3, 6, 3, 1e-6
    data = DataConfig(family=Family.orthogonal, d=d, T=T, tokens=Tokens.augmented)
    cfg = TransformerConfig(n_heads=2, attention="softmax", positional="multiplicative", bias=True,
                            readout=Readout.linear)
    model = build_model(cfg, data).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    ctx = SequenceSampler(data).sample(n, torch.Generator().manual_seed(2))[0][:, :T].double()  # (n, T, d)
    W_hat, M = implied_maps(model, ctx)
    e = encode_tokens(ctx, Tokens.augmented)  # (n, T, 3d)
    x = model.embed_tokens(e)

    def prediction(query: torch.Tensor) -> torch.Tensor:  # the query's (s_T, s_{T-1}) (n, 2d) -> (n, d)
        e_q = e.clone()
        e_q[:, -1, d:] = query
        return model.read_out(reference_block(model.blocks[0], model.embed_tokens(e_q), x)[:, -1])

    query = torch.cat([ctx[:, -1], ctx[:, -2]], -1)  # (n, 2d)
    with torch.no_grad():
        J = torch.stack([(prediction(query + eps * u) - prediction(query - eps * u)) / (2 * eps)
                         for u in torch.eye(2 * d, dtype=torch.float64)], -1)  # (n, d, 2d)
    torch.testing.assert_close(W_hat, J[..., :d], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(M, J[..., d:], rtol=1e-6, atol=1e-7)
    assert W_hat.abs().max() > 1e-2 and M.abs().max() > 1e-2


def test_real_matrix_acts_on_realified_vectors() -> None:
    g = torch.Generator().manual_seed(2)
    W = torch.randn(3, 4, 4, generator=g, dtype=torch.complex128)
    x = torch.randn(3, 4, generator=g, dtype=torch.complex128)
    y = torch.einsum("nij,nj->ni", W, x)
    real = real_matrix(W)
    torch.testing.assert_close(
        torch.einsum("nij,nj->ni", real, torch.cat([x.real, x.imag], -1)), torch.cat([y.real, y.imag], -1)
    )


def test_aligned_cosine_undoes_a_rotation_that_commutes_with_the_family() -> None:
    """W_hat = G^T W_gd G with G = Q diag(R_phi) Q^T: the raw cosine is low, the aligned one is 1."""
    d, n = 6, 32
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    W_gd = torch.randn(n, d, d, generator=g, dtype=torch.float64)
    G = Q @ rotation_blocks(torch.tensor([[0.9, -1.7, 2.4]], dtype=torch.float64))[0] @ Q.T
    W_hat = G.T @ W_gd @ G
    raw = torch.nn.functional.cosine_similarity(W_hat.flatten(1), W_gd.flatten(1)).mean().item()
    cos, phi = aligned_cosine(W_hat, W_gd, Q)
    assert raw < 0.9 and cos > 0.999, (raw, cos)
    assert len(phi) == d // 2
    # an unrelated map stays unaligned
    other, _ = aligned_cosine(torch.randn(n, d, d, generator=g, dtype=torch.float64), W_gd, Q)
    assert other < 0.5


def test_unitary_data_is_compared_with_real_gd_on_the_tokens_the_model_sees() -> None:
    """Complex sequences reach a real model as (Re, Im): Proposition 1's construction on those tokens is one real GD
    step, and the comparison says so (cosine 1); the true W enters as its real 2d x 2d form."""
    d, T, eta = 2, 6, 0.2
    model, _ = _gd_layer(2 * d, T, eta)  # a layer for real tokens of width 2d
    data = DataConfig(family=Family.unitary, d=d, T=T, tokens=Tokens.augmented, start=Start.phase)
    s, W = SequenceSampler(data).sample(8, torch.Generator().manual_seed(6))
    scores = compare_in_context_maps(model, s[:, :T], W, eta)
    assert scores["icmap/gd1_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert scores["icmap/gd1_scale"] == pytest.approx(1.0, abs=1e-6)
    assert 0.1 < scores["icmap/true_cosine"] < 0.999
