"""The training stream: freshly sampled sequences every step (no fixed training set).

The batch of training step k on rank r is drawn from a generator seeded by (seed, r, k) alone. So every rank and
every worker has its own reproducible stream, the stream does not depend on the number of CPU workers (the
DataLoader takes batches from workers in turn: worker w draws steps w, w + n_workers, ...), and a run resumed at step
k continues with batch k without any saved sampler state. On a GPU, num_workers=0 samples with CUDA generators and
workers with CPU ones: the two streams differ (each is reproducible).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from icar.data.sequences import SequenceSampler


def stream_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for one (seed, rank, step): stable across processes and Python versions."""
    digest = hashlib.blake2b(f"icar/{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SequenceStream(IterableDataset):
    """Infinite stream of (s, W) batches for one rank, starting at `start_step`; each item is a whole batch."""

    def __init__(
        self,
        sampler: SequenceSampler,
        batch_size: int,
        seed: int,
        rank: int = 0,
        start_step: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.sampler, self.batch_size, self.seed, self.rank = sampler, batch_size, seed, rank
        self.start_step, self.device = start_step, torch.device(device)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device=self.device).manual_seed(stream_seed(self.seed, self.rank, step))
        return self.sampler.sample(self.batch_size, g)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches start_step, start_step + 1, ... (worker w of n: start_step + w, + n, ...). On CPU the next batch
        is drawn in a background thread while the current one trains: torch releases the GIL in its operators, so
        the sampler's small operators overlap the step's large ones instead of adding to them."""
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + worker
        if self.device.type != "cpu":  # CUDA: the kernels queue on the training stream anyway
            while True:
                yield self.batch(step)
                step += n_workers
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="icar-sampler") as pool:
            pending = pool.submit(self.batch, step)
            while True:
                batch = pending.result()
                step += n_workers
                pending = pool.submit(self.batch, step)
                yield batch
