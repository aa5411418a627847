"""The fault battery of issue 15, one subprocess per case with a timeout: prints case | expected | observed.

    python scripts/faults.py [--repo PATH] [--only 7,8]   # PATH: another checkout (e.g. main) to measure "before"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

FAST = ["logger=none", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.max_steps=20",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=5", "data.batch_size=8", "data.val_size=16", "eval.analysis=false"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=100000",
       "trainer.val_check_interval=10"]
NOISE = ("The `srun` command is available", "[20")  # Lightning's hint where SLURM is installed; Hydra's log lines


class Launch:
    """`scripts/train.py args` of the checkout `repo`, started in `cwd`, with a clock."""

    def __init__(self, repo: Path, cwd: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(repo), **(env or {})}
        env = {k: v for k, v in env.items() if v and k not in ("ICAR_LAUNCH_ID", "WANDB_SERVICE")}  # "": unset
        self.cwd, self.start = cwd, time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(repo / "scripts/train.py"), *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out = self.err = ""

    def wait_for(self, path: str, lines: int = 1, timeout: float = 150) -> bool:
        """Until cwd/path exists with at least `lines` lines (False if the process ended or the time ran out)."""
        deadline = time.monotonic() + timeout
        target = self.cwd / path
        while time.monotonic() < deadline and self.proc.poll() is None:
            if target.is_file() and (lines <= 1 or target.read_text().count("\n") >= lines):
                return True
            time.sleep(0.2)
        return False

    def child(self) -> int | None:
        """The first child process (plain DDP: rank 1)."""
        try:
            return int(Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None

    def finish(self, timeout: float = 150) -> str:
        """'rc=R Ns: <last stderr line>' once the process ended ('timeout' if it did not, then killed)."""
        try:
            self.out, self.err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child = self.child()  # a rank that outlives its parent keeps the output pipes open
            self.proc.kill()
            if child is not None:
                os.kill(child, signal.SIGKILL)
            self.out, self.err = self.proc.communicate()
            return f"timeout after {time.monotonic() - self.start:.0f}s"
        return f"rc={self.proc.returncode} {time.monotonic() - self.start:.0f}s: {self.last_line()}"

    def error_lines(self) -> list[str]:
        return [line for line in self.err.strip().splitlines()
                if line.strip() and not line.startswith(NOISE[1]) and NOISE[0] not in line]

    def last_line(self, width: int = 150) -> str:
        lines = self.error_lines()
        return lines[-1].replace(f"{self.cwd}/", "")[:width] if lines else ""


def alive(pid: int | None) -> bool:
    try:
        return pid is not None and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def strict(path: Path) -> str:
    try:
        json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        return "strict JSON"
    except FileNotFoundError:
        return "no file"
    except ValueError as err:
        return f"not JSON ({err})"


def wandb_summary(run_dir: Path, recorded: set[int]) -> str:
    """'F folders, ids [...], W&B holds K of the N recorded train/loss steps' for the offline W&B segments of a run."""
    cli = str(Path(sys.executable).parent / "wandb")
    ids, steps = set(), set()
    folders = sorted(run_dir.glob("wandb/offline-run-*"))
    for log in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        out = subprocess.run([cli, "leet", "inspect", "--json", str(log)], capture_output=True, text=True).stdout
        for record in map(json.loads, out.splitlines()):
            if record["type"] == "run":
                ids.add(record["run"]["run_id"])
            elif record["type"] == "history" and "train/loss" in record["history"]["item"]:
                steps.add(int(record["history"]["item"].get("trainer/global_step", -1)))
    return f"{len(folders)} folders, ids {sorted(ids)}, W&B holds {len(steps & recorded)} of {len(recorded)} steps"


def cases(repo: Path, tmp: Path) -> list[tuple[str, str, Callable[[Path], str]]]:
    run = lambda cwd, *args, **kw: Launch(repo, cwd, [*FAST, "hydra.run.dir=run", *args], **kw)  # noqa: E731

    def wandb_unreachable(cwd: Path) -> str:
        job = run(cwd, "logger=wandb", "trainer.max_steps=5",
                  env={"WANDB_MODE": "", "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"})
        result = job.finish().split(":")[0]
        warnings = [line for line in (job.out + job.err).splitlines() if "unreachable" in line]
        return f"{result} / {len(warnings)} warning: {warnings[0].split(' - ')[-1][:90] if warnings else ''}" \
               f" / summary: {(cwd / 'run/summary.json').is_file()}"

    def diverged(cwd: Path) -> str:
        return run(cwd, "optim.lr=1e6").finish() + f" / summary: {strict(cwd / 'run/summary.json')}"

    def killed_and_resumed(cwd: Path) -> str:
        job = run(cwd, "logger=wandb", "trainer.max_steps=100000", "trainer.val_check_interval=10")
        job.wait_for("run/checkpoints/last.ckpt") and job.wait_for("run/metrics.jsonl", lines=18)
        job.proc.kill()
        job.finish()
        again = run(cwd, "logger=wandb", "trainer.max_steps=30", "trainer.val_check_interval=10",
                    f"ckpt_path={cwd / 'run/checkpoints/last.ckpt'}")
        result = again.finish()
        steps = [json.loads(line).get("step") for line in (cwd / "run/metrics.jsonl").read_text().splitlines()
                 if "train/loss" in line]
        return f"{result.split(':')[0]} / metrics.jsonl: {len(steps)} steps, each once: {len(steps) == len(set(steps))}" \
               f" / {wandb_summary(cwd / 'run', set(steps))}"

    def sigterm(cwd: Path) -> str:
        job = run(cwd, "trainer.max_steps=100000")
        job.wait_for("run/metrics.jsonl", lines=3)
        job.proc.send_signal(signal.SIGTERM)
        return job.finish() + f" / ckpt: {(cwd / 'run/checkpoints/interrupted.ckpt').is_file()}"

    def sweep_sigterm(cwd: Path) -> str:
        job = Launch(repo, cwd, ["-m", *FAST, "seed=0,1,2", "trainer.max_steps=100000", "hydra.sweep.dir=sweep"])
        job.wait_for("sweep/0/metrics.jsonl", lines=3)
        job.proc.send_signal(signal.SIGTERM)
        return job.finish()

    def sweep_failed_job(cwd: Path) -> str:
        result = Launch(repo, cwd, ["-m", *FAST, "model.n_heads=1,0,2", "hydra.sweep.dir=sweep"]).finish()
        analysis = subprocess.run([sys.executable, str(repo / "scripts/analyze.py"), str(cwd / "sweep")],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
        first = (analysis.stdout.strip().splitlines() or [""])[0].replace(str(cwd) + "/", "")
        return f"{result} / analyze: {first[:100]}"

    def ddp_frozen(cwd: Path, *extra: str, term: bool = False) -> str:
        job = run(cwd, *DDP, *extra)
        job.wait_for("run/checkpoints/last.ckpt")
        rank1 = job.child()
        if rank1 is None:
            return job.finish() + " / no rank 1 found"
        os.kill(rank1, signal.SIGSTOP)
        time.sleep(1)
        frozen = time.monotonic()
        if term:
            job.proc.send_signal(signal.SIGTERM)
        result = job.finish(timeout=120)
        left = alive(rank1)
        if left:  # a checkout that leaves it: clean up (a stopped process ignores everything but SIGKILL)
            os.kill(rank1, signal.SIGKILL)
        return f"{result} / ended {time.monotonic() - frozen:.0f}s after; rank 1 alive: {left}"

    def ddp_killed_rank(cwd: Path) -> str:
        job = run(cwd, *DDP)
        job.wait_for("run/checkpoints/last.ckpt")
        rank1 = job.child()
        if rank1 is not None:
            os.kill(rank1, signal.SIGKILL)
        result = job.finish(timeout=120)
        return f"{result} / {len(job.error_lines())} stderr lines (warnings and Hydra's log lines aside)"

    def huge_T(cwd: Path) -> str:
        return run(cwd, "data.T=100000").finish(timeout=120) + f" / folders left: {len(list(cwd.rglob('*')))}"

    def killed_run_analysis(cwd: Path) -> str:  # what SIGKILL leaves: no summary, no failure.txt
        job = run(cwd, "trainer.max_steps=100000", "trainer.val_check_interval=10")
        job.wait_for("run/checkpoints/last.ckpt") and job.wait_for("run/metrics.jsonl", lines=18)
        job.proc.kill()
        job.finish()
        analysis = subprocess.run([sys.executable, str(repo / "scripts/analyze.py"), str(cwd / "run")],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
        return f"rc={analysis.returncode}: " + (analysis.stdout.strip().splitlines() or [""])[0].replace(
            str(cwd) + "/", "")[:110]

    def closing(cwd: Path) -> str:
        job = run(cwd, "logger=wandb", "eval.analysis=true")
        result = job.finish()
        text = job.out + job.err
        block = job.out[job.out.find("finished "):].splitlines()
        return (f"{result.split(':')[0]} / 'GPU available' x{text.count('GPU available')}, litlogger x"
                f"{text.count('litlogger')}, W&B warning x{text.count('anonymous setting')} / block: "
                f"{len(block)} lines, sync: {any('wandb sync' in b for b in block)}")

    garbage = tmp / "garbage.ckpt"
    garbage.write_bytes(b"garbage")
    return [
        ("1 key, no network", "rc=0 offline + warning", wandb_unreachable),
        ("1 online, no key", "rc=1, one line",
         lambda cwd: run(cwd, "logger=wandb", env={"WANDB_MODE": "online", "NETRC": "/nonexistent"}).finish()),
        ("2 optim.lr=1e6", "rc=1 diverged line, strict JSON", diverged),
        ("5 SIGKILL + resume, W&B", "steps once; one run id; W&B holds every step", killed_and_resumed),
        ("6 SIGTERM", "rc=143, interrupted.ckpt", sigterm),
        ("6 SIGTERM in a grid sweep", "rc=143, 'N of 3 jobs finished; ... did not run'", sweep_sigterm),
        ("6/10 failed grid job", "rc=1, 'job 1 failed: <line>', analyze says so", sweep_failed_job),
        ("7 frozen rank, timeout 20 s", "rc=1 one line ~20 s, rank 1 gone",
         lambda cwd: ddp_frozen(cwd, "trainer.ddp_timeout_s=20")),
        ("7 frozen rank + SIGTERM", "rc=143 within seconds, rank 1 gone", lambda cwd: ddp_frozen(cwd, term=True)),
        ("7 rank 1 killed", "rc=1, one line", ddp_killed_rank),
        ("8 data.T=100000", "rc=1 one line < 5 s, no folder", huge_T),
        ("9 garbage ckpt_path", "rc=1, one line", lambda cwd: run(cwd, f"ckpt_path={garbage}").finish()),
        ("9 trainer.precision=7", "rc=1, one line", lambda cwd: run(cwd, "trainer.precision=7").finish()),
        ("10 killed run, analyze", "'unfinished: last checkpoint at step N'", killed_run_analysis),
        ("11 end of a run", "each line once, no adverts, closing block", closing),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--only", default="", help="comma-separated case numbers, e.g. 7,8")
    args = parser.parse_args()
    repo, only = args.repo.resolve(), {s for s in args.only.split(",") if s}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, expected, measure in cases(repo, Path(tmp)):
            if only and not only & set(name.split()[0].split("/")):
                continue
            cwd = Path(tmp) / re.sub(r"\W+", "_", name)  # a path Hydra's override grammar takes as it is
            cwd.mkdir()
            try:
                observed = measure(cwd)
            except Exception as err:  # a case that cannot even be measured on this checkout
                observed = f"battery error: {type(err).__name__}: {err}"
            rows.append([name, expected, observed.replace(str(cwd) + "/", "")])
            print(f"{name}: {rows[-1][2]}", file=sys.stderr, flush=True)
    print("| case | expected | observed |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
