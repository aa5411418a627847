"""The AR(1) fit of Figure 4 (docs/PAPER_NOTES.md §4.8): per window s_1..s_T, the least-squares map W_hat with
W_hat s_t ~ s_{t+1}, the window regenerated from s_1 by s_hat_{t+1} = W_hat s_hat_t, and its MSE.

`ar1_mse` (the primary measurement) is float64, so that "MSE <= 1e-12" means the fit is exact rather than within
float32 round-off: an exact fit regenerates the window to ~1e-30. `ar1_mse_float32` redoes it the authors' way
(per-window torch.linalg.lstsq and the recursion in float32), to see what their round-off does to the comparison.
With embedding dimension D >> T the T - 1 inputs are linearly independent and the fit is exact unless they are
rank-deficient, i.e. a token repeats among s_1..s_{T-1} with a different successor; the real-versus-shuffled
comparison is therefore about repeats (`conflicting_repeat`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from icar.analysis.plots import plt, save_figure

CHUNK = 4096  # windows per batched SVD: (CHUNK, T, D) float64 stays in the tens of MB for D ~ 1000
CHUNK_FLOAT32 = 1000  # windows per batched lstsq in float32: the (CHUNK, D, D) solutions are 262 MB at D = 256


def ar1_mse(s: torch.Tensor, rtol: float | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """Per-window MSE (mean over t and coordinates) of the regenerated window, (N, T, D) -> (N,).

    X = s_1..s_{T-1}, Y = s_2..s_T (rows); the least-squares solution of X A = Y is A = X^+ Y, and W_hat = A^T.
    X^+ is the minimum-norm pseudo-inverse that torch.linalg.lstsq's rank-revealing drivers (gelsy, gelsd)
    return, with a relative rank tolerance (singular values below rtol * the largest count as 0), so that an
    exactly repeated token gives a zero singular value instead of a division by round-off. It is computed as
    X^T = Q R (batched Householder QR, backward stable) and X^+ = Q (R^T)^+ with the (T-1) x (T-1) pinv by SVD:
    R has X's singular values, and this avoids batched SVDs of (T-1) x D matrices, which are orders of magnitude
    slower on a busy multi-threaded CPU. A (D x D per window) is never formed: s_hat^T A = (s_hat^T X^+) Y.
    """
    N, T, D = s.shape
    rtol = max(T - 1, D) * torch.finfo(torch.float64).eps if rtol is None else rtol
    out = torch.empty(N, dtype=torch.float64)
    for lo in range(0, N, chunk):
        w = s[lo : lo + chunk].double()  # (n, T, D)
        X, Y = w[:, :-1], w[:, 1:]  # (n, T-1, D) each
        Q, R = torch.linalg.qr(X.mT)  # (n, D, r), (n, r, T-1) with r = min(D, T-1): X = R^T Q^T
        R_pinv = torch.linalg.pinv(R.mT, rtol=rtol)  # (n, r, T-1): (R^T)^+
        s_hat = [w[:, 0]]  # s_hat_1 = s_1, (n, D)
        for _ in range(T - 1):
            coef = torch.einsum("nd,ndr->nr", s_hat[-1], Q)  # (n, r)
            coef = torch.einsum("nr,nrk->nk", coef, R_pinv)  # (n, T-1): s_hat^T X^+
            s_hat.append(torch.einsum("nk,nkd->nd", coef, Y))  # (n, D): s_hat^T A = W_hat s_hat
        err = torch.stack(s_hat, dim=1) - w  # (n, T, D)
        out[lo : lo + chunk] = err.pow(2).mean(dim=(1, 2))
    return out


def ar1_mse_float32(s: torch.Tensor, chunk: int = CHUNK_FLOAT32, threads: int | None = 1) -> torch.Tensor:
    """ar1_mse in the authors' arithmetic, (N, T, D) -> (N,) float32: per window the D x D solution A of X A = Y
    by torch.linalg.lstsq in float32 (CPU default driver gelsy, rcond = eps * max(T - 1, D)), then the recursion
    s_hat_{t+1} = A^T s_hat_t and the MSE, all in float32. Batched lstsq runs LAPACK window by window, as their
    loop did. Exact fits land at ~1e-15, but gelsy now and then (~1e-4 of windows) calls a well-conditioned X
    rank 3 and leaves it inexact. threads: torch's threads during the call (restored after); None: unchanged.
    """
    N, T, D = s.shape
    out = torch.empty(N, dtype=torch.float32)
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)  # per-window LAPACK calls on small matrices gain nothing from threads
    try:
        for lo in range(0, N, chunk):
            w = s[lo : lo + chunk].float()  # (n, T, D)
            A = torch.linalg.lstsq(w[:, :-1], w[:, 1:]).solution  # (n, D, D): X A = Y, W_hat = A^T
            s_hat = [w[:, 0]]  # (n, D)
            for _ in range(T - 1):
                s_hat.append(torch.bmm(A.mT, s_hat[-1][:, :, None])[:, :, 0])  # (n, D): W_hat s_hat_t
            err = torch.stack(s_hat, dim=1) - w  # (n, T, D)
            out[lo : lo + chunk] = err.pow(2).mean(dim=(1, 2))
    finally:
        torch.set_num_threads(saved)
    return out


def has_repeat(windows: torch.Tensor) -> torch.Tensor:
    """(N, T) ids -> (N,) bool: some token occurs twice among the fit's inputs s_1..s_{T-1}."""
    x = windows[:, :-1]  # (N, T-1)
    same = x[:, :, None] == x[:, None, :]  # (N, T-1, T-1)
    return torch.triu(same, diagonal=1).any(dim=(1, 2))


def conflicting_repeat(windows: torch.Tensor) -> torch.Tensor:
    """(N, T) ids -> (N,) bool: a token repeats among the inputs with two different successors, so that no map
    sends s_t to s_{t+1} for every t (the fit cannot be exact, whatever D is)."""
    x, y = windows[:, :-1], windows[:, 1:]  # (N, T-1) each
    clash = (x[:, :, None] == x[:, None, :]) & (y[:, :, None] != y[:, None, :])  # (N, T-1, T-1)
    return clash.any(dim=(1, 2))


def mse_summary(mse: torch.Tensor, threshold: float) -> dict[str, float | int | None]:
    """Fraction of windows fitted exactly (MSE <= threshold), the number not, their median MSE, and the median
    over all windows (the round-off level of the exact fits, which are the majority)."""
    inexact = mse[mse > threshold]
    return {
        "fraction_exact": float((mse <= threshold).double().mean()) if mse.numel() else float("nan"),
        "n_inexact": int(inexact.numel()),
        "median_mse_inexact": float(inexact.median()) if inexact.numel() else None,
        "median_mse": float(mse.median()) if mse.numel() else None,
    }


def plot_mse_histogram(panels: dict[str, dict[str, torch.Tensor]], threshold: float, path_stem: Path,
                       title: str = "") -> list[Path]:
    """One panel per arithmetic (float64, float32): overlaid histograms of the per-window MSEs above threshold
    (log x, bins shared across panels), real vs shuffled, each labelled with its fraction of exact fits."""
    above = {p: {name: v[v > threshold].double().numpy() for name, v in sets.items()} for p, sets in panels.items()}
    values = np.concatenate([v for sets in above.values() for v in sets.values()])
    bins = None
    if values.size:
        lo, hi = float(values.min()), float(values.max())
        bins = np.logspace(np.log10(lo) - 0.05, np.log10(hi) + 0.05, 50)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False, sharex=True)
    for ax, (panel, sets) in zip(axes[0], panels.items()):
        exact = {name: float((v <= threshold).double().mean()) for name, v in sets.items()}
        if bins is not None:
            for (name, v), colour in zip(above[panel].items(), ("tab:blue", "tab:orange")):
                ax.hist(v, bins=bins, alpha=0.55, color=colour,
                        label=f"{name}: {v.size} windows above, {exact[name]:.2%} exact")
            ax.set_xscale("log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"every window fitted exactly (MSE <= {threshold:g})", ha="center",
                    transform=ax.transAxes)
        ax.set_title(f"{panel}: exact " + " vs ".join(f"{n} {f:.2%}" for n, f in exact.items()), fontsize=9)
        ax.set_xlabel(f"per-window MSE of the AR(1) fit (only MSE > {threshold:g})")
    axes[0][0].set_ylabel("windows")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path_stem)
