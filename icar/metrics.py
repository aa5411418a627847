"""Metric names, defined once: what training logs, what the analyses add, and what sweeps, figures, reports and
verdicts read back (local files and W&B use the same names).

Validation logs, for the model and under the same names for every baseline (icar.baselines), the mean MSE over the
predicted positions, the MSE at the last position and the curve over positions:
`val/mse`, `val/mse_last`, `val/mse_by_pos`, and `val/<baseline>/mse`, ... (`val/gd3/mse_last`). The analyses add
`analysis/<name>` (`analysis/heads/layer0/kq_offdiag`); `summary.json` holds the final value of each scalar.
"""

from __future__ import annotations

TRAIN_LOSS = "train/loss"
GLOBAL_STEP = "global_step"  # summary.json: optimiser steps done
WANDB_STEP = "trainer/global_step"  # the step metric Lightning's WandbLogger defines; our own W&B logs use it too

# statistics of a validation curve
MSE = "mse"  # mean over the predicted positions
MSE_LAST = "mse_last"  # the last position
MSE_BY_POS = "mse_by_pos"  # the curve over positions (a list)
MODEL = "model"  # the model's own curve among the baselines' (validation, analysis.json's mse_by_position)

# baselines (icar.baselines.InContextBaselines), under the same statistics as the model
ZERO, LAST_TOKEN, TRUE_W, OLS = "zero", "last_token", "true_w", "ols"


def gd(k: int) -> str:
    """The baseline of k tuned gradient-descent steps: gd1, gd2, ..."""
    return f"gd{int(k)}"


def gd_steps(name: str) -> int | None:
    """k of a `gd<k>` baseline name, None for another name."""
    return int(name[2:]) if name.startswith("gd") and name[2:].isdigit() else None


def val(stat: str = MSE, of: str = MODEL) -> str:
    """The validation metric `stat` of the model (`val/mse_last`) or of a baseline (`val/gd1/mse_last`)."""
    return f"val/{stat}" if of == MODEL else f"val/{of}/{stat}"


VAL_MSE, VAL_MSE_LAST, VAL_MSE_BY_POS = val(MSE), val(MSE_LAST), val(MSE_BY_POS)
CHECKPOINT_MONITOR = VAL_MSE  # best.ckpt: the lowest val/mse


def analysis(name: str) -> str:
    """An analysis number as logged and summarised: `analysis/<name>` (analysis.json keeps the bare name)."""
    return f"analysis/{name}"


# analysis numbers (bare names, as in analysis.json; `analysis(name)` in metrics.jsonl and summary.json)
HEADS = "heads/"  # the head-orthogonality numbers and matrices


def heads_matrix(matrix: str) -> str:
    """The heads' cosine matrix of one parameter matrix: `A`, `B` (diagonal model) or `layer<i>/kq`, `layer<i>/ov`
    (Transformer)."""
    return f"{HEADS}{matrix}"


def heads_offdiag(matrix: str) -> str:
    """Mean |off-diagonal cosine| between heads of one parameter matrix (its cosine matrix's name + `_offdiag`)."""
    return f"{heads_matrix(matrix)}_offdiag"


def heads_layer(layer: int, kind: str) -> str:
    """The per-head matrix name of a Transformer layer: `layer0/kq` or `layer0/ov`."""
    return f"layer{layer}/{kind}"


P_FIT_NEWEST, P_FIT_ROTATION, P_LAG1_RATIO, P_TWO_TAP_ENERGY = (
    "P/fit_newest", "P/fit_rotation", "P/lag1_ratio", "P/two_tap_energy")
C_RANK, C_DIST_IDENTITY, C_DIST_BLOCKS = "C/rank", "C/dist_identity", "C/dist_blocks"


def theory(name: str) -> str:
    """Distance to the theoretical optimum (icar.theory.distance_to_optimum): `theory/C_rel_dist`, ..."""
    return f"theory/{name}"


THEORY_HEAD_BALANCE = theory("head_balance")


def icmap(name: str) -> str:
    """The in-context map against one GD step: `icmap/gd1_cosine`, ..."""
    return f"icmap/{name}"


def gd_eta_last(k: int) -> str:
    """GD's tuned step size at the last position: `baselines/gd<k>/eta_last`."""
    return f"baselines/{gd(k)}/eta_last"


SUMMARY_MSE_LAST_OVER_GD1 = "summary/mse_last_over_gd1"
SUMMARY_GD_STEPS_MATCHED_LAST = "summary/gd_steps_matched_last"
SUMMARY_GD_STEPS_MATCHED = "summary/gd_steps_matched"

# where a run keeps its analysis (read back by claims, reports and the closing block): RUN/analysis/ holds the figures
# and analysis.json, whose tables are the MSE-by-position curves and GD's tuned step sizes
ANALYSIS_DIR, ANALYSIS_FILE = "analysis", "analysis.json"
# a run folder's records: every logged step, the final scalars, the W&B run it continues on resume
METRICS_FILE, SUMMARY_FILE, WANDB_ID_FILE = "metrics.jsonl", "summary.json", "wandb_id.txt"
CURVES_TABLE, GD_STEP_SIZES_TABLE = "mse_by_position", "gd_step_sizes"
