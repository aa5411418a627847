"""How a run that ends early says so: a failure of one line (RunFailure: what went wrong and the fix), SIGTERM's
exit status (Interrupted: 128 + 15, with where it stopped), and the record RUN/failure.txt holding that line, which
sweeps and `scripts/analyze.py` report. No Lightning import: scripts/train.py uses it before Lightning is loaded."""

from __future__ import annotations

import signal
from pathlib import Path

from icar.config import ConfigError

SIGTERM_EXIT = 128 + signal.SIGTERM  # the shell's convention for "killed by SIGTERM"
FAILURE_FILE = "failure.txt"


class RunFailure(RuntimeError):
    """A run that cannot go on, with a message of one line naming what went wrong and the fix."""


class Interrupted(SystemExit):
    """Stopped by SIGTERM: exits 128 + 15, carrying the line that says at which step and how to resume."""

    def __init__(self, line: str) -> None:
        super().__init__(SIGTERM_EXIT)
        self.line = line


def failure_line(err: BaseException) -> str | None:
    """The one line that records why a run ended early, or None when it did not fail (a clean exit, a requeue)."""
    if isinstance(err, Interrupted):
        return err.line
    if isinstance(err, ConfigError):
        return f"config error: {err}"
    if isinstance(err, RunFailure):
        return str(err)
    if isinstance(err, SystemExit):  # Lightning ends a Ctrl-C with exit(1); a requeue's SIGTERM (no code) is no failure
        return None if err.code in (None, 0) else f"stopped (exit status {err.code})"
    if isinstance(err, KeyboardInterrupt):
        return "stopped by Ctrl-C"
    first = next((line for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first}"[:300]


def record_failure(run_dir: Path, line: str) -> None:
    """RUN/failure.txt: the one line of why the run ended early (replaced by the next failure, removed on success)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / FAILURE_FILE).write_text(line.rstrip("\n") + "\n")


def clear_failure(run_dir: Path) -> None:
    (Path(run_dir) / FAILURE_FILE).unlink(missing_ok=True)
