"""Figure 4 (docs/PAPER_NOTES.md §4.8): how often windows of T real token embeddings are fitted exactly by an AR(1) map,
against the same tokens shuffled across windows, in float64 (the measurement) and, as a check, in the authors'
float32 arithmetic. `run_fig4(cfg)` writes config.yaml, ar_fit_hist.png/.pdf,
summary.json and figure.json into the run folder, mirrors them to W&B, and returns the numbers."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from icar.analysis.ar_fit import (ar1_mse, ar1_mse_float32, conflicting_repeat, has_repeat, mse_summary,
                                  plot_mse_histogram)
from icar.claims.record import FigureRecord, command_line, machine, now
from icar.config import ConfigError, LoggerConfig, LoggerKind
from icar.data.real_tokens import (PYDOC, corpus_ids, cut_windows, embed_windows, load_corpus, load_embedding_source,
                                   shuffle_windows, subsample_windows, unit_rows)
from icar.training.loggers import wandb_mode

FIGURE_STEM = "ar_fit_hist"
PANELS = {"float64": "float64 (primary)", "float32": "float32 (authors' lstsq)"}  # figure panel titles


@dataclass
class Fig4Config:
    source: str = "wordllama"  # wordllama | hf:<model name or path>
    text: str = PYDOC  # pydoc | path of a text file
    T: int = 5
    max_windows: int = 10000  # 0: every window of the corpus
    threshold: float = 1e-12  # MSE <= threshold counts as an exact fit
    float32_check: bool = True  # also fit in float32 as the authors did (torch.linalg.lstsq, gelsy)
    seed: int = 0
    run_dir: Optional[str] = None  # None: the current directory
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def to_fig4_config(cfg: DictConfig | Fig4Config | dict[str, Any]) -> Fig4Config:
    """Merge cfg onto the schema (a misspelt key or a wrong type fails here) and check the values."""
    merged = OmegaConf.merge(OmegaConf.structured(Fig4Config), cfg)
    c: Fig4Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    checks = [
        (c.source == "wordllama" or (c.source.startswith("hf:") and len(c.source) > 3),
         f"source must be wordllama or hf:<model name or path>, got {c.source!r}"),
        (c.text == PYDOC or Path(c.text).expanduser().is_file(),
         f"text must be {PYDOC} or the path of a text file, got {c.text!r}"),
        (c.T >= 3, f"T must be >= 3 (at least two inputs to fit), got {c.T}"),
        (c.max_windows >= 0, f"max_windows must be >= 0 (0: all), got {c.max_windows}"),
        (c.threshold > 0, f"threshold must be > 0, got {c.threshold}"),
        (c.logger.kind in (LoggerKind.wandb, LoggerKind.none),
         f"logger.kind must be wandb or none for fig4, got {c.logger.kind.value}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return c


def fig4_numbers(c: Fig4Config) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The numbers of Figure 4 and the per-window MSEs {float64: {real, shuffled}, float32: {...}} (float32 only
    with c.float32_check): one seeded generator draws the window subset and then the shuffle. Keys without a
    suffix are float64; the float32 ones end in `_float32`."""
    source = load_embedding_source(c.source)
    corpus, texts = load_corpus(c.text)
    ids = corpus_ids(source, texts)  # (n,)
    windows = cut_windows(ids, c.T)  # (n // T, T)
    if windows.shape[0] == 0:
        raise ValueError(f"the corpus {corpus} has {ids.numel()} tokens, fewer than one window of T={c.T}")
    generator = torch.Generator().manual_seed(c.seed)
    sets = {"real": subsample_windows(windows, c.max_windows, generator)}
    sets["shuffled"] = shuffle_windows(sets["real"], generator)
    table = unit_rows(source.table)  # (V, D)
    mse = {"float64": {name: ar1_mse(embed_windows(w, table)) for name, w in sets.items()}}
    if c.float32_check:
        start = time.perf_counter()
        table32 = unit_rows(source.table, torch.float32)  # (V, D)
        mse["float32"] = {name: ar1_mse_float32(embed_windows(w, table32)) for name, w in sets.items()}
        float32_s = time.perf_counter() - start
    numbers: dict[str, Any] = {
        "source": source.name, "embedding_dim": table.shape[1], "vocab_size": table.shape[0], "corpus": corpus,
        "corpus_tokens": ids.numel(), "n_windows_available": windows.shape[0], "n_windows": sets["real"].shape[0],
        "T": c.T, "threshold": c.threshold, "seed": c.seed,
    }
    for name, w in sets.items():
        numbers |= {f"{k}_{name}": v for k, v in mse_summary(mse["float64"][name], c.threshold).items()}
        numbers[f"fraction_windows_with_repeat_{name}"] = float(has_repeat(w).double().mean())
        numbers[f"fraction_conflicting_repeat_{name}"] = float(conflicting_repeat(w).double().mean())
        if c.float32_check:
            m32 = mse["float32"][name]
            numbers |= {f"{k}_{name}_float32": v for k, v in mse_summary(m32, c.threshold).items()}
            # windows the float32 fit judges otherwise: round-off, or gelsy misjudging the rank (see ar1_mse_float32)
            numbers[f"n_exact_verdict_differs_{name}_float32"] = int(
                ((m32 <= c.threshold) != (mse["float64"][name] <= c.threshold)).sum())
    if c.float32_check:
        numbers["float32_check_s"] = float32_s
    return numbers, mse


def run_fig4(cfg: DictConfig | Fig4Config | dict[str, Any]) -> dict[str, Any]:
    """Compute, plot and record Figure 4 in cfg.run_dir; return the numbers."""
    start = time.perf_counter()
    c = to_fig4_config(cfg)
    run_dir = Path(c.run_dir or ".")
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(c), run_dir / "config.yaml")
    numbers, mse = fig4_numbers(c)
    title = (f"AR(1) fit of {numbers['n_windows']} windows of T={c.T} tokens: {numbers['source']} "
             f"(D={numbers['embedding_dim']}) on {numbers['corpus']}")
    panels = {PANELS[arithmetic]: sets for arithmetic, sets in mse.items()}
    paths = plot_mse_histogram(panels, c.threshold, run_dir / FIGURE_STEM, title=title)
    wall_s = time.perf_counter() - start
    numbers["wall_s"] = wall_s
    (run_dir / "summary.json").write_text(json.dumps(numbers, indent=2, sort_keys=True) + "\n")
    scale = "all windows" if c.max_windows == 0 else "cpu"  # make fig4 SCALE=paper fits every window
    FigureRecord(figure="fig4", numbers=numbers, figures=[str(p) for p in paths], wall_s=wall_s, machine=machine(),
                 command=command_line(), scale=scale, finished=now()).save(run_dir)
    _mirror_to_wandb(c, run_dir, numbers, paths)
    return numbers


def _mirror_to_wandb(c: Fig4Config, run_dir: Path, numbers: dict[str, Any], paths: list[Path]) -> None:
    """The histogram and the numbers (as `fig4/<name>` summary values) in one W&B run; offline without a key."""
    mode = wandb_mode(c.logger)
    if c.logger.kind != LoggerKind.wandb or mode == "disabled":
        return
    import wandb  # imported only where a W&B run is made (seconds)

    run = wandb.init(project=c.logger.project, entity=c.logger.entity, group=c.logger.group,
                     tags=list(c.logger.tags), job_type="fig4", dir=str(run_dir),
                     config=OmegaConf.to_container(OmegaConf.structured(c), resolve=True),
                     settings=wandb.Settings(mode=mode, silent=True))
    png = next(p for p in paths if p.suffix == ".png")
    run.log({f"fig4/{FIGURE_STEM}": wandb.Image(str(png))})
    run.summary.update({f"fig4/{k}": v for k, v in numbers.items() if v is not None})
    run.finish()
