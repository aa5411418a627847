"""Every analysis of one trained model, as figures (PNG + PDF) and numbers (analysis.json), from the module alone.

Used at the end of training (icar.analysis.callback) and offline from checkpoints (scripts/analyze.py). Which
analyses apply depends on the model: head orthogonality always; the positional matrix P when the model has one;
C = B^T A and the distance to the theoretical optimum for the diagonal model (where icar.theory has the optimum);
the in-context map W_hat for one-layer models on augmented tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from icar.analysis.heads import head_orthogonality
from icar.analysis.in_context import compare_in_context_maps, supports_in_context_map
from icar.analysis.plots import plot_c_structure, plot_head_orthogonality, plot_mse_by_position, plot_positional
from icar.analysis.positional import fit_positional_forms, positional_matrices
from icar.analysis.structure import c_structure
from icar.baselines import tune_gd_step_sizes
from icar.config import Basis, Family, Start
from icar.data.sequences import SequenceSampler
from icar.data.tokens import realify
from icar.models.diagonal import DiagonalAttention
from icar.objective import squared_error
from icar.theory import distance_to_optimum, head_balance
from icar.training.module import ICARModule

ANALYSIS_FILE = "analysis.json"
IN_CONTEXT_SEQUENCES = 256


@dataclass
class AnalysisResult:
    scalars: dict[str, float] = field(default_factory=dict)
    figures: dict[str, list[Path]] = field(default_factory=dict)  # name -> [png, pdf]
    tables: dict[str, Any] = field(default_factory=dict)  # JSON-ready: GD step sizes, curves

    def save(self, path: Path) -> None:
        record = {
            "scalars": self.scalars,
            "figures": {k: [str(p) for p in v] for k, v in self.figures.items()},
            **self.tables,
        }
        path.write_text(json.dumps(record, indent=2, sort_keys=True, default=float) + "\n")


def evaluate_curves(module: Any, s: torch.Tensor, W: torch.Tensor, batch_size: int = 256) -> dict[str, list[float]]:
    """Per-position MSE of the model and of every baseline on sequences s (n, T+1, d): what validation logs."""
    sums: dict[str, torch.Tensor] = {}
    device = next(module.parameters()).device
    with torch.no_grad():
        for i in range(0, len(s), batch_size):
            sb, Wb = s[i : i + batch_size].to(device), W[i : i + batch_size].to(device)
            pred, target = module.predict_sequences(sb)
            errors = {"model": squared_error(pred, target), **module.baseline_errors(sb, Wb)}
            for name, err in errors.items():
                sums[name] = sums.get(name, 0) + err.double().sum(0).cpu()
    return {name: (total / len(s)).tolist() for name, total in sums.items()}


def _curve_summaries(curves: dict[str, list[float]], t0: int) -> dict[str, float]:
    """How the model compares with GD: the ratios to gd1 and ols, and how many GD steps it is worth (last position)."""
    model_last = curves["model"][-1]
    out: dict[str, float] = {}
    gd = sorted((int(n[2:]), c) for n, c in curves.items() if n.startswith("gd") and n[2:].isdigit())
    if gd:
        out["summary/mse_last_over_gd1"] = model_last / max(gd[0][1][-1], 1e-30)
        # the largest k whose GD is no better than the model (0: one GD step already beats it)
        out["summary/gd_steps_matched_last"] = float(max([k for k, c in gd if c[-1] >= model_last], default=0))
        mean = lambda c: sum(c[t0:]) / len(c[t0:])  # noqa: E731
        out["summary/gd_steps_matched"] = float(max([k for k, c in gd if mean(c) >= mean(curves["model"])], default=0))
    return out


def _theory_family(module: Any) -> Family | None:
    """The family whose optimum icar.theory knows for the diagonal model (s_1 = 1_d, canonical basis, no noise)."""
    data = module.cfg.data
    if data.start != Start.ones or data.sigma > 0:
        return None
    if data.family == Family.unitary or (data.family == Family.commuting and data.basis == Basis.identity):
        return data.family
    return None


def analyze(module: Any, out_dir: Path, curves: dict[str, list[float]] | None = None) -> AnalysisResult:
    """Run every analysis that applies to `module` (an ICARModule); write figures into out_dir and return numbers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model, cfg = module.model, module.cfg
    result = AnalysisResult()
    module_was_training = module.training
    module.eval()

    if curves:
        result.figures["mse_by_position"] = plot_mse_by_position(
            curves, out_dir / "mse_by_position", title=f"{cfg.name}: MSE by position", first_position=model.first_position
        )
        result.scalars.update(_curve_summaries(curves, model.first_position - 1))
        result.tables["mse_by_position"] = curves

    heads = head_orthogonality(model)
    result.scalars.update(heads["scalars"])
    result.figures["head_orthogonality"] = plot_head_orthogonality(
        heads["matrices"], heads["scalars"], out_dir / "head_orthogonality"
    )

    P_mats = positional_matrices(model, cfg.data.T)
    if P_mats:
        fits = {name: fit_positional_forms(P, first_row=1) for name, P in P_mats.items()}
        for name, fit in fits.items():
            prefix = "" if len(fits) == 1 else name.rsplit("/P", 1)[0] + "/"  # layer1/P -> layer1/P/fit_newest
            result.scalars.update({f"{prefix}{k}": v for k, v in fit.items()})
        result.figures["positional"] = plot_positional(P_mats, fits, out_dir / "positional")

    if isinstance(model, DiagonalAttention):
        C = model.C.detach().double().cpu()
        info = c_structure(C)
        result.scalars.update({k: v for k, v in info.items() if isinstance(v, (int, float))})
        result.figures["c_structure"] = plot_c_structure(
            C, info, out_dir / "c_structure", A=model.A.detach().cpu(), B=model.B.detach().cpu()
        )
        family = _theory_family(module)
        if family is not None:
            P = model.positional_weights(cfg.data.T).detach().double().cpu()
            dist = distance_to_optimum(C, P, family, n_heads=model.A.shape[0], mu=cfg.data.mu)
            result.scalars.update({f"theory/{k}": v for k, v in dist.items() if v is not None})
            result.scalars["theory/head_balance"] = head_balance(model.A.detach().cpu(), model.B.detach().cpu())

    gd_eta = module.baselines.gd_eta.detach().cpu()
    if gd_eta.numel():
        result.tables["gd_step_sizes"] = {f"gd{k + 1}": gd_eta[k].tolist() for k in range(gd_eta.shape[0])}
        result.scalars.update({f"baselines/gd{k + 1}/eta_last": gd_eta[k, -1].item() for k in range(gd_eta.shape[0])})

    if gd_eta.numel() and supports_in_context_map(model, cfg.data.tokens):
        sampler = SequenceSampler(cfg.data)
        s, W = sampler.sample(min(IN_CONTEXT_SEQUENCES, cfg.data.val_size), torch.Generator().manual_seed(cfg.data.val_seed))
        eta = gd_eta[0, -1].item()
        if sampler.complex_valued:  # the model sees (Re, Im): compare with real GD on those tokens, its own tuned step
            held_out, _ = sampler.sample(cfg.data.val_size, torch.Generator().manual_seed(cfg.data.val_seed + 1))
            eta = tune_gd_step_sizes(realify(held_out), 1)[0, -1].item()
        device = next(model.parameters()).device
        result.scalars.update(
            compare_in_context_maps(
                model,
                s[:, :-1].to(device),
                W.to(device),
                eta,
                commuting=cfg.data.family == Family.commuting,
                basis=sampler.basis,
            )
        )

    result.scalars = {k: float(v) for k, v in result.scalars.items() if v is not None and not math.isnan(float(v))}
    result.save(out_dir / ANALYSIS_FILE)
    module.train(module_was_training)
    return result


def analyze_run_dir(run_dir: Path, checkpoint: str = "last", device: str = "cpu") -> AnalysisResult:
    """Recompute a finished run's analyses from RUN/checkpoints/<checkpoint>.ckpt into RUN/analysis/ (no W&B)."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoints" / f"{checkpoint}.ckpt"
    if not ckpt.is_file():
        found = sorted(p.stem for p in (run_dir / "checkpoints").glob("*.ckpt"))
        raise FileNotFoundError(f"{ckpt} does not exist (checkpoints here: {found or 'none'}); is {run_dir} a run folder?")
    module = ICARModule.load_from_checkpoint(ckpt, map_location=device)
    module.tune_baselines()  # a no-op unless the checkpoint predates the saved step sizes
    data = module.cfg.data
    s, W = SequenceSampler(data).sample(data.val_size, torch.Generator().manual_seed(data.val_seed))  # the val set
    curves = evaluate_curves(module, s, W)
    return analyze(module, run_dir / "analysis", curves)
