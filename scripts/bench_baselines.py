"""Time the in-context baselines: GD step-size tuning (once per run) and one evaluation of every baseline on a
validation-sized batch, against the explicit k-step matrix recursion for the same predictions (side by side).

    python scripts/bench_baselines.py [--n 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from icar.baselines import InContextBaselines, context_moments  # noqa: E402
from icar.config import DataConfig, Family, Start, Tokens  # noqa: E402
from icar.data.sequences import SequenceSampler  # noqa: E402

CONFIGS = {  # name -> data config: the defaults, the paper's Figure 5/7 length, the largest d of the d sweep
    "default d=5 T=20": DataConfig(family=Family.orthogonal, d=5, T=20),
    "Fig.5/7 d=5 T=50": DataConfig(family=Family.orthogonal, d=5, T=50),
    "unitary d=10 T=15": DataConfig(family=Family.unitary, d=10, T=15, start=Start.ones, tokens=Tokens.raw),
    "d=16 T=20": DataConfig(family=Family.orthogonal, d=16, T=20),
}


def explicit_gd(s: torch.Tensor, eta: torch.Tensor) -> list[torch.Tensor]:
    """The reference: W'_k by the recursion W' <- W' + eta (Y - W' S) at every position, k = 1..K, each k its own eta."""
    Y, S = context_moments(s.to(torch.complex128 if s.is_complex() else torch.float64))
    out = []
    for k in range(eta.shape[0]):
        step = eta[k].view(1, -1, 1, 1).to(Y.dtype)
        Wk = torch.zeros_like(Y)
        for _ in range(k + 1):
            Wk = Wk + step * (Y - Wk @ S)
        out.append(torch.einsum("btij,btj->bti", Wk, s.to(Y.dtype)))
    return out


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024, help="sequences (tuning and evaluation)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, n = {args.n}, gd1..gd8, best of {args.repeats}")
    print(f"{'config':20s} {'tune (s)':>9s} {'eval (s)':>9s} {'explicit (s)':>13s} {'speed-up':>9s} {'max |diff|':>11s}")
    for name, cfg in CONFIGS.items():
        s, W = SequenceSampler(cfg).sample(args.n, torch.Generator().manual_seed(0))
        baselines = InContextBaselines(8, cfg.T)
        tune = best_of(lambda: baselines.tune(s), 1)
        ctx = s[:, :-1]
        out: dict[str, torch.Tensor] = {}
        evaluate = best_of(lambda: out.update(baselines(ctx, W)), args.repeats)
        ref: list[torch.Tensor] = []
        explicit = best_of(lambda: ref.__setitem__(slice(None), explicit_gd(ctx, baselines.gd_eta)), args.repeats)
        diff = max((out[f"gd{k + 1}"] - ref[k].to(ctx.dtype)).abs().max().item() for k in range(8))
        print(f"{name:20s} {tune:9.2f} {evaluate:9.3f} {explicit:13.3f} {explicit / evaluate:8.1f}x {diff:11.1e}")


if __name__ == "__main__":
    main()
