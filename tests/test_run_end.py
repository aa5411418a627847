"""Issue 15, fault 11: a run ends on a closing block (the model beside the baselines that matter, GD steps it is
worth, where its files are), prints each Lightning line once, and no advertisement or W&B deprecation warning."""

from __future__ import annotations

from pathlib import Path

from icar.orchestration.closing import closing_block, gd_steps_worth
from tests.test_faults import CLI_FAST, train_cli


def test_gd_steps_worth_counts_the_steps_the_model_matches():
    metrics = {"val/mse": 0.2, "val/gd1/mse": 0.5, "val/gd2/mse": 0.2, "val/gd3/mse": 0.1}
    assert gd_steps_worth(metrics) == (2, 3)  # matches 2 steps, 3 are better
    assert gd_steps_worth({**metrics, "val/mse": 0.6}) == (0, 3)
    assert gd_steps_worth({**metrics, "val/mse": 0.05}) == (3, 3)


def test_closing_block_from_metrics_and_run_folder(tmp_path):
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "mse_by_position.png").write_bytes(b"")
    (tmp_path / "wandb" / "offline-run-20261204_000000-abc").mkdir(parents=True)
    metrics = {"global_step": 200.0, "val/mse": 0.3, "val/mse_last": 0.1, "val/zero/mse": 1.0, "val/zero/mse_last": 1.0,
               "val/ols/mse": 0.15, "val/ols/mse_last": 1e-14, **{f"val/gd{k}/mse": 0.5 / k for k in (1, 2, 3)},
               **{f"val/gd{k}/mse_last": 0.3 / k for k in (1, 2, 3)}}
    text = closing_block(metrics, tmp_path, n_layers=2, seconds=12.3)
    lines = text.splitlines()
    assert lines[0] == f"finished 200 steps in 12 s: {tmp_path}"
    assert [line.split()[0] for line in lines[2:7]] == ["model", "predict", "GD,", "best", "least"]
    assert "GD, 2 steps (= layers)" in text and "best GD (3 steps, of 1..3)" in text
    assert "worth 1 GD steps on val/mse, 2 on val/mse_last" in text
    assert f"figures: {tmp_path / 'analysis'}/{{mse_by_position}}.png" in text
    assert f"wandb sync {tmp_path / 'wandb'}/offline-run-*" in text


def test_a_run_ends_on_its_closing_block_and_prints_each_line_once(tmp_path: Path):
    proc = train_cli(tmp_path, *CLI_FAST, "logger=wandb", "hydra.run.dir=run")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    everything = out + err
    assert everything.count("GPU available") == 1  # Lightning's own handler and Hydra's printed it twice
    assert "litlogger" not in everything and "litmodels" not in everything
    assert "anonymous setting" not in everything  # wandb 0.31's warning about Lightning's anonymous=None
    assert "LeafSpec" not in everything
    block = out[out.index("finished 4 steps"):].splitlines()
    assert block[0].endswith(str(tmp_path / "run")) and "model" in block[2] and "predict zero" in block[3]
    assert block[-1].startswith("  W&B offline; upload with: wandb sync ")
