"""Figures of the analyses (seaborn on the Agg backend), each saved as PNG and PDF by `save_figure`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from icar import metrics  # noqa: E402
from icar.analysis.structure import C_SINGULAR_VALUES, normalised_singular_values  # noqa: E402

DPI = 150
LOG_FLOOR = 1e-12  # non-positive MSEs (e.g. the true-W baseline) are drawn at this value on the log axis
DIVERGING = "RdBu_r"
PANEL = 3.6  # inches per heatmap panel


def save_figure(fig: plt.Figure, path_stem: Path) -> list[Path]:
    """Write fig to path_stem.png and path_stem.pdf, close it, and return both paths."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [path_stem.with_name(f"{path_stem.name}.{ext}") for ext in ("png", "pdf")]
    for path in paths:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return paths


def heatmap(ax: plt.Axes, M: torch.Tensor, title: str, vmax: float | None = None, mask: np.ndarray | None = None,
             first_label: int = 0) -> None:
    """A diverging heatmap centred at 0 on [-vmax, vmax] (default: the largest |entry|), ticks from first_label."""
    M = M.detach().double().cpu().numpy()
    vmax = vmax if vmax is not None else float(np.abs(M).max()) or 1.0
    rows, cols = [list(range(first_label, first_label + n)) if n <= 20 else "auto" for n in M.shape]
    sns.heatmap(M, ax=ax, cmap=DIVERGING, vmin=-vmax, vmax=vmax, center=0, square=M.shape[0] == M.shape[1],
                mask=mask, xticklabels=cols, yticklabels=rows, cbar_kws={"shrink": 0.8})
    ax.set_title(title, fontsize=9)


def plot_head_orthogonality(matrices: dict[str, torch.Tensor], scalars: dict[str, float], path_stem: Path) -> list[Path]:
    """One heatmap of head cosines per matrix on [-1, 1], titled with its mean |off-diagonal| (section 6)."""
    if not matrices:
        return []
    fig, axes = plt.subplots(1, len(matrices), figsize=(PANEL * len(matrices), PANEL), squeeze=False)
    for ax, (name, M) in zip(axes[0], matrices.items()):
        off = scalars.get(f"{name}_offdiag", math.nan)
        heatmap(ax, M, f"{name}\nmean |off-diag| = {off:.3f}", vmax=1.0)
        ax.set_xlabel("head h'")
        ax.set_ylabel("head h")
    return save_figure(fig, path_stem)


def plot_positional(P_mats: dict[str, torch.Tensor], fits: dict[str, dict[str, float]], path_stem: Path) -> list[Path]:
    """Per P: its causal triangle as a heatmap (rows tau, columns t) and row profiles p_{tau, t} against the lag
    tau - t for a few tau (newest form: one spike at lag 0; rotation form: 1 at lag 0, -1/2 at lag 1)."""
    if not P_mats:
        return []
    fig, axes = plt.subplots(len(P_mats), 2, figsize=(2 * PANEL + 1, PANEL * len(P_mats)), squeeze=False)
    for (ax_map, ax_rows), (name, P) in zip(axes, P_mats.items()):
        P = P.detach().double().cpu()
        T = P.shape[0]
        fit = fits.get(name, {})
        summary = ", ".join(f"{k.split('/')[-1]}={v:.2f}" for k, v in fit.items() if k != metrics.P_TWO_TAP_ENERGY)
        heatmap(ax_map, P, f"{name}\n{summary}", mask=np.triu(np.ones((T, T), dtype=bool), k=1), first_label=1)
        ax_map.set_xlabel("token t")
        ax_map.set_ylabel("prefix length tau")
        taus = sorted({max(2, T // 4), max(2, T // 2), max(2, 3 * T // 4), T})
        for tau in taus:
            row = P[tau - 1, :tau].flip(0).numpy()  # (tau,): index = lag tau - t
            ax_rows.plot(np.arange(tau), row, marker="o", markersize=3, label=f"tau={tau}")
        ax_rows.axhline(0, color="grey", linewidth=0.5)
        ax_rows.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_rows.set_xlabel("lag tau - t")
        ax_rows.set_ylabel("p_{tau, t}")
        ax_rows.set_title(f"{name}: rows of P", fontsize=9)
        ax_rows.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def plot_c_structure(C: torch.Tensor, info: dict, path_stem: Path, A: torch.Tensor | None = None,
                     B: torch.Tensor | None = None, rank_tol: float = 0.05) -> list[Path]:
    """Heatmaps of C = B^T A and (when given) A and B, as in Figure 3, and C's normalised singular values against
    the rank threshold."""
    panels = [("C = B^T A", C)] + [(n, M) for n, M in (("A", A), ("B", B)) if M is not None]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(PANEL * (len(panels) + 1), PANEL), squeeze=False)
    for ax, (name, M) in zip(axes[0], panels):
        heatmap(ax, M, name)
    s = info.get(C_SINGULAR_VALUES)
    s = np.asarray(s if s is not None else normalised_singular_values(C).numpy())
    ax = axes[0, -1]
    ax.bar(np.arange(1, len(s) + 1), s, color="tab:blue")
    ax.axhline(rank_tol, color="tab:red", linestyle="--", linewidth=1, label=f"{rank_tol:.0%} of the first")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / first")
    scalars = ", ".join(f"{k.split('/')[-1]}={v:.3g}" for k, v in info.items() if isinstance(v, (int, float)))
    ax.set_title(f"spectrum of C\n{scalars}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def plot_mse_by_position(curves: dict[str, Sequence[float]], path_stem: Path, title: str = "",
                         first_position: int = 1) -> list[Path]:
    """MSE against the position t (context length) from first_position on, log scale: the model bold, the
    baselines thin; curves[name][t - 1] is the error at position t."""
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    gd = sorted((n for n in curves if metrics.gd_steps(n) is not None), key=lambda n: metrics.gd_steps(n) or 0)
    gd_colours = dict(zip(gd, sns.color_palette("viridis_r", len(gd)))) if gd else {}  # one hue per step count
    others = {metrics.ZERO: ("tab:gray", ":"), metrics.LAST_TOKEN: ("tab:brown", ":"), metrics.OLS: ("tab:red", "--"),
              metrics.TRUE_W: ("tab:pink", "--")}
    for name in [metrics.MODEL, *gd, *(n for n in curves if n != metrics.MODEL and n not in gd)]:
        if name not in curves:
            continue
        y = np.clip(np.asarray(curves[name], dtype=float)[first_position - 1 :], LOG_FLOOR, None)
        x = np.arange(first_position, first_position + len(y))
        if name == metrics.MODEL:
            ax.plot(x, y, color="black", linewidth=2.5, label="model", zorder=3)
        elif name in gd_colours:
            ax.plot(x, y, color=gd_colours[name], linewidth=1, label=f"GD, {metrics.gd_steps(name)} step(s)")
        else:
            colour, style = others.get(name, (None, "-."))
            ax.plot(x, y, color=colour, linestyle=style, linewidth=1.2, label=name)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("position t (context length)")
    ax.set_ylabel(f"MSE (values below {LOG_FLOOR:g} drawn at it)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return save_figure(fig, path_stem)


def plot_metric_against(runs: pd.DataFrame, x: str, path_stem: Path, metric: str = metrics.VAL_MSE_LAST,
                        hue: str | None = None, log_y: bool = True) -> list[Path]:
    """`metric` against the swept value `x` (mean over seeds, band from min to max, one line per `hue` value), with
    least squares and GD overlaid; against the depth `model.n_layers`, GD takes as many steps as the model has layers
    (docs/PAPER_NOTES.md §4.4), elsewhere one step."""
    data = runs.sort_values(x)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sns.lineplot(data=data, x=x, y=metric, hue=hue, errorbar=("pi", 100), marker="o", ax=ax, **({} if hue else {"label": "model"}))
    stat = metric.split("/")[-1]  # mse or mse_last
    by_x = data.groupby(x)
    if x == "model.n_layers":
        gd = [(L, data.loc[data[x] == L, metrics.val(stat, metrics.gd(L))].mean()) for L in by_x.groups
              if metrics.val(stat, metrics.gd(L)) in data]
        if gd:
            ax.plot(*zip(*gd), "k--", marker="s", label="GD, L steps (tuned)")
    elif metrics.val(stat, metrics.gd(1)) in data:
        ax.plot(list(by_x.groups), by_x[metrics.val(stat, metrics.gd(1))].mean().values, "k--", marker="s",
                label="GD, 1 step")
    ols = by_x[metrics.val(stat, metrics.OLS)].mean() if metrics.val(stat, metrics.OLS) in data else None
    if ols is not None and (ols > 1e-8).any():  # exact least squares (t > d) would only squash the axis
        ax.plot(list(by_x.groups), ols.clip(lower=1e-12).values, ":", color="tab:red", label="least squares")
    if log_y:
        ax.set_yscale("log")
    values = sorted(data[x].unique())
    if values[0] > 0 and values[-1] / values[0] >= 16:  # H = 1..64, T = 10..100: evenly spaced on a log axis
        ax.set_xscale("log", base=2)
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.minorticks_off()
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path_stem)
