"""Training-throughput benchmark: prints figures (it is not a test).

For each configuration it measures, in one process and on one device:
  1. sequences/s through the real Lightning path: `icar.train.run(cfg)` itself (ICARModule, ARDataModule, the
     callbacks and the JSONL logger it builds), with a timing callback passed to it;
  2. the share of a training step spent drawing its batch: `SequenceStream.batch(step)` alone, same batch size,
     same device, divided by the Lightning step time;
  3. a plain torch loop over the same model, data, loss, optimiser and scheduler (ICARModule used without a
     Trainer: `predict_sequences`, `squared_error`, `configure_optimizers`), and Lightning's overhead as
     (Lightning time per step) / (plain-loop time per step);
  4. the authors' own model class for the configuration (scripts/authors_models.py: Figure 5's augmented.py,
     Figure 7's non_augmented.py), same batch, same sequences, their nn.MSELoss and Adam, in the same process,
     and the speed-up of icar's Lightning path over it;
  5. the FLOPs of one training step (torch.utils.flop_counter, forward + backward) and the rate achieved, against a
     large-GEMM rate measured at the start on the same device.

Timing: `warmup` untimed steps, then `steps` timed steps split into `repeats` consecutive chunks; a chunk's time
runs from the end of the step before it to the end of its last step (so it contains the data fetch of each of its
steps), with a CUDA synchronisation at the chunk boundaries only. Start-up, the sanity validation and
checkpointing are outside every chunk. Figures are medians over the chunks; the per-chunk values are printed so
that the noise is visible.

    .venv/bin/python scripts/bench_train.py
    .venv/bin/python scripts/bench_train.py --configs orthogonal_multihead --steps 10 --warmup 5 --device cpu
    .venv/bin/python scripts/bench_train.py --configs augmented_depth:model.n_layers=4,augmented_depth:model.kernel=explicit
    .venv/bin/python scripts/bench_train.py --override data.batch_size=4096 --json bench_results/bench.json
"""

from __future__ import annotations

import argparse
import gc
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import icar.train  # noqa: E402
from icar.config import LossOn, Tokens, register_configs, to_dataclass, to_plain_dict, validate  # noqa: E402
from icar.data.tokens import encode_tokens  # noqa: E402
from icar.data.datamodule import SequenceStream  # noqa: E402
from icar.data.sequences import SequenceSampler  # noqa: E402
from icar.train import ICARModule  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from authors_models import authors_transformer  # noqa: E402

CONF_DIR = REPO / "conf"
CONFIGS = ",".join(["default", *(f"augmented_depth:model.n_layers={L}" for L in (1, 2, 4, 8)), "orthogonal_multihead"])
# Per-configuration (warmup, steps) used when --warmup / --steps are not given.
DEFAULT_STEPS = {"default": (20, 150), "orthogonal_multihead": (5, 15)}
FALLBACK_STEPS = (5, 30)
AUTHORS_STEPS = (1, 3)  # (warmup, steps) of the authors' model: 10 s a step at Figure 7 on 2 cores


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


def per_step(stamps: dict[int, tuple[float, float]], bounds: list[int]) -> Timings:
    """Wall seconds per step of each chunk between consecutive bounds, and the cores this process kept busy then
    (its CPU time / wall time): well under torch.get_num_threads() on a compute-bound CPU run means that other
    processes took cores from the benchmark."""
    secs, cores = [], []
    for a, b in zip(bounds, bounds[1:]):
        wall, cpu = stamps[b][0] - stamps[a][0], stamps[b][1] - stamps[a][1]
        secs.append(wall / (b - a))
        cores.append(cpu / wall)
    return secs, cores


class StepTimer(pl.Callback):
    """Reads the clock at the end of the training steps named in `bounds` (synchronising CUDA there only)."""

    def __init__(self, bounds: list[int], device: torch.device) -> None:
        self.bounds, self.device = set(bounds), device
        self.done = 0
        self.stamps: dict[int, tuple[float, float]] = {}
        self.last_loss = float("nan")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.done += 1
        if self.done in self.bounds:
            _sync(self.device)
            self.stamps[self.done] = clock()
        if self.done == max(self.bounds) and isinstance(outputs, dict) and "loss" in outputs:
            self.last_loss = float(outputs["loss"])  # after the clock reading: the sync is not timed


# -- the three measurements -----------------------------------------------------------------------------------------
def bench_lightning(cfg: DictConfig, bounds: list[int], device: torch.device) -> tuple[Timings, float]:
    """Seconds per step (and busy cores) of each chunk through `icar.train.run(cfg)`, and the last step's loss."""
    timer = StepTimer(bounds, device)
    icar.train.run(cfg, callbacks=[timer])
    if timer.done != bounds[-1]:
        raise RuntimeError(f"Lightning ran {timer.done} training steps, expected {bounds[-1]}")
    return per_step(timer.stamps, bounds), timer.last_loss


def bench_plain(cfg: DictConfig, bounds: list[int], device: torch.device) -> tuple[Timings, float]:
    """The same training steps as a plain torch loop: model, batches, loss, optimiser and schedule as in `run`."""
    c = to_dataclass(cfg)
    with torch.random.fork_rng(devices=[]):  # the same initialisation as run()
        torch.manual_seed(c.seed)
        module = ICARModule(to_plain_dict(c))
    module.to(device).train()
    opt_cfg = module.configure_optimizers()
    optimizer, scheduler = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    stream = SequenceStream(SequenceSampler(c.data), c.data.batch_size, c.seed, 0, 0, device)
    last_only, t0, clip = c.loss_on == LossOn.last, module.t0, c.optim.grad_clip
    stamps: dict[int, tuple[float, float]] = {}
    loss = torch.zeros(())
    for step in range(bounds[-1]):
        s, _ = stream.batch(step)
        pred, target = module.predict_sequences(s)
        err = module.squared_error(pred, target)
        loss = err[:, -1].mean() if last_only else err[:, t0:].mean()
        optimizer.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        optimizer.step()
        scheduler.step()
        if step + 1 in bounds:
            _sync(device)
            stamps[step + 1] = clock()
    return per_step(stamps, bounds), float(loss.detach())


def bench_sampling(cfg: DictConfig, bounds: list[int], device: torch.device) -> Timings:
    """Seconds per batch of `SequenceStream.batch(step)` alone, for the steps the training runs drew."""
    c = to_dataclass(cfg)
    stream = SequenceStream(SequenceSampler(c.data), c.data.batch_size, c.seed, 0, 0, device)
    stamps: dict[int, tuple[float, float]] = {}
    for step in range(bounds[-1]):
        stream.batch(step)
        if step + 1 in bounds:
            _sync(device)
            stamps[step + 1] = clock()
    return per_step(stamps, bounds)


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


def bench_authors(cfg: DictConfig, bounds: list[int], device: torch.device) -> tuple[Timings, Any] | None:
    """Seconds per step of the authors' model on our batches, as their training loop runs it: MSELoss, Adam."""
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

    stamps: dict[int, tuple[float, float]] = {}
    for i in range(bounds[-1]):
        step(i)
        if i + 1 in bounds:
            _sync(device)
            stamps[i + 1] = clock()
    with FlopCounterMode(display=False) as counter:
        step(bounds[-1])
    return per_step(stamps, bounds), counter.get_total_flops()


def step_flops(cfg: DictConfig, device: torch.device) -> int:
    """FLOPs of one of our training steps (forward and backward), counted by torch's FlopCounterMode."""
    c = to_dataclass(cfg)
    module = ICARModule(to_plain_dict(c)).to(device)
    s, _ = SequenceStream(SequenceSampler(c.data), c.data.batch_size, c.seed, 0, 0, device).batch(0)
    with FlopCounterMode(display=False) as counter:
        pred, target = module.predict_sequences(s)
        module.squared_error(pred, target).mean().backward()
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


# -- driver ---------------------------------------------------------------------------------------------------------
def compose_config(name: str, run_dir: Path, device: torch.device, max_steps: int, overrides: list[str]) -> DictConfig:
    base = [
        "logger=none",
        f"run_dir={run_dir}",
        "trainer.enable_progress_bar=false",
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
        # After the user's overrides: no validation inside the run (only Lightning's sanity check, untimed).
        cfg.trainer.max_steps = max_steps
        cfg.trainer.val_check_interval = max_steps + 1
    validate(to_dataclass(cfg))
    return cfg


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def bench_config(name: str, args: argparse.Namespace, device: torch.device, tmp: Path,
                 gemm: float) -> dict[str, Any]:
    warmup, steps = DEFAULT_STEPS.get(name.split(":")[0], FALLBACK_STEPS)
    warmup = args.warmup if args.warmup is not None else warmup
    steps = args.steps if args.steps is not None else steps
    bounds = chunk_bounds(warmup, steps, args.repeats)
    cfg = compose_config(name, tmp / name.replace(":", "_").replace("=", "_"), device, bounds[-1], args.override)
    batch = int(cfg.data.batch_size)
    print(f"\n== {name}: batch {batch}, d={cfg.data.d}, T={cfg.data.T}, tokens={cfg.data.tokens}, "
          f"heads={cfg.model.n_heads}x{cfg.model.head_dim or cfg.model.d_model or 'auto'}, "
          f"layers={cfg.model.n_layers}, {cfg.model.attention}/{cfg.model.positional}; "
          f"{warmup} warm-up + {steps} timed steps in {len(bounds) - 1} chunks", flush=True)

    load_before = os.getloadavg()[0]
    results: dict[str, Any] = {}
    for which in (["plain", "lightning"] if args.plain_first else ["lightning", "plain"]):
        t = time.perf_counter()
        results[which] = (bench_plain if which == "plain" else bench_lightning)(cfg, bounds, device)
        results[which + "_wall"] = time.perf_counter() - t
        gc.collect()
    (light, light_cores), light_loss = results["lightning"]
    (plain, plain_cores), plain_loss = results["plain"]
    light_wall, plain_wall = results["lightning_wall"], results["plain_wall"]
    sample, sample_cores = bench_sampling(cfg, bounds, device)
    authors = None if args.no_authors else bench_authors(cfg, chunk_bounds(*AUTHORS_STEPS, args.repeats), device)
    flops = step_flops(cfg, device)
    load_after = os.getloadavg()[0]

    light_s, plain_s, sample_s = median(light), median(plain), median(sample)
    row = {
        "config": name,
        "device": device.type,
        "batch": batch,
        "warmup": warmup,
        "steps": steps,
        "chunks": len(bounds) - 1,
        "overrides": list(args.override),
        "order": "plain,lightning" if args.plain_first else "lightning,plain",
        "lightning_s_per_step": light,
        "plain_s_per_step": plain,
        "sampling_s_per_batch": sample,
        "lightning_busy_cores": light_cores,
        "plain_busy_cores": plain_cores,
        "sampling_busy_cores": sample_cores,
        "lightning_seq_per_s": batch / light_s,
        "plain_seq_per_s": batch / plain_s,
        "lightning_seq_per_s_best_chunk": batch / min(light),
        "plain_seq_per_s_best_chunk": batch / min(plain),
        "lightning_overhead_ratio": light_s / plain_s,
        "sampling_share": sample_s / light_s,
        "sampling_share_plain": sample_s / plain_s,
        "authors_s_per_step": authors[0][0] if authors else None,
        "authors_seq_per_s": batch / median(authors[0][0]) if authors else None,
        "speedup_vs_authors": median(authors[0][0]) / light_s if authors else None,
        "flops_per_step": flops,
        "authors_flops_per_step": authors[1] if authors else None,
        "achieved_flop_per_s_plain": flops / plain_s,
        "gemm_flop_per_s": gemm,
        "fraction_of_gemm_rate": flops / plain_s / gemm,
        "final_loss_lightning": light_loss,
        "final_loss_plain": plain_loss,
        "wall_s_lightning_run": light_wall,
        "wall_s_plain_loop": plain_wall,
        "loadavg_1min_before_after": [load_before, load_after],
    }

    def fmt(xs: list[float], cores: list[float]) -> str:
        return ", ".join(f"{batch / x:,.0f}" for x in xs) + "   [busy cores " + \
            ", ".join(f"{c:.2f}" for c in cores) + "]"

    print(f"   Lightning  seq/s per chunk: {fmt(light, light_cores)}   {light_s * 1e3:.2f} ms/step median; "
          f"whole run() {light_wall:.1f} s")
    print(f"   plain loop seq/s per chunk: {fmt(plain, plain_cores)}   {plain_s * 1e3:.2f} ms/step median; "
          f"whole loop {plain_wall:.1f} s")
    print(f"   sampling   ms per batch:    {', '.join(f'{x * 1e3:.2f}' for x in sample)}   [busy cores "
          f"{', '.join(f'{c:.2f}' for c in sample_cores)}]")
    if authors:
        print(f"   authors'   seq/s per chunk: {fmt(*authors[0])}   {median(authors[0][0]) * 1e3:.1f} ms/step median; "
              f"{authors[1] / 1e9:.2f} GFLOP/step")
    print(f"   our step:  {flops / 1e9:.3f} GFLOP (forward + backward), {flops / plain_s / 1e9:.1f} GFLOP/s in the plain "
          f"loop = {100 * flops / plain_s / gemm:.0f}% of the {gemm / 1e9:.0f} GFLOP/s large-GEMM rate")
    print(f"   last-step loss: Lightning {light_loss:.6g}, plain {plain_loss:.6g} (same init, data and optimiser)")
    if device.type == "cpu" and max(load_before, load_after) > torch.get_num_threads() + 0.5:
        print(f"   WARNING: 1-min load average {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} cores: other "
              "processes were competing for the CPU, so these CPU figures understate the code's speed")
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["config", "device", "batch", "seq/s Lightning", "seq/s plain", "seq/s authors", "speed-up vs authors",
            "Lightning overhead", "sampling share", "GFLOP/step", "GFLOP/s (plain)", "of GEMM rate"]
    body = []
    for r in rows:
        authors = r["authors_seq_per_s"]
        body.append([r["config"], r["device"], str(r["batch"]), f"{r['lightning_seq_per_s']:,.0f}",
                     f"{r['plain_seq_per_s']:,.0f}", f"{authors:,.0f}" if authors else "n/a",
                     f"{r['speedup_vs_authors']:.1f}x" if authors else "n/a",
                     f"{r['lightning_overhead_ratio']:.2f}", f"{100 * r['sampling_share']:.1f}%",
                     f"{r['flops_per_step'] / 1e9:.3f}", f"{r['achieved_flop_per_s_plain'] / 1e9:.1f}",
                     f"{100 * r['fraction_of_gemm_rate']:.0f}%"])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = " | ".join(h.ljust(w) for h, w in zip(head, widths))
    print("\n" + line)
    print("-+-".join("-" * w for w in widths))
    for b in body:
        print(" | ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(b, widths))))
    print("(medians over the timed chunks, all measured in this process; speed-up = the authors' time per step / "
          "icar's through Lightning; overhead = Lightning time per step / plain-loop time per step; sampling share = "
          "SequenceStream.batch time / Lightning step time; GFLOP counted by torch.utils.flop_counter)")


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
    p.add_argument("--plain-first", action="store_true",
                   help="time the plain loop before the Lightning run (default: after), to see order effects")
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

    gemm = gemm_rate(device)
    print(f"large-GEMM rate (2048^2 float32): {gemm / 1e9:.0f} GFLOP/s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="icar-bench-") as tmp:
        for name in [n.strip() for n in args.configs.split(",") if n.strip()]:
            rows.append(bench_config(name, args, device, Path(tmp), gemm))
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
