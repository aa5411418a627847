"""The paper's figures from a finished figure sweep (sweeps/fig*.yaml, prop2, softmax_vs_linear): one function per
figure reads the run folders (summary.json, analysis.json, the last checkpoint), draws the figure (PNG + PDF) into
SWEEP/aggregate/ and returns the numbers that REPRODUCTION.md judges (icar.claims.verdicts)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from icar.analysis.heads import head_orthogonality
from icar.analysis.plots import PANEL, heatmap, plot_metric_against, plot_mse_by_position, plt, save_figure
from icar.analysis.positional import positional_matrices
from icar.analysis.runs import analysis_tables, load_model, swept_values
from icar.theory import pe_only_gd_P, prop2_min_loss

Numbers = dict[str, Any]


def experiment_of(run: pd.Series) -> str:
    """The experiment a sweep job ran (its `experiment=...` tag), or the run's name."""
    return swept_values(run.get("logger.tags")).get("experiment", str(run.get("name", "")))


def _get(run: pd.Series, key: str) -> float:
    """run[key] as a float (NaN where the run logged no value); a missing column is an error, not a NaN."""
    if key not in run.index:
        raise KeyError(f"the runs have no {key!r}: not a sweep of this figure, or runs from an older icar")
    value = run[key]
    return float(value) if not pd.isna(value) else math.nan


def _mean(runs: pd.DataFrame, key: str) -> float:
    if key not in runs:
        raise KeyError(f"the runs have no {key!r}: not a sweep of this figure, or runs from an older icar")
    return float(runs[key].mean()) if runs[key].notna().any() else math.nan


def one_run_per(runs: pd.DataFrame, key: str) -> pd.DataFrame:
    """The first seed's run per value of `key`: the figures draw one model per panel (numbers say how many seeds)."""
    return runs.sort_values("seed").drop_duplicates(subset=[key], keep="first")


def prop2(runs: pd.DataFrame, out: Path) -> tuple[Numbers, list[Path]]:
    """Claim 1: the last-token MSE against d (d - 1) / (T + d - 2) and tuned one-step GD; the in-context map."""
    first = runs.iloc[0]
    T, d = int(first["data.T"]), int(first["data.d"])
    theory = prop2_min_loss(T, d)
    numbers = {
        "T": T, "d": d, "steps": int(first["trainer.max_steps"]), "seeds": len(runs),
        "mse_last": _mean(runs, "val/mse_last"), "gd1_mse_last": _mean(runs, "val/gd1/mse_last"),
        "theory_min_loss": theory, "eta_star": 1.0 / (T + d - 2),
        "icmap_cosine": _mean(runs, "analysis/icmap/gd1_cosine"),
        "icmap_cosine_aligned": _mean(runs, "analysis/icmap/gd1_cosine_aligned"),
        "icmap_scale": _mean(runs, "analysis/icmap/gd1_scale"),
    }
    numbers["mse_last_over_theory"] = numbers["mse_last"] / theory
    numbers["mse_last_over_gd1"] = numbers["mse_last"] / numbers["gd1_mse_last"]
    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(11, 4))
    curves = analysis_tables(first["run_dir"]).get("mse_by_position", {})
    for name, style in (("model", "k-"), ("gd1", "b--"), ("gd2", "c--"), ("ols", "r:")):
        if name in curves:
            y = np.asarray(curves[name][1:], dtype=float)
            ax_curve.plot(np.arange(2, 2 + len(y)), np.clip(y, 1e-12, None), style, label=name)
    ax_curve.set_yscale("log")
    ax_curve.set(xlabel="position t", ylabel="MSE", title="MSE by position (seed 0)")
    ax_curve.legend(fontsize=8)
    bars = {"model": numbers["mse_last"], "GD 1 step (tuned)": numbers["gd1_mse_last"],
            "theory d(d-1)/(T+d-2)": theory}
    ax_bar.bar(list(bars), list(bars.values()), color=["black", "tab:blue", "tab:green"])
    ax_bar.set_title(f"last token, T = {T}, d = {d}; in-context map cosine to eta Y (aligned) = "
                     f"{numbers['icmap_cosine_aligned']:.3f}", fontsize=8)
    ax_bar.set_ylabel("MSE at the last position")
    fig.tight_layout()
    return numbers, save_figure(fig, out / "prop2")


def fig3(runs: pd.DataFrame, out: Path) -> tuple[Numbers, list[Path]]:
    """Claims 2 and 3 (Figure 3): A, B, B^T A and P of the diagonal model per context, with their distance to the
    theoretical optimum (icar.theory.distance_to_optimum, computed by each run's analysis)."""
    numbers: Numbers = {"seeds": int(runs["seed"].nunique())}
    runs = one_run_per(runs, "data.family").sort_values("data.family", ascending=False)  # unitary first, as in the paper
    fig, axes = plt.subplots(len(runs), 4, figsize=(4 * PANEL + 1, PANEL * len(runs)), squeeze=False)
    for row, (_, run) in zip(axes, runs.iterrows()):
        key = "unitary" if run["data.family"] == "unitary" else "rotation"
        model = load_model(run["run_dir"])
        T = int(run["data.T"])
        P = model.positional_weights(T).detach()
        heatmap(row[0], model.A.detach(), f"{key}: A (H = {model.A.shape[0]} x d)")
        heatmap(row[1], model.B.detach(), f"{key}: B")
        heatmap(row[2], model.C.detach(), f"{key}: B^T A")
        heatmap(row[3], P, f"{key}: P (rows tau)", mask=np.triu(np.ones((T, T), dtype=bool), k=1), first_label=1)
        for name, col in (("mse", "val/mse"), ("zero_mse", "val/zero/mse"), ("c", "analysis/theory/c"),
                          ("C_rel_dist", "analysis/theory/C_rel_dist"), ("P_rel_dist", "analysis/theory/P_rel_dist"),
                          ("theory_loss", "analysis/theory/loss"), ("head_balance", "analysis/theory/head_balance"),
                          ("A_offdiag", "analysis/heads/A_offdiag"), ("B_offdiag", "analysis/heads/B_offdiag"),
                          ("lag1_ratio", "analysis/P/lag1_ratio")):
            numbers[f"{key}/{name}"] = _get(run, col)
        numbers[f"{key}/d"], numbers[f"{key}/H"], numbers[f"{key}/T"] = int(run["data.d"]), int(run["model.n_heads"]), T
        numbers[f"{key}/steps"] = int(run["trainer.max_steps"])
        numbers[f"{key}/mse_over_zero"] = numbers[f"{key}/mse"] / numbers[f"{key}/zero_mse"]
    fig.tight_layout()
    return numbers, save_figure(fig, out / "fig3")


def fig5(runs: pd.DataFrame, out: Path) -> tuple[Numbers, list[Path]]:
    """Claim 4 (Figure 5): MSE against depth L beside L tuned GD steps, at the last position and averaged."""
    runs = runs[runs["model.attention"] == "linear"] if "model.attention" in runs else runs
    paths = plot_metric_against(runs, "model.n_layers", out / "fig5_mse_last", "val/mse_last")
    paths += plot_metric_against(runs, "model.n_layers", out / "fig5_mse_mean", "val/mse")
    numbers: Numbers = {"seeds": int(runs["seed"].nunique()), "steps": int(runs["trainer.max_steps"].iloc[0]),
                        "T": int(runs["data.T"].iloc[0]), "depths": sorted(int(L) for L in runs["model.n_layers"].unique())}
    for L, group in runs.groupby("model.n_layers"):
        L = int(L)
        for suffix in ("mse_last", "mse"):
            numbers[f"L{L}/{suffix}"] = _mean(group, f"val/{suffix}")
            numbers[f"L{L}/{suffix}_max"] = float(group[f"val/{suffix}"].max())
            numbers[f"L{L}/{suffix}_min"] = float(group[f"val/{suffix}"].min())
            numbers[f"L{L}/gd{L}_{suffix}"] = _mean(group, f"val/gd{L}/{suffix}")
    return numbers, paths


def fig6(runs: pd.DataFrame, out: Path) -> tuple[Numbers, list[Path]]:
    """Claim 6 (Figure 6): the learned P per angle scale mu (heatmap and last-row profile), against the exact
    minimiser (all weight on the newest token) and against gradient descent on the exact population loss from P = 0
    with the same step size and number of steps (icar.theory.pe_only_gd_P)."""
    seeds = int(runs["seed"].nunique())
    runs = one_run_per(runs, "data.mu").sort_values("data.mu")
    fig, axes = plt.subplots(2, len(runs), figsize=(PANEL * len(runs), 2 * PANEL), squeeze=False)
    numbers: Numbers = {"mus": [float(m) for m in runs["data.mu"]], "seeds": seeds}
    profiles = {}
    for col, (_, run) in enumerate(runs.iterrows()):
        mu, T = float(run["data.mu"]), int(run["data.T"])
        model = load_model(run["run_dir"])
        P = model.positional_weights(T).detach().double()
        # the closed form is plain GD at a constant step: only a run trained that way has it as its reference
        plain_sgd = (run["optim.optimizer"] == "sgd" and run["optim.schedule"] == "constant"
                     and not run["optim.warmup_steps"] and not run["optim.grad_clip"] and not run["optim.weight_decay"])
        P_gd = pe_only_gd_P(T, mu, float(run["optim.lr"]), int(run["trainer.max_steps"])) if plain_sgd else None
        rows = torch.tril(torch.ones(T, T, dtype=torch.bool))[1:]  # the trained rows tau = 2..T
        last = P[T - 1]
        profiles[mu] = last
        k = f"mu{mu:g}"
        numbers[f"{k}/mse"] = _get(run, "val/mse")
        numbers[f"{k}/newest_weight"] = float(last[T - 1])
        numbers[f"{k}/past_share"] = float(last[: T - 1].abs().sum() / last.abs().sum())
        numbers[f"{k}/dist_to_minimiser"] = _get(run, "analysis/theory/P_rel_dist")
        numbers[f"{k}/dist_to_population_gd"] = (
            float((P - P_gd)[1:][rows].norm() / P_gd[1:][rows].norm()) if P_gd is not None else None)
        heatmap(axes[0, col], P[1:, :], f"P, mu = {mu:g} (the authors' {2 * mu:g}), rows tau = 2..{T}",
                mask=np.triu(np.ones((T, T), dtype=bool), k=1)[1:], first_label=1)
        ticks = np.arange(0, T, 4)
        axes[0, col].set_xticks(ticks + 0.5, ticks + 1)  # token t
        axes[0, col].set_yticks(ticks[ticks < T - 1] + 0.5, ticks[ticks < T - 1] + 2)  # prefix length tau
        ax = axes[1, col]
        ax.plot(np.arange(1, T + 1), last.numpy(), "k-o", markersize=3, label="trained (SGD)")
        if P_gd is not None:
            ax.plot(np.arange(1, T + 1), P_gd[T - 1].numpy(), "--", color="tab:orange", label="GD on the exact loss")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set(xlabel="token t", ylabel=f"p_(T={T}, t)", title=f"last row, mu = {mu:g}")
        ax.legend(fontsize=7)
    mus = sorted(profiles)
    if len(mus) >= 2:
        a, b = profiles[mus[0]], profiles[mus[-1]]
        numbers["profile_change_first_last_mu"] = float((a - b).norm() / max(a.norm(), b.norm()))
    fig.tight_layout()
    return numbers, save_figure(fig, out / "fig6")


def fig7(runs: pd.DataFrame, out: Path) -> tuple[Numbers, list[Path]]:
    """Claim 5 (Figure 7): the multi-head model on raw tokens of general orthogonal W: MSE by position against GD
    and least squares, the heads' cosine matrices and the positional weights (first seed, linear attention)."""
    linear = runs[runs["model.attention"] == "linear"] if "model.attention" in runs else runs
    if linear.empty:
        raise ValueError("fig7 draws the linear-attention model: the sweep has no run with model.attention=linear")
    first = linear.sort_values("seed").iloc[0]
    model = load_model(first["run_dir"])
    heads = head_orthogonality(model)
    P = positional_matrices(model, int(first["data.T"]))
    paths = []
    curves = analysis_tables(first["run_dir"]).get("mse_by_position", {})
    if curves:
        paths += plot_mse_by_position(curves, out / "fig7_mse_by_position", title="Figure 7: MSE by position",
                                      first_position=model.first_position)
    panels = {**heads["matrices"], **P}
    fig, axes = plt.subplots(1, len(panels), figsize=(PANEL * len(panels), PANEL), squeeze=False)
    for ax, (name, M) in zip(axes[0], panels.items()):
        if name.startswith("heads/"):
            heatmap(ax, M, f"{name} cosines\nmean |off-diag| = {heads['scalars'][name + '_offdiag']:.3f}", vmax=1.0)
        else:
            T = M.shape[0]
            heatmap(ax, M, f"{name} (mean over heads)", mask=np.triu(np.ones((T, T), dtype=bool), k=1), first_label=1)
    fig.tight_layout()
    paths += save_figure(fig, out / "fig7_heads_and_P")
    numbers: Numbers = {"H": int(first["model.n_heads"]), "T": int(first["data.T"]), "d": int(first["data.d"]),
                        "steps": int(first["trainer.max_steps"]), "seeds": len(linear)}
    for name, key in (("mse_last", "val/mse_last"), ("mse", "val/mse"), ("gd1_mse_last", "val/gd1/mse_last"),
                      ("gd8_mse_last", "val/gd8/mse_last"), ("zero_mse_last", "val/zero/mse_last"),
                      ("last_token_mse_last", "val/last_token/mse_last"), ("ols_mse_last", "val/ols/mse_last"),
                      ("gd_steps_matched_last", "analysis/summary/gd_steps_matched_last"),
                      ("kq_offdiag", "analysis/heads/layer0/kq_offdiag"),
                      ("ov_offdiag", "analysis/heads/layer0/ov_offdiag"),
                      ("P_fit_newest", "analysis/P/fit_newest"), ("P_two_tap_energy", "analysis/P/two_tap_energy")):
        numbers[name] = _mean(linear, key)
    if P:  # the share of the positional weight (rows tau >= 3, mean over heads) on the first two tokens
        W = next(iter(P.values())).abs()
        numbers["P_first_two_share"] = float((W[2:, :2].sum(1) / W[2:].sum(1)).mean())
    return numbers, paths


def softmax_vs_linear(runs: pd.DataFrame, out: Path) -> tuple[Numbers, list[Path]]:
    """Claim 7: each protocol with linear and softmax attention side by side (mean over seeds, min-max bars), GD and
    least squares as references."""
    runs = runs.assign(protocol=[experiment_of(r) for _, r in runs.iterrows()])
    protocols = sorted(runs["protocol"].unique())
    kinds = ["linear", "softmax"]
    fig, ax = plt.subplots(figsize=(2.6 * len(protocols) + 2, 4.2))
    width = 0.35
    numbers: Numbers = {"protocols": protocols, "seeds": int(runs["seed"].nunique())}
    for i, kind in enumerate(kinds):
        means, lows, highs = [], [], []
        for p in protocols:
            vals = runs.loc[(runs["protocol"] == p) & (runs["model.attention"] == kind), "val/mse_last"].dropna()
            m = float(vals.mean()) if len(vals) else math.nan
            numbers[f"{p}/{kind}"] = m
            means.append(m)
            lows.append(m - float(vals.min()) if len(vals) else 0)
            highs.append(float(vals.max()) - m if len(vals) else 0)
        x = np.arange(len(protocols)) + (i - 0.5) * width
        ax.bar(x, means, width, yerr=[lows, highs], label=f"{kind} attention", color=["tab:blue", "tab:orange"][i])
    for j, p in enumerate(protocols):
        group = runs[runs["protocol"] == p]
        numbers[f"{p}/gd1"] = _mean(group, "val/gd1/mse_last")
        numbers[f"{p}/zero"] = _mean(group, "val/zero/mse_last")
        ax.hlines(numbers[f"{p}/gd1"], j - width, j + width, colors="k", linestyles="--",
                  label="GD, 1 step" if j == 0 else None)
    ax.set_xticks(np.arange(len(protocols)), protocols, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("val/mse_last")
    ax.set_title("the same protocols with linear and softmax attention")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return numbers, save_figure(fig, out / "softmax_vs_linear")


FIGURES: dict[str, Callable[[pd.DataFrame, Path], tuple[Numbers, list[Path]]]] = {
    "prop2": prop2, "fig3": fig3, "fig5": fig5, "fig6": fig6, "fig7": fig7, "softmax_vs_linear": softmax_vs_linear,
}
