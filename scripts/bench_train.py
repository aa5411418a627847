"""Training-throughput benchmark: prints figures (it is not a test).

For each configuration it measures, in one process and on one device:
  1. sequences/s through the real Lightning path: `icar.run.run(cfg)` itself (ICARModule, ARDataModule, the
     callbacks and the JSONL logger it builds), with a timing callback passed to it;
  2. the share of a training step spent waiting for its batch (the time spent in the stream's `next`; on CPU the
     stream draws the next batch in a background thread during the step; on CUDA it is the time to queue the
     sampler's kernels, which then run on the training stream), and the cost of drawing one:
     `SequenceStream.batch(step)` alone, same batch size, same device, divided by the Lightning step time;
  3. a plain torch loop over the same model, data, loss, optimiser and scheduler (ICARModule used without a
     Trainer: `predict_sequences`, `icar.objective.squared_error`, `configure_optimizers`), and Lightning's overhead as
     (Lightning time per step) / (plain-loop time per step);
  4. the authors' own model class for the configuration (scripts/authors_models.py: Figure 5's augmented.py,
     Figure 7's non_augmented.py), same batch, same sequences, their nn.MSELoss and Adam, in the same process,
     and the speed-up of icar's Lightning path over it;
  5. the FLOPs of one training step (torch.utils.flop_counter, forward + backward) and the rate achieved, against a
     large-GEMM rate measured at the start on the same device;
  6. the limits of the step as written: the bytes its operators read and write if nothing stays in cache (a
     dispatch-mode count over one forward + backward) against a measured streaming-copy rate, and (CPU) the time
     the step spends inside its matrix products, from torch.profiler, with the FLOP rate they reach on its shapes.

Timing: `warmup` untimed steps, then `steps` timed steps split into `repeats` chunks; a chunk's time runs from the
end of the step before it to the end of its last step (so it contains the data fetch of each of its steps), with a
CUDA synchronisation at the chunk boundaries only. The plain loop's, the sampling's and the authors' chunks run
inside the Lightning run, between its chunks (Lightning, plain, sampling, authors, Lightning, ...), so that on a
shared machine every ratio compares steps taken under the same load. Start-up, validation and checkpointing are
outside every chunk (validation is timed apart and amortised over the config's schedule). Figures are medians
over the chunks; the per-chunk values and busy cores are printed so that the noise is visible.

    .venv/bin/python scripts/bench_train.py
    .venv/bin/python scripts/bench_train.py --configs orthogonal_multihead --steps 10 --warmup 5 --device cpu
    .venv/bin/python scripts/bench_train.py --configs augmented_depth:model.n_layers=4,augmented_depth:model.kernel=explicit
    .venv/bin/python scripts/bench_train.py --override data.batch_size=4096 --json bench_results/bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # torch.profiler's "USDT ... profiler_start" lines
if str(REPO) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import icar.run  # noqa: E402
from icar.config import LossOn, Tokens, n_layers, validate  # noqa: E402
from icar.orchestration.hydra_config import register_configs  # noqa: E402
from icar.training.config_io import to_dataclass, to_plain_dict  # noqa: E402
from icar.data.tokens import encode_tokens  # noqa: E402
from icar.data.stream import SequenceStream  # noqa: E402
from icar.data.sequences import SequenceSampler  # noqa: E402
from icar.objective import squared_error  # noqa: E402
from icar.training.module import ICARModule  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from authors_models import authors_transformer  # noqa: E402

CONF_DIR = REPO / "conf"
CONFIGS = ",".join(["default", *(f"augmented_depth:model.n_layers={L}" for L in (1, 2, 4, 8)), "orthogonal_multihead"])
# Per-configuration (warmup, steps) used when --warmup / --steps are not given.
DEFAULT_STEPS = {"default": (20, 150), "orthogonal_multihead": (5, 15)}
FALLBACK_STEPS = (5, 30)
# (warmup, steps per chunk) of the authors' model where it differs from ours: 10 s a step at Figure 7 on 2 cores
AUTHORS_STEPS = {"orthogonal_multihead": (1, 1)}


Timings = tuple[list[float], list[float]]  # per chunk: wall seconds per step, busy cores


# -- timing helpers -------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chunk_bounds(warmup: int, steps: int, repeats: int) -> list[int]:
    """Step counts after which a clock reading is taken: warmup, then the ends of `repeats` near-equal chunks."""
    repeats = max(1, min(repeats, steps))
    return [warmup + round(i * steps / repeats) for i in range(repeats + 1)]


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process over all its threads)."""
    return time.perf_counter(), time.process_time()


class NullTerminal(io.TextIOBase):
    """Discards what is written but says it is a terminal: the progress bar draws as in a user's `make train`."""

    def write(self, text: str) -> int:
        return len(text)

    def isatty(self) -> bool:
        return True


class ValidationTimer(pl.Callback):
    """Wall seconds of each validation pass that is not Lightning's sanity check, with the checkpoints written after
    it: from the start of the pass to the next training step (or the end of training)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start: float | None = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._start = time.perf_counter()

    def _close(self) -> None:
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None

    def on_train_batch_start(self, *args: Any) -> None:
        self._close()

    def on_train_end(self, *args: Any) -> None:
        self._close()


class Contender:
    """A step timed beside the Lightning run: `warmup` untimed steps, then a timed chunk after each of Lightning's
    (as many steps as that chunk, or `per_chunk`), so that both see the same load on a shared machine."""

    def __init__(self, name: str, step: Callable[[int], None], warmup: int, per_chunk: int | None = None) -> None:
        self.name, self.step, self.warmup, self.per_chunk = name, step, warmup, per_chunk
        self.done = 0
        self.secs: list[float] = []
        self.cores: list[float] = []

    def run(self, n: int, device: torch.device, timed: bool) -> None:
        start = clock()
        for _ in range(n):
            self.step(self.done)
            self.done += 1
        _sync(device)
        if timed:
            end = clock()
            self.secs.append((end[0] - start[0]) / n)
            self.cores.append((end[1] - start[1]) / (end[0] - start[0]))


class DataWait:
    """Seconds the training loop waits for each batch of every SequenceStream iterated while `watching`."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    @contextlib.contextmanager
    def watching(self) -> Any:
        original = SequenceStream.__iter__

        def timed(stream: SequenceStream) -> Any:
            batches = original(stream)
            while True:
                start = time.perf_counter()
                batch = next(batches)
                self.seconds.append(time.perf_counter() - start)
                yield batch

        SequenceStream.__iter__ = timed  # type: ignore[method-assign]
        try:
            yield self
        finally:
            SequenceStream.__iter__ = original  # type: ignore[method-assign]


class Interleaved(pl.Callback):
    """Times the Lightning run's chunks between the `bounds` steps and runs each contender's chunk in the gaps:
    Lightning chunk 1, plain chunk 1, sampling chunk 1, authors' chunk 1, Lightning chunk 2, ... (CUDA is
    synchronised at the chunk boundaries only)."""

    def __init__(self, bounds: list[int], contenders: list[Contender], device: torch.device,
                 wait: DataWait | None = None) -> None:
        self.bounds, self.contenders, self.device, self.wait = bounds, contenders, device, wait
        self.done = 0
        self.secs: list[float] = []
        self.cores: list[float] = []
        self.waits: list[float] = []  # per chunk: seconds per step spent waiting for the batch
        self._waited = 0
        self._start = clock()
        self.last_loss = float("nan")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.done += 1
        if self.done not in self.bounds:
            return
        _sync(self.device)
        end = clock()
        i = self.bounds.index(self.done)
        if i > 0:
            steps = self.done - self.bounds[i - 1]
            self.secs.append((end[0] - self._start[0]) / steps)
            self.cores.append((end[1] - self._start[1]) / (end[0] - self._start[0]))
            if self.wait is not None:
                self.waits.append(sum(self.wait.seconds[self._waited :]) / steps)
        if self.done == self.bounds[-1] and isinstance(outputs, dict) and "loss" in outputs:
            self.last_loss = float(outputs["loss"])
        for c in self.contenders:
            n = c.warmup if i == 0 else c.per_chunk or self.done - self.bounds[i - 1]
            c.run(n, self.device, timed=i > 0)
        if self.wait is not None:
            self._waited = len(self.wait.seconds)  # Lightning fetches one batch ahead: waits of this chunk's steps
        self._start = clock()


# -- the measurements -----------------------------------------------------------------------------------------------
def bench_lightning(cfg: DictConfig, bounds: list[int], device: torch.device,
                    contenders: list[Contender]) -> tuple[Timings, float, list[float], list[float]]:
    """Seconds per step (and busy cores) of each chunk through `icar.run.run(cfg)` with the contenders' chunks
    run in between, the last timed step's loss, and the seconds of the two validation passes after the timed steps:
    the run's first (it also computes the baselines, once per run) and, one untimed step later, a later one. The
    progress bar is on and draws as on a terminal, into nothing. Also: per chunk, the seconds per step the loop
    waited for its batch."""
    wait = DataWait()
    timer, validation = Interleaved(bounds, contenders, device, wait), ValidationTimer()
    with contextlib.redirect_stdout(NullTerminal()), wait.watching():
        icar.run.run(cfg, callbacks=[timer, validation])
    if timer.done != bounds[-1] + 1:
        raise RuntimeError(f"Lightning ran {timer.done} training steps, expected {bounds[-1] + 1}")
    return (timer.secs, timer.cores), timer.last_loss, validation.seconds, timer.waits


class PlainLoop:
    """The same training steps as a plain torch loop: model, batches, loss, optimiser and schedule as in `run`."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        c = to_dataclass(cfg)
        with torch.random.fork_rng(devices=[]):  # the same initialisation as run()
            torch.manual_seed(c.seed)
            self.module = ICARModule(to_plain_dict(c))
        self.module.to(device).train()
        opt_cfg = self.module.configure_optimizers()
        self.optimizer, self.scheduler = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
        # iterated as Lightning's DataLoader iterates it (on CPU: the next batch drawn in a background thread)
        self.batches = iter(SequenceStream(SequenceSampler(c.data), c.data.batch_size, c.seed, 0, 0, device))
        self.last_only, self.clip = c.loss_on == LossOn.last, c.optim.grad_clip
        self.loss = torch.zeros(())

    def step(self, i: int) -> None:
        module = self.module
        s, _ = next(self.batches)
        pred, target = module.predict_sequences(s)
        err = squared_error(pred, target)
        loss = err[:, -1].mean() if self.last_only else err[:, module.t0 :].mean()
        self.optimizer.zero_grad()
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.loss = loss.detach()


def sampling_step(cfg: DictConfig, device: torch.device) -> Callable[[int], None]:
    """`SequenceStream.batch(step)` alone: the batches the training runs draw."""
    c = to_dataclass(cfg)
    stream = SequenceStream(SequenceSampler(c.data), c.data.batch_size, c.seed, 0, 0, device)

    def step(i: int) -> None:
        stream.batch(i)

    return step


def authors_model(cfg: DictConfig) -> tuple[torch.nn.Module, Any] | None:
    """The authors' model for this configuration and the slice of our sequences it reads, or None if they have none.

    Figure 7 (raw tokens, softmax positional scores): non_augmented.py's Transformer, tokens repeated to embed_size.
    Figure 5 (augmented tokens, one head, no positions): augmented.py's Transformer on e_t = (0, s_t, s_{t-1})."""
    m, data = cfg.model, cfg.data
    if m.arch != "transformer" or m.attention != "linear":
        return None
    if data.tokens == "raw" and m.positional == "softmax_positional":
        cls = authors_transformer("non_augmented")
        return cls(dim_in=data.d, embed_size=m.d_model or data.d, num_layers=m.n_layers, forward_expansion=1,
                   heads=m.n_heads, device=torch.device("cpu")), "raw"
    if data.tokens == "augmented" and m.positional == "none" and m.n_heads == 1:
        cls = authors_transformer("augmented")
        return cls(dim_in=3 * data.d, embed_size=3 * data.d, num_layers=m.n_layers, forward_expansion=1, heads=1,
                   device=torch.device("cpu")), "augmented"
    return None


def authors_step(cfg: DictConfig, device: torch.device) -> Callable[[int], None] | None:
    """One training step of the authors' model on our batches, as their training loop runs it: MSELoss, Adam."""
    with contextlib.redirect_stdout(io.StringIO()):  # their Decoder prints its number of layers
        built = authors_model(cfg)
    if built is None:
        return None
    model, tokens = built
    model.to(device).train()
    model.device = device
    model.decoder.device = device
    c = to_dataclass(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=c.optim.lr)
    criterion = torch.nn.MSELoss()
    stream = SequenceStream(SequenceSampler(c.data), c.data.batch_size, c.seed, 0, 0, device)
    d = c.data.d

    def step(i: int) -> None:
        s, _ = stream.batch(i)
        inputs, targets = s[:, :-1], s[:, 1:]
        if tokens == "augmented":  # their Figure 5 loss: the zero block of the output against s_{t+1}
            inputs = encode_tokens(inputs, Tokens.augmented)
        optimizer.zero_grad()
        out = model(inputs)
        loss = criterion(out[..., :d], targets)
        loss.backward()
        optimizer.step()

    return step


def count_flops(step: Callable[[int], None], i: int) -> int:
    with FlopCounterMode(display=False) as counter:
        step(i)
    return counter.get_total_flops()


def step_flops(cfg: DictConfig, device: torch.device) -> int:
    """FLOPs of one of our training steps (forward and backward), counted by torch's FlopCounterMode."""
    c = to_dataclass(cfg)
    module = ICARModule(to_plain_dict(c)).to(device)
    s, _ = SequenceStream(SequenceSampler(c.data), c.data.batch_size, c.seed, 0, 0, device).batch(0)
    with FlopCounterMode(display=False) as counter:
        pred, target = module.predict_sequences(s)
        squared_error(pred, target).mean().backward()
    return counter.get_total_flops()


def gemm_rate(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square float32 GEMM on this device: the yardstick for 'how close to the limit'."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def copy_rate(device: torch.device, n: int = 64 << 20, repeats: int = 5) -> float:
    """Bytes/s read + written by a large float32 copy on this device: the yardstick for memory-bound steps."""
    a, b = torch.randn(n, device=device), torch.empty(n, device=device)
    for _ in range(2):
        b.copy_(a)
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        b.copy_(a)
    _sync(device)
    return 2 * 4 * n * repeats / (time.perf_counter() - t)


class ByteCounter(TorchDispatchMode):
    """Sums the bytes of every tensor read and written by each aten operator (views and other aliases skipped):
    the memory traffic of a step whose intermediates all went to memory, i.e. with no fusion and no cache reuse."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes, self.ops = 0, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        aliases = [r.alias_info for r in func._schema.returns if r.alias_info is not None]
        if not aliases or any(a.is_write for a in aliases):  # a view moves nothing; an in-place op does
            tensors = [x for x in tree_flatten((args, kwargs, out))[0] if isinstance(x, torch.Tensor)]
            self.bytes += sum(x.numel() * x.element_size() for x in tensors)
            self.ops += 1
        return out


GEMM_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm"}


def step_limits(cfg: DictConfig, device: torch.device, passes: int = 3) -> dict[str, float | None]:
    """Bytes moved by one forward + backward step (ByteCounter), its operator count, and on CPU the seconds per step
    spent inside matrix products (torch.profiler self time over `passes` steps after one warm-up)."""
    c = to_dataclass(cfg)
    module = ICARModule(to_plain_dict(c)).to(device)
    s, _ = SequenceStream(SequenceSampler(c.data), c.data.batch_size, c.seed, 0, 0, device).batch(0)

    def step() -> None:
        pred, target = module.predict_sequences(s)
        squared_error(pred, target)[:, module.t0 :].mean().backward()

    step()
    with ByteCounter() as counter:
        step()
    gemm_s = None
    if device.type == "cpu":
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(passes):
                step()
        gemm_s = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS) / 1e6 / passes
    return {"bytes": counter.bytes, "ops": counter.ops, "gemm_s": gemm_s}


# -- driver ---------------------------------------------------------------------------------------------------------
def compose_config(name: str, run_dir: Path, device: torch.device, max_steps: int,
                   overrides: list[str]) -> tuple[DictConfig, int, int]:
    """The run's config for `max_steps` timed steps, validated after the last of them and after one more step, and
    the config's own val_check_interval and max_steps (to amortise validation over a real run)."""
    base = [
        "logger=none",
        f"run_dir={run_dir}",
        "trainer.enable_progress_bar=true",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        "trainer.strategy=auto",
    ]
    experiment, *extra = name.split(":")
    if experiment != "default":
        base.append(f"experiment={experiment}")
    base.extend(extra)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*base, *overrides])
        # After the user's overrides: no validation inside the timed steps (Lightning's sanity check and the two
        # passes after them are outside); the configured schedule is kept to amortise validation.
        interval, steps = int(cfg.trainer.val_check_interval), int(cfg.trainer.max_steps)
        cfg.trainer.max_steps = max_steps + 1
        cfg.trainer.val_check_interval = max_steps
    validate(to_dataclass(cfg))
    return cfg, interval, steps


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def bench_config(name: str, args: argparse.Namespace, device: torch.device, tmp: Path,
                 gemm: float, bandwidth: float) -> dict[str, Any]:
    warmup, steps = DEFAULT_STEPS.get(name.split(":")[0], FALLBACK_STEPS)
    warmup = args.warmup if args.warmup is not None else warmup
    steps = args.steps if args.steps is not None else steps
    bounds = chunk_bounds(warmup, steps, args.repeats)
    cfg, val_interval, run_steps = compose_config(name, tmp / name.replace(":", "_").replace("=", "_"), device, bounds[-1],
                                       args.override)
    batch = int(cfg.data.batch_size)
    model = to_dataclass(cfg).model  # TransformerConfig or DiagonalConfig
    print(f"\n== {name}: batch {batch}, d={cfg.data.d}, T={cfg.data.T}, tokens={cfg.data.tokens}, "
          f"heads={model.n_heads}x{getattr(model, 'head_dim', 0) or getattr(model, 'd_model', 0) or 'auto'}, "
          f"layers={n_layers(model)}, {model.attention}/{getattr(model, 'positional', 'P')}; "
          f"{warmup} warm-up + {steps} timed steps in {len(bounds) - 1} chunks", flush=True)

    load_before = os.getloadavg()[0]
    plain = PlainLoop(cfg, device)
    contenders = [Contender("plain", plain.step, warmup), Contender("sampling", sampling_step(cfg, device), warmup)]
    authors = None if args.no_authors else authors_step(cfg, device)
    if authors is not None:
        a_warmup, a_chunk = AUTHORS_STEPS.get(name.split(":")[0], (warmup, None))
        contenders.append(Contender("authors", authors, a_warmup, a_chunk))
    t = time.perf_counter()
    (light, light_cores), light_loss, val_passes, waits = bench_lightning(cfg, bounds, device, contenders)
    light_wall = time.perf_counter() - t
    gc.collect()
    timed = {c.name: c for c in contenders}
    plain_c, sample_c = timed["plain"], timed["sampling"]
    plain_loss = float(plain.loss)
    plain_cores, sample_cores = plain_c.cores, sample_c.cores
    plain_times, sample = plain_c.secs, sample_c.secs
    authors_c = timed.get("authors")
    flops = step_flops(cfg, device)
    authors_flops = count_flops(authors, authors_c.done) if authors_c is not None else None
    limits = step_limits(cfg, device)
    load_after = os.getloadavg()[0]

    light_s, plain_s, sample_s = median(light), median(plain_times), median(sample)
    # validation per step over the config's own run: the first pass (with the baselines), then the later ones
    if len(val_passes) < 2:
        raise RuntimeError(f"expected 2 validation passes after the timed steps, saw {len(val_passes)}")
    first_val, later_val = val_passes[:2]
    n_val = max(1, -(-run_steps // val_interval))  # every val_check_interval steps and after the last
    val_s = (first_val + (n_val - 1) * later_val) / run_steps
    row = {
        "config": name,
        "device": device.type,
        "batch": batch,
        "warmup": warmup,
        "steps": steps,
        "chunks": len(bounds) - 1,
        "overrides": list(args.override),
        "order": "interleaved: " + ", ".join(["lightning", *(c.name for c in contenders)]),
        "lightning_s_per_step": light,
        "plain_s_per_step": plain_times,
        "sampling_s_per_batch": sample,
        "lightning_busy_cores": light_cores,
        "plain_busy_cores": plain_cores,
        "sampling_busy_cores": sample_cores,
        "lightning_seq_per_s": batch / light_s,
        "plain_seq_per_s": batch / plain_s,
        "lightning_seq_per_s_best_chunk": batch / min(light),
        "plain_seq_per_s_best_chunk": batch / min(plain_times),
        "lightning_overhead_ratio": light_s / plain_s,
        "validation_first_s": first_val,
        "validation_later_s": later_val,
        "val_check_interval": val_interval,
        "run_max_steps": run_steps,
        "validation_s_per_step": val_s,
        "lightning_overhead_ratio_with_validation": (light_s + val_s) / plain_s,
        "data_wait_s_per_step": waits,
        "sampling_share": median(waits) / light_s,
        "sampling_cost_share": sample_s / light_s,
        "authors_s_per_step": authors_c.secs if authors_c else None,
        "authors_seq_per_s": batch / median(authors_c.secs) if authors_c else None,
        "speedup_vs_authors": median(authors_c.secs) / light_s if authors_c else None,
        "flops_per_step": flops,
        "authors_flops_per_step": authors_flops,
        "achieved_flop_per_s_plain": flops / plain_s,
        "gemm_flop_per_s": gemm,
        "fraction_of_gemm_rate": flops / plain_s / gemm,
        "bytes_per_step_unfused": limits["bytes"],
        "operators_per_step": limits["ops"],
        "copy_bytes_per_s": bandwidth,
        "fraction_of_copy_rate": limits["bytes"] / plain_s / bandwidth,
        "gemm_s_per_step": limits["gemm_s"],
        "final_loss_lightning": light_loss,
        "final_loss_plain": plain_loss,
        "wall_s_lightning_run": light_wall,
        "loadavg_1min_before_after": [load_before, load_after],
    }

    def fmt(xs: list[float], cores: list[float]) -> str:
        return ", ".join(f"{batch / x:,.0f}" for x in xs) + "   [busy cores " + \
            ", ".join(f"{c:.2f}" for c in cores) + "]"

    print(f"   Lightning  seq/s per chunk: {fmt(light, light_cores)}   {light_s * 1e3:.2f} ms/step median; "
          f"whole run() {light_wall:.1f} s")
    print(f"   plain loop seq/s per chunk: {fmt(plain_times, plain_cores)}   {plain_s * 1e3:.2f} ms/step median "
          f"(its chunks interleaved with Lightning's)")
    print(f"   validation {first_val * 1e3:.0f} ms the first pass (with the baselines), {later_val * 1e3:.0f} ms a later "
          f"one; every {val_interval} of {run_steps} steps: {val_s * 1e3:.2f} ms per step "
          f"({100 * val_s / light_s:.1f}%); overhead with it {(light_s + val_s) / plain_s:.2f}")
    print(f"   sampling   ms per batch:    {', '.join(f'{x * 1e3:.2f}' for x in sample)}   [busy cores "
          f"{', '.join(f'{c:.2f}' for c in sample_cores)}]   (SequenceStream.batch alone)")
    print(f"   data wait  ms per step:     {', '.join(f'{x * 1e3:.2f}' for x in waits)}   = "
          f"{100 * median(waits) / light_s:.1f}% of the Lightning step (the next batch is drawn during the step)")
    if authors_c:
        print(f"   authors'   seq/s per chunk: {fmt(authors_c.secs, authors_c.cores)}   "
              f"{median(authors_c.secs) * 1e3:.1f} ms/step median; {authors_flops / 1e9:.2f} GFLOP/step")
    print(f"   our step:  {flops / 1e9:.3f} GFLOP (forward + backward), {flops / plain_s / 1e9:.1f} GFLOP/s in the plain "
          f"loop = {100 * flops / plain_s / gemm:.0f}% of the {gemm / 1e9:.0f} GFLOP/s large-GEMM rate")
    floor = limits["bytes"] / bandwidth
    print(f"   limits:    {limits['bytes'] / 1e6:,.0f} MB read + written per step by {limits['ops']} operators if nothing "
          f"stayed in cache = {floor * 1e3:.1f} ms at the {bandwidth / 1e9:.0f} GB/s copy rate "
          f"({100 * floor / plain_s:.0f}% of the plain step)")
    if limits["gemm_s"] is not None:
        gemm_s = limits["gemm_s"]
        print(f"              matrix products: {gemm_s * 1e3:.1f} ms of the {plain_s * 1e3:.1f} ms step "
              f"({100 * gemm_s / plain_s:.0f}%), {flops / gemm_s / 1e9:.0f} GFLOP/s on this step's shapes "
              f"(profiled; the profiler slows small operators a little)")
    if authors_c and median(authors_c.secs) / light_s < 3:
        print(f"              3x the authors' step would be {median(authors_c.secs) / 3 * 1e3:.1f} ms")
    print(f"   last-step loss: Lightning {light_loss:.6g}, plain {plain_loss:.6g} (same init, data and optimiser)")
    if device.type == "cpu" and max(load_before, load_after) > torch.get_num_threads() + 0.5:
        print(f"   WARNING: 1-min load average {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} cores: other "
              "processes were competing for the CPU, so these CPU figures understate the code's speed")
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["config", "device", "batch", "seq/s Lightning", "seq/s plain", "seq/s authors", "speed-up vs authors",
            "Lightning overhead", "with validation", "data wait", "sampling cost", "GFLOP/step", "GFLOP/s (plain)", "of GEMM rate", "MB/step unfused", "of copy rate"]
    body = []
    for r in rows:
        authors = r["authors_seq_per_s"]
        body.append([r["config"], r["device"], str(r["batch"]), f"{r['lightning_seq_per_s']:,.0f}",
                     f"{r['plain_seq_per_s']:,.0f}", f"{authors:,.0f}" if authors else "n/a",
                     f"{r['speedup_vs_authors']:.1f}x" if authors else "n/a",
                     f"{r['lightning_overhead_ratio']:.2f}", f"{r['lightning_overhead_ratio_with_validation']:.2f}",
                     f"{100 * r['sampling_share']:.1f}%", f"{100 * r['sampling_cost_share']:.1f}%",
                     f"{r['flops_per_step'] / 1e9:.3f}", f"{r['achieved_flop_per_s_plain'] / 1e9:.1f}",
                     f"{100 * r['fraction_of_gemm_rate']:.0f}%", f"{r['bytes_per_step_unfused'] / 1e6:,.0f}",
                     f"{100 * r['fraction_of_copy_rate']:.0f}%"])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = " | ".join(h.ljust(w) for h, w in zip(head, widths))
    print("\n" + line)
    print("-+-".join("-" * w for w in widths))
    for b in body:
        print(" | ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(b, widths))))
    print("(medians over the timed chunks, all measured in this process; speed-up = the authors' time per step / "
          "icar's through Lightning; overhead = Lightning time per step / plain-loop time per step; data wait = "
          "time the Lightning loop waited for its batch / its step time; sampling cost = SequenceStream.batch alone / "
          "the Lightning step; GFLOP counted by torch.utils.flop_counter; MB/step: bytes "
          "read + written by the step's operators, none fused; of copy rate: those bytes per plain step / the copy rate)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=CONFIGS,
                   help="comma-separated: 'default' or names of conf/experiment/*.yaml, each optionally followed by"
                        " :key=value overrides (e.g. augmented_depth:model.n_layers=4)")
    p.add_argument("--no-authors", action="store_true", help="skip timing the authors' models")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed steps per measurement (default per config, as (warmup, steps): {DEFAULT_STEPS})")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before timing (default per config)")
    p.add_argument("--repeats", type=int, default=3, help="chunks the timed steps are split into (median reported)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override applied to every config (repeatable), e.g. data.batch_size=4096")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    if args.warmup is not None and args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step allocates and is never representative)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*Checkpoint directory.*exists and is not empty.*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    register_configs()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # what run() sets: the plain loop gets the same TF32 matmuls
        where = torch.cuda.get_device_name(device)
    else:
        where = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, lightning {pl.__version__}; device {device.type} ({where}); "
          f"torch.get_num_threads() = {torch.get_num_threads()}, os.cpu_count() = {os.cpu_count()}")

    gemm, bandwidth = gemm_rate(device), copy_rate(device)
    print(f"large-GEMM rate (2048^2 float32): {gemm / 1e9:.0f} GFLOP/s; copy rate (256 MB float32): "
          f"{bandwidth / 1e9:.0f} GB/s read + written")
    rows = []
    with tempfile.TemporaryDirectory(prefix="icar-bench-") as tmp:
        for name in [n.strip() for n in args.configs.split(",") if n.strip()]:
            rows.append(bench_config(name, args, device, Path(tmp), gemm, bandwidth))
            gc.collect()
    total = time.perf_counter() - start
    print_table(rows)
    print(f"total benchmark time: {total:.1f} s")
    if args.json:
        out = {
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "device": device.type,
            "device_name": where,
            "num_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "total_s": total,
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
