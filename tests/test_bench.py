"""`make bench` keeps running: a two-step pass over a small Figure 5 config, the authors' model beside ours."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AUTHORS = REPO.parent / "shared" / "reference" / "ical" / "augmented.py"


@pytest.mark.skipif(not AUTHORS.exists(), reason="../shared/reference/ical/ (the authors' scripts) is not beside the repo")
def test_bench_measures_ours_and_the_authors_side_by_side(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_train

    out = tmp_path / "bench.json"
    bench_train.main(["--configs", "augmented_depth:model.n_layers=2", "--override", "data.batch_size=16",
                      "--override", "data.T=10", "--warmup", "1", "--steps", "2", "--repeats", "2",
                      "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert len(row["lightning_s_per_step"]) == len(row["plain_s_per_step"]) == len(row["authors_s_per_step"]) == 2
    for key in ("lightning_overhead_ratio", "lightning_overhead_ratio_with_validation", "sampling_share",
                "sampling_cost_share", "speedup_vs_authors", "fraction_of_gemm_rate", "fraction_of_copy_rate"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["flops_per_step"] > 0 and row["authors_flops_per_step"] > 0 and row["bytes_per_step_unfused"] > 0
    assert row["final_loss_lightning"] == pytest.approx(row["final_loss_plain"], rel=1e-6)  # the same training
    assert "speed-up vs authors" in capsys.readouterr().out
