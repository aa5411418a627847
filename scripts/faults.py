"""The fault battery of issue 15, one subprocess per case with a timeout: prints case | expected | observed.

    python scripts/faults.py [--repo PATH]   # PATH: another checkout (e.g. main) to measure "before"
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST = ["logger=none", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.max_steps=20",
        "trainer.val_check_interval=5", "data.batch_size=8", "data.val_size=16", "eval.analysis=false"]


def launch(repo: Path, cwd: Path, args: list[str], env: dict[str, str] | None = None,
           term_after: float | None = None, timeout: float = 150) -> tuple[int | str, str, float]:
    """(exit code or 'timeout', last stderr line, seconds) of `scripts/train.py args` run in `cwd`."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(repo), **(env or {})}
    env = {k: v for k, v in env.items() if v and k != "ICAR_LAUNCH_ID"}  # "": unset
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(repo / "scripts/train.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if term_after is not None:
        metrics = cwd / "run" / "metrics.jsonl"
        while proc.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return "timeout", "", time.monotonic() - start
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return proc.returncode, (lines[-1][:110] if lines else ""), time.monotonic() - start


def strict(path: Path) -> str:
    try:
        json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        return "strict JSON"
    except FileNotFoundError:
        return "no file"
    except ValueError as err:
        return f"not JSON ({err})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    repo = parser.parse_args().repo.resolve()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def case(name: str, expected: str, *args: str, **kw) -> Path:
            cwd = Path(tmp) / name.replace(" ", "_")
            cwd.mkdir()
            rc, line, secs = launch(repo, cwd, [*FAST, "hydra.run.dir=run", *args], **kw)
            rows.append([name, expected, f"rc={rc} {secs:.0f}s: {line}"])
            return cwd

        cwd = case("1 key, no network", "rc=0 offline + warning", "logger=wandb", "trainer.max_steps=5",
                   env={"WANDB_MODE": "", "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"})
        rows[-1][2] += f" | summary: {(cwd / 'run/summary.json').is_file()}"
        case("1 online, no key", "rc=1, one line", "logger=wandb", env={"WANDB_MODE": "online", "NETRC": "/nonexistent"})
        cwd = case("2 optim.lr=1e6", "rc=1 diverged line, strict JSON", "optim.lr=1e6")
        rows[-1][2] += f" | summary: {strict(cwd / 'run/summary.json')}"
        cwd = case("6 SIGTERM", "rc=143, interrupted.ckpt", "trainer.max_steps=100000", term_after=0)
        rows[-1][2] += f" | ckpt: {(cwd / 'run/checkpoints/interrupted.ckpt').is_file()}"
        garbage = Path(tmp) / "garbage.ckpt"
        garbage.write_bytes(b"garbage")
        case("9 garbage ckpt_path", "rc=1, one line", f"ckpt_path={garbage}")
        case("9 trainer.precision=7", "rc=1, one line", "trainer.precision=7")
    print("| case | expected | observed |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
