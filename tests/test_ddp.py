"""Multi-device training on CPU: two ranks draw different sequences and report one exactly reduced val/mse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from icar.training.config_io import to_dataclass
from icar.data.stream import SequenceStream
from icar.training.datamodule import ARDataModule
from icar.run import run
from icar.training.module import ICARModule
from tests.conftest import FAST, REPO


class BatchRecorder(pl.Callback):
    """Each rank saves its first training batch and the val/mse it ends with."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            torch.save(batch[0].cpu(), self.out / f"batch_rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer, pl_module):
        val = float(trainer.callback_metrics["val/mse"])
        (self.out / f"val_rank{trainer.global_rank}.json").write_text(json.dumps(val))


def _single_process_val_mse(ckpt: Path) -> float:
    module = ICARModule.load_from_checkpoint(ckpt, map_location="cpu")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    (val,) = trainer.validate(module, datamodule=ARDataModule(module.cfg.data, module.cfg.seed), verbose=False)
    return val["val/mse"]


def test_two_ranks_different_sequences_one_reduced_val(make_cfg, tmp_path):
    """ddp_fork on 2 CPU ranks: rank streams differ and match SequenceStream(rank=r); val/mse is the exact mean
    over all 17 validation sequences (an odd count: padding duplicates would bias it), the same on both ranks."""
    cfg = make_cfg(*FAST, "trainer.strategy=ddp_fork", "trainer.devices=2", "data.val_size=17", "trainer.max_steps=3")
    metrics = run(cfg, callbacks=[BatchRecorder(tmp_path)])
    b0, b1 = (torch.load(tmp_path / f"batch_rank{r}.pt") for r in (0, 1))
    assert not torch.allclose(b0, b1)
    c = to_dataclass(cfg)
    sampler = ARDataModule(c.data, c.seed).sampler
    for rank, batch in ((0, b0), (1, b1)):
        expected, _ = SequenceStream(sampler, c.data.batch_size, c.seed, rank=rank).batch(0)
        assert torch.equal(batch, expected)
    v0, v1 = (json.loads((tmp_path / f"val_rank{r}.json").read_text()) for r in (0, 1))
    assert v0 == v1 == pytest.approx(metrics["val/mse"])
    assert metrics["val/mse"] == pytest.approx(_single_process_val_mse(tmp_path / "run/checkpoints/last.ckpt"), rel=1e-6)


def test_cli_ddp_on_cpu(tmp_path):
    """`scripts/train.py trainer=ddp trainer.accelerator=cpu trainer.devices=2` (the subprocess launcher that
    re-executes the command line) trains, and every rank writes into the one run folder."""
    run_dir = tmp_path / "ddp"
    cmd = [
        sys.executable, "scripts/train.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        *FAST, "data.val_size=17", f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 4
    assert summary["val/mse"] == pytest.approx(_single_process_val_mse(run_dir / "checkpoints/last.ckpt"), rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # no second Hydra folder from the other rank
