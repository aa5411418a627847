"""The one LightningModule: next-token MSE on streamed sequences (icar.objective), validation beside the in-context
baselines on the same sequences under the same metric names (icar.metrics), and the optimiser."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch

from icar import metrics, objective
from icar.baselines import InContextBaselines
from icar.config import Optimizer, Schedule, TrainConfig
from icar.data.sequences import SequenceSampler
from icar.models import build_model
from icar.objective import predict_sequences, squared_error
from icar.training.config_io import to_dataclass
from icar.training.loggers import log_curves


class ICARModule(pl.LightningModule):
    """Trains one model on streamed sequences; its hyperparameters are the whole resolved config (a plain dict)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(config)  # goes to the checkpoint and, once, to every logger
        self.cfg: TrainConfig = to_dataclass(config)
        self.model = build_model(self.cfg.model, self.cfg.data)
        self.baselines = InContextBaselines(self.cfg.eval.gd_steps, self.cfg.data.T)
        self.t0 = self.model.first_position - 1  # first predicted position, 0-based
        self._val_sums: dict[str, torch.Tensor] = {}
        self._baseline_sums: dict[str, torch.Tensor] | None = None  # this rank's, after its first full validation
        self.val_curves: dict[str, list[float]] = {}  # the last validation's per-position MSE, "model" and baselines

    # -- the forward pass shared by training, validation and analysis ------------------------------------------
    def predict_sequences(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences s_1..s_{T+1} (B, T+1, d) -> (predictions, targets) of s_2..s_{T+1}, both (B, T, d')."""
        return predict_sequences(self.model, s, self.cfg.data.tokens)

    def tune_baselines(self) -> None:
        """Tune GD's step sizes once, on CPU, on held-out sequences from data.val_seed + 1 (as many as validation).

        Every rank computes the same values; a resumed run or a loaded checkpoint keeps them."""
        if self.baselines.tuned:
            return
        g = torch.Generator().manual_seed(self.cfg.data.val_seed + 1)
        s, _ = SequenceSampler(self.cfg.data).sample(self.cfg.data.val_size, g)
        self.baselines.tune(s)

    def baseline_errors(self, s: torch.Tensor, W: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token squared errors (B, T) of every baseline on sequences s_1..s_{T+1} (B, T+1, d)."""
        target = s[:, 1:]
        return {name: squared_error(pred, target) for name, pred in self.baselines(s[:, :-1], W).items()}

    def on_validation_start(self) -> None:
        self.tune_baselines()  # once (also for trainer.validate on a fresh module); a no-op when restored

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gd_eta"] = self.baselines.gd_eta  # GD's tuned step sizes: a resumed or analysed run reuses them

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "gd_eta" in checkpoint:
            self.baselines.gd_eta = checkpoint["gd_eta"].to("cpu", torch.float64)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        s, _ = batch
        pred, target = self.predict_sequences(s)
        loss = objective.loss(squared_error(pred, target), self.model.first_position, self.cfg.loss_on)  # err: (B, T)
        if self._logs_this_step():
            self.log(metrics.TRAIN_LOSS, loss, prog_bar=True)
        return loss

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes this step's metrics (every trainer.log_every_n_steps-th step, as its logger
        connector counts them) or it is the last: `self.log` costs about 1 ms a call on CPU (4% of a Figure 5 step),
        and a value logged on the other steps would never be written. The progress bar shows the latest one."""
        try:
            trainer = self.trainer
        except RuntimeError:  # called without a Trainer (a notebook, a test): `self.log` decides
            return True
        step = self.global_step + 1  # this step's number once it has stepped (one optimiser, no accumulation)
        return step % max(1, trainer.log_every_n_steps) == 0 or step >= (trainer.max_steps or 0)

    # -- validation: exact sums over the whole validation set, reduced across ranks ----------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def _accumulate(self, name: str, err: torch.Tensor) -> None:
        total = err.sum(0)  # (T,)
        self._val_sums[name] = self._val_sums.get(name, torch.zeros_like(total)) + total

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        s, W = batch
        pred, target = self.predict_sequences(s)
        self._accumulate(metrics.MODEL, squared_error(pred, target))
        if self._baseline_sums is None:  # the validation set and the baselines never change: computed once
            for name, err in self.baseline_errors(s, W).items():
                self._accumulate(name, err.to(target.real.dtype))
        self._accumulate("count", torch.full_like(target[..., 0].real, 1.0))

    def on_validation_epoch_end(self) -> None:
        if self._baseline_sums is not None:
            self._val_sums.update(self._baseline_sums)
        elif not self.trainer.sanity_checking:  # a full pass over this rank's share: keep its baseline sums
            self._baseline_sums = {n: v for n, v in self._val_sums.items() if n not in (metrics.MODEL, "count")}
        names = sorted(self._val_sums)
        stacked = torch.stack([self._val_sums[n] for n in names])  # (n_curves, T): this rank's sums
        stacked = self.trainer.strategy.reduce(stacked, reduce_op="sum")  # every rank's sequences, each once
        sums = dict(zip(names, stacked))
        count = sums.pop("count")  # (T,): number of sequences
        curves = {n: v / count for n, v in sums.items()}  # per-position MSE
        if not self.trainer.sanity_checking:
            self.val_curves = {n: c.tolist() for n, c in curves.items()}
        for name, curve in curves.items():
            # already reduced over ranks; sync_dist averages identical values (and silences Lightning's warning)
            self.log(metrics.val(metrics.MSE, name), curve[self.t0 :].mean(), prog_bar=name == metrics.MODEL,
                     sync_dist=True)
            self.log(metrics.val(metrics.MSE_LAST, name), curve[-1], sync_dist=True)
        if not self.trainer.sanity_checking and self.trainer.loggers:
            positions = list(range(1, len(count) + 1))
            labelled = {metrics.val(metrics.MSE_BY_POS, n): c for n, c in curves.items()}
            # The curves go under the step Lightning's logger writes val/* under. That is private loop state
            # (`_batches_that_stepped`, Lightning 2.6): no public attribute holds it, and `global_step` differs from
            # it after a resume from interrupted.ckpt (icar.training.callbacks.CheckpointOnInterrupt). Pinned by
            # tests/test_train.py (assert_curves_share_the_steps_of_val_metrics, also across such a resume).
            step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
            log_curves(self.trainer.loggers, step, positions, labelled, metrics.VAL_MSE_BY_POS)

    # -- optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        o, max_steps = self.cfg.optim, self.cfg.trainer.max_steps
        if o.optimizer == Optimizer.sgd:
            optimizer = torch.optim.SGD(self.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        elif o.weight_decay:
            optimizer = torch.optim.AdamW(self.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=o.lr)

        def factor(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / o.warmup_steps
            if o.schedule == Schedule.cosine:
                progress = min(1.0, (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps))
                return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
