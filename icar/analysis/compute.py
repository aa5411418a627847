"""Every analysis of one trained model as a typed result, computed from the module alone and drawn afterwards
(icar.analysis.draw): head orthogonality always; the positional matrix P when the model has one; C = B^T A and the
distance to the theoretical optimum for the diagonal model; the in-context map W_hat for one-layer models on
augmented tokens; the MSE-by-position curves and GD's step sizes when there are any.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from icar import metrics
from icar.analysis.curves import curve_summaries
from icar.analysis.heads import head_orthogonality
from icar.analysis.in_context import compare_in_context_maps, supports_in_context_map
from icar.analysis.positional import fit_positional_forms, positional_matrices
from icar.analysis.structure import c_structure
from icar.baselines import tune_gd_step_sizes
from icar.config import Basis, Family, Start
from icar.data.sequences import SequenceSampler
from icar.data.tokens import realify
from icar.models.diagonal import DiagonalAttention
from icar.theory import distance_to_optimum, head_balance
from icar.training.module import ICARModule

IN_CONTEXT_SEQUENCES = 256

Curves = dict[str, list[float]]  # baseline name (metrics.MODEL, gd1, ...) -> MSE at positions 1..T


@dataclass
class CStructure:
    """The diagonal model's C = B^T A with its factors, and `c_structure`'s numbers and normalised spectrum."""

    C: torch.Tensor  # (d, d)
    A: torch.Tensor  # (H, d)
    B: torch.Tensor  # (H, d)
    info: dict[str, float | list[float]]


@dataclass
class ModelAnalysis:
    """What the analyses found about one model: the numbers of analysis.json and the matrices its figures draw."""

    name: str  # the run's name, for titles
    first_position: int  # the model's first predicted position (1-based)
    scalars: dict[str, float]  # finite numbers only, bare names (`heads/layer0/kq_offdiag`)
    head_cosines: dict[str, torch.Tensor]  # heads/<matrix> -> (H, H)
    positional: dict[str, torch.Tensor]  # P or layer<i>/P -> (T, T)
    positional_fits: dict[str, dict[str, float]]  # the same keys -> fit_positional_forms (NaN kept)
    c_structure: CStructure | None  # the diagonal model only
    mse_by_position: Curves | None
    gd_step_sizes: dict[str, list[float]] | None  # gd<k> -> eta at positions 1..T


def theory_family(module: ICARModule) -> Family | None:
    """The family whose optimum icar.theory knows for the diagonal model (s_1 = 1_d, canonical basis, no noise)."""
    data = module.cfg.data
    if data.start != Start.ones or data.sigma > 0:
        return None
    if data.family == Family.unitary or (data.family == Family.commuting and data.basis == Basis.identity):
        return data.family
    return None


def _positional_scalars(fits: dict[str, dict[str, float]]) -> dict[str, float]:
    """The fits' numbers: bare (`P/fit_newest`) for one matrix, under their layer for several
    (`layer1/P/fit_newest`)."""
    out: dict[str, float] = {}
    for name, fit in fits.items():
        prefix = "" if len(fits) == 1 else name.rsplit("/P", 1)[0] + "/"  # layer1/P -> layer1/P/fit_newest
        out.update({prefix + k: v for k, v in fit.items()})
    return out


def _diagonal_structure(module: ICARModule, model: DiagonalAttention) -> tuple[CStructure, dict[str, float]]:
    """C's structure and, where icar.theory knows the optimum, the distance to it and the heads' balance."""
    C = model.C.detach().double().cpu()  # (d, d)
    A, B = model.A.detach().cpu(), model.B.detach().cpu()  # (H, d) each
    info = c_structure(C)
    scalars = {k: v for k, v in info.items() if isinstance(v, (int, float))}
    family = theory_family(module)
    if family is not None:
        P = model.positional_weights(module.cfg.data.T).detach().double().cpu()  # (T, T)
        dist = distance_to_optimum(C, P, family, n_heads=A.shape[0], mu=module.cfg.data.mu)
        scalars.update({metrics.theory(k): v for k, v in dist.items() if v is not None})
        scalars[metrics.THEORY_HEAD_BALANCE] = head_balance(A, B)
    return CStructure(C, A, B, info), scalars


def _in_context_scalars(module: ICARModule, eta: float) -> dict[str, float]:
    """The in-context map of a one-layer augmented model against one GD step of size eta (its tuned step at the last
    position) on the first validation sequences; complex data: real GD on the (Re, Im) tokens, its own tuned step."""
    cfg = module.cfg
    sampler = SequenceSampler(cfg.data)
    n = min(IN_CONTEXT_SEQUENCES, cfg.data.val_size)
    s, W = sampler.sample(n, torch.Generator().manual_seed(cfg.data.val_seed))  # (n, T+1, d), (n, d, d)
    if sampler.complex_valued:  # the model sees (Re, Im): compare with real GD on those tokens, its own tuned step
        held_out, _ = sampler.sample(cfg.data.val_size, torch.Generator().manual_seed(cfg.data.val_seed + 1))
        eta = tune_gd_step_sizes(realify(held_out), 1)[0, -1].item()
    device = next(module.model.parameters()).device
    return compare_in_context_maps(module.model, s[:, :-1].to(device), W.to(device), eta,
                                   commuting=cfg.data.family == Family.commuting, basis=sampler.basis)


def _finite(scalars: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in scalars.items() if v is not None and not math.isnan(float(v))}


def compute_analysis(module: ICARModule, curves: Curves | None = None) -> ModelAnalysis:
    """Run every analysis that applies to the module's model (in eval mode, restored after), and the summaries of
    `curves` (the MSE by position of the model and its baselines) when given. Draws nothing."""
    model, cfg = module.model, module.cfg
    was_training = module.training
    module.eval()
    try:
        scalars: dict[str, Any] = curve_summaries(curves, model.first_position - 1) if curves else {}
        heads = head_orthogonality(model)
        scalars.update(heads["scalars"])
        P_mats = positional_matrices(model, cfg.data.T)
        fits = {name: fit_positional_forms(P, first_row=1) for name, P in P_mats.items()}
        scalars.update(_positional_scalars(fits))
        structure = None
        if isinstance(model, DiagonalAttention):
            structure, numbers = _diagonal_structure(module, model)
            scalars.update(numbers)
        gd_eta = module.baselines.gd_eta.detach().cpu()  # (k, T): GD's tuned step sizes, empty without GD
        gd_step_sizes = None
        if gd_eta.numel():
            gd_step_sizes = {metrics.gd(k + 1): gd_eta[k].tolist() for k in range(gd_eta.shape[0])}
            scalars.update({metrics.gd_eta_last(k + 1): gd_eta[k, -1].item() for k in range(gd_eta.shape[0])})
            if supports_in_context_map(model, cfg.data.tokens):
                scalars.update(_in_context_scalars(module, gd_eta[0, -1].item()))
    finally:
        module.train(was_training)
    return ModelAnalysis(
        name=cfg.name,
        first_position=model.first_position,
        scalars=_finite(scalars),
        head_cosines=heads["matrices"],
        positional=P_mats,
        positional_fits=fits,
        c_structure=structure,
        mse_by_position=curves or None,
        gd_step_sizes=gd_step_sizes,
    )
