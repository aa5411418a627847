"""Analyses: head cosines, per-head matrices against the attention layer, P's fitted forms, C's structure, plots."""

from __future__ import annotations

import math

import pytest
import torch

from icar.analysis.heads import cosine_matrix, head_matrices, head_orthogonality, mean_abs_offdiag
from icar.analysis.plots import plot_c_structure, plot_head_orthogonality, plot_mse_by_position, plot_positional
from icar.analysis.positional import fit_positional_forms, positional_matrices
from icar.analysis.structure import c_structure
from icar.config import Attention, Family, Positional, TransformerConfig
from icar.models.diagonal import DiagonalAttention
from icar.models.transformer import MultiHeadAttention, Transformer
from icar.theory import optimal_C, optimal_P


def test_cosine_matrix_orthogonal_identical_and_scale_invariant() -> None:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    heads = Q[:4].reshape(4, 2, 3)  # four orthonormal heads, each a 2 x 3 matrix
    assert torch.allclose(cosine_matrix(heads), torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert mean_abs_offdiag(cosine_matrix(heads)) < 1e-12
    same = torch.randn(1, 5, generator=g).repeat(3, 1)  # (3, 5)
    assert torch.allclose(cosine_matrix(same), torch.ones(3, 3, dtype=torch.float64), atol=1e-6)
    x = torch.randn(4, 5, generator=g)
    scales = torch.tensor([1.0, 7.0, 0.01, 3.0])[:, None]
    assert torch.allclose(cosine_matrix(x), cosine_matrix(scales * x), atol=1e-6)
    zero = cosine_matrix(torch.cat([x[:2], torch.zeros(1, 5)]))  # a dead head: cosines 0, not nan
    assert torch.isfinite(zero).all() and (zero[2] == 0).all()
    assert math.isnan(mean_abs_offdiag(torch.ones(1, 1)))  # one head: nothing to compare


def test_head_matrices_match_explicit_per_head_computation() -> None:
    torch.manual_seed(0)
    H, D, dh, T = 3, 6, 4, 5
    attn = MultiHeadAttention(TransformerConfig(n_heads=H, attention=Attention.linear), D, dh, max_len=T).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
    x = torch.randn(2, T, D, dtype=torch.float64)
    M, OV = head_matrices(attn)  # (H, D, D) each
    q, k, v = attn.project(x)  # (2, H, T, dh) each
    scores = q @ k.transpose(-1, -2)  # (2, H, T, T)
    assert torch.allclose(scores, torch.einsum("bti,hij,bsj->bhts", x, M, x), atol=1e-9)
    weights = attn.attention_weights(x)  # (2, H, T, T)
    per_head = torch.einsum("hij,bhts,bsj->bti", OV, weights, x)  # sum_h O_h V_h (weighted sum of tokens)
    assert torch.allclose(attn(x), per_head, atol=1e-9)
    # one head alone: zero the others' output columns
    with torch.no_grad():
        attn.out.weight[:, dh:] = 0
    assert torch.allclose(attn(x), torch.einsum("ij,bts,bsj->bti", OV[0], weights[:, 0], x), atol=1e-9)


def test_head_orthogonality_keys_and_values() -> None:
    model = DiagonalAttention(d=4, n_heads=4, max_len=6)
    with torch.no_grad():
        model.A.copy_(2 * torch.eye(4))
        model.B.copy_(torch.ones(4, 4))
    out = head_orthogonality(model)
    assert set(out["matrices"]) == {"heads/A", "heads/B"}
    assert out["scalars"]["heads/A_offdiag"] == pytest.approx(0.0)
    assert out["scalars"]["heads/B_offdiag"] == pytest.approx(1.0)
    cfg = TransformerConfig(n_layers=2, n_heads=3, positional=Positional.multiplicative)
    out = head_orthogonality(Transformer(cfg, token_dim=6, out_dim=2, max_len=6, augmented=False))
    assert set(out["scalars"]) == {f"heads/layer{i}/{m}_offdiag" for i in (0, 1) for m in ("kq", "ov")}
    assert all(M.shape == (3, 3) for M in out["matrices"].values())


def test_positional_matrices_per_model() -> None:
    T = 5
    diag = DiagonalAttention(d=2, n_heads=2, max_len=8)
    assert set(positional_matrices(diag, T)) == {"P"}
    assert (positional_matrices(diag, T)["P"].triu(1) == 0).all()
    for positional, keys in [(Positional.multiplicative, {"layer0/P"}), (Positional.softmax_positional, {"layer0/P"}),
                             (Positional.none, set())]:
        model = Transformer(TransformerConfig(n_heads=2, positional=positional), 4, 4, max_len=8, augmented=False)
        mats = positional_matrices(model, T)
        assert set(mats) == keys and all(P.shape == (T, T) for P in mats.values())
    cfg = TransformerConfig(n_heads=2, positional=Positional.softmax_positional)
    model = Transformer(cfg, 4, 4, 8, augmented=False)
    softmax = positional_matrices(model, T)
    assert torch.allclose(softmax["layer0/P"].sum(-1), torch.ones(T, dtype=torch.float64))  # head mean of softmaxes


def test_fit_positional_forms_at_the_optima_and_on_random_P() -> None:
    T = 12
    unitary = fit_positional_forms(optimal_P(Family.unitary, T, c=2.0))
    assert unitary["P/fit_newest"] == pytest.approx(1.0)
    assert unitary["P/lag1_ratio"] == pytest.approx(0.0)
    assert unitary["P/fit_rotation"] == pytest.approx(0.8)  # <e, e - e'/2>^2 / ||e - e'/2||^2 = 1 / 1.25
    rotation = fit_positional_forms(optimal_P(Family.commuting, T, c=0.5))
    assert rotation["P/fit_rotation"] == pytest.approx(1.0)
    assert rotation["P/lag1_ratio"] == pytest.approx(-0.5)
    assert rotation["P/fit_newest"] < 0.9
    assert unitary["P/two_tap_energy"] == pytest.approx(1.0) and rotation["P/two_tap_energy"] == pytest.approx(1.0)
    random = fit_positional_forms(torch.randn(T, T, generator=torch.Generator().manual_seed(0)))
    assert random["P/fit_newest"] < 0.5 and random["P/fit_rotation"] < 0.5 and random["P/two_tap_energy"] < 0.5
    assert abs(random["P/lag1_ratio"]) > 0 and random["P/lag1_ratio"] != pytest.approx(-0.5)
    with pytest.raises(ValueError, match="first_row"):
        fit_positional_forms(torch.eye(3), first_row=3)


def test_c_structure_rank_and_distances() -> None:
    blocks = c_structure(-3.0 * optimal_C(Family.commuting, 10))
    assert blocks["C/rank"] == 5
    assert blocks["C/dist_blocks"] == pytest.approx(0.0, abs=1e-7)
    assert blocks["C/dist_identity"] == pytest.approx(math.sqrt(0.5))  # <J_2, I>^2 / (||J_2||^2 ||I||^2) = 1/2
    assert blocks["C/singular_values"] == pytest.approx([1.0] * 5 + [0.0] * 5, abs=1e-7)
    identity = c_structure(3 * torch.eye(10))
    assert identity["C/rank"] == 10 and identity["C/dist_identity"] == pytest.approx(0.0, abs=1e-7)
    assert math.isnan(c_structure(torch.eye(5))["C/dist_blocks"])  # no block form for odd d
    noisy = c_structure(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    assert noisy["C/dist_identity"] > 0.5 and noisy["C/dist_blocks"] > 0.5


def _written(paths: list) -> bool:
    return sorted(p.suffix for p in paths) == [".pdf", ".png"] and all(p.stat().st_size > 0 for p in paths)


@pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")  # inside seaborn's heatmap
def test_plots_write_png_and_pdf(tmp_path) -> None:
    model = DiagonalAttention(d=4, n_heads=3, max_len=6)
    heads = head_orthogonality(model)
    assert _written(plot_head_orthogonality(heads["matrices"], heads["scalars"], tmp_path / "heads"))
    P_mats = {"P": optimal_P(Family.commuting, 6), "layer0/P": torch.randn(6, 6).tril()}
    fits = {k: fit_positional_forms(P) for k, P in P_mats.items()}
    assert _written(plot_positional(P_mats, fits, tmp_path / "positional"))
    C = model.C.detach()
    assert _written(plot_c_structure(C, c_structure(C), tmp_path / "sub" / "c", A=model.A, B=model.B))
    curves = {"model": [0.0, 1.0, 0.1, 1e-3], "zero": [2.0] * 4, "true_w": [0.0] * 4, "gd1": [1.0, 0.8, 0.5, 0.4]}
    assert _written(plot_mse_by_position(curves, tmp_path / "mse", title="test", first_position=2))


# ---------------------------------------------------------------------------------------------------------------
# The whole analysis of a run: at the end of training, and offline from its checkpoint (scripts/analyze.py)
# ---------------------------------------------------------------------------------------------------------------


def _module(make_cfg, *overrides: str):
    """A fresh ICARModule of a composed config, GD's step sizes tuned (as at the end of training)."""
    from icar.training.config_io import to_dataclass, to_plain_dict
    from icar.training.module import ICARModule
    from tests.conftest import FAST

    module = ICARModule(to_plain_dict(to_dataclass(make_cfg(*FAST, *overrides))))
    module.tune_baselines()
    return module


@pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")  # inside seaborn's heatmap
def test_analyze_is_compute_then_draw(make_cfg, tmp_path) -> None:
    """compute_analysis holds every number and matrix the figures need; draw_analysis draws from that result alone;
    analyze writes both into analysis.json with exactly its four entries, and the callback reports the same numbers."""
    import dataclasses
    import json

    from icar import metrics
    from icar.analysis.analyze import analyze
    from icar.analysis.callback import AnalysisCallback
    from icar.analysis.compute import compute_analysis
    from icar.analysis.curves import evaluate_curves
    from icar.analysis.draw import draw_analysis
    from icar.data.sequences import SequenceSampler

    module = _module(make_cfg, "experiment=unitary_diagonal", "data.d=4", "model.n_heads=4", "data.T=6")
    s, W = SequenceSampler(module.cfg.data).sample(64, torch.Generator().manual_seed(0))
    curves = evaluate_curves(module, s, W)
    module.train()
    analysis = compute_analysis(module, curves)
    assert module.training  # eval mode only while analysing
    assert set(analysis.head_cosines) == {"heads/A", "heads/B"} and set(analysis.positional) == {"P"}
    assert analysis.c_structure is not None and analysis.c_structure.C.shape == (4, 4)
    assert analysis.gd_step_sizes is not None and len(analysis.gd_step_sizes[metrics.gd(1)]) == 6
    assert {metrics.C_RANK, metrics.theory("C_rel_dist"), metrics.heads_offdiag("A"), metrics.P_FIT_NEWEST,
            metrics.gd_eta_last(8), metrics.SUMMARY_MSE_LAST_OVER_GD1} <= set(analysis.scalars)
    assert all(math.isfinite(v) for v in analysis.scalars.values())

    drawn = draw_analysis(analysis, tmp_path / "drawn")
    assert set(drawn) == {"mse_by_position", "head_orthogonality", "positional", "c_structure"}
    assert all(_written(paths) for paths in drawn.values())
    bare = dataclasses.replace(analysis, mse_by_position=None, positional={}, c_structure=None)
    assert set(draw_analysis(bare, tmp_path / "bare")) == {"head_orthogonality"}

    result = analyze(module, tmp_path / "analysis", curves)
    saved = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert set(saved) == {"scalars", "figures", "mse_by_position", "gd_step_sizes"}
    assert saved["scalars"] == analysis.scalars == result.scalars
    assert saved["mse_by_position"] == curves and saved["gd_step_sizes"] == analysis.gd_step_sizes
    assert saved["figures"] == {k: [str(p) for p in v] for k, v in result.figures.items()}
    assert set(saved["figures"]) == set(drawn)
    callback = AnalysisCallback(tmp_path)
    callback.result = result
    assert callback.final_metrics() == {metrics.analysis(k): v for k, v in saved["scalars"].items()}

    plain = _module(make_cfg, "data.d=2", "data.T=5", "eval.gd_steps=0")  # no GD, no curves
    analyze(plain, tmp_path / "plain", None)
    assert set(json.loads((tmp_path / "plain" / "analysis.json").read_text())) == {"scalars", "figures"}


def test_diagonal_run_analysis_and_offline_recompute(tmp_path):
    """A diagonal-model run gets C, P, head and theory numbers; scripts/analyze.py recomputes the same from the
    checkpoint, without W&B, and names the problem for a folder that is not a run."""
    import json
    import subprocess
    import sys

    from icar.run import run
    from tests.conftest import FAST, REPO, compose_train

    run_dir = tmp_path / "run"
    overrides = [*FAST, "experiment=unitary_diagonal", "data.d=4", "model.n_heads=4", "data.T=6", "data.val_size=2048"]
    metrics = run(compose_train(run_dir, *overrides))
    for key in ("C/rank", "C/dist_identity", "theory/C_rel_dist", "theory/loss", "heads/A_offdiag", "P/fit_newest",
                "baselines/gd1/eta_last", "summary/mse_last_over_gd1"):
        assert f"analysis/{key}" in metrics, key
    # the theory's population loss of the trained (C, P) is the validation MSE, up to sampling error
    assert metrics["analysis/theory/loss"] == pytest.approx(metrics["val/mse"], rel=0.1)
    saved = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    assert set(saved["figures"]) == {"mse_by_position", "head_orthogonality", "positional", "c_structure"}
    assert len(saved["gd_step_sizes"]["gd1"]) == 6

    for p in (run_dir / "analysis").glob("*.p*"):
        p.unlink()
    proc = subprocess.run([sys.executable, "scripts/analyze.py", str(run_dir), str(tmp_path / "nothing")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1  # one of the two folders is not a run
    assert "nothing/checkpoints/last.ckpt does not exist" in proc.stderr
    assert "theory/C_rel_dist" in proc.stdout
    offline = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    for name in ("c_structure", "positional", "head_orthogonality", "mse_by_position"):
        assert (run_dir / "analysis" / f"{name}.png").stat().st_size > 0
    for key in ("C/dist_identity", "theory/C_rel_dist", "heads/A_offdiag"):
        assert offline["scalars"][key] == pytest.approx(saved["scalars"][key], rel=1e-6)
    # the offline curves are a fresh evaluation of the same validation set: they match the logged ones
    assert offline["mse_by_position"]["model"] == pytest.approx(saved["mse_by_position"]["model"], rel=1e-4)
    assert not list((run_dir / "analysis").glob("wandb*"))


def test_periodic_analysis_during_training(make_cfg, tmp_path):
    """eval.analysis_every=1 analyses after every validation (inside Lightning's inference mode: the in-context map
    and its alignment need autograd) into analysis/step_<N>/, then once more at the end."""
    from icar.run import run
    from tests.conftest import FAST

    cfg = make_cfg(*FAST, "experiment=augmented_gd_step", "trainer.max_steps=4", "trainer.val_check_interval=2",
                   "eval.analysis_every=1", "data.val_size=32")
    metrics = run(cfg)
    analysis = tmp_path / "run" / "analysis"
    assert (analysis / "step_2" / "analysis.json").is_file() and not (analysis / "step_4").exists()
    assert (analysis / "analysis.json").is_file()
    assert "analysis/icmap/gd1_cosine_aligned" in metrics
