"""Resuming a run safely: refuse config changes that would make its checkpoint describe another experiment, record
what each resume changed (RUN/resumes/<n>.yaml; config.yaml stays the original's), and cut the metrics that the
resumed steps will log again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from icar.config import ConfigError
from icar.metrics import METRICS_FILE
from icar.training.config_io import to_dataclass, to_plain_dict

# may differ on resume without opt-in: how long and how often, what is logged and shown, where things go
SAFE_KEYS = (
    "name", "run_dir", "ckpt_path", "resume_override", "trainer.max_steps", "trainer.val_check_interval",
    "trainer.log_every_n_steps", "trainer.enable_progress_bar", "logger.", "eval.analysis", "eval.analysis_every",
)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every key whose value differs."""
    a, b = _flat(old), _flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def is_safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_KEYS)


def check_resume(old: dict[str, Any], new: dict[str, Any], override: bool) -> dict[str, tuple[Any, Any]]:
    """The diff between the checkpoint's config and this launch's; ConfigError (one line) when it changes the
    model, the data, the optimisation or the seed and `resume_override` is not set."""
    diff = config_diff(to_plain_dict(to_dataclass(dict(old))), new)  # old: as this icar records it
    refused = [k for k in diff if not is_safe(k)]
    if refused and not override:
        changes = ", ".join(f"{k}: {diff[k][0]!r} -> {diff[k][1]!r}" for k in refused)
        raise ConfigError(
            f"resuming with a different config ({changes}) would mix two experiments in one run folder;"
            " start a new run, or pass resume_override=true to resume anyway (it is recorded in resumes/)"
        )
    return diff


def record_resume(run_dir: Path, ckpt_path: str, step: int, diff: dict[str, tuple[Any, Any]], override: bool) -> Path:
    """Write RUN/resumes/<n>.yaml: from which checkpoint and step, what changed, and whether it was forced."""
    folder = run_dir / "resumes"
    folder.mkdir(parents=True, exist_ok=True)
    n = 1 + sum(1 for _ in folder.glob("*.yaml"))
    path = folder / f"{n}.yaml"
    record = {
        "ckpt_path": str(ckpt_path),
        "step": step,
        "resume_override": override,
        "changed": {k: {"old": o, "new": v} for k, (o, v) in diff.items()},
    }
    OmegaConf.save(OmegaConf.create(record), path)
    return path


def truncate_metrics(run_dir: Path, global_step: int) -> int:
    """Drop the records a run resumed from a checkpoint at `global_step` logs again (Lightning logs the step that
    reaches global_step g under step g - 1): keep step < global_step. Returns how many were dropped."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if (json.loads(line).get("step") or 0) < global_step]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return len(lines) - len(kept)


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to continue a stopped run from: the newer of `interrupted.ckpt` (written when it was stopped
    cleanly) and `last.ckpt` (its last validation), or None when it has neither."""
    found = [p for p in (Path(run_dir) / "checkpoints" / n for n in ("interrupted.ckpt", "last.ckpt")) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
