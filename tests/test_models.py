"""Properties of icar.models: causality, attention against its closed form, Proposition 1, the exact
solutions of claims 2 and 3 (docs/PAPER_NOTES.md §3.3, §3.4) for the diagonal model, and `build_model` sizing.

Exact checks run in float64 / complex128 with tolerances near machine precision.
"""

from __future__ import annotations

import math

import pytest
import torch

from icar.config import (
    Attention,
    Basis,
    DataConfig,
    DiagonalConfig,
    Embedding,
    Family,
    Positional,
    Readout,
    Start,
    Tokens,
    TransformerConfig,
)
from icar.data.contexts import random_angles, rotation_blocks
from icar.data.sequences import SequenceSampler, roll_out
from icar.data.tokens import encode_tokens, realify
from icar.models import DiagonalAttention, Transformer, build_model
from icar.models.transformer import MultiHeadAttention
from icar.theory import l_unitary_row

EXACT = 1e-12
POSITIONALS = list(Positional)
WEIGHTED = [Positional.none, Positional.multiplicative, Positional.softmax_positional]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.5) -> torch.nn.Module:
    """Every parameter (P, positional embeddings, LayerNorm affine included) redrawn N(0, std^2), float64."""
    g = _gen(seed)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _transformer(token_dim: int, out_dim: int, T: int, augmented: bool = False, **kw) -> Transformer:
    return Transformer(TransformerConfig(**kw), token_dim, out_dim, T, augmented)


# ---------------------------------------------------------------------------------------------------------------
# 1. Causality
# ---------------------------------------------------------------------------------------------------------------


def _assert_causal(model: torch.nn.Module, x: torch.Tensor, seed: int) -> None:
    """Perturbing positions >= k leaves outputs < k bit-for-bit (1e-12) and changes some output >= k."""
    g = _gen(seed)
    T = x.shape[1]
    with torch.no_grad():
        y = model(x)
        for k in range(1, T):
            x2 = x.clone()
            x2[:, k:] = x2[:, k:] + torch.randn(x2[:, k:].shape, generator=g, dtype=x.dtype)
            y2 = model(x2)
            assert (y2[:, :k] - y[:, :k]).abs().max() <= EXACT, f"output before {k} depends on the future"
            assert (y2[:, k:] - y[:, k:]).abs().max() > 1e-3, f"perturbing positions >= {k} changed nothing"


@pytest.mark.parametrize("attention", list(Attention))
@pytest.mark.parametrize("positional", POSITIONALS)
def test_transformer_is_causal(attention: Attention, positional: Positional) -> None:
    """Two-layer, three-head Transformer: outputs at t < k ignore tokens at t >= k, and do see tokens at t = k."""
    T, width = 7, 5
    model = _randomize(
        _transformer(width, 3, T, n_layers=2, n_heads=3, head_dim=4, attention=attention, positional=positional,
                     layernorm=True, bias=True),
        seed=1,
    )
    x = torch.randn(4, T, width, generator=_gen(2), dtype=torch.float64)
    _assert_causal(model, x, seed=3)


@pytest.mark.parametrize("complex_valued", [False, True])
def test_diagonal_is_causal(complex_valued: bool) -> None:
    """Diagonal model: the prediction from s_1..s_tau (query s_{tau-1}) ignores s_{tau+1}, ... and sees s_tau."""
    T, d = 7, 4
    model = _randomize(DiagonalAttention(d, 3, T), seed=4)
    dtype = torch.complex128 if complex_valued else torch.float64
    s = torch.randn(3, T, d, generator=_gen(5), dtype=dtype)
    _assert_causal(model, s, seed=6)


def test_diagonal_matches_explicit_sum() -> None:
    """Diagonal model = sum_{t<=tau} P[tau,t] sum_h <a_h * s_{tau-1}, s_t> (b_h * s_t), conj on the query s_{tau-1}."""
    T, d, H = 5, 3, 2
    model = _randomize(DiagonalAttention(d, H, T + 2), seed=7)  # inputs shorter than max_len
    s = torch.randn(2, T, d, generator=_gen(8), dtype=torch.complex128)
    A, B, P = (m.detach().to(torch.complex128) for m in (model.A, model.B, model.P))
    expected = torch.zeros_like(s)
    for tau in range(1, T):  # 0-based index tau holds s_{tau+1}; the query s_{tau-1} sits at index tau - 1
        for t in range(tau + 1):
            for h in range(H):
                score = (A[h] * s[:, tau - 1]).conj().mul(s[:, t]).sum(-1, keepdim=True)  # (n, 1)
                expected[:, tau] += P[tau, t] * score * (B[h] * s[:, t])
    with torch.no_grad():
        out = model(s)
    assert out[:, 0].abs().max() == 0  # tau = 1: no query token, s_0 = 0
    torch.testing.assert_close(out, expected, rtol=0, atol=EXACT)


# ---------------------------------------------------------------------------------------------------------------
# 2 and 6. Attention against hand-computed numbers and an explicit per-head, per-position loop
# ---------------------------------------------------------------------------------------------------------------


def test_linear_attention_hand_checked() -> None:
    """Hand-set 1-layer linear attention gives e_t + sum_{t'<=t} (q_t.k_t' / sqrt(dh)) W_O v_t', worked out by hand."""
    model = _transformer(2, 2, 3, n_heads=1, head_dim=4, positional=Positional.none, layernorm=False, residual=True,
                         bias=False, readout=Readout.block).double()
    Wq = [[1, 0], [0, 1], [0, 0], [0, 0]]  # q = (e0, e1, 0, 0)
    Wk = [[1, 1], [0, 1], [0, 0], [0, 0]]  # k = (e0 + e1, e1, 0, 0): not symmetric, so q/k swaps show
    Wv = [[1, 0], [0, 0], [0, 0], [0, 1]]  # v = (e0, 0, 0, e1)
    Wo = [[2, 0, 0, 0], [0, 0, 0, 4]]  # W_O v = (2 e0, 4 e1)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.copy_(torch.tensor(Wq + Wk + Wv, dtype=torch.float64))
        model.blocks[0].attn.out.weight.copy_(torch.tensor(Wo, dtype=torch.float64))
    e = torch.tensor([[[1, 0], [0, 1], [1, 2]]], dtype=torch.float64)
    # sqrt(head_dim) = 2.  k_1 = (1, 0), k_2 = (1, 1), k_3 = (3, 2);  W_O v: (2, 0), (0, 4), (2, 8).
    # t=1: q=(1,0): score 1/2                          -> (1,0) + 1/2 (2,0)                        = (2, 0)
    # t=2: q=(0,1): scores 0, 1/2                      -> (0,1) + 1/2 (0,4)                        = (0, 3)
    # t=3: q=(1,2): scores 1/2, 3/2, 7/2               -> (1,2) + 1/2 (2,0) + 3/2 (0,4) + 7/2 (2,8) = (9, 36)
    expected = torch.tensor([[[2, 0], [0, 3], [9, 36]]], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(e), expected, rtol=0, atol=EXACT)


def _reference_mha(mha: MultiHeadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit loops over heads and query positions: output (B, T, d_model) and weights (B, H, T, T)."""
    Bn, T, D = x.shape
    H, dh = mha.n_heads, mha.head_dim
    W, b = mha.qkv.weight, mha.qkv.bias if mha.qkv.bias is not None else torch.zeros(3 * H * dh, dtype=x.dtype)
    out = torch.zeros(Bn, T, D, dtype=x.dtype) + (mha.out.bias if mha.out.bias is not None else 0)
    weights = torch.zeros(Bn, H, T, T, dtype=x.dtype)
    for h in range(H):
        rows = [slice(j * H * dh + h * dh, j * H * dh + (h + 1) * dh) for j in range(3)]  # q, k, v rows of head h
        q, k, v = (x @ W[r].T + b[r] for r in rows)  # each (B, T, dh)
        if mha.positional == Positional.softmax_positional:
            qp, kp = (mha.pos_emb[:T] @ W[r].T + b[r] for r in rows[:2])  # (T, dh)
        Wo_h = mha.out.weight[:, h * dh : (h + 1) * dh]  # (D, dh)
        for t in range(T):
            w = torch.stack([(q[:, t] * k[:, u]).sum(-1) for u in range(t + 1)], -1) / math.sqrt(dh)  # (B, t+1)
            if mha.kind == Attention.softmax:
                w = torch.softmax(w, -1)
            if mha.positional == Positional.multiplicative:
                w = w * mha.P[t, : t + 1]
            elif mha.positional == Positional.softmax_positional:
                w = w * torch.softmax(torch.stack([qp[t] @ kp[u] for u in range(t + 1)]) / math.sqrt(dh), -1)
            weights[:, h, t, : t + 1] = w
            y = sum(w[:, u, None] * v[:, u] for u in range(t + 1))  # (B, dh)
            out[:, t] += y @ Wo_h.T
    return out, weights


@pytest.mark.parametrize("attention", list(Attention))
@pytest.mark.parametrize("positional", WEIGHTED)
def test_attention_matches_explicit_loop(attention: Attention, positional: Positional) -> None:
    """Batched MultiHeadAttention (forward and attention_weights) equals the loop over heads and positions."""
    T, D = 6, 5
    cfg = TransformerConfig(n_heads=3, attention=attention, positional=positional, bias=True)
    mha = _randomize(MultiHeadAttention(cfg, D, 4, T + 2), seed=10)  # inputs shorter than max_len
    x = torch.randn(2, T, D, generator=_gen(11), dtype=torch.float64)
    expected_out, expected_w = _reference_mha(mha, x)
    with torch.no_grad():
        torch.testing.assert_close(mha(x), expected_out, rtol=0, atol=EXACT)
        torch.testing.assert_close(mha.attention_weights(x), expected_w, rtol=0, atol=EXACT)


@pytest.mark.parametrize("attention", list(Attention))
@pytest.mark.parametrize("positional", POSITIONALS)
def test_heads_sum_to_multi_head(attention: Attention, positional: Positional) -> None:
    """An H-head Transformer layer equals the sum of H single-head Transformers holding each head's weights."""
    T, D, H, dh = 6, 5, 3, 4
    kw = dict(attention=attention, positional=positional, layernorm=False, residual=False, bias=False, head_dim=dh,
              readout=Readout.linear)
    multi = _randomize(_transformer(D, 2, T, n_heads=H, **kw), seed=12)
    x = torch.randn(2, T, D, generator=_gen(13), dtype=torch.float64)
    total = torch.zeros(2, T, 2, dtype=torch.float64)
    src = multi.blocks[0].attn
    for h in range(H):
        single = _transformer(D, 2, T, n_heads=1, **kw).double()
        dst = single.blocks[0].attn
        with torch.no_grad():
            for j in range(3):  # q, k, v rows of head h
                dst.qkv.weight[j * dh : (j + 1) * dh] = src.qkv.weight[j * H * dh + h * dh : j * H * dh + (h + 1) * dh]
            dst.out.weight.copy_(src.out.weight[:, h * dh : (h + 1) * dh])
            single.readout.weight.copy_(multi.readout.weight)
            if positional == Positional.multiplicative:
                dst.P.copy_(src.P)
            if positional == Positional.softmax_positional:
                dst.pos_emb.copy_(src.pos_emb)
            if positional == Positional.additive:
                single.pos_emb.copy_(multi.pos_emb)
            total += single(x)
    with torch.no_grad():
        torch.testing.assert_close(multi(x), total, rtol=0, atol=EXACT)


@pytest.mark.parametrize("attention", list(Attention))
def test_additive_positional_is_added_to_tokens(attention: Attention) -> None:
    """positional=additive equals positional=none run on e_t + pos_emb[t] (first T rows, for T below max_len)."""
    T, D, max_len = 4, 5, 7
    kw = dict(n_layers=2, n_heads=2, attention=attention, bias=True)
    additive = _randomize(_transformer(D, 3, max_len, positional=Positional.additive, **kw), seed=14)
    plain = _transformer(D, 3, max_len, positional=Positional.none, **kw).double()
    plain.load_state_dict({k: v for k, v in additive.state_dict().items() if k != "pos_emb"})
    x = torch.randn(2, T, D, generator=_gen(15), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(additive(x), plain(x + additive.pos_emb[:T]), rtol=0, atol=EXACT)
        assert (additive(x) - plain(x)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# 3. Proposition 1: one linear attention layer on augmented tokens is one gradient step
# ---------------------------------------------------------------------------------------------------------------


def test_linear_attention_is_one_gd_step() -> None:
    """Block-sparse attention on e_t = (0, s_t, s_{t-1}) outputs W_hat s_t, W_hat = eta sum_{j<t} s_{j+1} s_j^T."""
    d, T, eta = 3, 6, 0.3
    data = DataConfig(family=Family.orthogonal, d=d, T=T, start=Start.sphere, tokens=Tokens.augmented)
    cfg = TransformerConfig(n_heads=1, positional=Positional.none, layernorm=False, residual=True, bias=False,
                            readout=Readout.block)
    model = build_model(cfg, data).double()
    D = 3 * d  # d_model = head_dim = token width
    zero, mid, prev = slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)
    Wq, Wk, Wv, Wo = (torch.zeros(D, D, dtype=torch.float64) for _ in range(4))
    I = torch.eye(d, dtype=torch.float64)
    Wq[zero, mid] = I  # query s_t
    Wk[zero, prev] = I  # key s_{t'-1}
    Wv[zero, mid] = I  # value s_{t'}
    Wo[zero, zero] = eta * math.sqrt(D) * I  # written into the zero block; sqrt(D) undoes the scaling
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.copy_(torch.cat([Wq, Wk, Wv]))
        model.blocks[0].attn.out.weight.copy_(Wo)

    s, _ = SequenceSampler(data).sample(5, _gen(20))
    s = s[:, :T].double()  # (n, T, d): the context s_1..s_T
    with torch.no_grad():
        out = model(encode_tokens(s, Tokens.augmented))  # (n, T, d)

    for t in range(T):  # 0-based: the model has seen s[:, :t+1]; pairs (s_j, s_{j+1}) with j + 1 <= t
        W_hat = eta * sum((torch.einsum("ni,nj->nij", s[:, j + 1], s[:, j]) for j in range(t)),
                          torch.zeros(s.shape[0], d, d, dtype=torch.float64))
        torch.testing.assert_close(out[:, t], torch.einsum("nij,nj->ni", W_hat, s[:, t]), rtol=0, atol=EXACT)

    # The same W_hat is one GD step from W' = 0 on L(W') = 1/2 sum_{t<T} ||s_{t+1} - W' s_t||^2 (autograd).
    W0 = torch.zeros(s.shape[0], d, d, dtype=torch.float64, requires_grad=True)
    resid = s[:, 1:] - torch.einsum("nij,ntj->nti", W0, s[:, :-1])
    (grad,) = torch.autograd.grad(0.5 * resid.pow(2).sum(), W0)
    torch.testing.assert_close(out[:, -1], torch.einsum("nij,nj->ni", -eta * grad, s[:, -1]), rtol=0, atol=EXACT)
    assert out.abs().max() > 0.1  # not trivially zero


# ---------------------------------------------------------------------------------------------------------------
# 4. Claim 2: unitary context, C = c I, p_{tau,tau} = 1/c
# ---------------------------------------------------------------------------------------------------------------


def _unitary_sequences(n: int, d: int, T: int, seed: int) -> torch.Tensor:
    """s_1..s_{T+1} (n, T+1, d) complex128 from the sampler's angles, s_1 = 1_d, |lambda| = 1 to float64 precision."""
    data = DataConfig(family=Family.unitary, d=d, T=T, start=Start.ones, tokens=Tokens.raw)
    _, W = SequenceSampler(data).sample(n, _gen(seed))
    lam = torch.polar(torch.ones(n, d, dtype=torch.float64), W.diagonal(dim1=-2, dim2=-1).angle().double())
    return roll_out(torch.diag_embed(lam), torch.ones(n, d, dtype=torch.complex128), T)


def _set_diagonal(model: DiagonalAttention, A: torch.Tensor, B: torch.Tensor, P: torch.Tensor) -> DiagonalAttention:
    with torch.no_grad():
        model.A.copy_(A)
        model.B.copy_(B)
        model.P.copy_(P)
    return model


def _claim2_model(d: int, T: int, c: float, dtype: torch.dtype = torch.float64) -> DiagonalAttention:
    P = torch.eye(T, dtype=dtype) / c  # P[tau, tau] = 1/c
    model = DiagonalAttention(d, d, T).to(dtype)
    return _set_diagonal(model, torch.eye(d, dtype=dtype), c * torch.eye(d, dtype=dtype), P)


@pytest.mark.parametrize("d", [4, 7, 10])
def test_claim2_exact_solution(d: int) -> None:
    """Unitary W, s_1 = 1_d: A = I, B = cI (C = cI), P = I/c predicts s_{tau+1} exactly for tau >= 2, 0 at tau = 1."""
    T, c = 8, 0.7
    model = _claim2_model(d, T, c)
    torch.testing.assert_close(model.C, c * torch.eye(d, dtype=torch.float64), rtol=0, atol=EXACT)
    s = _unitary_sequences(16, d, T, seed=d)
    with torch.no_grad():
        out = model(s[:, :T])  # (n, T, d)
    assert out[:, 0].abs().max() == 0
    torch.testing.assert_close(out[:, 1:], s[:, 2:], rtol=0, atol=1e-10)


def test_claim2_exact_solution_complex64_pipeline() -> None:
    """The claim-2 solution also holds (to 1e-5) on the sampler's own complex64 sequences with float32 parameters."""
    d, T = 10, 15
    s, _ = SequenceSampler(DataConfig(family=Family.unitary, d=d, T=T, start=Start.ones, tokens=Tokens.raw)).sample(
        32, _gen(21)
    )
    assert s.dtype == torch.complex64
    with torch.no_grad():
        out = _claim2_model(d, T, 2.0, torch.float32)(s[:, :T])
    torch.testing.assert_close(out[:, 1:], s[:, 2:], rtol=0, atol=1e-5)


def test_claim2_population_loss_formula() -> None:
    """Monte Carlo squared error of the diagonal model at each tau matches l_U(C, p) within 5 standard errors."""
    d, T, n = 4, 5, 40_000
    g = _gen(30)
    A = 0.4 + 0.4 * torch.randn(d, d, generator=g, dtype=torch.float64)  # positive mean: ||C 1||^2 != ||C||_F^2
    B = 0.4 + 0.4 * torch.randn(d, d, generator=g, dtype=torch.float64)
    P = torch.randn(T, T, generator=g, dtype=torch.float64)
    model = _set_diagonal(DiagonalAttention(d, d, T).double(), A, B, P)
    C = model.C.detach()
    s = _unitary_sequences(n, d, T, seed=31)
    with torch.no_grad():
        err = (model(s[:, :T]) - s[:, 1:]).abs().pow(2).sum(-1)  # (n, T): |s_hat_{tau+1} - s_{tau+1}|^2
    for tau in range(2, T + 1):  # 1-based prefix length; its prediction sits at 0-based index tau - 1
        e = err[:, tau - 1]
        mean, se = e.mean().item(), e.std().item() / math.sqrt(n)
        p = P[tau - 1, :tau]
        l_U = l_unitary_row(C, p)
        assert abs(mean - l_U) < 5 * se, f"tau={tau}: MC {mean:.4f} +- {se:.4f} vs l_U {l_U:.4f}"
        # The check discriminates: the formula without its query-token term fails it.
        wrong = l_U - p[-2].item() ** 2 * ((C.sum(1)).pow(2).sum() - C.pow(2).sum()).item()
        assert abs(mean - wrong) > 5 * se, f"tau={tau}: the p_(tau-1) term is too small to be tested"


# ---------------------------------------------------------------------------------------------------------------
# 5. Claim 3: rotation blocks, C = c (J_2 + ... + J_2), p_{tau,tau} = 1/c, p_{tau,tau-1} = -1/(2c)
# ---------------------------------------------------------------------------------------------------------------


def _rotation_sequences(n: int, d: int, T: int, seed: int) -> torch.Tensor:
    """s_1..s_{T+1} (n, T+1, d) float64 for canonical 2x2 rotation blocks (Basis.identity), s_1 = 1_d."""
    W = rotation_blocks(random_angles(n, d // 2, 1.0, _gen(seed), "cpu").double())  # (n, d, d), float64
    return roll_out(W, torch.ones(n, d, dtype=torch.float64), T)


def _claim3_model(d: int, H: int, T: int, c: float, dtype: torch.dtype = torch.float64) -> DiagonalAttention:
    A = torch.zeros(H, d, dtype=dtype)  # heads beyond d/2 stay zero
    for k in range(d // 2):
        A[k, 2 * k : 2 * k + 2] = 1  # block indicator
    sub = torch.diag_embed(torch.ones(T - 1, dtype=dtype), offset=-1)  # ones at [tau, tau - 1]
    P = (torch.eye(T, dtype=dtype) - 0.5 * sub) / c  # P[tau, tau] = 1/c, P[tau, tau-1] = -1/(2c)
    return _set_diagonal(DiagonalAttention(d, H, T).to(dtype), A, c * A, P)


@pytest.mark.parametrize(("d", "H"), [(6, 3), (10, 5), (10, 8)])
def test_claim3_exact_solution(d: int, H: int) -> None:
    """Rotation blocks, s_1 = 1_d: C = c blockdiag(J_2), P[tau,tau] = 1/c, P[tau,tau-1] = -1/(2c) is exact."""
    T, c = 9, 1.5
    model = _claim3_model(d, H, T, c)
    J = torch.block_diag(*[torch.ones(2, 2, dtype=torch.float64)] * (d // 2))
    torch.testing.assert_close(model.C, c * J, rtol=0, atol=EXACT)
    s = _rotation_sequences(16, d, T, seed=40 + d)
    with torch.no_grad():
        out = model(s[:, :T])
    assert out[:, 0].abs().max() == 0
    torch.testing.assert_close(out[:, 1:], s[:, 2:], rtol=0, atol=1e-10)
    # Negative control: the claim-2 solution (C = cI, P = I/c) is not exact on rotation blocks.
    with torch.no_grad():
        wrong = _claim2_model(d, T, c)(s[:, :T])
    assert (wrong[:, 1:] - s[:, 2:]).abs().max() > 0.1


def test_claim3_exact_solution_sampler_pipeline() -> None:
    """The claim-3 solution also holds (to 1e-5) on the sampler's float32 sequences with basis=identity."""
    d, T = 10, 15
    data = DataConfig(family=Family.commuting, basis=Basis.identity, d=d, T=T, start=Start.ones, tokens=Tokens.raw)
    s, _ = SequenceSampler(data).sample(32, _gen(41))
    with torch.no_grad():
        out = _claim3_model(d, 8, T, 1.0, torch.float32)(s[:, :T])
    torch.testing.assert_close(out[:, 1:], s[:, 2:], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 7. build_model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", list(Tokens))
@pytest.mark.parametrize("family", [Family.orthogonal, Family.unitary])
def test_build_model_widths(tokens: Tokens, family: Family) -> None:
    """Token width 3d (augmented) or d (raw), doubled for complex data; block readout exactly for augmented tokens."""
    d, T = 3, 6
    data = DataConfig(family=family, d=d, T=T, tokens=tokens, start=Start.sphere)
    model = build_model(TransformerConfig(n_heads=2), data)
    real_d = 2 * d if family == Family.unitary else d
    width = 3 * real_d if tokens == Tokens.augmented else real_d
    assert (model.token_dim, model.d_model, model.out_dim) == (width, width, real_d)
    assert (model.readout is None) == (tokens == Tokens.augmented)  # readout=auto
    s, _ = SequenceSampler(data).sample(4, _gen(50))
    e = encode_tokens(realify(s[:, :T]), tokens)
    assert e.shape == (4, T, width)
    assert model(e).shape == (4, T, real_d)


def test_build_model_diagonal() -> None:
    """arch=diagonal builds the (A, B, P) model on the complex width d, with H rows and a T x T matrix P."""
    data = DataConfig(family=Family.unitary, d=5, T=7, tokens=Tokens.raw, start=Start.ones)
    model = build_model(DiagonalConfig(n_heads=3), data)
    assert isinstance(model, DiagonalAttention)
    assert model.A.shape == model.B.shape == (3, 5) and model.P.shape == (7, 7)
    s, _ = SequenceSampler(data).sample(2, _gen(51))
    assert model(s[:, :7]).shape == (2, 7, 5)


def test_build_model_repeat_embedding_tiles_tokens() -> None:
    """embedding=repeat with d_model a multiple of the token width tiles e_t (checked on the first block's input)."""
    data = DataConfig(d=2, T=4, tokens=Tokens.raw)
    model = build_model(TransformerConfig(d_model=6, embedding=Embedding.repeat), data)
    seen = {}
    model.blocks[0].register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0]))
    e = torch.randn(1, 4, 2, generator=_gen(52))
    model(e)
    torch.testing.assert_close(seen["x"], torch.cat([e, e, e], -1), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(readout=Readout.block, d_model=18), "model.readout=block"),
        (dict(readout=Readout.block, embedding=Embedding.linear), "model.readout=block"),
        (dict(d_model=10, embedding=Embedding.repeat), "must be a multiple of the token width 9"),
    ],
)
def test_build_model_rejects_bad_widths(overrides: dict, match: str) -> None:
    """Block readout off the token width, or repeat embedding to a non-multiple width: ValueError naming the fix."""
    data = DataConfig(d=3, T=5, tokens=Tokens.augmented)
    with pytest.raises(ValueError, match=match):
        build_model(TransformerConfig(**overrides), data)


@pytest.mark.parametrize("positional", ["none", "multiplicative", "softmax_positional"])
@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_cpu_batch_chunks_give_the_same_outputs_and_gradients(monkeypatch, attention, positional):
    """The CPU path that runs attention in batch chunks equals the one-shot layer, outputs and gradients."""
    import icar.models.transformer as tr
    from icar.config import Attention, Kernel, Positional, TransformerConfig

    for kernel, method in ((Kernel.explicit, "_attend"), (Kernel.auto, "_attend_dense")):
        cfg = TransformerConfig(attention=Attention(attention), positional=Positional(positional), n_heads=3,
                                head_dim=4, kernel=kernel)
        _check_chunks(monkeypatch, tr, cfg, method, attention, positional)


def _check_chunks(monkeypatch, tr, cfg, method: str, attention: str, positional: str) -> None:
    torch.manual_seed(0)
    attn = tr.MultiHeadAttention(cfg, d_model=6, head_dim=4, max_len=7).double()
    x = torch.randn(10, 7, 6, dtype=torch.float64)
    results, calls = [], []
    attend = getattr(attn, method)
    monkeypatch.setattr(attn, method, lambda x, pos: calls.append(len(x)) or attend(x, pos))
    for elements in (1 << 30, 3 * 7 * 7 * 3):  # one chunk; chunks of 3 sequences (the last one shorter)
        monkeypatch.setattr(tr, "CHUNK_ELEMENTS", elements)
        attn.zero_grad()
        out = attn(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in attn.parameters()]))
    (o1, g1), (o2, g2) = results
    if attention == "linear" or positional != "none":  # softmax without positional weights uses the fused kernel
        assert calls == [10, 3, 3, 3, 1]
    assert torch.allclose(o1, o2, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g1, g2))
