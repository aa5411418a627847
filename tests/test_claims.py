"""The claim modules (icar/claims/<figure>.py) and their registry: every claim once, every figure drawn by one
module whose protocol names the sweep files (and make targets) that run it; the typed numbers read the records older
icar wrote; the scale ranks records; the evidence says only what the numbers show."""

from __future__ import annotations

import importlib
import json
import pkgutil
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import icar.claims
from icar.claims.base import INCOMPLETE, NOT, PARTLY, REPRODUCED, Scale
from icar.claims.fig4 import Fig4Numbers, judge_fig4
from icar.claims.fig5 import Fig5Numbers, judge_fig5
from icar.claims.prop2 import Prop2Numbers, judge_prop2
from icar.claims.record import FigureRecord
from icar.claims.registry import CLAIMS, FIGURES
from icar.orchestration.reproduction import newest_records, render
from tests.conftest import REPO
from tests.test_sweeps import SWEEPS, compose_sweep


def _diagonal(mse: float, dist: float) -> dict[str, float]:
    return {"mse": mse, "zero_mse": 10.0, "c": 1.5, "C_rel_dist": dist, "P_rel_dist": dist, "theory_loss": mse,
            "head_balance": 0.2, "A_offdiag": 0.02, "B_offdiag": 0.03, "lag1_ratio": -0.5, "d": 10, "H": 10, "T": 15,
            "steps": 2000, "mse_over_zero": mse / 10.0}


# one record's numbers per figure, in the layout icar wrote before the claim modules (fig6 and fig4: real records)
OLD_NUMBERS = {
    "prop2": {"T": 20, "d": 6, "steps": 2500, "seeds": 1, "mse_last": 1.27, "gd1_mse_last": 1.28,
              "theory_min_loss": 1.25, "eta_star": 1 / 24, "icmap_cosine": 0.779, "icmap_cosine_aligned": 0.9999,
              "icmap_scale": 1.01, "mse_last_over_theory": 1.016, "mse_last_over_gd1": 0.992},
    "fig3": {"seeds": 1, **{f"unitary/{k}": v for k, v in _diagonal(1.6e-5, 4e-5).items()},
             **{f"rotation/{k}": v for k, v in _diagonal(3e-10, 2e-6).items()}},
    "fig5": {"seeds": 2, "steps": 2000, "T": 20, "depths": [1, 2, 3],
             **{f"L{L}/{k}{s}": m + d for L, m in ((1, 0.3), (2, 0.2), (3, 0.1)) for k in ("mse_last", "mse")
                for s, d in (("", 0.0), ("_max", 0.01), ("_min", -0.01))},
             **{f"L{L}/gd{L}_{k}": m for L, m in ((1, 0.4), (2, 0.3), (3, 0.2)) for k in ("mse_last", "mse")}},
    "fig6": {"mu100/dist_to_minimiser": 0.8194883202107875, "mu100/dist_to_population_gd": 0.00012939762902756876,
             "mu100/mse": 0.00043596586328931153, "mu100/newest_weight": 0.24277912080287933,
             "mu100/past_share": 0.8685389675878525, "mu200/dist_to_minimiser": 0.8650498511653947,
             "mu200/dist_to_population_gd": 8.425978167455563e-05, "mu200/mse": 0.0002997628762386739,
             "mu200/newest_weight": 0.1430835723876953, "mu200/past_share": 0.9062433942264582,
             "mu300/dist_to_minimiser": 0.8797309913823451, "mu300/dist_to_population_gd": 7.944898247250303e-05,
             "mu300/mse": 0.0002638544829096645, "mu300/newest_weight": 0.12959358096122742,
             "mu300/past_share": 0.9189368510691086, "mu50/dist_to_minimiser": 0.7545019864116902,
             "mu50/dist_to_population_gd": 0.0001623242895961826, "mu50/mse": 0.0005146172479726374,
             "mu50/newest_weight": 0.3272242844104767, "mu50/past_share": 0.811403553845294,
             "mus": [50.0, 100.0, 200.0, 300.0], "profile_change_first_last_mu": 0.7540231533395569, "seeds": 1},
    "fig7": {"H": 16, "T": 20, "d": 5, "steps": 2000, "seeds": 1, "mse_last": 0.381, "mse": 0.5,
             "gd1_mse_last": 0.245, "gd8_mse_last": 0.0202, "zero_mse_last": 1.0, "last_token_mse_last": 2.0,
             "ols_mse_last": 1e-3, "gd_steps_matched_last": 0.0, "kq_offdiag": 0.184, "ov_offdiag": 0.156,
             "P_fit_newest": 0.3, "P_two_tap_energy": 0.201, "P_first_two_share": 0.524},
    "softmax_vs_linear": {"protocols": ["augmented_depth", "rotation_diagonal"], "seeds": 1,
                          "augmented_depth/linear": 0.127, "augmented_depth/softmax": 0.178,
                          "augmented_depth/gd1": 0.245, "augmented_depth/zero": 1.0,
                          "rotation_diagonal/linear": 4.57e-6, "rotation_diagonal/softmax": 4.81,
                          "rotation_diagonal/gd1": 3.19, "rotation_diagonal/zero": 10.0},
    "fig4": {"T": 5, "corpus": "text.txt", "corpus_tokens": 309, "embedding_dim": 256,
             "float32_check_s": 0.0497, "fraction_conflicting_repeat_real": 0.025,
             "fraction_conflicting_repeat_shuffled": 0.2, "fraction_exact_real": 0.975,
             "fraction_exact_real_float32": 0.975, "fraction_exact_shuffled": 0.8,
             "fraction_exact_shuffled_float32": 0.8,
             "fraction_windows_with_repeat_real": 0.025, "fraction_windows_with_repeat_shuffled": 0.2,
             "median_mse_inexact_real": 0.0011878929779757697, "median_mse_inexact_real_float32": 0.001187892397865653,
             "median_mse_inexact_shuffled": 0.0011905298801442835,
             "median_mse_inexact_shuffled_float32": 0.0011905295541509986, "median_mse_real": 3.53e-33,
             "median_mse_real_float32": 6.3e-16, "median_mse_shuffled": 2.94e-33,
             "median_mse_shuffled_float32": 9.4e-16,
             "n_exact_verdict_differs_real_float32": 0, "n_exact_verdict_differs_shuffled_float32": 0,
             "n_inexact_real": 1, "n_inexact_real_float32": 1, "n_inexact_shuffled": 8, "n_inexact_shuffled_float32": 8,
             "n_windows": 40, "n_windows_available": 61, "seed": 0, "source": "wordllama", "threshold": 1e-12,
             "vocab_size": 32000, "wall_s": 1.257},
}


def test_every_claim_is_registered_once_and_every_figure_by_one_module():
    assert [claim.number for claim, _ in CLAIMS] == list(range(1, 9))
    modules: dict[str, list[str]] = {}
    for info in pkgutil.iter_modules(icar.claims.__path__):
        figure = getattr(importlib.import_module(f"icar.claims.{info.name}"), "FIGURE", None)
        if figure is not None:
            modules.setdefault(figure.name, []).append(info.name)
    assert set(modules) == set(FIGURES) and all(len(m) == 1 for m in modules.values()), modules
    assert {figure.name for _, figure in CLAIMS} == set(FIGURES)


@pytest.mark.parametrize("figure, scale", [(f, s) for f, fig in FIGURES.items() for s in fig.protocol])
def test_protocol_names_sweep_files_of_its_figure(figure, scale):
    """make_figure tells the scale from the runs' `name`: each protocol's sweep config must name its runs after
    itself and draw its figure at the end."""
    config = FIGURES[figure].protocol[scale]
    assert (SWEEPS / f"{config}.yaml").is_file()
    cfg = compose_sweep(config)
    assert cfg.name == config
    assert cfg.hydra.callbacks.aggregate.figure == figure


def test_sweep_figures_run_at_both_scales_and_every_figure_sweep_is_registered():
    for name, figure in FIGURES.items():
        assert set(figure.protocol) == ({Scale.cpu, Scale.paper} if figure.draw else set()), name
    named = {line.split("figure:")[1].strip() for path in SWEEPS.glob("*.yaml")
             for line in path.read_text().splitlines() if line.strip().startswith("figure:")}
    assert named == {name for name, figure in FIGURES.items() if figure.draw}


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("figure", list(FIGURES))
def test_make_target_runs_the_protocol_of_each_scale(figure):
    """`make -n` (print, run nothing): SCALE=cpu, its alias quick and the default run the cpu sweep, paper the paper
    one; fig4 fits every window at paper scale."""
    claim_figure = FIGURES[figure]
    target = claim_figure.target.removeprefix("make ")

    def command(*scale: str) -> str:
        # under `make test` the outer make's flags and variables (ARGS, SCALE) must not reach this one
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "ARGS", "SCALE")}
        proc = subprocess.run(["make", "-n", "--no-print-directory", target, *scale], cwd=REPO, capture_output=True,
                              text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        return " ".join(proc.stdout.splitlines()) + " "  # the run, then keeping its record in results/

    cpu, paper = command("SCALE=cpu"), command("SCALE=paper")
    assert command("SCALE=quick").replace("SCALE=quick", "SCALE=cpu") == cpu
    assert command().replace(f'"make {target}"', f'"make {target} SCALE=cpu"') == cpu
    if claim_figure.protocol:
        assert f"--config-name {claim_figure.protocol[Scale.cpu]} " in cpu
        assert f"--config-name {claim_figure.protocol[Scale.paper]} " in paper
    else:
        assert "scripts/fig4.py" in cpu and "max_windows=0" in paper and "max_windows" not in cpu


@pytest.mark.parametrize("figure", list(FIGURES))
def test_numbers_read_old_records_and_write_them_back_unchanged(figure):
    old = OLD_NUMBERS[figure]
    numbers = FIGURES[figure].numbers.from_json(json.loads(json.dumps(old)))
    assert numbers.to_json() == old
    for claim in FIGURES[figure].claims:
        ours, verdict, evidence = claim.judge(numbers)
        assert verdict in (REPRODUCED, PARTLY, NOT) and ours and evidence.startswith("rule:")


@pytest.mark.parametrize("figure", list(FIGURES))
def test_a_record_missing_a_number_is_incomplete_unless_the_number_is_optional(figure):
    """Without any one key, the numbers either cannot be read (the verdict is `incomplete record`) or read back
    as a record that lacks just that key (an optional number, such as fig7's P share of a model without P)."""
    old = OLD_NUMBERS[figure]
    incomplete = 0
    for key in old:
        partial = {k: v for k, v in old.items() if k != key}
        try:
            numbers = FIGURES[figure].numbers.from_json(partial)
        except KeyError:
            incomplete += 1
            text = render({(figure, Scale.cpu): (Path("x/figure.json"), FigureRecord(figure=figure, numbers=partial))},
                          Path("."))
            assert INCOMPLETE in text
        else:
            assert numbers.to_json() == partial, key
    assert incomplete >= len(old) - 4


def test_every_registered_figure_has_an_old_record_here():
    assert set(OLD_NUMBERS) == set(FIGURES)


def test_scale_of_the_runs_comes_from_the_protocol():
    fig6 = FIGURES["fig6"]
    assert fig6.scale_of({"fig6_quick"}) == Scale.cpu and fig6.scale_of({"fig6"}) == Scale.paper
    for names in ({"fig6", "fig6_quick"}, {"fig3"}, set()):
        with pytest.raises(ValueError, match="not of the fig6 sweep"):
            fig6.scale_of(names)


def _save(root: Path, sub: str, figure: str, scale: str, finished: str) -> None:
    """A record as an icar of any age wrote it, with its own scale word."""
    (root / sub).mkdir(parents=True)
    record = {"figure": figure, "numbers": {"tag": sub}, "scale": scale, "finished": finished}
    (root / sub / "figure.json").write_text(json.dumps(record))


def test_the_newest_record_of_each_scale_is_read_and_old_words_are_read(tmp_path):
    _save(tmp_path, "fig6_paper", "fig6", "paper", "2026-01-01 10:00 UTC")
    _save(tmp_path, "fig6_cpu", "fig6", "cpu", "2026-02-01 10:00 UTC")
    _save(tmp_path, "fig4_all", "fig4", "all windows", "2026-01-01 10:00 UTC")  # fig4's max_windows=0, before
    _save(tmp_path, "fig4_cpu", "fig4", "cpu", "2026-02-01 10:00 UTC")
    _save(tmp_path, "fig5_quick", "fig5", "quick", "2026-02-01 10:00 UTC")
    _save(tmp_path, "fig5_cpu", "fig5", "cpu", "2026-01-01 10:00 UTC")
    found = newest_records([tmp_path])
    assert {key: record.numbers["tag"] for key, (_, record) in found.items()} == {
        ("fig6", Scale.paper): "fig6_paper", ("fig6", Scale.cpu): "fig6_cpu", ("fig4", Scale.paper): "fig4_all",
        ("fig4", Scale.cpu): "fig4_cpu", ("fig5", Scale.cpu): "fig5_quick"}  # a newer CPU one never hides a paper one


def test_fig5_evidence_says_depth_stops_paying_only_where_the_mse_does():
    old = OLD_NUMBERS["fig5"]
    assert "stops paying" not in judge_fig5(Fig5Numbers.from_json(old))[2]
    rises = judge_fig5(Fig5Numbers.from_json(old | {"L3/mse_last": 0.25}))
    assert rises[1] == PARTLY and "depth stops paying after L = 2" in rises[2] and "SCALE=paper" in rises[2]
    two = {k: v for k, v in old.items() if not k.startswith("L3/")} | {"depths": [1, 2]}
    falls = judge_fig5(Fig5Numbers.from_json(two))  # every step falls, but two depths show no trend
    assert falls[1] == PARTLY and "stops paying" not in falls[2] and "too few" in falls[2]
    paper = judge_fig5(Fig5Numbers.from_json(old | {"L3/mse_last": 0.25, "T": 50, "steps": 3200}))
    assert "stops paying" in paper[2] and "SCALE=paper" not in paper[2]


def test_a_verdict_that_changes_with_scale_is_explained_from_both_records():
    """CPU size: L = 3 no better than L = 2 (partly); paper size: every layer helps (reproduced). REPRODUCTION.md
    says the verdict changed, where each stops paying and what differs, from the two records' numbers."""
    cpu = OLD_NUMBERS["fig5"] | {"L3/mse_last": 0.25, "d": 5}
    paper = OLD_NUMBERS["fig5"] | {"T": 50, "steps": 3200, "seeds": 1, "d": 5}
    records = {("fig5", scale): (Path(f"results/fig5/{scale.value}/figure.json"),
                                 FigureRecord(figure="fig5", numbers=numbers, scale=scale))
               for scale, numbers in ((Scale.cpu, cpu), (Scale.paper, paper))}
    text = render(records, Path("."))
    row = next(line for line in text.splitlines() if line.startswith("| 4. "))
    assert row.endswith("| **reproduced** | partly |")
    assert "**The verdict changes with scale**: partly at CPU size, reproduced at the paper's size" in text
    assert "it stops falling at L = 2 -> 3 (+25.0%, rises), where GD's step 3 still changes GD's MSE by -33.3%" in text
    assert "With 2.5x the context and 1.6x the optimiser steps depth pays at every L" in text
    assert text.count("changes with scale") == 1  # no other claim has both records
    assert "| 3 | 0.1 | 0.2 | 0.1 | 0.2 | 0.02 | 0.04 |" in text  # nn.MSELoss-equivalent: mean over positions / d


def test_fig4_evidence_explains_repeats_only_where_real_and_shuffled_differ():
    old = OLD_NUMBERS["fig4"] | {"fraction_exact_real": 0.8, "fraction_exact_shuffled": 0.975}
    differ = judge_fig4(Fig4Numbers.from_json(old))
    assert differ[1] == NOT and "repeat a token less often" in differ[2] and "GPT-2-large" in differ[2]
    same = judge_fig4(Fig4Numbers.from_json(old | {"fraction_windows_with_repeat_shuffled": 0.025}))
    assert same[1] == NOT and "repeat" not in same[2].split("tokens).", 1)[1]
    paper = judge_fig4(Fig4Numbers.from_json(old | {"source": "hf:gpt2-large"}))
    assert "GPT-2-large" not in paper[2]


def test_prop2_evidence_explains_the_raw_cosine_only_where_it_is_below_the_aligned_one():
    old = OLD_NUMBERS["prop2"]
    assert "commutes" in judge_prop2(Prop2Numbers.from_json(old))[2]
    assert "commutes" not in judge_prop2(Prop2Numbers.from_json(old | {"icmap_cosine": 0.9999}))[2]


def test_a_protocol_run_with_one_kind_only_makes_claim_7_partly_not_refuted():
    from icar.claims.softmax_vs_linear import SoftmaxVsLinearNumbers, judge_softmax_vs_linear

    old = OLD_NUMBERS["softmax_vs_linear"]
    numbers = SoftmaxVsLinearNumbers.from_json(old)
    assert judge_softmax_vs_linear(numbers)[1] == REPRODUCED
    missing = {k: (float("nan") if k == "augmented_depth/softmax" else v) for k, v in old.items()}
    _, verdict, evidence = judge_softmax_vs_linear(SoftmaxVsLinearNumbers.from_json(missing))
    assert verdict == PARTLY and "Not measured: augmented_depth (softmax)." in evidence


def test_the_committed_reproduction_md_is_what_the_committed_records_render():
    """`make reproduction` on a clean clone trains nothing and rewrites REPRODUCTION.md unchanged: every row comes
    from a record under results/ (regenerate it after keeping a new record)."""
    from icar.orchestration.reproduction import newest_records, render

    records = newest_records([REPO / "results"])
    assert {scale for _, scale in records} == {Scale.cpu, Scale.paper}
    assert render(records, REPO) == (REPO / "REPRODUCTION.md").read_text()
