"""Peak memory of a run, estimated from its config before anything is allocated, and refused in one line when it
cannot fit (`data.T=100000` used to build a 1e10-element mask and die in the allocator after 46 s).

The estimate is a rough upper bound: the sizes of the tensors that grow with the config, times how many of each a
step keeps alive, as measured on this code (the peak resident memory of a step, with the allocator keeping freed
memory as training does; tests/test_memory.py checks that it bounds a measured step within a factor of 2.5):
  attention, per layer (training): 2.75 (linear scores) or 5.5 (softmax scores times positional weights) tensors of
    (B, H, T, T) (3 for softmax scores in a first layer's coordinates), none for PyTorch's fused causal softmax
    (no positional weights, model.kernel other than explicit; icar.models.transformer.choose_path); the token-space
    kernel of a first
    linear layer (model.kernel) keeps 3 batch-independent (T P, T r D) tensors instead, P = r (r + 1) / 2; the
    diagonal model 5 of (B, H, T, T);
  the residual stream, per layer: 10 tensors of (B, T, H dh + d_model);
  parameters x 4 (weights, gradients, Adam's two moments), the T x T causal masks and positional matrices P;
  validation: the model's forward pass on a validation batch, and the baselines' float64 predictions
    (B, T, d) x (12 K + 24) bytes per coordinate with K = eval.gd_steps;
  GD's step-size tuning (once, on data.val_size held-out sequences): 8 (2 d^2 + 7 d) bytes per position.
On the CPU, ranks of one machine share its memory: the estimate is multiplied by trainer.devices.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from icar.config import (
    Arch,
    Attention,
    ConfigError,
    Embedding,
    Family,
    Optimizer,
    Positional,
    TrainConfig,
    Tokens,
    available_devices,
    n_layers,
)
from icar.models.transformer import AttentionPath, choose_path

CHUNK_WORK = 2 * 8 * (1 << 22)  # bytes of the baselines' per-chunk float64 work (icar.baselines.CHUNK_ELEMENTS)


@dataclass
class Part:
    """One term of the estimate: its bytes and the config keys (with their values) that drive it."""

    name: str
    bytes: float
    keys: str


@dataclass
class MemoryEstimate:
    persistent: list[Part] = field(default_factory=list)  # alive for the whole run
    train: list[Part] = field(default_factory=list)  # one training step
    validation: list[Part] = field(default_factory=list)  # one validation batch
    tuning: list[Part] = field(default_factory=list)  # GD's step sizes, once, on the CPU

    @staticmethod
    def total(parts: list[Part]) -> float:
        return sum(p.bytes for p in parts)

    def peak(self) -> float:
        """Bytes at the worst moment of a run on one device (the tuning counted where it runs: see `check_memory`)."""
        phases = (self.train, self.validation, self.tuning)
        return self.total(self.persistent) + max(self.total(p) for p in phases)

    def worst_parts(self) -> list[Part]:
        """The persistent terms and those of the largest phase, largest first."""
        phase = max((self.train, self.validation, self.tuning), key=self.total)
        return sorted(self.persistent + phase, key=lambda p: -p.bytes)


def element_bytes(precision: str, complex_valued: bool = False) -> int:
    """Bytes per element of the model's tensors under `trainer.precision` (complex numbers count twice)."""
    size = 8 if precision.startswith("64") else 2 if precision in ("16-true", "bf16-true", "16", "bf16") else 4
    return size * (2 if complex_valued else 1)


def estimate_memory(cfg: TrainConfig) -> MemoryEstimate:
    """The estimate of one rank's memory, in bytes, split into the terms above."""
    m, dt = cfg.model, cfg.data
    B, T, d, L, H = dt.batch_size, dt.T, dt.d, n_layers(m), m.n_heads
    complex_data = dt.family == Family.unitary
    f = element_bytes(cfg.trainer.precision, complex_data and m.arch == Arch.diagonal)
    val_batch = max(1, min(B, math.ceil(dt.val_size / (cfg.trainer.devices * cfg.trainer.num_nodes))))
    K = cfg.eval.gd_steps
    wide = 16 if complex_data else 8  # the baselines work in complex128 / float64
    est = MemoryEstimate()
    layers = f" x model.n_layers={L}" if m.arch == Arch.transformer else ""  # the diagonal model is one layer
    attn_keys = f"data.batch_size={B} x model.n_heads={H} x data.T={T}^2{layers}"
    mask_keys = f"data.T={T}^2{layers}"
    if m.arch == Arch.diagonal:
        params = 2 * H * d + T * T
        est.persistent.append(Part("causal mask (T, T)", 4 * T * T, f"data.T={T}^2"))
        est.train.append(Part("(B, H, T, T) attention", 5 * B * H * T * T * f, attn_keys))
        est.validation.append(Part("(B, H, T, T) attention", 2 * val_batch * H * T * T * f, attn_keys))
    else:
        width = (3 if dt.tokens == Tokens.augmented else 1) * (2 if complex_data else 1) * d
        D = m.d_model or width
        dh = m.head_dim or D
        layer_params = 4 * H * dh * D + 2 * D + (4 * H * dh + D if m.bias else 0)
        layer_params += T * D if m.positional in (Positional.softmax_positional, Positional.additive) else 0
        params = L * layer_params + (width * D if m.embedding == Embedding.linear else 0) + D * width
        est.persistent.append(Part("causal masks (T, T)", L * T * T, mask_keys))
        if m.positional == Positional.multiplicative:  # P (T, T) per layer, with its gradient and Adam's moments
            est.persistent.append(Part("positional matrices P (T, T)", 4 * L * T * T * f, mask_keys))
        elif m.positional == Positional.softmax_positional:  # (H, T, T) weights every step, saved and their gradient
            est.train.append(Part("positional weights (H, T, T)", 3 * L * H * T * T * f, mask_keys + f" x model.n_heads={H}"))
        per_tensor = B * H * T * T * f
        # a first layer's token coordinates (augmented tokens drop their zero block), and a constant one for biases
        r = (width * 2 // 3 if dt.tokens == Tokens.augmented else width) + int(m.bias)
        pairs = r * (r + 1) // 2
        paths = [choose_path(m.attention, m.positional, m.kernel, r if i == 0 else None, H, T, dh, D) for i in range(L)]
        dense_layers = [i for i, path in enumerate(paths) if path not in (AttentionPath.token_space, AttentionPath.fused)]
        if AttentionPath.token_space in paths:
            est.train.append(Part("token-space kernel (T P, T r D)", 3 * T * pairs * T * r * D * f,
                                  f"data.T={T}^2 x {pairs * r * D} (model.kernel={m.kernel.value}, first layer)"))
        if dense_layers:
            softmax = m.attention == Attention.softmax  # the coordinate kernel keeps fewer softmax intermediates
            c = sum((3.0 if paths[i] == AttentionPath.coordinates else 5.5) if softmax else 2.75 for i in dense_layers)
            est.train.append(Part("(B, H, T, T) attention", c * per_tensor, attn_keys))
            est.validation.append(Part("(B, H, T, T) attention", 2 * val_batch * H * T * T * f, attn_keys))
        est.train.append(Part("residual stream", 10 * L * B * T * (H * dh + D) * f,
                              f"data.batch_size={B} x data.T={T} x model.n_layers={L} x width {H * dh + D}"))
    states = 4 if cfg.optim.optimizer == Optimizer.adam else 3
    est.persistent.append(Part("parameters, gradients, optimiser", states * params * f, "model.*, data.T"))
    est.persistent.append(Part("validation set", 2 * dt.val_size * (T + 1) * d * f + CHUNK_WORK,
                               f"data.val_size={dt.val_size} x data.T={T}"))
    est.validation.append(Part("baselines' predictions", val_batch * T * d * (12 * K + 24) * wide / 8 + CHUNK_WORK,
                               f"data.batch_size={B} x data.T={T} x data.d={d} x eval.gd_steps={K}"))
    if K:
        est.tuning.append(Part("GD step-size tuning", wide * dt.val_size * T * (2 * d * d + 7 * d) + CHUNK_WORK,
                               f"data.val_size={dt.val_size} x data.T={T} x data.d={d}^2"))
    return est


def available_memory(cfg: TrainConfig, device_claimed: bool = False) -> tuple[float, str] | None:
    """(bytes free, what was measured) on the device this process trains on; None where it cannot be told, and for
    a job of a parallel sweep (`device_claimed`): it trains on a GPU of its own, claimed when it starts."""
    kind, _ = available_devices(cfg.trainer.accelerator)
    if kind == "cpu":
        return host_memory()
    if kind != "gpu":
        return None  # mps: unified memory, no reliable figure
    if not torch.cuda.is_available():
        return None
    if cfg.trainer.strategy in ("ddp_fork", "ddp_notebook") or device_claimed:
        return None  # CUDA must stay uninitialised before a fork; a parallel sweep's job claims its GPU later
    index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()  # the GPU this rank will use anyway
    return float(torch.cuda.mem_get_info(index)[0]), f"the free memory of GPU {index}"


def host_memory() -> tuple[float, str] | None:
    """Available RAM: MemAvailable of /proc/meminfo (Linux), else psutil when installed."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024, "RAM available (/proc/meminfo)"
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return float(psutil.virtual_memory().available), "RAM available (psutil)"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def check_memory(cfg: TrainConfig, device_claimed: bool = False) -> MemoryEstimate:
    """Raise ConfigError (one line naming the keys that drive it) when the estimated peak exceeds the memory free on
    the device; a GPU run's step-size tuning is checked against the host's RAM. Set ICAR_SKIP_MEMORY_CHECK=1 to skip."""
    est = estimate_memory(cfg)
    if os.environ.get("ICAR_SKIP_MEMORY_CHECK"):
        return est
    on_gpu = available_devices(cfg.trainer.accelerator)[0] == "gpu"
    if not on_gpu and int(os.environ.get("LOCAL_RANK", 0)) > 0:
        return est  # rank 0 checked for every rank of this machine; by now it holds memory of its own
    device = available_memory(cfg, device_claimed)
    ranks_here = 1 if on_gpu else cfg.trainer.devices
    if on_gpu:
        checks = [(est.total(est.persistent) + max(est.total(est.train), est.total(est.validation)), device,
                   est.worst_parts()), (est.total(est.tuning), host_memory(), est.tuning)]
    else:
        checks = [(est.peak() * ranks_here, device, est.worst_parts())]
    for need, have, parts in checks:
        if have is None or need <= have[0]:
            continue
        terms = ", ".join(f"{p.name} {_size(p.bytes * ranks_here)} [{p.keys}]" for p in parts[:2])
        ranks = f" for {ranks_here} ranks" if ranks_here > 1 else ""
        raise ConfigError(f"this run needs about {_size(need)} of memory{ranks} but {have[1]} is {_size(have[0])}:"
                          f" {terms}; lower the keys named (estimate: icar/training/memory.py, skip with"
                          f" ICAR_SKIP_MEMORY_CHECK=1)")
    return est
