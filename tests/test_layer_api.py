"""The public layer API the analyses read (`head_weights`, `project`, `attend`, `forward_with_context`,
`Block.output`) against every evaluation path of `forward` and against a from-scratch numpy recomputation, in float64,
for every positional variant x attention kind, with and without biases, LayerNorm and the residual."""

from __future__ import annotations

import itertools

import pytest
import torch

from icar.config import Attention, Kernel, Positional, Readout, TransformerConfig
from icar.models.transformer import AttentionPath, MultiHeadAttention, Transformer
from tests.layer_reference import reference_block

T, WIDTH = 7, 5
CASES = list(itertools.product(Positional, Attention, [False, True], [False, True], [False, True]))
TIGHT = dict(rtol=1e-12, atol=1e-12)


def _model(positional: Positional, attention: Attention, bias: bool, layernorm: bool, residual: bool,
           **kw: object) -> Transformer:
    """A one-layer model on raw tokens (d_model = 2 x token width) with every parameter redrawn, float64."""
    cfg = TransformerConfig(n_heads=3, d_model=2 * WIDTH, head_dim=4, positional=positional, attention=attention,
                            bias=bias, layernorm=layernorm, residual=residual, readout=Readout.linear, **kw)
    model = Transformer(cfg, WIDTH, WIDTH, T, augmented=False).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _tokens(seed: int) -> torch.Tensor:
    return torch.randn(4, T, WIDTH, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _paths(positional: Positional, attention: Attention) -> list[AttentionPath]:
    """The evaluations of a first layer that apply to this variant."""
    paths = [AttentionPath.explicit, AttentionPath.dense]
    if attention == Attention.softmax and positional in (Positional.none, Positional.additive):
        paths.append(AttentionPath.fused)
    if positional != Positional.additive:  # token coordinates exist
        paths.append(AttentionPath.coordinates)
        if attention == Attention.linear:
            paths.append(AttentionPath.token_space)
    return paths


@pytest.mark.parametrize("positional,attention,bias,layernorm,residual", CASES)
def test_forward_with_context_is_forward_on_every_path(monkeypatch: pytest.MonkeyPatch, positional: Positional,
                                                       attention: Attention, bias: bool, layernorm: bool,
                                                       residual: bool) -> None:
    """With the same input for queries and context, the public map equals `Block.forward` however it is evaluated."""
    model = _model(positional, attention, bias, layernorm, residual)
    e = _tokens(1)
    x = model.embed_tokens(e)  # (B, T, D)
    coords = model.token_coords(e)
    block = model.blocks[0]
    with torch.no_grad():
        public = block.forward_with_context(x, x)  # (B, T, D)
        for path in _paths(positional, attention):
            monkeypatch.setattr(MultiHeadAttention, "path", lambda self, c, t, p=path: p)
            torch.testing.assert_close(public, block(x, coords), **TIGHT, msg=f"path {path.value}")
        assert public.abs().max() > 1e-2


@pytest.mark.parametrize("positional,attention,bias,layernorm,residual", CASES)
def test_head_weights_rebuild_the_layer_from_scratch(positional: Positional, attention: Attention, bias: bool,
                                                     layernorm: bool, residual: bool) -> None:
    """numpy on `head_weights()` (and the raw P, positional embeddings, LayerNorm) reproduces `project`, `forward`
    and `forward_with_context` with a different query input."""
    model = _model(positional, attention, bias, layernorm, residual, kernel=Kernel.explicit)
    block, attn = model.blocks[0], model.blocks[0].attn
    x, other = model.embed_tokens(_tokens(2)), model.embed_tokens(_tokens(3))  # (B, T, D) each
    with torch.no_grad():
        w = attn.head_weights()
        q, k, v = attn.project(x)  # (B, H, T, dh) each
        for got, M, b in ((q, w.Q, w.bq), (k, w.K, w.bk), (v, w.V, w.bv)):
            expected = torch.einsum("hij,btj->bhti", M, x)
            torch.testing.assert_close(got, expected if b is None else expected + b[:, None], **TIGHT)
        torch.testing.assert_close(block(x), reference_block(block, x, x), **TIGHT)
        x_query = x.clone()
        x_query[:, -1] = other[:, -1]  # the last query replaced, as the in-context map does
        for query in (x_query, other):
            torch.testing.assert_close(block.forward_with_context(query, x), reference_block(block, query, x), **TIGHT)
        changed = block.forward_with_context(x_query, x) - block(x)  # (B, T, D)
        assert changed[:, :-1].abs().max() == 0 and changed[:, -1].abs().max() > 1e-3  # only the replaced query


def test_head_weights_of_gd_blocks_are_the_masked_weights() -> None:
    """Under model.gd_blocks the per-head weights are the parametrised (masked) ones the layer uses."""
    d = 3
    cfg = TransformerConfig(n_heads=2, gd_blocks=True, layernorm=False, readout=Readout.block)
    model = Transformer(cfg, 3 * d, d, T, augmented=True).double()
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.qkv.parametrizations.weight.original.normal_()
        attn.out.parametrizations.weight.original.normal_()
        w = attn.head_weights()
        zero, mid, prev = slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)
        assert w.Q[..., zero].abs().max() == 0 and w.Q[..., prev].abs().max() == 0 and w.Q[..., mid].abs().min() > 0
        assert w.K[..., mid].abs().max() == 0 and w.O[:, d:].abs().max() == 0
        s = torch.randn(2, T, d, dtype=torch.float64)
        e = torch.cat([torch.zeros_like(s), s, torch.nn.functional.pad(s, (0, 0, 1, 0))[:, :-1]], -1)
        x = model.embed_tokens(e)
        torch.testing.assert_close(model.blocks[0](x, model.token_coords(e)), reference_block(model.blocks[0], x, x),
                                   **TIGHT)
