"""REPRODUCTION.md from the figure records (figure.json) of the newest figure runs: per claim of docs/PAPER_NOTES.md §4,
the paper's statement and number, ours, a verdict (reproduced, partly, not) with its evidence, the command, and the
time it took on which machine. The verdicts are rules on the recorded numbers, written here once, so the table is
regenerated, never edited by hand."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any



REPRODUCED, PARTLY, NOT = "reproduced", "partly", "not reproduced"
INCOMPLETE = "incomplete record"  # the record lacks a number its rule needs: rerun the figure
Verdict = tuple[str, str, str]  # (our number, verdict, evidence and, where we differ, why we think so)


@dataclass(frozen=True)
class Claim:
    number: int
    title: str
    paper: str  # the paper's statement and number or figure
    figure: str  # the record's figure name
    target: str  # the make target
    judge: Callable[[dict[str, Any]], Verdict]


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def judge_prop2(n: dict[str, Any]) -> Verdict:
    ours = (f"last-token MSE {_f(n['mse_last'])} vs theory {_f(n['theory_min_loss'])} (ratio "
            f"{_f(n['mse_last_over_theory'])}); tuned GD-1 {_f(n['gd1_mse_last'])}; in-context map cosine to eta Y "
            f"{_f(n['icmap_cosine'])} raw, {_f(n['icmap_cosine_aligned'])} up to the commuting rotation")
    loss_ok = abs(n["mse_last_over_theory"] - 1) < 0.05
    map_ok = n.get("icmap_cosine_aligned", 0) > 0.95
    verdict = REPRODUCED if loss_ok and map_ok else PARTLY if loss_ok or map_ok else NOT
    evidence = (f"rule: |MSE / theory - 1| < 5% ({'yes' if loss_ok else 'no'}) and aligned cosine > 0.95 "
                f"({'yes' if map_ok else 'no'}); {n['seeds']} seed(s), {n['steps']} steps, T = {n['T']}, d = {n['d']}. "
                "The raw cosine is below 1 because B Y A equals eta Y only up to a rotation that commutes with every "
                "W of the family, which the loss cannot see.")
    return ours, verdict, evidence


def _judge_diagonal(n: dict[str, Any], key: str, structure: str) -> Verdict:
    ours = (f"final MSE {_f(n[f'{key}/mse'])} ({_f(n[f'{key}/mse_over_zero'])} of predicting 0); distance to the "
            f"optimum: C {_f(n[f'{key}/C_rel_dist'])}, P {_f(n[f'{key}/P_rel_dist'])} (relative); c = "
            f"{_f(n[f'{key}/c'])}; head cosines |off-diag| A {_f(n[f'{key}/A_offdiag'])}, B {_f(n[f'{key}/B_offdiag'])}")
    loss_ok = n[f"{key}/mse_over_zero"] < 1e-2
    near = n[f"{key}/C_rel_dist"] < 0.1 and n[f"{key}/P_rel_dist"] < 0.1
    verdict = REPRODUCED if loss_ok and near else PARTLY if loss_ok or near else NOT
    evidence = (f"rule: MSE < 1% of predicting 0 ({'yes' if loss_ok else 'no'}) and C, P within 10% of {structure} "
                f"({'yes' if near else 'no'}); d = {n[f'{key}/d']}, H = {n[f'{key}/H']}, T = {n[f'{key}/T']}, "
                f"{n[f'{key}/steps']} Adam steps from a small Gaussian initialisation, first seed of {n['seeds']}.")
    return ours, verdict, evidence


def judge_unitary(n: dict[str, Any]) -> Verdict:
    ours, verdict, evidence = _judge_diagonal(n, "unitary", "c I and 1/c on the newest token")
    orthogonal = n["unitary/A_offdiag"] < 0.1 and n["unitary/B_offdiag"] < 0.1
    if verdict == REPRODUCED and not orthogonal:
        verdict = PARTLY
    evidence += (f" Orthogonal heads (mean |cosine| between rows of A and of B < 0.1): {'yes' if orthogonal else 'no'}."
                 " Equal norms are reported, not judged: they follow from gradient flow conserving A A^T - B B^T, "
                 "which Adam's per-coordinate step sizes do not.")
    return ours + f"; head balance ||AA^T - BB^T|| / ||AA^T|| = {_f(n['unitary/head_balance'])}", verdict, evidence


def judge_rotation(n: dict[str, Any]) -> Verdict:
    ours, verdict, evidence = _judge_diagonal(n, "rotation", "c (J_2 + ... + J_2) with taps 1/c and -1/(2c)")
    return ours + f"; median p(tau, tau-1) / p(tau, tau) = {_f(n['rotation/lag1_ratio'])} (theory -0.5)", verdict, evidence


def judge_fig5(n: dict[str, Any]) -> Verdict:
    depths = n["depths"]
    mse = [n[f"L{L}/mse_last"] for L in depths]
    gd = [n[f"L{L}/gd{L}_mse_last"] for L in depths]
    ours = "last-position MSE by L: " + ", ".join(f"L={L}: {_f(m)} (GD {L} steps {_f(g)})" for L, m, g in
                                                   zip(depths, mse, gd))
    ours += "; averaged over positions: " + ", ".join(f"{_f(n[f'L{L}/mse'])}" for L in depths)
    # a step L-1 -> L falls when the mean MSE does; it rises when the mean goes up by more than the seeds' spread at
    # either depth (max - min); otherwise it is flat: within what the seeds tell apart
    spread = [n[f"L{L}/mse_last_max"] - n[f"L{L}/mse_last_min"] for L in depths]
    steps = ["falls" if b < a else "rises" if b - a > max(sa, sb) else "flat"
             for a, b, sa, sb in zip(mse, mse[1:], spread, spread[1:])]
    falls, rises = steps.count("falls"), steps.count("rises")
    if len(depths) < 3:
        verdict = NOT if rises else PARTLY
    else:
        verdict = REPRODUCED if falls == len(steps) else PARTLY if steps[0] == "falls" else NOT
    beats = sum(m <= g for m, g in zip(mse, gd))
    evidence = (f"rule: the mean MSE falls with every added layer over at least 3 depths; here {falls} of {len(steps)} "
                f"steps fall, {rises} rise beyond the seeds' spread, {len(steps) - falls - rises} are flat within it; "
                f"{n['seeds']} seed(s), {n['steps']} steps, T = {n['T']}. The model is at or below GD with as many "
                f"steps as it has layers at {beats} of {len(depths)} depths.")
    for i, step in enumerate(steps):
        if step != "falls":
            a, b = depths[i], depths[i + 1]
            evidence += (f" L = {a} to {b}: {mse[i + 1] / mse[i] - 1:+.1%} ({step}; seeds at L = {b} from "
                         f"{_f(n[f'L{b}/mse_last_min'])} to {_f(n[f'L{b}/mse_last_max'])}).")
    if verdict != REPRODUCED:
        evidence += (f" At this scale (T = {n['T']}, {n['steps']} steps) depth stops paying; the paper's sizes "
                     "(T = 50, 3200 steps of batch 1024) are SCALE=paper.")
    return ours, verdict, evidence


def judge_fig7(n: dict[str, Any]) -> Verdict:
    ours = (f"last-position MSE {_f(n['mse_last'])} vs predicting 0 {_f(n['zero_mse_last'])}, the last token "
            f"{_f(n['last_token_mse_last'])}, GD 1 step {_f(n['gd1_mse_last'])}, 8 steps {_f(n['gd8_mse_last'])}; "
            f"worth {_f(n['gd_steps_matched_last'])} GD steps; head cosines |off-diag| kq {_f(n['kq_offdiag'])}, ov "
            f"{_f(n['ov_offdiag'])}; P: {_f(n['P_two_tap_energy'])} of its energy on the last two tokens, "
            f"{_f(n.get('P_first_two_share'))} of its weight on the first two")
    learns = n["mse_last"] < 0.5 * n["zero_mse_last"] and n["mse_last"] < n["last_token_mse_last"]
    beats_gd = n["mse_last"] <= n["gd1_mse_last"]
    verdict = REPRODUCED if learns else NOT
    evidence = (f"rule: the claim is that the model still learns in context: MSE below half of predicting 0 and "
                f"below the last token ({'yes' if learns else 'no'}). Against GD (measured, not judged): "
                f"{'at least' if beats_gd else 'less than'} one tuned GD step's worth. "
                f"H = {n['H']}, T = {n['T']}, d = {n['d']}, {n['steps']} steps, {n['seeds']} seed(s). The heads' "
                "orthogonality and P are measured, not judged: the paper poses them as the question. With the "
                "authors' fixed start s_1 = 1_d / sqrt(d), s_2 = W s_1 reveals W applied to a known vector, which is "
                "why weight on the first tokens can pay (claim 1 notes the same for a known start).")
    return ours, verdict, evidence


def judge_fig6(n: dict[str, Any]) -> Verdict:
    mus = n["mus"]
    key = lambda mu: f"mu{mu:g}"  # noqa: E731
    ours = "; ".join(f"mu={mu:g}: MSE {_f(n[f'{key(mu)}/mse'])}, newest weight {_f(n[f'{key(mu)}/newest_weight'])}, "
                     f"past share {_f(n[f'{key(mu)}/past_share'])}, distance to GD on the exact loss "
                     f"{_f(n[f'{key(mu)}/dist_to_population_gd'])}" for mu in mus)
    change = n.get("profile_change_first_last_mu", math.nan)
    ours += f"; last-row change from mu={mus[0]:g} to mu={mus[-1]:g}: {_f(change)}"
    spread = all(n[f"{key(mu)}/dist_to_minimiser"] > 0.3 for mu in mus)
    depends = change > 0.1
    dists = [n[f"{key(mu)}/dist_to_population_gd"] for mu in mus]
    matches = all(x is not None and x < 0.15 for x in dists)
    verdict = REPRODUCED if spread and depends and matches else PARTLY if spread or depends else NOT
    evidence = (f"rule: P stays > 30% (relative) from the exact minimiser at every mu ({'yes' if spread else 'no'}), "
                f"the profile changes by > 10% across mu ({'yes' if depends else 'no'}), and the trained P is within "
                f"15% of gradient descent on the exact population loss from P = 0 with the same step and number of "
                f"steps (closed form, icar.theory.pe_only_gd_P; {'yes' if matches else 'no'}"
                f"{'' if all(x is not None for x in dists) else ': n/a, the runs did not train by plain constant-step SGD'}). "
                "The smooth profile is then the early-stopped solution of an ill-conditioned quadratic. Our theta is "
                "uniform on [-pi, pi); the authors' script draws it on [0, 2 pi), whose loss is ours at mu / 2, so our "
                "mu = 50..300 are the authors' 100..600, and the paper's panels are ours at half its mu.")
    return ours, verdict, evidence


def judge_softmax_vs_linear(n: dict[str, Any]) -> Verdict:
    protocols = n["protocols"]
    ours = "; ".join(f"{p}: linear {_f(n[f'{p}/linear'])}, softmax {_f(n[f'{p}/softmax'])} (GD-1 {_f(n[f'{p}/gd1'])})"
                     for p in protocols)
    both = all(not math.isnan(n[f"{p}/{k}"]) for p in protocols for k in ("linear", "softmax"))
    rot = next((p for p in protocols if p.startswith("rotation")), None)
    # "cannot carry": the linear P solves the rotation blocks (< 1% of predicting 0), the softmax rows stay stuck
    sign = rot is not None and n[f"{rot}/linear"] < 0.01 * n[f"{rot}/zero"] < 0.1 * n[f"{rot}/softmax"]
    wins = sum(n[f"{p}/linear"] < n[f"{p}/softmax"] for p in protocols)
    verdict = REPRODUCED if both and sign else PARTLY if both else NOT
    evidence = (f"rule: both kinds measured under every protocol ({'yes' if both else 'no'}) and, on the rotation "
                f"blocks whose optimum needs opposite-sign positional weights, the diagonal model with a linear P "
                f"reaches < 1% of predicting 0 while the one whose P rows are softmaxes stays above 10% of it "
                f"({'yes' if sign else 'no'}). Linear wins {wins} of "
                f"{len(protocols)} protocols; {n['seeds']} seed(s) each. On augmented_depth and orthogonal_multihead* "
                "the softmax is over the token scores; on the diagonal model (unitary_diagonal, rotation_diagonal) it "
                "is over P's rows, the token scores staying linear, as in the authors' Figure 7 model.")
    return ours, verdict, evidence


def judge_fig4(n: dict[str, Any]) -> Verdict:
    ours = (f"exact fits (MSE <= {n['threshold']:g}): real {_f(n['fraction_exact_real'], 4)}, shuffled "
            f"{_f(n['fraction_exact_shuffled'], 4)} of {n['n_windows']} windows (float32 as the authors: "
            f"{_f(n.get('fraction_exact_real_float32'), 4)} vs {_f(n.get('fraction_exact_shuffled_float32'), 4)}); "
            f"windows with a repeated token: real {_f(n['fraction_windows_with_repeat_real'])}, shuffled "
            f"{_f(n['fraction_windows_with_repeat_shuffled'])}")
    real_miss, shuf_miss = 1 - n["fraction_exact_real"], 1 - n["fraction_exact_shuffled"]
    verdict = REPRODUCED if real_miss < 0.5 * shuf_miss else PARTLY if real_miss < shuf_miss else NOT
    evidence = (f"rule: real windows miss an exact fit less than half as often as shuffled ones (real misses "
                f"{_f(real_miss)}, shuffled {_f(shuf_miss)}); embeddings: {n['source']} (D = {n['embedding_dim']}), "
                f"corpus {n['corpus']} ({n['corpus_tokens']} tokens).")
    if verdict != REPRODUCED:
        evidence += (" With D >> T a least-squares AR(1) map fits any window exactly unless a token repeats among the "
                     "first T - 1 with a different successor, and that is what separates the two sets here, window "
                     "for window; this corpus (Python's reference documentation, shipped with Python) repeats tokens "
                     "more than random draws do. The paper used GPT-2-large on Moby Dick, which needs a download: "
                     "`python scripts/fig4.py source=hf:gpt2-large text=moby_dick.txt` runs it where the network is.")
    return ours, verdict, evidence


CLAIMS = [
    Claim(1, "Augmented tokens, commuting W: one layer = one GD step (Proposition 2)",
          "B A = eta* I with eta* = 1/(T+d-2); minimal last-token loss d(d-1)/(T+d-2)", "prop2", "make prop2", judge_prop2),
    Claim(2, "Non-augmented, unitary context (Proposition 3, Figure 3 left)",
          "C = c I, p(tau,tau) = 1/c, loss 0, orthogonal heads with equal norms (d = H = 10)", "fig3", "make fig3",
          judge_unitary),
    Claim(3, "Non-augmented, rotation blocks (Figure 3 right)",
          "C = c (J_2 + ... + J_2), taps 1/c and -1/(2c), loss 0 (d = 10, H = 8)", "fig3", "make fig3", judge_rotation),
    Claim(4, "Depth (Figure 5)", "MSE decreases with L, compared with L steps of GD", "fig5", "make fig5", judge_fig5),
    Claim(5, "Non-augmented, general orthogonal W, multi-head (Figure 7)",
          "still learns in context (H = 64, d = 5, T = 50); heads and P measured", "fig7", "make fig7", judge_fig7),
    Claim(6, "Positional encoding only (Figure 6)",
          "P is a smooth, mu-dependent profile over the past, not the exact minimiser (mu = 50..300)", "fig6",
          "make fig6", judge_fig6),
    Claim(7, "Softmax versus linear attention", "softmax weights cannot carry claim 3's opposite signs in one head; "
          "report both kinds under the same protocol", "softmax_vs_linear", "make softmax-vs-linear",
          judge_softmax_vs_linear),
    Claim(8, "Real tokens (Figure 4)", "windows of 5 real token embeddings are fitted exactly by an AR(1) map far "
          "more often than shuffled ones (histogram of MSE > 1e-12)", "fig4", "make fig4", judge_fig4),
]
