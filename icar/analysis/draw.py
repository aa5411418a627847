"""The figures of one model's analysis (PNG + PDF), drawn from its `ModelAnalysis` alone."""

from __future__ import annotations

from pathlib import Path

from icar.analysis.compute import ModelAnalysis
from icar.analysis.plots import plot_c_structure, plot_head_orthogonality, plot_mse_by_position, plot_positional


def draw_analysis(result: ModelAnalysis, out_dir: Path) -> dict[str, list[Path]]:
    """Every figure the analysis has data for, into out_dir: figure name -> [png, pdf] (empty when nothing to draw)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[Path]] = {}
    if result.mse_by_position:
        figures["mse_by_position"] = plot_mse_by_position(
            result.mse_by_position, out_dir / "mse_by_position", title=f"{result.name}: MSE by position",
            first_position=result.first_position,
        )
    figures["head_orthogonality"] = plot_head_orthogonality(result.head_cosines, result.scalars,
                                                            out_dir / "head_orthogonality")
    if result.positional:
        figures["positional"] = plot_positional(result.positional, result.positional_fits, out_dir / "positional")
    if result.c_structure is not None:
        c = result.c_structure
        figures["c_structure"] = plot_c_structure(c.C, c.info, out_dir / "c_structure", A=c.A, B=c.B)
    return figures
