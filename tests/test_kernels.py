"""The attention kernels (model.kernel) are one function: fast paths equal the explicit one, outputs and gradients,
in float64 to 1e-10 relative, for every positional variant x attention kind x tokens, with and without biases and
LayerNorm."""

from __future__ import annotations

import itertools

import pytest
import torch

from icar.config import Attention, Embedding, Kernel, Positional, Readout, TransformerConfig
from icar.models.token_space import token_space_attention
from icar.models.transformer import AttentionPath, MultiHeadAttention, Transformer

VARIANTS = list(itertools.product(Positional, Attention, [False, True], [False, True]))


def _run(kernel: Kernel, e: torch.Tensor, augmented: bool, **kw: object) -> tuple[torch.Tensor, list[torch.Tensor], Transformer]:
    torch.manual_seed(1)
    model = Transformer(TransformerConfig(kernel=kernel, **kw), e.shape[-1], 5, e.shape[1], augmented).double()
    with torch.no_grad():
        for block in model.blocks:
            if hasattr(block.attn, "P"):
                block.attn.P.normal_()  # a P far from its all-ones initialisation
    y = model(e)
    (y.square().sum() + y.sum()).backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()], model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _forcing(monkeypatch: pytest.MonkeyPatch, first_layer: AttentionPath) -> None:
    """Every first layer takes `first_layer` (where the layer would use a token-coordinate path), later ones dense."""
    chosen = MultiHeadAttention.path

    def path(self: MultiHeadAttention, coords: object, T: int) -> AttentionPath:
        natural = chosen(self, coords, T)
        if natural in (AttentionPath.token_space, AttentionPath.coordinates, AttentionPath.dense) and coords is not None:
            return first_layer
        return natural

    monkeypatch.setattr(MultiHeadAttention, "path", path)


@pytest.mark.parametrize("tokens", ["raw", "augmented"])
@pytest.mark.parametrize("positional,attention,bias,layernorm", VARIANTS)
def test_fast_kernels_equal_explicit(monkeypatch: pytest.MonkeyPatch, positional: Positional, attention: Attention,
                                     bias: bool, layernorm: bool, tokens: str) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 9, 5, generator=g, dtype=torch.float64)
    e = s if tokens == "raw" else torch.cat([torch.zeros_like(s), s, torch.nn.functional.pad(s, (0, 0, 1, 0))[:, :-1]], -1)
    width = e.shape[-1]
    first_layer_paths = [AttentionPath.dense, AttentionPath.coordinates]
    if attention == Attention.linear:
        first_layer_paths.append(AttentionPath.token_space)
    for embedding in (Embedding.repeat, Embedding.linear):
        kw = dict(n_layers=2, n_heads=3, d_model=2 * width, head_dim=4, positional=positional, attention=attention,
                  bias=bias, layernorm=layernorm, embedding=embedding, readout=Readout.linear)
        y0, g0, _ = _run(Kernel.explicit, e, tokens == "augmented", **kw)
        runs = [(kernel, None) for kernel in (Kernel.fast, Kernel.auto)] + [(Kernel.auto, p) for p in first_layer_paths]
        for kernel, forced in runs:
            with monkeypatch.context() as patch:
                if forced is not None:
                    _forcing(patch, forced)
                y, grads, model = _run(kernel, e, tokens == "augmented", **kw)
            assert _rel(y, y0) < 1e-10, (kernel, forced, embedding)
            for a, b in zip(grads, g0):
                assert _rel(a, b) < 1e-10, (kernel, forced, embedding)
        # which path runs: a token-coordinate one on the first layer unless positions are added to the tokens or
        # softmax scores have no positional weights (torch's fused kernel); dense on later layers
        fast = Transformer(TransformerConfig(kernel=Kernel.fast, **kw), width, 5, e.shape[1], tokens == "augmented")
        coords = fast.token_coords(e.float())
        expected = AttentionPath.dense if positional == Positional.additive else \
            AttentionPath.token_space if attention == Attention.linear else AttentionPath.coordinates
        if attention == Attention.softmax and positional in (Positional.none, Positional.additive):
            expected = AttentionPath.fused
        assert fast.blocks[0].attn.path(coords, e.shape[1]) == expected
        assert fast.blocks[1].attn.path(None, e.shape[1]) in (AttentionPath.dense, AttentionPath.fused)
        if tokens == "augmented" and coords is not None:
            assert coords.s.shape[-1] == 10  # the zero block of (0, s_t, s_{t-1}) is not a coordinate


def test_augmented_tokens_with_a_nonzero_first_block_keep_every_coordinate() -> None:
    model = Transformer(TransformerConfig(n_heads=1, readout=Readout.linear), 15, 5, 8, True)
    e = torch.randn(2, 8, 15)
    assert model.token_coords(e).s.shape[-1] == 15
    e[..., :5] = 0
    assert model.token_coords(e).s.shape[-1] == 10


def test_auto_picks_token_space_for_figure7_and_coordinates_for_figure5() -> None:
    fig7 = TransformerConfig(n_heads=64, d_model=10, head_dim=10, positional=Positional.softmax_positional, bias=True,
                       residual=False, readout=Readout.linear)
    m7 = Transformer(fig7, 5, 5, 50, False)
    assert m7.blocks[0].attn.path(m7.token_coords(torch.zeros(1, 50, 5)), 50) == AttentionPath.token_space
    fig5 = TransformerConfig(n_heads=1, n_layers=2, positional=Positional.none, readout=Readout.linear)
    m5 = Transformer(fig5, 15, 5, 50, True)
    e = torch.cat([torch.zeros(1, 50, 5), torch.randn(1, 50, 10)], -1)
    assert m5.blocks[0].attn.path(m5.token_coords(e), 50) == AttentionPath.coordinates  # r = 10 < head_dim = 15
    assert m5.blocks[1].attn.path(None, 50) == AttentionPath.dense


def test_token_space_attention_against_the_double_sum() -> None:
    """The trilinear formula against y_t = sum_h sum_{t'} pos_h[t, t'] (q_t . k_t') Wo_h v_t' written as loops."""
    g = torch.Generator().manual_seed(3)
    B, T, r, H, dh, D = 2, 7, 4, 3, 2, 5
    s = torch.randn(B, T, r, generator=g, dtype=torch.float64)
    Aq, Ak, Av = (torch.randn(H, dh, r, generator=g, dtype=torch.float64) for _ in range(3))
    Wo = torch.randn(H, D, dh, generator=g, dtype=torch.float64)
    bo = torch.randn(D, generator=g, dtype=torch.float64)
    pos = torch.randn(H, T, T, generator=g, dtype=torch.float64).tril()
    expected = bo.expand(B, T, D).clone()
    for b, h, t, u in itertools.product(range(B), range(H), range(T), range(T)):
        q, k, v = Aq[h] @ s[b, t], Ak[h] @ s[b, u], Av[h] @ s[b, u]
        expected[b, t] += pos[h, t, u] * (q @ k) * (Wo[h] @ v)
    for blocks in (1, 2, 3, T):
        got = token_space_attention(s, Aq, Ak, Av, Wo, bo, pos, blocks=blocks)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
