"""Training-throughput benchmark: prints figures (it is not a test).

For each configuration it measures, in one process and on one device:
  1. sequences/s through the real Lightning path: `icar.train.run(cfg)` itself (ICARModule, ARDataModule, the
     callbacks and the JSONL logger it builds), with a timing callback passed to it;
  2. the share of a training step spent drawing its batch: `SequenceStream.batch(step)` alone, same batch size,
     same device, divided by the Lightning step time;
  3. a plain torch loop over the same model, data, loss, optimiser and scheduler (ICARModule used without a
     Trainer: `predict_sequences`, `squared_error`, `configure_optimizers`), and Lightning's overhead as
     (Lightning time per step) / (plain-loop time per step).

Timing: `warmup` untimed steps, then `steps` timed steps split into `repeats` consecutive chunks; a chunk's time
runs from the end of the step before it to the end of its last step (so it contains the data fetch of each of its
steps), with a CUDA synchronisation at the chunk boundaries only. Start-up, the sanity validation and
checkpointing are outside every chunk. Figures are medians over the chunks; the per-chunk values are printed so
that the noise is visible.

    .venv/bin/python scripts/bench_train.py
    .venv/bin/python scripts/bench_train.py --configs orthogonal_multihead --steps 10 --warmup 5 --device cpu
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
from icar.config import LossOn, register_configs, to_dataclass, to_plain_dict, validate  # noqa: E402
from icar.data.datamodule import SequenceStream  # noqa: E402
from icar.data.sequences import SequenceSampler  # noqa: E402
from icar.train import ICARModule  # noqa: E402

CONF_DIR = REPO / "conf"
AUTHORS_SEQ_PER_S = 67.0  # the authors' implementation on orthogonal_multihead, 2 CPU cores (15 s / 1024 sequences)
FLOOR_SPEEDUP = 10.0
# Per-configuration (warmup, steps) used when --warmup / --steps are not given: about 4 minutes in all on 2 cores.
DEFAULT_STEPS = {"default": (20, 150), "orthogonal_multihead": (5, 10)}
FALLBACK_STEPS = (5, 30)


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
    if name != "default":
        base.append(f"experiment={name}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*base, *overrides])
        # After the user's overrides: no validation inside the run (only Lightning's sanity check, untimed).
        cfg.trainer.max_steps = max_steps
        cfg.trainer.val_check_interval = max_steps + 1
    validate(to_dataclass(cfg))
    return cfg


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def bench_config(name: str, args: argparse.Namespace, device: torch.device, tmp: Path) -> dict[str, Any]:
    warmup, steps = DEFAULT_STEPS.get(name, FALLBACK_STEPS)
    warmup = args.warmup if args.warmup is not None else warmup
    steps = args.steps if args.steps is not None else steps
    bounds = chunk_bounds(warmup, steps, args.repeats)
    cfg = compose_config(name, tmp / name, device, bounds[-1], args.override)
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
        "speedup_vs_authors": batch / light_s / AUTHORS_SEQ_PER_S,
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
    print(f"   last-step loss: Lightning {light_loss:.6g}, plain {plain_loss:.6g} (same init, data and optimiser)")
    if device.type == "cpu" and max(load_before, load_after) > torch.get_num_threads() + 0.5:
        print(f"   WARNING: 1-min load average {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} cores: other "
              "processes were competing for the CPU, so these CPU figures understate the code's speed")
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["config", "device", "batch", "seq/s (Lightning)", "seq/s (plain torch)", "Lightning overhead ratio",
            "data sampling share", "speed-up vs authors' 67 seq/s"]
    body = []
    for r in rows:
        meaningful = r["config"] == "orthogonal_multihead" and r["device"] == "cpu" and not r["overrides"]
        speed = f"{r['speedup_vs_authors']:.1f}x" + ("" if meaningful else " (n/a)")
        if meaningful:
            speed += " ok" if r["speedup_vs_authors"] >= FLOOR_SPEEDUP else f" < {FLOOR_SPEEDUP:.0f}x floor"
        body.append([r["config"], r["device"], str(r["batch"]), f"{r['lightning_seq_per_s']:,.0f}",
                     f"{r['plain_seq_per_s']:,.0f}", f"{r['lightning_overhead_ratio']:.2f}",
                     f"{100 * r['sampling_share']:.1f}%", speed])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = " | ".join(h.ljust(w) for h, w in zip(head, widths))
    print("\n" + line)
    print("-+-".join("-" * w for w in widths))
    for b in body:
        print(" | ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(b, widths))))
    print("(medians over the timed chunks; overhead = Lightning time per step / plain-loop time per step; sampling"
          " share = SequenceStream.batch time / Lightning step time; the speed-up vs the authors' 67 seq/s is only"
          " meaningful for orthogonal_multihead on cpu without overrides, marked n/a elsewhere)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="default,orthogonal_multihead",
                   help="comma-separated: 'default' and/or names of conf/experiment/*.yaml")
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

    rows = []
    with tempfile.TemporaryDirectory(prefix="icar-bench-") as tmp:
        for name in [n.strip() for n in args.configs.split(",") if n.strip()]:
            rows.append(bench_config(name, args, device, Path(tmp)))
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
            "authors_seq_per_s": AUTHORS_SEQ_PER_S,
            "total_s": total,
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
