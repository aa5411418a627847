"""Sequences s_1..s_{T+1} of the process s_{t+1} = W s_t + sigma eps_t (docs/PAPER_NOTES.md §1.1, §1.3), batched."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from icar.config import Basis, DataConfig, Family, Start
from icar.data.contexts import haar_orthogonal, sample_contexts


def sample_starts(
    start: Start,
    n: int,
    d: int,
    generator: torch.Generator,
    *,
    complex_valued: bool = False,
    basis: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """n start vectors s_1, shape (n, d).

    `phase`: complex coordinates exp(i phi_j); for real data one phase per 2x2 block (in the basis Q), the block
    being sqrt(2) (cos phi, sin phi), i.e. unit-modulus coordinates in the rotations' complex eigenbasis.
    """
    dtype = torch.complex64 if complex_valued else torch.float32
    if start == Start.fixed:
        return torch.full((n, d), 1 / math.sqrt(d), device=device, dtype=dtype)
    if start == Start.ones:
        return torch.ones(n, d, device=device, dtype=dtype)
    if start == Start.sphere:
        x = torch.randn(n, d, generator=generator, device=device, dtype=dtype)
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    if start == Start.phase:
        if complex_valued:
            phi = 2 * math.pi * torch.rand(n, d, generator=generator, device=device)
            return torch.polar(torch.ones_like(phi), phi)
        phi = 2 * math.pi * torch.rand(n, d // 2, generator=generator, device=device)
        s = math.sqrt(2) * torch.stack([torch.cos(phi), torch.sin(phi)], -1).reshape(n, d)  # (n, d)
        return s if basis is None else s @ basis.to(device).T
    raise ValueError(f"unknown start {start!r}; allowed: {[s.value for s in Start]}")


def roll_out(
    W: torch.Tensor, s1: torch.Tensor, steps: int, sigma: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """s_1..s_{steps+1} from s_{t+1} = W s_t + sigma eps_t; W (n, d, d), s1 (n, d) -> (n, steps + 1, d).

    Complex noise has E|eps_j|^2 = 1 per coordinate, like real noise. Without noise, by doubling (`_roll_out_powers`).
    """
    if sigma == 0:
        return _roll_out_powers(W, s1, steps)
    s = [s1]
    for _ in range(steps):
        nxt = torch.einsum("nij,nj->ni", W, s[-1])  # (n, d)
        nxt = nxt + sigma * torch.randn(nxt.shape, generator=generator, device=nxt.device, dtype=nxt.dtype)
        s.append(nxt)
    return torch.stack(s, dim=1)


def _roll_out_powers(W: torch.Tensor, s1: torch.Tensor, steps: int) -> torch.Tensor:
    """The noiseless recursion by doubling: s_1..s_k known, s_{k+1}..s_{2k} = W^k s_1..s_k, then W^{2k} = (W^k)^2.

    About 2 log2(steps) batched products instead of `steps` small ones (1024 sequences of T = 50 in d = 5 on two
    CPU cores: 0.75 ms against 1.36 ms); rounding differs from the step-by-step recursion at float precision
    (tests/test_data.py compares them)."""
    s = s1.unsqueeze(1)  # (n, k, d) with k = 1
    power = W  # W^k
    while s.shape[1] < steps + 1:
        s = torch.cat([s, s @ power.transpose(-1, -2)], dim=1)  # rows: (W^k s_j)^T = s_j^T (W^k)^T
        if s.shape[1] < steps + 1:
            power = power @ power
    return s[:, : steps + 1]


@dataclass
class SequenceSampler:
    """Draws (s, W) batches for one data config: s (n, T+1, d) and W (n, d, d), on any device."""

    cfg: DataConfig

    def __post_init__(self) -> None:
        self.complex_valued = self.cfg.family == Family.unitary
        self.basis: torch.Tensor | None = None
        if self.cfg.family == Family.commuting and self.cfg.basis == Basis.random:
            g = torch.Generator().manual_seed(self.cfg.basis_seed)
            self.basis = haar_orthogonal(1, self.cfg.d, g)[0]  # (d, d), one Q shared by every sequence

    @property
    def out_dim(self) -> int:
        """Width of the prediction target as a real model sees it (complex coordinates count twice)."""
        return 2 * self.cfg.d if self.complex_valued else self.cfg.d

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        c, device = self.cfg, generator.device
        W = sample_contexts(c.family, n, c.d, generator, mu=c.mu, basis=self.basis, device=device)
        s1 = sample_starts(
            c.start, n, c.d, generator, complex_valued=self.complex_valued, basis=self.basis, device=device
        )
        return roll_out(W, s1, c.T, c.sigma, generator), W
