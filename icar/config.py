"""Typed configuration: one dataclass per component, the Hydra schema (icar.orchestration.hydra_config) and the
defaults, in this one place (the YAML files under conf/ carry only what differs from them).

A misspelt key or a wrong type fails when the config is composed (OmegaConf struct mode); `validate` then
checks the values, so that a bad run stops before training with one line naming the key and what is allowed.
Model and data code receive these dataclasses and never import Hydra or OmegaConf.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

import torch


class Family(str, Enum):
    """Context-matrix families of docs/PAPER_NOTES.md §1.2."""

    orthogonal = "orthogonal"  # Haar on O(d), non-commuting
    commuting = "commuting"  # Q diag(R_theta_1, ..., R_theta_{d/2}) Q^T with one shared Q
    unitary = "unitary"  # diag(exp(i theta)), complex tensors


class Start(str, Enum):
    """How s_1 is drawn."""

    fixed = "fixed"  # 1_d / sqrt(d) for every sequence (the authors' experiments)
    ones = "ones"  # 1_d: every coordinate of modulus 1 (the theory of claims 2 and 3)
    sphere = "sphere"  # uniform on the unit sphere
    phase = "phase"  # unit-modulus coordinates with random phases (claim 1)


class Basis(str, Enum):
    """The shared basis Q of the commuting family."""

    random = "random"  # Haar, drawn once from data.basis_seed
    identity = "identity"  # canonical 2x2 rotation blocks


class Tokens(str, Enum):
    augmented = "augmented"  # e_t = (0_d, s_t, s_{t-1})
    raw = "raw"  # e_t = s_t


class Arch(str, Enum):
    transformer = "transformer"
    diagonal = "diagonal"  # the reduced (A, B, P) model of Figure 3


class Attention(str, Enum):
    linear = "linear"
    softmax = "softmax"


class Positional(str, Enum):
    none = "none"
    multiplicative = "multiplicative"  # attention weights times a learned T x T matrix P
    softmax_positional = "softmax_positional"  # weights times softmax of learned positional scores (Figure 7)
    additive = "additive"  # learned positional embedding added to the input tokens


class Kernel(str, Enum):
    """How a Transformer layer evaluates attention (icar/models/transformer.py); all give the same numbers."""

    auto = "auto"  # of the evaluations that apply, the one with the fewest forward FLOPs (choose_path)
    fast = "fast"  # a first layer: token-space (linear scores) or coordinates (softmax); later layers dense
    explicit = "explicit"  # the reference: the full (B, H, T, T) weights, token weights times positional weights


class Embedding(str, Enum):
    repeat = "repeat"  # tile the token to d_model (identity when the widths agree), as the authors do
    linear = "linear"  # learned linear map


class Readout(str, Enum):
    auto = "auto"  # block for augmented tokens, linear otherwise
    block = "block"  # the first d coordinates of the residual stream (the zero block of e_t)
    linear = "linear"  # learned linear map d_model -> d


class LossOn(str, Enum):
    all = "all"  # mean over every predicted position
    last = "last"  # the last position only


class Optimizer(str, Enum):
    adam = "adam"  # AdamW when optim.weight_decay > 0
    sgd = "sgd"  # plain SGD: the authors' positional-only experiment (Figure 6)


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


class LoggerKind(str, Enum):
    wandb = "wandb"
    csv = "csv"
    none = "none"


class WandbMode(str, Enum):
    auto = "auto"  # online when an API key is configured, offline otherwise
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class DataConfig:
    family: Family = Family.orthogonal
    d: int = 5
    T: int = 20  # context length: the model sees s_1..s_T and predicts s_2..s_{T+1}
    mu: float = 1.0  # angle scale: theta / mu (commuting and unitary families)
    sigma: float = 0.0  # additive noise s_{t+1} = W s_t + sigma eps_t
    start: Start = Start.fixed
    basis: Basis = Basis.random
    basis_seed: int = 0
    tokens: Tokens = Tokens.augmented
    batch_size: int = 256  # per device
    val_size: int = 1024
    val_seed: int = 20240205  # the validation set is the same for every training seed
    num_workers: int = 0  # 0: sample on the training device in the main process


@dataclass
class ModelConfig:
    """What every architecture has; `TransformerConfig` and `DiagonalConfig` add their own keys (model=linear,
    model=softmax and model=diagonal pick one)."""

    arch: Arch = Arch.transformer
    n_heads: int = 4  # several heads, so that head orthogonality is visible in every run
    attention: Attention = Attention.linear  # Transformer: token weights q.k / sqrt(head_dim), or their softmax


@dataclass
class TransformerConfig(ModelConfig):
    """The causal attention-only Transformer (icar/models/transformer.py). The defaults are `make train`'s model:
    one layer, 4 heads and a learned multiplicative P, so that every run shows every analysis."""

    n_layers: int = 1
    head_dim: int = 0  # 0: d_model
    d_model: int = 0  # 0: the token width (3d augmented, d raw; doubled for complex data)
    positional: Positional = Positional.multiplicative
    embedding: Embedding = Embedding.repeat
    readout: Readout = Readout.auto
    layernorm: bool = True  # LayerNorm on each attention layer's output, as in the authors' scripts
    residual: bool = True
    bias: bool = False
    gd_blocks: bool = False  # keep only the blocks of Proposition 1 (query s_t, key s_{t-1}, value s_t, out: zero block)
    kernel: Kernel = Kernel.auto  # attention evaluation: auto | fast | explicit (the same function, other speeds)


@dataclass
class DiagonalConfig(ModelConfig):
    """The reduced (A, B, P) model of Figure 3 (icar/models/diagonal.py), on raw tokens. Its `attention` is the
    positional weighting: softmax makes each row of P a softmax over t <= tau (claim 7), the token scores stay
    linear."""

    arch: Arch = Arch.diagonal
    n_heads: int = 10
    attention: Attention = Attention.linear
    init_std: float = 0.1  # std of the Gaussian initialisation of A, B, P
    pe_only: bool = False  # C = B^T A fixed to I (A = B = I, n_heads = d), only P trained, from P = 0


MODEL_CONFIGS: dict[Arch, type[ModelConfig]] = {Arch.transformer: TransformerConfig, Arch.diagonal: DiagonalConfig}


def n_layers(model: ModelConfig) -> int:
    """Attention layers of the model: the diagonal model is one layer (its GD reference takes one step)."""
    return model.n_layers if isinstance(model, TransformerConfig) else 1


@dataclass
class OptimConfig:
    optimizer: Optimizer = Optimizer.adam
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Schedule = Schedule.constant
    min_lr_ratio: float = 0.0  # cosine schedule floor, as a fraction of lr
    grad_clip: float = 0.0  # 0: off


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto | cpu | gpu | cuda | mps
    devices: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | ddp_fork | ...
    num_nodes: int = 1
    precision: str = "32-true"
    max_steps: int = 1000
    val_check_interval: int = 100  # validate (and checkpoint) every this many training steps
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    deterministic: bool = False
    ddp_timeout_s: int = 600  # longest wait of a collective for another rank (a frozen rank ends the run after it)


@dataclass
class LoggerConfig:
    kind: LoggerKind = LoggerKind.wandb
    project: str = "icar"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: WandbMode = WandbMode.auto


@dataclass
class EvalConfig:
    gd_steps: int = 8  # baselines gd1..gd{gd_steps}: GD on the inner objective, step sizes tuned per (k, t)
    analysis: bool = True  # analyses (figures + numbers) at the end of training
    analysis_every: int = 0  # also after every this many validations (0: only at the end)


@dataclass
class TrainConfig:
    name: str = "default"
    seed: int = 0
    loss_on: LossOn = LossOn.all
    run_dir: Optional[str] = None  # None: the current directory
    ckpt_path: Optional[str] = None  # resume from this checkpoint
    resume_override: bool = False  # resume although the model, data, optimiser or seed differ (recorded in resumes/)
    model: ModelConfig = field(default_factory=TransformerConfig)  # or DiagonalConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


PYDOC = "pydoc"  # Fig4Config.text: Python's reference documentation (pydoc_data.topics), shipped with Python


@dataclass
class Fig4Config:
    """Figure 4 (icar/claims/fig4.py, scripts/fig4.py): AR(1) fits of windows of real token embeddings; no training."""

    source: str = "wordllama"  # wordllama | hf:<model name or path>
    text: str = PYDOC  # pydoc | path of a text file
    T: int = 5
    max_windows: int = 10000  # 0: every window of the corpus
    threshold: float = 1e-12  # MSE <= threshold counts as an exact fit
    float32_check: bool = True  # also fit in float32 as the authors did (torch.linalg.lstsq, gelsy)
    seed: int = 0
    run_dir: Optional[str] = None  # None: the current directory
    logger: LoggerConfig = field(default_factory=LoggerConfig)


class ConfigError(ValueError):
    """A config value outside what is allowed; the message names the key and the allowed values."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# lightning.fabric.plugins.precision.precision._PRECISION_INPUT_STR(_ALIAS) (Lightning 2.6), listed here so that validate needs no Lightning
PRECISIONS = ("64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed", "transformer-engine",
              "transformer-engine-float16", "64", "32", "16", "bf16")


def available_devices(accelerator: str) -> tuple[str, int]:
    """The accelerator `auto` resolves to here, and how many devices of it this machine has."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "gpu", torch.cuda.device_count()
    if accelerator == "mps" or (accelerator in ("auto", "gpu") and torch.backends.mps.is_available()):
        return "mps", int(torch.backends.mps.is_available())
    return "cpu", os.cpu_count() or 1


def validate(cfg: TrainConfig) -> None:
    """Check values (not just types): raise ConfigError with one line naming the key and what is allowed."""
    m, dt, o, tr, ev = cfg.model, cfg.data, cfg.optim, cfg.trainer, cfg.eval
    _require(dt.d >= 1, f"data.d must be >= 1, got {dt.d}")
    _require(dt.T >= 2, f"data.T must be >= 2 (context length), got {dt.T}")
    _require(dt.mu > 0, f"data.mu must be > 0, got {dt.mu}")
    _require(dt.sigma >= 0, f"data.sigma must be >= 0, got {dt.sigma}")
    _require(dt.batch_size >= 1, f"data.batch_size must be >= 1, got {dt.batch_size}")
    _require(dt.val_size >= 1, f"data.val_size must be >= 1, got {dt.val_size}")
    _require(dt.num_workers >= 0, f"data.num_workers must be >= 0, got {dt.num_workers}")
    _require(
        dt.family != Family.commuting or dt.d % 2 == 0,
        f"data.d must be even for data.family=commuting (2x2 rotation blocks), got {dt.d}",
    )
    _require(
        dt.family != Family.orthogonal or dt.mu == 1.0,
        f"data.mu applies to the commuting and unitary families only; set data.mu=1 for orthogonal, got {dt.mu}",
    )
    _require(
        dt.start != Start.phase or dt.family == Family.unitary or dt.d % 2 == 0,
        f"data.start=phase needs an even data.d for real families (one phase per 2x2 block), got {dt.d}",
    )
    _require(
        isinstance(m, MODEL_CONFIGS[m.arch]),
        f"model.arch={m.arch.value} does not match the model's keys ({type(m).__name__}): choose the architecture"
        f" with model={'diagonal' if m.arch == Arch.diagonal else 'linear'} instead of setting model.arch",
    )
    _require(m.n_heads >= 1, f"model.n_heads must be >= 1, got {m.n_heads}")
    if isinstance(m, DiagonalConfig):
        _require(m.init_std > 0, f"model.init_std must be > 0, got {m.init_std}")
        _require(
            dt.tokens == Tokens.raw,
            "model.arch=diagonal reads raw tokens: set data.tokens=raw (or use model=diagonal with data defaults)",
        )
        _require(
            not m.pe_only or m.n_heads == dt.d,
            f"model.pe_only=true fixes C = B^T A = I in the diagonal model: it needs model.n_heads == data.d"
            f" (got n_heads={m.n_heads}, d={dt.d})",
        )
    if isinstance(m, TransformerConfig):
        _require(m.n_layers >= 1, f"model.n_layers must be >= 1, got {m.n_layers}")
        _require(m.head_dim >= 0, f"model.head_dim must be >= 1 (or 0 for d_model), got {m.head_dim}")
        _require(m.d_model >= 0, f"model.d_model must be >= 1 (or 0 for the token width), got {m.d_model}")
        width = (3 if dt.tokens == Tokens.augmented else 1) * (2 if dt.family == Family.unitary else 1) * dt.d
        _require(
            m.embedding != Embedding.repeat or m.d_model % width == 0,
            f"model.d_model={m.d_model} must be a multiple of the token width {width} for model.embedding=repeat"
            " (or set model.embedding=linear, or model.d_model=0)",
        )
        _require(
            not m.gd_blocks or (dt.tokens == Tokens.augmented and m.d_model in (0, width)
                                and m.embedding == Embedding.repeat and m.head_dim in (0, width)),
            "model.gd_blocks=true masks the blocks of augmented tokens: it needs data.tokens=augmented,"
            " model.d_model=0, model.head_dim=0 and model.embedding=repeat",
        )
        block = m.readout == Readout.block or (m.readout == Readout.auto and dt.tokens == Tokens.augmented)
        _require(
            not block or (dt.tokens == Tokens.augmented and m.d_model in (0, width) and m.embedding == Embedding.repeat),
            "model.readout=block reads the zero block of augmented tokens: it needs data.tokens=augmented,"
            " model.d_model=0 and model.embedding=repeat; use model.readout=linear otherwise",
        )
    _require(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _require(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 turns it off), got {o.grad_clip}")
    _require(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _require(0 <= ev.gd_steps <= 64, f"eval.gd_steps must be in [0, 64], got {ev.gd_steps}")
    _require(ev.analysis_every >= 0, f"eval.analysis_every must be >= 0 (0: only at the end), got {ev.analysis_every}")
    _require(tr.max_steps >= 1, f"trainer.max_steps must be >= 1, got {tr.max_steps}")
    _require(tr.val_check_interval >= 1, f"trainer.val_check_interval must be >= 1, got {tr.val_check_interval}")
    _require(tr.devices >= 1, f"trainer.devices must be >= 1, got {tr.devices}")
    _require(tr.num_nodes >= 1, f"trainer.num_nodes must be >= 1, got {tr.num_nodes}")
    _require(tr.log_every_n_steps >= 1, f"trainer.log_every_n_steps must be >= 1, got {tr.log_every_n_steps}")
    _require(tr.ddp_timeout_s >= 1, f"trainer.ddp_timeout_s must be >= 1 (seconds), got {tr.ddp_timeout_s}")
    _require(
        tr.accelerator in ACCELERATORS,
        f"trainer.accelerator must be one of {', '.join(ACCELERATORS)}, got {tr.accelerator!r}",
    )
    _require(tr.precision in PRECISIONS, f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {tr.precision!r}")
    kind, count = available_devices(tr.accelerator)
    _require(
        tr.devices <= count,
        f"trainer.devices={tr.devices} but this machine has {count} {kind} device(s)"
        f" (trainer.accelerator={tr.accelerator}); ask for at most {count}",
    )
    _require(
        dt.val_size >= tr.devices * tr.num_nodes,
        f"data.val_size={dt.val_size} must be >= the number of ranks ({tr.devices * tr.num_nodes}):"
        " every rank validates a share",
    )
    if cfg.ckpt_path is not None:
        _require(os.path.isfile(cfg.ckpt_path), f"ckpt_path={cfg.ckpt_path} does not exist or is not a file")
