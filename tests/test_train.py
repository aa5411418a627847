"""Training end to end: run folders, metrics, determinism, resume, every experiment config, W&B offline."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from icar.config import LoggerConfig, WandbMode

from icar.training.config_io import to_dataclass, to_plain_dict
from icar.training.datamodule import ARDataModule
from icar.training.loggers import read_metrics
from icar.training.wandb_mode import wandb_mode
from icar.objective import squared_error
from icar.run import run
from icar.training.module import ICARModule
from tests.conftest import CONF_DIR, FAST, REPO, job_folder


def to_dataclass_dict(cfg) -> dict:
    return to_plain_dict(to_dataclass(cfg))


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_last_checkpoint_holds_the_final_weights_even_when_they_are_not_the_best(make_cfg, tmp_path):
    """last.ckpt is the newest validated step and best.ckpt the lowest val/mse, also when the run ends worse than it
    was (a learning rate this high makes sure of it): analyses and figures read the final model from last.ckpt."""
    metrics = run(make_cfg(*FAST, "optim.lr=0.5", "trainer.max_steps=8", "trainer.val_check_interval=2"))
    folder = tmp_path / "run" / "checkpoints"
    assert _step(folder / "last.ckpt") == 8
    best = torch.load(folder / "best.ckpt", map_location="cpu", weights_only=False)
    scores = [r["val/mse"] for r in read_metrics(tmp_path / "run") if "val/mse" in r]
    assert min(scores) < scores[-1] == pytest.approx(metrics["val/mse"])  # the run did not end at its best
    (score,) = [float(state["best_model_score"]) for key, state in best["callbacks"].items() if "val/mse" in key]
    assert score == pytest.approx(min(scores)) and best["global_step"] < 8
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_run_folder_and_metrics(make_cfg, tmp_path):
    """A run leaves config, metrics (scalars and the per-position curve), checkpoints and a summary."""
    metrics = run(make_cfg(*FAST, "data.T=6"))
    folder = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= {p.name for p in folder.iterdir()}
    assert (folder / "checkpoints" / "last.ckpt").is_file() and (folder / "checkpoints" / "best.ckpt").is_file()
    records = read_metrics(folder)
    keys = set().union(*records)
    for key in ("train/loss", "val/mse", "val/mse_last", "val/zero/mse_last", "val/last_token/mse", "val/mse_by_pos"):
        assert key in keys, key
    curve = [r["val/mse_by_pos"] for r in records if "val/mse_by_pos" in r][-1]
    assert len(curve) == 6  # one value per predicted position t = 1..T
    # val/mse is the mean of the curve over positions; val/mse_last its last value
    assert math.isclose(sum(curve) / len(curve), metrics["val/mse"], rel_tol=1e-5)
    assert math.isclose(curve[-1], metrics["val/mse_last"], rel_tol=1e-5)
    assert json.loads((folder / "summary.json").read_text())["global_step"] == 4
    assert _step(folder / "checkpoints" / "last.ckpt") == 4
    assert_curves_share_the_steps_of_val_metrics(records)


def assert_curves_share_the_steps_of_val_metrics(records: list[dict]) -> None:
    """The per-position curves are logged beside Lightning's logger, under the step it logs val/* under (private loop
    state, see ICARModule.on_validation_epoch_end): each validation's curve and scalars carry one step."""
    curve_steps = [r["step"] for r in records if "val/mse_by_pos" in r]
    scalar_steps = [r["step"] for r in records if "val/mse" in r]
    assert curve_steps and curve_steps == scalar_steps


def test_trivial_baselines_are_exact(make_cfg):
    """Predict-zero MSE is E||s_{t+1}||^2 = 1 for s_1 = 1/sqrt(d) 1_d; predict-last is 2 - 2 E[s^T W s] = 2 (Haar)."""
    metrics = run(make_cfg(*FAST, "data.val_size=4096", "data.d=4"))
    assert metrics["val/zero/mse"] == pytest.approx(1.0, abs=1e-5)
    # E[s^T W s] = 0 for Haar W; its std over 4096 sequences is about 0.5/64: 5 standard errors
    assert metrics["val/last_token/mse"] == pytest.approx(2.0, abs=0.08)
    assert metrics["val/true_w/mse"] < 1e-10  # the oracle, through the whole validation pipeline
    assert metrics["val/ols/mse_last"] < 1e-8  # least squares is exact once t > d (float32 data)
    assert metrics["val/gd1/mse_last"] > metrics["val/gd8/mse_last"] > metrics["val/ols/mse_last"]


def test_same_seed_same_loss(make_cfg):
    """The same seed gives bit-identical losses; another seed gives different ones."""
    a = run(make_cfg(*FAST, "seed=3", sub="a"))
    b = run(make_cfg(*FAST, "seed=3", sub="b"))
    c = run(make_cfg(*FAST, "seed=4", sub="c"))
    assert a["train/loss"] == b["train/loss"] and a["val/mse"] == b["val/mse"]
    assert a["train/loss"] != c["train/loss"]


def test_resume_reproduces_uninterrupted_run(make_cfg, tmp_path):
    """10 steps, then resume to 20 from last.ckpt == 20 steps straight: same weights, same losses."""
    common = [*FAST, "trainer.val_check_interval=5", "model.n_layers=2"]
    full = run(make_cfg(*common, "trainer.max_steps=20", sub="full"))
    run(make_cfg(*common, "trainer.max_steps=10", sub="part"))
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    resumed = run(make_cfg(*common, "trainer.max_steps=20", f"ckpt_path={last}", sub="part"))
    assert resumed["global_step"] == 20
    assert resumed["train/loss"] == full["train/loss"] and resumed["val/mse"] == full["val/mse"]
    w_full, w_resumed = _load(tmp_path / "full/checkpoints/last.ckpt"), _load(tmp_path / "part/checkpoints/last.ckpt")
    assert all(torch.equal(w_full[k], w_resumed[k]) for k in w_full)
    steps = [r["step"] for r in read_metrics(tmp_path / "part") if "train/loss" in r]
    assert steps == sorted(steps)  # the resumed run appended to the same record


@pytest.mark.parametrize("model", ["linear", "softmax", "diagonal"])
@pytest.mark.parametrize("data", ["orthogonal", "commuting", "unitary"])
def test_every_model_trains_on_every_family(make_cfg, model, data):
    """Each model option trains on each context family and the loss it reports is finite."""
    metrics = run(make_cfg(*FAST, f"model={model}", f"data={data}"))
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/mse"])


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_trains(make_cfg, experiment):
    """Every conf/experiment/*.yaml composes, validates and trains a few steps (smaller batches)."""
    metrics = run(make_cfg(f"experiment={experiment}", *FAST))
    assert math.isfinite(metrics["val/mse"])


def test_loss_on_last_position(make_cfg):
    """loss_on=last trains on the last position only: the first step's loss is the untrained last-position error."""
    cfg = make_cfg(*FAST, "loss_on=last", "trainer.max_steps=1")
    module = ICARModule(to_dataclass_dict(cfg))
    s, W = ARDataModule(module.cfg.data, module.cfg.seed).sampler.sample(8, torch.Generator().manual_seed(0))
    pred, target = module.predict_sequences(s)
    err = squared_error(pred, target)
    module.log = lambda *a, **k: None  # no trainer attached
    loss = module.training_step((s, W), 0)
    loss = loss.item()
    assert loss == pytest.approx(err[:, -1].mean().item()) and loss != pytest.approx(err.mean().item())


def test_checkpoint_restores_the_model(make_cfg, tmp_path):
    """ICARModule.load_from_checkpoint rebuilds the model from the saved config and gives the saved val/mse."""
    import lightning.pytorch as pl

    metrics = run(make_cfg(*FAST, "model=softmax", "model.positional=multiplicative"))
    module = ICARModule.load_from_checkpoint(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu")
    dm = ARDataModule(module.cfg.data, module.cfg.seed)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert module.baselines.tuned  # GD's step sizes come back from the checkpoint, float64 on the CPU
    saved = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)["gd_eta"]
    assert saved.dtype == torch.float64 and torch.equal(module.baselines.gd_eta, saved)
    (val,) = trainer.validate(module, datamodule=dm, verbose=False)
    assert val["val/mse"] == pytest.approx(metrics["val/mse"], rel=1e-6)
    assert val["val/gd2/mse_last"] == pytest.approx(metrics["val/gd2/mse_last"], rel=1e-6)


def test_wandb_mode_is_offline_without_a_key(monkeypatch, tmp_path):
    """logger.mode=auto: offline without a key (no prompt, no network), online with one; WANDB_MODE wins."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb_mode(LoggerConfig()) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(LoggerConfig()) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(LoggerConfig()) == "disabled"
    assert wandb_mode(LoggerConfig(mode=WandbMode.offline)) == "offline"


def test_wandb_offline_run_is_written(make_cfg, tmp_path, monkeypatch):
    """With no API key the default W&B logger writes an offline run: clean resolved config, metrics in summary."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    metrics = run(make_cfg(*FAST, "logger=wandb", "data.d=3"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--summary", "--json", str(runs[0])],
        capture_output=True, text=True, timeout=120, check=True,
    )
    record = json.loads(out.stdout)
    assert record["config"]["data"]["d"] == 3 and record["config"]["model"]["attention"] == "linear"
    assert "_target_" not in out.stdout
    assert record["summary"]["val/mse"] == pytest.approx(metrics["val/mse"])
    assert record["state"] == "finished"
    # the analyses: figures in the run folder and as W&B images, numbers as W&B summary values
    figures = ("head_orthogonality", "positional", "mse_by_position")
    for name in figures:
        assert (tmp_path / "run" / "analysis" / f"{name}.png").stat().st_size > 0
        assert (tmp_path / "run" / "analysis" / f"{name}.pdf").stat().st_size > 0
        assert list((runs[0] / "files" / "media" / "images" / "analysis").glob(f"{name}_*.png")), name
    for key in ("analysis/heads/layer0/kq_offdiag", "analysis/P/fit_newest", "analysis/summary/mse_last_over_gd1",
                "val/gd3/mse_last"):
        assert record["summary"][key] == pytest.approx(metrics[key]), key


class StopAt(Callback):
    """Raises in the middle of training, as a crash or Ctrl-C would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated interruption")


def test_interrupted_run_loses_nothing(make_cfg, tmp_path):
    """A run stopped by an exception at step 7 leaves interrupted.ckpt; resuming from it ends where an
    uninterrupted run ends (same weights)."""
    common = [*FAST, "trainer.max_steps=12", "trainer.val_check_interval=5"]
    run(make_cfg(*common, sub="full"))
    with pytest.raises(RuntimeError, match="simulated"):
        run(make_cfg(*common, sub="cut"), callbacks=[StopAt(7)])
    ckpt = tmp_path / "cut/checkpoints/interrupted.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 7
    resumed = run(make_cfg(*common, f"ckpt_path={ckpt}", sub="cut"))
    assert resumed["global_step"] == 12
    w_full, w_cut = _load(tmp_path / "full/checkpoints/last.ckpt"), _load(tmp_path / "cut/checkpoints/last.ckpt")
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full)
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert_curves_share_the_steps_of_val_metrics(cut)  # also across the resume from interrupted.ckpt
    assert [r["step"] for r in cut if "val/mse_by_pos" in r] == [r["step"] for r in full if "val/mse_by_pos" in r]


def test_multirun_gives_one_wandb_run_per_job(tmp_path):
    """`scripts/train.py -m seed=0,1` with W&B offline: two jobs, two run folders, two distinct W&B runs."""
    cmd = [sys.executable, "scripts/train.py", "-m", "seed=0,1", "logger=wandb", "logger.mode=offline",
           *[o for o in FAST if not o.startswith("logger=")], f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = {p.name.split("-")[-1] for job in (job_folder(tmp_path, 0), job_folder(tmp_path, 1)) for p in (job / "wandb").glob("offline-run-*")}
    assert len(ids) == 2
    seeds = [json.loads((job_folder(tmp_path, n) / "summary.json").read_text()) for n in (0, 1)]
    assert seeds[0]["train/loss"] != seeds[1]["train/loss"]


def test_baselines_are_evaluated_once_and_logged_every_validation(make_cfg, tmp_path, monkeypatch):
    """The validation set is fixed, so the baselines' sums are computed in the first full validation and reused:
    later validations log the same values without recomputing them."""
    calls = []
    original = ICARModule.baseline_errors
    monkeypatch.setattr(ICARModule, "baseline_errors", lambda self, s, W: calls.append(len(s)) or original(self, s, W))
    run(make_cfg(*FAST, "trainer.max_steps=6", "trainer.val_check_interval=2"))  # 3 validations + the sanity check
    assert sum(calls) == 16 + 16  # the sanity check's 2 batches, then one full pass over the 16 sequences
    logged = [r["val/gd2/mse"] for r in read_metrics(tmp_path / "run") if "val/gd2/mse" in r]
    assert len(logged) == 3 and len(set(logged)) == 1
