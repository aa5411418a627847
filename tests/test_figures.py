"""The paper's figures (make prop2, fig3, fig5, fig6, fig7, softmax-vs-linear): every figure sweep config composes
into valid runs at both scales; each runs end to end for a few steps and leaves its figure (PNG + PDF), its record
(figure.json) and the W&B aggregate; REPRODUCTION.md is generated from those records with a verdict per claim."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from icar.claims.base import NOT, PARTLY, REPRODUCED, Scale
from icar.claims.fig4 import Fig4Numbers, judge_fig4
from icar.claims.fig5 import Fig5Numbers, judge_fig5
from icar.claims.record import FigureRecord
from icar.claims.registry import CLAIMS, FIGURES
from icar.config import ConfigError, DataConfig, DiagonalConfig, Tokens, TrainConfig, validate
from icar.orchestration.figures import sweep_figures
from icar.orchestration.reproduction import render
from icar.training.config_io import to_dataclass
from tests.conftest import FAST, REPO
from tests.test_sweeps import compose_sweep, expand

pytestmark = pytest.mark.xdist_group("figures")  # make test -n: the figure sweeps (a module fixture) run once

# figure -> (overrides that narrow its grid for the smoke run, jobs at paper scale, jobs at CPU scale); the sweep
# configs are the claim's protocol (icar/claims/<figure>.py)
FIGURE_SWEEPS = {
    "prop2": ([], 3, 1),
    "fig3": ([], 2, 2),
    "fig5": (["model.n_layers=1,2", "seed=0"], 24, 8),
    "fig6": (["data.mu=50,300"], 4, 4),
    "fig7": ([], 3, 1),
    "softmax_vs_linear": (["experiment=augmented_depth,rotation_diagonal"], 24, 8),
}


def test_every_sweep_figure_is_smoke_tested():
    assert set(FIGURE_SWEEPS) == set(sweep_figures())


@pytest.mark.parametrize("scale", list(Scale))
@pytest.mark.parametrize("figure", list(FIGURE_SWEEPS))
def test_every_figure_config_composes_into_valid_runs(figure, scale):
    _, paper_jobs, cpu_jobs = FIGURE_SWEEPS[figure]
    config_name = FIGURES[figure].protocol[scale]
    cfg = compose_sweep(config_name)
    jobs = expand(dict(cfg.hydra.sweeper.params))
    assert len(jobs) == (paper_jobs if scale == Scale.paper else cpu_jobs)
    assert cfg.hydra.callbacks.aggregate.figure == figure
    for job in jobs:
        job_cfg = compose_sweep(config_name, *(f"{k}={v}" for k, v in job.items()), "run_dir=/tmp/unused")
        train_cfg = to_dataclass(OmegaConf.masked_copy(job_cfg, [k for k in job_cfg if k != "hydra"]))
        validate(train_cfg)
        assert isinstance(train_cfg, TrainConfig)


@pytest.fixture(scope="module")
def figure_sweeps(tmp_path_factory) -> dict[str, Path]:
    """Every figure sweep at CPU scale, narrowed and cut to a few steps, W&B offline for fig3 and disabled
    elsewhere (the offline writer costs seconds per run)."""
    root = tmp_path_factory.mktemp("figures")
    sweeps = {}
    for figure, (narrow, _, _) in FIGURE_SWEEPS.items():
        name = FIGURES[figure].protocol[Scale.cpu]
        sweep = root / "multirun" / name / "t0"
        mode = "offline" if figure == "fig3" else "disabled"
        overrides = [o for o in FAST if not o.startswith("logger=")] + [
            f"logger.mode={mode}", "data.val_size=32", *narrow, f"hydra.sweep.dir={sweep}"]
        cmd = [sys.executable, "scripts/train.py", "-m", "--config-dir", "sweeps", "--config-name", name,
               *overrides]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                              env={**__import__("os").environ, "ICAR_COMMAND": f"make {figure}"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "raised" not in proc.stderr and "failed" not in proc.stderr, proc.stderr[-3000:]
        sweeps[figure] = sweep
    return sweeps


@pytest.mark.parametrize("figure", list(FIGURE_SWEEPS))
def test_every_figure_runs_and_writes_its_figure_and_record(figure_sweeps, figure):
    sweep = figure_sweeps[figure]
    record = FigureRecord.load(sweep / "aggregate" / "figure.json")
    assert record.figure == figure and record.scale == Scale.cpu and record.command == f"make {figure}"
    assert record.wall_s is not None and record.wall_s > 0 and "CPU cores" in record.machine
    suffixes = {Path(p).suffix for p in record.figures}
    assert suffixes == {".png", ".pdf"} and all(Path(p).stat().st_size > 0 for p in record.figures)
    assert record.numbers and json.dumps(record.numbers, default=float)
    report = (sweep / "aggregate" / "report.html").read_text()
    assert all(f"{Path(p).stem}.png" in report for p in record.figures)  # the figure is embedded in the report
    if figure == "fig3":  # the aggregate's W&B run (offline here) holds the figure
        assert list((sweep / "aggregate" / "wandb").glob("offline-run-*"))
        assert {"unitary/C_rel_dist", "rotation/P_rel_dist"} <= set(record.numbers)


def test_reproduction_md_gives_every_recorded_claim_a_verdict(figure_sweeps, tmp_path):
    out = tmp_path / "REPRODUCTION.md"
    proc = subprocess.run([sys.executable, "scripts/reproduction.py", "--out", str(out), "--roots",
                           str(next(iter(figure_sweeps.values())).parents[2])], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| \d+\. ", line)]  # the headline table
    assert all(len(re.split(r"(?<!\\)\|", row)) == 6 for row in rows), rows  # four cells, pipes escaped
    assert len(rows) == len(CLAIMS)
    for (_, figure), row in zip(CLAIMS, rows):
        claim, paper, at_paper, at_cpu = (c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1])
        assert at_paper == "not run yet"  # these sweeps are CPU-scale
        if figure.draw is None:  # fig4: not part of these sweeps
            assert at_cpu == "not run yet"
        else:
            assert at_cpu in (REPRODUCED, PARTLY, NOT), row
    assert text.count("### Claim") == len(CLAIMS)  # a section per claim, both scales in it
    assert text.count("| cpu | ") == len(CLAIMS) and "`make fig5 SCALE=paper`" in text


def test_a_kept_record_is_self_contained_and_renders_from_results_alone(figure_sweeps, tmp_path):
    """scripts/reproduction.py --keep copies the newest record below a folder into results/<figure>/<scale>/ with its
    PNGs, runs table and every run's summary.json and config.yaml; REPRODUCTION.md then needs nothing else."""
    sweep = figure_sweeps["fig6"]
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, "scripts/reproduction.py", "--keep", str(sweep.parent), "--results",
                           str(results)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = results / "fig6" / "cpu"
    record = FigureRecord.load(kept / "figure.json")
    assert record.figures and all((kept / p).is_file() and "/" not in p for p in record.figures)
    assert record.numbers == FigureRecord.load(sweep / "aggregate" / "figure.json").numbers
    jobs = sorted(p.parent.name for p in sweep.glob("*/summary.json"))
    assert sorted(p.name for p in (kept / "runs").iterdir()) == jobs and len(jobs) == 2
    assert all((kept / "runs" / j / "config.yaml").is_file() for j in jobs) and (kept / "runs.csv").is_file()
    assert not list(kept.rglob("*.ckpt")) and not list(kept.rglob("metrics.jsonl"))
    out = tmp_path / "REPRODUCTION.md"
    proc = subprocess.run([sys.executable, "scripts/reproduction.py", "--out", str(out), "--results", str(results)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in out.read_text().splitlines() if line.startswith("| 6. "))
    assert row.rstrip(" |").endswith((REPRODUCED, PARTLY, NOT)) and "not run yet" in row  # cpu verdict, no paper


def test_verdict_rules_follow_the_numbers():
    fig5 = {"depths": [1, 2, 3], "seeds": 2, "steps": 100, "T": 20}
    for L, m in zip([1, 2, 3], [0.3, 0.2, 0.1]):
        fig5 |= {f"L{L}/mse_last": m, f"L{L}/mse": m, f"L{L}/gd{L}_mse_last": m, f"L{L}/mse_last_max": m + 0.01,
                 f"L{L}/mse_last_min": m - 0.01}
        fig5 |= {f"L{L}/mse_max": m, f"L{L}/mse_min": m, f"L{L}/gd{L}_mse": m}

    def fig5_verdict(numbers: dict) -> tuple[str, str, str]:
        return judge_fig5(Fig5Numbers.from_json(numbers))

    assert fig5_verdict(fig5)[1] == REPRODUCED
    flat = fig5_verdict(fig5 | {"L3/mse_last": 0.205})  # up by less than the seeds' spread
    assert flat[1] == PARTLY and "flat" in flat[2]
    rise = fig5_verdict(fig5 | {"L3/mse_last": 0.25})
    assert rise[1] == PARTLY and "rises" in rise[2]
    assert fig5_verdict(fig5 | {"L2/mse_last": 0.35, "L3/mse_last": 0.4})[1] == NOT
    assert fig5_verdict({**fig5, "depths": [1, 2]})[1] == PARTLY  # two depths cannot show a trend
    fig4 = {"threshold": 1e-12, "n_windows": 100, "source": "x", "embedding_dim": 8, "vocab_size": 50, "corpus": "c",
            "corpus_tokens": 500, "n_windows_available": 100, "T": 5, "seed": 0}
    for name, repeat in (("real", 0.0), ("shuffled", 0.1)):
        fig4 |= {f"n_inexact_{name}": 1, f"median_mse_inexact_{name}": 0.1, f"median_mse_{name}": 0.0,
                 f"fraction_windows_with_repeat_{name}": repeat, f"fraction_conflicting_repeat_{name}": repeat}

    def fig4_verdict(numbers: dict) -> str:
        return judge_fig4(Fig4Numbers.from_json(numbers))[1]

    assert fig4_verdict(fig4 | {"fraction_exact_real": 0.99, "fraction_exact_shuffled": 0.9}) == REPRODUCED
    assert fig4_verdict(fig4 | {"fraction_exact_real": 0.9, "fraction_exact_shuffled": 0.95}) == NOT
    # a record missing what its rule needs is reported as such, not as a crash
    record = FigureRecord(figure="fig5", numbers={"depths": [1, 2]})
    text = render({("fig5", Scale.cpu): (Path("x/figure.json"), record)}, Path("."))
    assert "incomplete record" in text


def test_positional_only_model_trains_only_P_from_zero():
    from icar.models.diagonal import DiagonalAttention

    model = DiagonalAttention(d=1, n_heads=1, max_len=6, pe_only=True)
    assert [name for name, _ in model.named_parameters()] == ["P"] and model.P.abs().sum() == 0
    assert torch.equal(model.C, torch.ones(1, 1))
    s = torch.polar(torch.ones(2, 6, 1), torch.rand(2, 1, 1) * torch.arange(6.0)[None, :, None])
    model(s).abs().sum().backward()
    assert model.P.grad is not None
    with pytest.raises(ValueError, match="n_heads == d"):
        DiagonalAttention(d=2, n_heads=1, max_len=6, pe_only=True)
    cfg = TrainConfig(model=DiagonalConfig(pe_only=True), data=DataConfig(tokens=Tokens.raw))  # 10 heads, d = 5
    with pytest.raises(ConfigError, match="model.pe_only=true"):
        validate(cfg)


def test_softmax_positional_rows_of_the_diagonal_model_are_distributions():
    from icar.models.diagonal import DiagonalAttention

    model = DiagonalAttention(d=4, n_heads=3, max_len=7, softmax_positional=True)
    W = model.positional_weights(7)
    assert (W >= 0).all() and torch.allclose(W.sum(-1), torch.ones(7)) and (W.triu(1) == 0).all()
    linear = DiagonalAttention(d=4, n_heads=3, max_len=7)
    assert torch.equal(linear.positional_weights(7), linear.P * torch.tril(torch.ones(7, 7)))


def test_pe_only_gd_matches_gradient_descent_on_the_exact_population_loss():
    """The closed form of claim 6's reference against autograd steps on icar.theory.population_loss."""
    from icar.theory import pe_only_gd_P, population_loss

    T, mu, lr, steps = 8, 50.0, 0.5, 40
    P = torch.zeros(T, T, dtype=torch.float64, requires_grad=True)
    C = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(steps):
        loss = population_loss(C, P, "unitary", mu).mean()
        (grad,) = torch.autograd.grad(loss, P)
        with torch.no_grad():
            P -= lr * grad.tril()
    assert torch.allclose(P.detach(), pe_only_gd_P(T, mu, lr, steps), atol=1e-12)
    assert math.isclose(float(population_loss(C, torch.zeros(T, T), "unitary", mu).mean()), 1.0, rel_tol=1e-12)


def test_a_figure_that_fails_fails_the_sweep_but_keeps_its_aggregate(tmp_path):
    """Hydra turns a callback's exception into a warning: the figure callback exits with status 1 instead, so that
    `make figN` fails, after writing runs.csv and report.html."""
    sweep = tmp_path / "multirun" / "prop2_quick" / "t0"
    overrides = [o for o in FAST if not o.startswith("logger=")] + [
        "logger.mode=disabled", "hydra.callbacks.aggregate.figure=fig3", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run([sys.executable, "scripts/train.py", "-m", "--config-dir", "sweeps", "--config-name",
                           "prop2_quick", *overrides], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "not of the fig3 sweep" in proc.stderr and "redo it with" in proc.stderr
    assert (sweep / "aggregate" / "report.html").is_file() and not (sweep / "aggregate" / "figure.json").exists()
