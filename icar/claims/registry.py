"""Every claim module of icar/claims/, found by listing the package: a module that exposes `FIGURE` (a ClaimFigure)
is one figure and its claims, so that adding a claim is adding one file."""

from __future__ import annotations

import importlib
import pkgutil

import icar.claims
from icar.claims.base import Claim, ClaimFigure


def _discover() -> dict[str, ClaimFigure]:
    """{figure name: ClaimFigure} of the package's modules, in module order; two modules of one figure, or two
    claims with one number, are an error."""
    figures: dict[str, ClaimFigure] = {}
    for info in pkgutil.iter_modules(icar.claims.__path__):
        if info.name == __name__.rsplit(".", 1)[1]:
            continue
        figure = getattr(importlib.import_module(f"{icar.claims.__name__}.{info.name}"), "FIGURE", None)
        if not isinstance(figure, ClaimFigure):
            continue
        if figure.name in figures:
            raise ValueError(f"two claim modules draw {figure.name}: icar/claims/{info.name}.py and another")
        figures[figure.name] = figure
    numbers = [c.number for f in figures.values() for c in f.claims]
    if len(numbers) != len(set(numbers)):
        raise ValueError(f"claim numbers repeat across icar/claims/: {sorted(numbers)}")
    return figures


FIGURES: dict[str, ClaimFigure] = _discover()
CLAIMS: list[tuple[Claim, ClaimFigure]] = sorted(((c, f) for f in FIGURES.values() for c in f.claims),
                                                 key=lambda cf: cf[0].number)
