"""The in-context map of a trained one-layer model on augmented tokens (docs/PAPER_NOTES.md §1.6).

The prediction of s_{T+1} is read as `W_hat s_T + M s_{T-1}`: W_hat and M are the derivatives of the prediction with
respect to the query token's copies of s_T and s_{T-1} (e_T = (0, s_T, s_{T-1})), with the keys and values held at
the context. For linear attention without LayerNorm the prediction is exactly linear in the query, so this reads
the map off exactly (Proposition 1's construction gives W_hat = eta sum_{t<T} s_{t+1} s_t^T and M = 0); with
LayerNorm or softmax it is the map linearised at the actual query.
"""

from __future__ import annotations

import math

import torch

from icar import metrics
from icar.baselines import context_moments
from icar.config import Tokens
from icar.data.contexts import rotation_blocks
from icar.data.tokens import encode_tokens, realify
from icar.models.transformer import Transformer


def supports_in_context_map(model: torch.nn.Module, tokens: Tokens) -> bool:
    return isinstance(model, Transformer) and len(model.blocks) == 1 and tokens == Tokens.augmented


def implied_maps(model: Transformer, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_hat, M), each (n, d, d), of a one-layer model at the last position of real contexts s_1..s_T (n, T, d)."""
    if len(model.blocks) != 1:
        raise ValueError(f"the in-context map is read off one-layer models; this one has {len(model.blocks)} layers")
    d = s.shape[-1]
    block = model.blocks[0]
    e = encode_tokens(s, Tokens.augmented)  # (n, T, 3d)
    x = model.embed_tokens(e)  # (n, T, D): the context, keys and values

    def predict(query_pair: torch.Tensor) -> torch.Tensor:  # (n, 2d): the query's (s_T, s_{T-1}) -> (n, d_out)
        e_last = torch.cat([torch.zeros_like(query_pair[:, :d]), query_pair], -1)  # (n, 3d)
        x_q = model.embed_tokens(torch.cat([e[:, :-1], e_last[:, None]], 1))  # (n, T, D): last token replaced
        out = block.forward_with_context(x_q, x)  # (n, T, D)
        return model.read_out(out[:, -1]).sum(0)  # summed over n: each sample's output depends on its own query

    query = torch.cat([s[:, -1], s[:, -2]], -1).detach()  # (n, 2d)
    with torch.enable_grad():
        J = torch.func.jacrev(predict)(query)  # (d_out, n, 2d)
    J = J.permute(1, 0, 2)  # (n, d_out, 2d)
    return J[..., :d].detach(), J[..., d:].detach()


def real_matrix(W: torch.Tensor) -> torch.Tensor:
    """A complex map (n, d, d) as the real (n, 2d, 2d) map on (Re, Im)-stacked vectors (`realify`'s layout)."""
    if not W.is_complex():
        return W
    return torch.cat([torch.cat([W.real, -W.imag], -1), torch.cat([W.imag, W.real], -1)], -2)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1), b.flatten(1)  # (n, d*d)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def compare_in_context_maps(
    model: Transformer,
    s: torch.Tensor,
    W: torch.Tensor,
    gd_eta: float,
    *,
    commuting: bool = False,
    basis: torch.Tensor | None = None,
) -> dict[str, float]:
    """W_hat of a one-layer augmented model against one-step GD's eta * Y_T and the true W, on contexts s_1..s_T.

    GD runs on the real tokens the model sees (complex data: (Re, Im), with `gd_eta` tuned for that real GD).

    Cosines and relative errors are per sequence (Frobenius), then averaged; `icmap/gd1_scale` is the least-squares
    factor <W_hat, W_gd> / ||W_gd||^2 (1 when the model's step equals the tuned one). For the commuting family (shared
    basis `basis`, None = identity) `icmap/gd1_cosine_aligned` is the cosine up to the loss-preserving conjugation
    of `aligned_cosine`."""
    with torch.no_grad():
        tokens = realify(s)  # (n, T, d'): what the model sees ((Re, Im) for the unitary family)
        Y, _ = context_moments(tokens.double())
        W_gd = gd_eta * Y[:, -1]  # (n, d', d'): one real GD step from the pairs of s_1..s_T
        W_true = real_matrix(W.to(torch.complex128 if W.is_complex() else torch.float64))
        W_hat, M = implied_maps(model, tokens.to(next(model.parameters()).dtype))
        W_hat, M = W_hat.double(), M.double()
    gd_flat, hat_flat = W_gd.flatten(1), W_hat.flatten(1)
    aligned = {}
    if commuting:
        cos, phi = aligned_cosine(W_hat, W_gd, basis)
        aligned = {metrics.icmap("gd1_cosine_aligned"): cos,
                   **{metrics.icmap(f"align_phi{j}"): p for j, p in enumerate(phi)}}
    return {
        **aligned,
        metrics.icmap("gd1_cosine"): _cosine(W_hat, W_gd).mean().item(),
        metrics.icmap("gd1_rel_err"): ((W_hat - W_gd).flatten(1).norm(dim=1) / gd_flat.norm(dim=1)).mean().item(),
        metrics.icmap("gd1_scale"): ((hat_flat * gd_flat).sum(1) / gd_flat.square().sum(1)).mean().item(),
        metrics.icmap("true_cosine"): _cosine(W_hat, W_true).mean().item(),
        metrics.icmap("true_rel_err"): ((W_hat - W_true).flatten(1).norm(dim=1)
                                        / W_true.flatten(1).norm(dim=1)).mean().item(),
        metrics.icmap("prev_token_share"): (M.flatten(1).norm(dim=1)
                                            / hat_flat.norm(dim=1).clamp_min(1e-30)).mean().item(),
    }


def aligned_cosine(W_hat: torch.Tensor, W_ref: torch.Tensor, basis: torch.Tensor | None, steps: int = 300) -> tuple[float, list[float]]:
    """Mean cosine of W_hat with G^T W_ref G for the best G = Q diag(R_phi_1, ..., R_phi_{d/2}) Q^T (commuting family).

    Conjugation by such a G (it commutes with every W of the family) leaves the training loss unchanged, so a trained
    model may implement one GD step up to it: with claim 1's blocks, B Y A = eta G^T Y G when A = G, B = eta G^T.
    The angles are fitted by Adam (one G shared by all sequences) from three starts, phi = 0 and +-2 pi / 3 for every
    block, keeping the best: the cosine is not concave in phi."""
    d = W_hat.shape[-1]
    Q = torch.eye(d, dtype=torch.float64) if basis is None else basis.to(torch.float64)
    W_hat, W_ref = W_hat.double().cpu(), W_ref.double().cpu()  # a few hundred small matrices: CPU

    def cosine(phi: torch.Tensor) -> torch.Tensor:
        G = Q @ rotation_blocks(phi)[0] @ Q.T  # (d, d)
        return _cosine(W_hat, G.T @ W_ref @ G).mean()

    best: tuple[float, list[float]] = (-math.inf, [])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny ops: the thread pool's overhead made them 8x slower on 2 cores
    try:
        for start in (0.0, 2 * math.pi / 3, -2 * math.pi / 3):
            phi = torch.full((1, d // 2), start, dtype=torch.float64, requires_grad=True)
            optimizer = torch.optim.Adam([phi], lr=0.05)
            with torch.enable_grad():
                for _ in range(steps):
                    loss = -cosine(phi)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            with torch.no_grad():
                value = cosine(phi).item()
            if value > best[0]:
                best = (value, phi.detach()[0].tolist())
    finally:
        torch.set_num_threads(threads)
    return best
