"""A configurable causal Transformer for in-context autoregression (docs/PAPER_NOTES.md §2).

Attention weights are `token weights * positional weights` on the causal triangle:
  token weights: linear  -> scores q_t . k_t' / sqrt(head_dim) (no normalisation by t: our convention);
                 softmax -> softmax over t' <= t of the same scores;
  positional:    multiplicative     -> a learned T x T matrix P shared by the heads (the paper's P), init 1;
                 softmax_positional -> softmax over t' <= t of the heads' scores on learned positional
                                       embeddings (the authors' Figure 7 model);
                 additive           -> none here: a learned embedding is added to the input tokens;
                 none               -> 1.
Layer: x <- x + LayerNorm(Attention(x)) (LayerNorm and residual optional), attention-only as in the paper.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from icar.config import Attention, Embedding, Kernel, Positional, Readout, TransformerConfig
from icar.models.token_space import QUERY_BLOCKS, token_space_attention

CHUNK_ELEMENTS = 1 << 20  # CPU: attention weights per batch chunk (4 MB in float32)


class HeadWeights(NamedTuple):
    """A layer's parameters per head h: q_h = Q_h x + bq_h, k_h, v_h alike, and the output sum_h O_h y_h + bo."""

    Q: torch.Tensor  # (H, dh, D)
    K: torch.Tensor  # (H, dh, D)
    V: torch.Tensor  # (H, dh, D)
    O: torch.Tensor  # (H, D, dh)
    bq: torch.Tensor | None  # (H, dh)
    bk: torch.Tensor | None  # (H, dh)
    bv: torch.Tensor | None  # (H, dh)
    bo: torch.Tensor | None  # (D,)


class TokenCoords(NamedTuple):
    """A first layer's input as x = s @ basis^T (+ offset): the coordinates of its tokens, for the token-space
    kernel (icar/models/token_space.py). Raw d = 5 tokens repeated to d_model = 10 have r = 5 coordinates."""

    s: torch.Tensor  # (B, T, r)
    basis: torch.Tensor  # (d_model, r)
    offset: torch.Tensor | None  # (d_model,)


def dense_flops(H: int, T: int, dh: int, D: int) -> int:
    """Multiply-adds x 2 per sequence of the dense kernel's forward pass: projections, scores, weighted values."""
    return 4 * H * T * T * dh + 8 * T * D * H * dh


def coordinate_flops(H: int, T: int, r: int, D: int) -> int:
    """The same for the coordinate kernel: scores and weighted values in the r token coordinates, then U."""
    return 4 * H * T * T * r + 2 * T * H * r * (r + D)


def token_space_flops(r: int, T: int, D: int) -> int:
    """The same for the token-space kernel: its one GEMM over the causal query blocks."""
    pairs = r * (r + 1) // 2
    return 2 * T * pairs * T * r * D * (QUERY_BLOCKS + 1) // (2 * QUERY_BLOCKS)


class AttentionPath(str, Enum):
    """How `MultiHeadAttention.forward` evaluates a layer (model.kernel picks among those that apply)."""

    explicit = "explicit"  # the (B, H, T, T) weights as written: the reference
    fused = "fused"  # softmax scores without positional weights: torch's scaled_dot_product_attention
    dense = "dense"  # one float factor, contiguous keys, batch chunks on CPU
    coordinates = "coordinates"  # a first layer: scores and values in its r token coordinates (r < head_dim)
    token_space = "token_space"  # a first layer, linear scores: one batch GEMM, no per-sequence weights


def choose_path(attention: Attention, positional: Positional, kernel: Kernel, r: int | None, H: int, T: int,
                dh: int, D: int) -> AttentionPath:
    """The evaluation of a layer (the rule of model.kernel): r is the number of its token coordinates (a constant
    one included where biases or an offset need it) on a first layer, None elsewhere."""
    if kernel == Kernel.explicit:
        return AttentionPath.explicit
    if attention == Attention.softmax and positional in (Positional.none, Positional.additive):
        return AttentionPath.fused
    if r is None or positional == Positional.additive:  # additive: outside the token coordinates
        return AttentionPath.dense
    cost = {AttentionPath.dense: dense_flops(H, T, dh, D), AttentionPath.coordinates: coordinate_flops(H, T, r, D)}
    if attention == Attention.linear:
        cost[AttentionPath.token_space] = token_space_flops(r, T, D)
    if kernel == Kernel.fast:
        return AttentionPath.token_space if AttentionPath.token_space in cost else AttentionPath.coordinates
    return min(cost, key=cost.__getitem__)


class MultiHeadAttention(nn.Module):
    """Causal multi-head attention with all heads computed in one batched product (no loop over heads).

    Evaluations of the same function (`AttentionPath`, chosen by `path`): `explicit` builds the (B, H, T, T) weights as
    written above; the dense kernel does the same with the positional factor, the causal mask and 1/sqrt(dh) folded
    into one float factor and contiguous operands. A first layer sees tokens x = basis s (+ offset) with r token
    coordinates, so q_t . k_t' = s_t^T M s_t' and the output is U s_t' summed: the coordinate kernel computes the
    weights from m_t = M^T s_t against the coordinates themselves (r-wide products instead of head_dim-wide, and
    no gradient for keys and values); with linear scores the token-space kernel never builds per-sequence weights.
    model.kernel=auto takes the path with the fewest forward FLOPs, `fast` the most specialised one that applies
    (for tests), `explicit` the reference.

    Analyses read the layer only through `head_weights`, `project`, `positional_weights`, `attention_weights`,
    `attend` and `forward_with_context` (tests/test_layer_api.py pins them to every path of `forward`).
    """

    def __init__(self, cfg: TransformerConfig, d_model: int, head_dim: int, max_len: int) -> None:
        super().__init__()
        self.kind, self.positional, self.kernel = cfg.attention, cfg.positional, cfg.kernel
        self.n_heads, self.head_dim = cfg.n_heads, head_dim
        self.qkv = nn.Linear(d_model, 3 * cfg.n_heads * head_dim, bias=cfg.bias)
        self.out = nn.Linear(cfg.n_heads * head_dim, d_model, bias=cfg.bias)  # O_h V_h per head
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)), persistent=False)
        if self.positional == Positional.multiplicative:
            self.P = nn.Parameter(torch.ones(max_len, max_len))
        elif self.positional == Positional.softmax_positional:
            self.pos_emb = nn.Parameter(torch.randn(max_len, d_model))

    def head_weights(self) -> HeadWeights:
        """The layer's parameters per head (views of the fused projections): the one place that reads their layout
        besides `project`, which applies them in one product."""
        H, dh = self.n_heads, self.head_dim
        Q, K, V = self.qkv.weight.view(3, H, dh, -1).unbind(0)  # each (H, dh, D)
        O = self.out.weight.view(-1, H, dh).transpose(0, 1)  # (H, D, dh): the head's columns of out
        bq = bk = bv = None
        if self.qkv.bias is not None:
            bq, bk, bv = self.qkv.bias.view(3, H, dh).unbind(0)  # each (H, dh)
        return HeadWeights(Q, K, V, O, bq, bk, bv, self.out.bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., T, d_model) -> q, k, v of shape (..., H, T, head_dim): q_h = Q_h x + bq_h, and so on."""
        *lead, T, _ = x.shape
        qkv = self.qkv(x).view(*lead, T, 3, self.n_heads, self.head_dim)  # (..., T, 3, H, dh)
        q, k, v = qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)  # each (..., H, T, dh)
        return q, k, v

    def positional_weights(self, T: int) -> torch.Tensor | None:
        """Batch-independent positional factor: (T, T), (H, T, T) or None."""
        if self.positional == Positional.multiplicative:
            return self.P[:T, :T] * self.causal[:T, :T]  # (T, T)
        if self.positional == Positional.softmax_positional:
            qp, kp, _ = self.project(self.pos_emb[:T])  # each (H, T, dh)
            scores = qp @ kp.transpose(-1, -2) / math.sqrt(self.head_dim)  # (H, T, T)
            return torch.softmax(scores.masked_fill(~self.causal[:T, :T], float("-inf")), dim=-1)
        return None

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The full weights (B, H, T, T): for inspection and tests; `forward` avoids building them when it can."""
        q, k, _ = self.project(x)  # each (B, H, T, dh)
        return self._weights(q, k, self.positional_weights(x.shape[-2]))

    def _weights(self, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        T = q.shape[-2]
        scores = (q / math.sqrt(self.head_dim)) @ k.transpose(-1, -2)  # (B, H, T, T)
        mask = self.causal[:T, :T]
        if self.kind == Attention.softmax:
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        else:
            weights = scores
        if pos is not None:  # multiplicative and softmax_positional factors are already causal
            return weights * pos
        return weights if self.kind == Attention.softmax else weights * mask

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """The layer on explicit weights from its projections q, k, v (B, H, T, dh) and the positional factor
        `positional_weights(T)`: (B, T, d_model). The explicit path of `forward` and `forward_with_context`."""
        return self._merge_heads(self._weights(q, k, pos) @ v)  # weights @ v: (B, H, T, dh)

    def _attend(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """The explicit path on one batch chunk: (B, T, d_model) -> (B, T, d_model)."""
        return self.attend(*self.project(x), pos)

    def forward_with_context(self, x_query: torch.Tensor, x_context: torch.Tensor) -> torch.Tensor:
        """The layer with queries from x_query and keys and values from x_context, both (B, T, d_model), on explicit
        weights: `forward(x)` when both are x. Reads how the output depends on the query alone (the in-context map)."""
        q, _, _ = self.project(x_query)  # (B, H, T, dh)
        _, k, v = self.project(x_context)  # each (B, H, T, dh)
        return self.attend(q, k, v, self.positional_weights(x_query.shape[-2]))

    def _attend_dense(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """The dense kernel: `_attend` with one float factor (positional x causal / sqrt(dh) for linear scores,
        positional for softmax) and the keys laid out (B, H, dh, T) contiguously for the batched products."""
        T = x.shape[-2]
        q, k, v = self.project(x)  # each (B, H, T, dh)
        kt = k.transpose(-1, -2).contiguous()  # (B, H, dh, T)
        if self.kind == Attention.softmax:
            scores = (q @ kt).masked_fill(~self.causal[:T, :T], float("-inf"))  # (B, H, T, T)
            weights = torch.softmax(scores / math.sqrt(self.head_dim), dim=-1) * factor
        else:
            weights = (q @ kt) * factor  # (B, H, T, T)
        return self._merge_heads(weights @ v)

    def _merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, dh) -> concatenated heads through the output projection, (B, T, d_model)."""
        B, H, T, dh = y.shape
        return self.out(y.transpose(1, 2).reshape(B, T, H * dh))

    def path(self, coords: TokenCoords | None, T: int) -> AttentionPath:
        """The evaluation `forward` uses for this layer, given its tokens' coordinates (None: not a first layer)."""
        r = None
        if coords is not None:
            r = coords.s.shape[-1] + int(coords.offset is not None or self.qkv.bias is not None)
        return choose_path(self.kind, self.positional, self.kernel, r, self.n_heads, T, self.head_dim,
                           self.out.out_features)

    def reads_token_coords(self) -> bool:
        """Whether a first layer's token coordinates can change how this layer is evaluated (else not built)."""
        return self.path(None, 1) == AttentionPath.dense and self.positional != Positional.additive

    def uses_token_space(self, coords: TokenCoords | None, T: int) -> bool:
        """Whether `forward` evaluates this layer with the token-space kernel."""
        return self.path(coords, T) == AttentionPath.token_space

    def _coordinate_maps(self, coords: TokenCoords) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's projections composed with the tokens' basis: s (B, T, r) with a constant-1 coordinate where
        biases or an offset need it, and A (3, H, dh, r), the query, key and value maps of those coordinates."""
        s, basis, offset = coords
        B, T, _ = s.shape
        w = self.head_weights()
        W = torch.stack([w.Q, w.K, w.V])  # (3, H, dh, D)
        A = W @ basis  # (3, H, dh, r): the projections of the token coordinates
        const = None if offset is None else W @ offset  # (3, H, dh)
        if w.bq is not None:
            bias = torch.stack([w.bq, w.bk, w.bv])  # (3, H, dh)
            const = bias if const is None else const + bias
        if const is not None:  # a constant coordinate carries the biases
            A = torch.cat([A, const.unsqueeze(-1)], dim=-1)
            s = torch.cat([s, s.new_ones(B, T, 1)], dim=-1)
        return s, A

    def _coordinates(self, coords: TokenCoords, pos: torch.Tensor | None) -> torch.Tensor:
        """The coordinate kernel: y_t = b_o + sum_h U_h sum_t' w_h[t, t'] s_t', with w_h the layer's weights
        computed from scores m_t,h . s_t', m_t,h = M_h^T s_t, M_h = A_q,h^T A_k,h / sqrt(dh), U_h = W_o,h A_v,h."""
        H, dh = self.n_heads, self.head_dim
        s, A = self._coordinate_maps(coords)
        B, T, r = s.shape
        M = A[0].transpose(1, 2) @ A[1] / math.sqrt(dh)  # (H, r, r)
        U = self.head_weights().O @ A[2]  # (H, D, r)
        causal = self.causal[:T, :T]
        factor = causal.to(s.dtype) if pos is None else pos  # (T, T) or (H, T, T), causal
        m = torch.einsum("btr,hrc->bhtc", s, M).reshape(B, H * T, r)  # rows m_t,h^T, heads stacked over t
        st = s.transpose(1, 2).contiguous()  # (B, r, T)
        chunk = max(1, CHUNK_ELEMENTS // (H * T * T)) if s.device.type == "cpu" else B
        parts = []
        for i in range(0, B, chunk):
            scores = (m[i : i + chunk] @ st[i : i + chunk]).view(-1, H, T, T)  # (b, H, T, T)
            if self.kind == Attention.softmax:
                weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) * factor
            else:
                weights = scores * factor
            parts.append((weights.view(-1, H * T, T) @ s[i : i + chunk]).view(-1, H, T, r))  # (b, H, T, r)
        y = torch.cat(parts).transpose(1, 2).reshape(B, T, H * r) @ U.transpose(1, 2).reshape(H * r, -1)  # (B, T, D)
        return y if self.out.bias is None else y + self.out.bias

    def _token_space(self, coords: TokenCoords, pos: torch.Tensor | None) -> torch.Tensor:
        """The layer through `token_space_attention`: the projections composed with the tokens' basis."""
        s, A = self._coordinate_maps(coords)
        T = s.shape[1]
        Wo = self.head_weights().O  # (H, D, dh)
        if pos is None:
            pos = self.causal[:T, :T].to(s.dtype)
        pos = pos if pos.dim() == 3 else pos.unsqueeze(0)  # (1 or H, T, T)
        return token_space_attention(s, A[0] / math.sqrt(self.head_dim), A[1], A[2], Wo, self.out.bias, pos)

    def forward(self, x: torch.Tensor, coords: TokenCoords | None = None) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model); `coords`, when given, must describe x (x = s basis^T + offset)."""
        B, T, _ = x.shape
        path = self.path(coords, T)
        if path == AttentionPath.fused:
            q, k, v = self.project(x)  # each (B, H, T, dh)
            return self._merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        pos = self.positional_weights(T)  # batch-independent: computed once
        if path == AttentionPath.token_space:
            return self._token_space(coords, pos)  # type: ignore[arg-type]
        if path == AttentionPath.coordinates:
            return self._coordinates(coords, pos)  # type: ignore[arg-type]
        if path == AttentionPath.dense:
            factor = self.causal[:T, :T].to(x.dtype) if pos is None else pos
            attend, arg = self._attend_dense, factor / math.sqrt(self.head_dim) if self.kind == Attention.linear \
                else factor
        else:
            attend, arg = self._attend, pos
        chunk = max(1, CHUNK_ELEMENTS // (self.n_heads * T * T))
        if x.device.type != "cpu" or B <= chunk:
            return attend(x, arg)
        # On CPU, (B, H, T, T) intermediates of hundreds of MB cost more in page faults and memory traffic than in
        # arithmetic (measured 3.3x slower at B=1024, H=64, T=50): run the layer in batch chunks of a few MB.
        return torch.cat([attend(x[i : i + chunk], arg) for i in range(0, B, chunk)])


class Masked(nn.Module):
    """Parametrisation that keeps a fixed pattern of a weight's entries and zeroes the rest (and their gradients)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def mask_gd_blocks(attn: MultiHeadAttention, d: int) -> None:
    """Restrict a layer on augmented tokens e_t = (0, s_t, s_{t-1}) to Proposition 1's blocks: queries read s_t,
    keys s_{t-1}, values s_t, and the output is written into the zero block. One head then computes
    B (sum_{t'} s_{t'} s_{t'-1}^T) A s_t with A = (W_k^T W_q)[prev, mid] / sqrt(3d) and B = (W_o W_v)[zero, mid]
    (docs/PAPER_NOTES.md §2.4, §3.1)."""
    H, dh = attn.n_heads, attn.head_dim
    zero, mid, prev = slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)
    qkv = torch.zeros(3, H * dh, 3 * d)
    qkv[0, :, mid], qkv[1, :, prev], qkv[2, :, mid] = 1, 1, 1
    out = torch.zeros(3 * d, H * dh)
    out[zero] = 1
    parametrize.register_parametrization(attn.qkv, "weight", Masked(qkv.reshape(3 * H * dh, 3 * d)))
    parametrize.register_parametrization(attn.out, "weight", Masked(out))


class Block(nn.Module):
    """x <- x + LayerNorm(Attention(x)); LayerNorm and residual optional."""

    def __init__(self, cfg: TransformerConfig, d_model: int, head_dim: int, max_len: int) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(cfg, d_model, head_dim, max_len)
        self.norm = nn.LayerNorm(d_model) if cfg.layernorm else nn.Identity()
        self.residual = cfg.residual

    def output(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The block's output from its input x and the attention's output h, both (B, T, d_model)."""
        h = self.norm(h)  # (B, T, d_model)
        return x + h if self.residual else h

    def forward(self, x: torch.Tensor, coords: TokenCoords | None = None) -> torch.Tensor:
        return self.output(x, self.attn(x, coords))

    def forward_with_context(self, x_query: torch.Tensor, x_context: torch.Tensor) -> torch.Tensor:
        """The block with queries (and the residual) from x_query, keys and values from x_context: `forward(x)` when
        both are x, on the explicit path (`MultiHeadAttention.forward_with_context`)."""
        return self.output(x_query, self.attn.forward_with_context(x_query, x_context))


class Transformer(nn.Module):
    """Tokens e_1..e_T (B, T, token_dim) -> predictions of s_2..s_{T+1} (B, T, out_dim)."""

    accepts_complex = False
    first_position = 1  # every position t >= 1 is predicted

    def __init__(self, cfg: TransformerConfig, token_dim: int, out_dim: int, max_len: int, augmented: bool) -> None:
        super().__init__()
        d_model = cfg.d_model or token_dim
        head_dim = cfg.head_dim or d_model
        self.token_dim, self.d_model, self.out_dim = token_dim, d_model, out_dim
        self.zero_width = token_dim // 3 if augmented else 0  # e_t = (0, s_t, s_{t-1}): a first block of zeros
        self.embedding = cfg.embedding
        if cfg.embedding == Embedding.linear:
            self.embed = nn.Linear(token_dim, d_model, bias=cfg.bias)
        elif d_model % token_dim:
            raise ValueError(
                f"model.d_model={d_model} must be a multiple of the token width {token_dim}"
                " for model.embedding=repeat; use model.embedding=linear"
            )
        self.pos_emb = nn.Parameter(torch.zeros(max_len, d_model)) if cfg.positional == Positional.additive else None
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb, std=0.02)
        self.blocks = nn.ModuleList([Block(cfg, d_model, head_dim, max_len) for _ in range(cfg.n_layers)])
        if cfg.gd_blocks:
            if not augmented or d_model != token_dim or head_dim != token_dim:
                raise ValueError("model.gd_blocks=true needs augmented tokens with d_model = head_dim = token width")
            for block in self.blocks:
                mask_gd_blocks(block.attn, token_dim // 3)
        readout = cfg.readout if cfg.readout != Readout.auto else (Readout.block if augmented else Readout.linear)
        if readout == Readout.block and (d_model != token_dim or cfg.embedding != Embedding.repeat):
            raise ValueError("model.readout=block reads the zero block of e_t: it needs model.d_model=0 and embedding=repeat")
        self.readout = nn.Linear(d_model, out_dim, bias=cfg.bias) if readout == Readout.linear else None

    def embed_tokens(self, e: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, token_dim) -> the residual stream (B, T, d_model): embedding plus additive positions."""
        if self.embedding == Embedding.linear:
            x = self.embed(e)
        else:
            x = e.repeat(1, 1, self.d_model // self.token_dim)  # (B, T, d_model)
        return x if self.pos_emb is None else x + self.pos_emb[: e.shape[1]]

    def read_out(self, x: torch.Tensor) -> torch.Tensor:
        """Residual stream (..., d_model) -> predictions (..., out_dim): the zero block or a learned map."""
        return x[..., : self.out_dim] if self.readout is None else self.readout(x)

    def token_coords(self, e: torch.Tensor) -> TokenCoords | None:
        """The residual stream entering the first layer in the coordinates of the tokens (x = e basis^T + offset),
        or None with additive positions (not a function of the token alone). Augmented tokens drop their zero
        block (checked: tokens built otherwise keep every coordinate)."""
        if self.pos_emb is not None:
            return None
        cols = slice(None)
        if self.zero_width and not bool(e[..., : self.zero_width].any()):
            cols = slice(self.zero_width, None)
        if self.embedding == Embedding.linear:
            return TokenCoords(e[..., cols], self.embed.weight[:, cols], self.embed.bias)
        eye = torch.eye(self.token_dim, dtype=e.dtype, device=e.device)[:, cols]
        return TokenCoords(e[..., cols], eye.repeat(self.d_model // self.token_dim, 1), None)  # stacked identities

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(e)  # (B, T, d_model)
        for i, block in enumerate(self.blocks):
            x = block(x, self.token_coords(e) if i == 0 and block.attn.reads_token_coords() else None)
        return self.read_out(x)  # (B, T, out_dim)
