"""How a sweep's runs trained, drawn from their metrics.jsonl: learning curves (`train/loss` and `val/mse` against
the step) and the final MSE by position, one line per configuration (the swept values but the seed) with the band
over seeds, and as many tuned GD steps as the model has layers as the dashed reference of the same colour."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from icar import metrics
from icar.analysis.plots import LOG_FLOOR, save_figure
from icar.analysis.runs import configurations
from icar.training.loggers import read_metrics

CURVES = (metrics.TRAIN_LOSS, metrics.VAL_MSE)
LEARNING_CURVES, MSE_BY_POSITION = "learning_curves", "mse_by_position_by_configuration"
MAX_CONFIGURATIONS = 12  # more lines than this are not told apart: the figure says which it left out


def gd_reference(run: pd.Series, stat: str, logged: dict | pd.Series) -> str | None:
    """The name of `stat` for as many tuned GD steps as the run's model has layers (one for the diagonal model),
    else for one step, if `logged` holds it."""
    layers = run.get("model.n_layers")
    L = int(layers) if layers is not None and pd.notna(layers) else 1
    for name in (metrics.val(stat, metrics.gd(L)), metrics.val(stat, metrics.gd(1))):
        value = logged.get(name)
        if isinstance(value, list) or (value is not None and pd.notna(value)):
            return name
    return None


def _records(run_dir: str) -> list[dict]:
    try:
        return read_metrics(run_dir)
    except (FileNotFoundError, ValueError):
        return []


def curve_frames(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict[str, float]]]:
    """(learning curves: configuration, seed, step, metric, value; MSE by position of each run's last validation:
    configuration, seed, position, curve, value; the GD levels {configuration: {metric: mean over seeds}})."""
    curves, by_position, levels = [], [], {}
    for (_, run), label in zip(runs.iterrows(), configurations(runs)):
        seed = run.get("seed", 0)
        records = _records(str(run.get("run_dir", "")))
        for record in records:
            for name in CURVES:
                if isinstance(record.get(name), (int, float)):
                    curves.append((label, seed, record["step"], name, record[name]))
        last = next((r for r in reversed(records) if isinstance(r.get(metrics.VAL_MSE_BY_POS), list)), None)
        gd_by_pos = gd_reference(run, metrics.MSE_BY_POS, last) if last else None
        gd_name = gd_reference(run, metrics.MSE, run)
        for curve, name in (("model", metrics.VAL_MSE_BY_POS), ("GD", gd_by_pos)):
            values = last.get(name) if last and name else None
            if isinstance(values, list):
                by_position += [(label, seed, i + 1, curve, v) for i, v in enumerate(values)]
        # the training loss is on the last position alone for `loss_on: last` (Proposition 2's protocol)
        gd_train = gd_reference(run, metrics.MSE_LAST, run) if run.get("loss_on") == "last" else gd_name
        for curve, name in ((metrics.VAL_MSE, gd_name), (metrics.TRAIN_LOSS, gd_train)):
            if name is not None:
                levels.setdefault(label, {}).setdefault(curve, []).append(float(run[name]))
    levels = {label: {m: float(np.mean(v)) for m, v in by_metric.items()} for label, by_metric in levels.items()}
    columns = ["configuration", "seed"]
    return (pd.DataFrame(curves, columns=[*columns, "step", "metric", "value"]),
            pd.DataFrame(by_position, columns=[*columns, "position", "curve", "value"]), levels)


def _palette(labels: list[str]) -> dict[str, tuple]:
    return dict(zip(labels, sns.color_palette("tab10" if len(labels) <= 10 else "viridis", len(labels))))


def _shown(labels: list[str]) -> tuple[list[str], str]:
    if len(labels) <= MAX_CONFIGURATIONS:
        return labels, ""
    return labels[:MAX_CONFIGURATIONS], f" (first {MAX_CONFIGURATIONS} of {len(labels)} configurations)"


def plot_learning_curves(runs: pd.DataFrame, path_stem: Path) -> list[Path]:
    """`train/loss` and `val/mse` against the step: per configuration the mean over seeds and the band from the
    lowest to the highest seed; its GD level (as many steps as layers, on the validation set, at the last position
    for a loss on the last position only) dashed. [] when the runs logged no curves."""
    curves, _, levels = curve_frames(runs)
    if curves.empty:
        return []
    labels, note = _shown(sorted(curves["configuration"].unique(), key=natural_order))
    colours = _palette(labels)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(6.2 * len(CURVES), 4.2), squeeze=False)
    for ax, name in zip(axes[0], CURVES):
        data = curves[(curves["metric"] == name) & curves["configuration"].isin(labels)]
        data = data.assign(value=data["value"].clip(lower=LOG_FLOOR))
        if not data.empty:
            sns.lineplot(data=data, x="step", y="value", hue="configuration", hue_order=labels, palette=colours,
                         errorbar=("pi", 100), estimator="mean", ax=ax, linewidth=1.2)
        for label in labels:
            level = levels.get(label, {}).get(name)
            if level is not None:
                ax.axhline(max(level, LOG_FLOOR), color=colours[label], linestyle="--", linewidth=0.9, alpha=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{name}{note}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    handles = [plt.Line2D([], [], color=colours[label], label=label) for label in labels]
    handles.append(plt.Line2D([], [], color="grey", linestyle="--", label="GD, as many steps as layers"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle("Learning curves: mean over seeds, band from the lowest to the highest seed", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def plot_mse_by_position(runs: pd.DataFrame, path_stem: Path) -> list[Path]:
    """The last validation's MSE at each position per configuration (mean over seeds, band from the lowest to the
    highest seed), GD with as many steps as layers dashed in the same colour. [] when no run logged the curve."""
    _, by_position, _ = curve_frames(runs)
    if by_position.empty:
        return []
    labels, note = _shown(sorted(by_position["configuration"].unique(), key=natural_order))
    colours = _palette(labels)
    fig, ax = plt.subplots(figsize=(7, 4))
    data = by_position[by_position["configuration"].isin(labels)]
    data = data.assign(value=data["value"].clip(lower=LOG_FLOOR))
    for curve, style in (("model", "-"), ("GD", "--")):
        part = data[data["curve"] == curve]
        if not part.empty:
            sns.lineplot(data=part, x="position", y="value", hue="configuration", hue_order=labels, palette=colours,
                         errorbar=("pi", 100), estimator="mean", ax=ax, linestyle=style, linewidth=1.2,
                         legend=curve == "model")
    ax.set_yscale("log")
    ax.set_xlabel("position t (predicting x_{t+1})")
    ax.set_ylabel("validation MSE")
    ax.set_title(f"MSE by position at the end of training{note}; dashed: GD, as many steps as layers", fontsize=10)
    if ax.get_legend() is not None:
        sns.move_legend(ax, "center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False, title=None)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def natural_order(label: str) -> tuple:
    """Sort 'n_layers=10' after 'n_layers=9'."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in
                 "".join(c if c.isdigit() else f" {c} " for c in label).split())
