"""The record of one reproduced figure: `<out>/figure.json` with its numbers (the claim module's typed numbers, as
JSON), figures, wall time, machine, command and scale. scripts/reproduction.py reads these records (never the W&B
server) to write REPRODUCTION.md."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from icar.claims.base import Scale

RECORD_FILE = "figure.json"
# the scale words of older records: fig4 wrote "all windows" for max_windows=0, the Makefile's alias of cpu is quick
OLD_SCALES = {"all windows": Scale.paper, "quick": Scale.cpu}


def machine() -> str:
    """One line naming the machine: CPU model and cores, memory, and the GPU when torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cores} CPU cores ({cpu})"
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        text += f", {pages * page / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        text += f", {n} x {torch.cuda.get_device_name(0)}"
    else:
        text += ", no GPU"
    return text


@dataclass
class FigureRecord:
    """What one figure target produced: `numbers` feed the verdicts, `figures` are PNG/PDF paths."""

    figure: str
    numbers: dict[str, Any]
    figures: list[str] = field(default_factory=list)
    wall_s: float | None = None
    machine: str = ""
    command: str = ""
    scale: Scale = Scale.cpu
    finished: str = ""

    def __post_init__(self) -> None:
        self.scale = OLD_SCALES.get(self.scale) or Scale(self.scale)

    def save(self, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / RECORD_FILE
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True, default=float) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> "FigureRecord":
        return cls(**json.loads(Path(path).read_text()))


def command_line() -> str:
    """The command that is running, as a user would type it again: the make target when the Makefile says so
    (ICAR_COMMAND), else this process's command line."""
    if os.environ.get("ICAR_COMMAND"):
        return os.environ["ICAR_COMMAND"]
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
