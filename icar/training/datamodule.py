"""The LightningDataModule: per rank, the training stream of icar.data.stream, and a fixed validation set drawn from
`data.val_seed`, sharded across ranks without padding."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from icar.config import DataConfig
from icar.data.sequences import SequenceSampler
from icar.data.stream import SequenceStream


class ARDataModule(pl.LightningDataModule):
    """Streams training batches per rank and holds a fixed validation set drawn from `data.val_seed`."""

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.sampler = SequenceSampler(cfg)
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is None:
            g = torch.Generator().manual_seed(self.cfg.val_seed)
            s, W = self.sampler.sample(self.cfg.val_size, g)
            self.val_set = TensorDataset(s, W)

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, _ = self._rank()
        start = 0
        if self.trainer is not None:  # resumed runs restore global_step before the loaders are built
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
        # Sample where the model trains when in the main process; workers sample on the CPU.
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if self.cfg.num_workers > 0:
            device = torch.device("cpu")
        stream = SequenceStream(self.sampler, self.cfg.batch_size, self.seed, rank, start, device)
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """Rank r evaluates sequences r, r + world, ...: every sequence exactly once, no padding duplicates."""
        assert self.val_set is not None, "call setup() first"
        rank, world = self._rank()
        s, W = self.val_set.tensors
        shard = TensorDataset(s[rank::world], W[rank::world])
        return DataLoader(shard, batch_size=min(self.cfg.batch_size, len(shard)) or 1, shuffle=False)
