"""What every claim module (icar/claims/<figure>.py) is made of: the scales a protocol runs at, the verdict words,
a claim and its figure (statement, protocol, drawing, typed numbers, verdict rule), and the helpers they share."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import pandas as pd

REPRODUCED, PARTLY, NOT = "reproduced", "partly", "not reproduced"
INCOMPLETE = "incomplete record"  # the record lacks a number its rule needs: rerun the figure
Verdict = tuple[str, str, str]  # (our number, verdict, evidence and, where we differ, why we think so)


class Scale(str, Enum):
    """The size a protocol runs at: `cpu` (minutes on a laptop, sweeps/<name>_quick.yaml) or `paper` (the
    paper's sizes, GPUs). Records, make_figure, the ranking of records and the Makefile's SCALE use these words."""

    cpu = "cpu"
    paper = "paper"

    def __str__(self) -> str:
        return self.value


N = TypeVar("N", bound="FigureNumbers")


class FigureNumbers(Protocol):
    """A figure's numbers as a typed record that round-trips through figure.json's `numbers`."""

    def to_json(self) -> dict[str, Any]: ...

    @classmethod
    def from_json(cls: type[N], data: Mapping[str, Any]) -> N: ...


class FlatNumbers:
    """Numbers whose dataclass fields are figure.json's keys, one to one (a field left at None is left out)."""

    def to_json(self) -> dict[str, Any]:
        return to_keys(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Any:
        return from_keys(cls, data)


@dataclass(frozen=True)
class Claim(Generic[N]):
    """One claim of docs/PAPER_NOTES.md §4: the paper's statement and number, and the rule that judges ours."""

    number: int
    title: str
    paper: str
    judge: Callable[[N], Verdict]
    # (CPU-scale numbers, paper-scale numbers) -> what differs between the two records and what the numbers suggest
    # about why; said in REPRODUCTION.md where the verdict changes with scale
    across_scales: Callable[[N, N], str] | None = None


@dataclass(frozen=True)
class ClaimFigure(Generic[N]):
    """One figure and the claims it judges: `protocol` names the sweep config (sweeps/<name>.yaml) that runs it at
    each scale (empty for a figure made by its own script, fig4), `draw` turns the sweep's runs into the figure and
    its numbers."""

    name: str  # the record's `figure`, the sweeps' `hydra.callbacks.aggregate.figure`
    claims: tuple[Claim[N], ...]
    numbers: type[N]
    target: str  # the make command
    protocol: Mapping[Scale, str]
    draw: Callable[[pd.DataFrame, Path], tuple[N, list[Path]]] | None = None

    def scale_of(self, run_names: set[str]) -> Scale:
        """The scale whose sweep config the runs came from (every run's `name` is its sweep config's name)."""
        for scale, sweep in self.protocol.items():
            if run_names == {sweep}:
                return scale
        sweeps = " or ".join(f"sweeps/{s}.yaml" for s in self.protocol.values())
        raise ValueError(f"runs of {', '.join(sorted(run_names)) or '(unnamed)'}, not of the {self.name} sweep "
                         f"({sweeps})")


def to_keys(numbers: Any, key: str = "{}") -> dict[str, Any]:
    """A dataclass's fields under JSON keys made from `key` ("mu50/{}" -> "mu50/mse"); a field left at its default
    None is left out, as the records that lack it always did."""
    return {key.format(f.name): getattr(numbers, f.name) for f in fields(numbers)
            if not (f.default is None and getattr(numbers, f.name) is None)}


def from_keys(cls: type[Any], data: Mapping[str, Any], key: str = "{}") -> Any:
    """The dataclass `cls` read back from to_keys' layout; a missing key of a field without a default raises
    KeyError (the verdict is then `incomplete record`)."""
    values = {}
    for f in fields(cls):
        if key.format(f.name) in data:
            values[f.name] = data[key.format(f.name)]
        elif f.default is MISSING:
            raise KeyError(key.format(f.name))
    return cls(**values)


def _f(x: Any, digits: int = 3) -> str:
    """A number for the table: 3 significant digits, n/a for None and NaN."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def _missing(key: str) -> KeyError:
    return KeyError(f"the runs have no {key!r}: not a sweep of this figure, or runs from an older icar")


def _get(run: pd.Series, key: str) -> float:
    """run[key] as a float (NaN where the run logged no value); a missing column is an error, not a NaN."""
    if key not in run.index:
        raise _missing(key)
    value = run[key]
    return float(value) if not pd.isna(value) else math.nan


def _mean(runs: pd.DataFrame, key: str) -> float:
    """The mean of column `key` over the runs (NaN where none logged it); a missing column is an error."""
    if key not in runs:
        raise _missing(key)
    return float(runs[key].mean()) if runs[key].notna().any() else math.nan


def one_run_per(runs: pd.DataFrame, key: str) -> pd.DataFrame:
    """The first seed's run per value of `key`: the figures draw one model per panel (numbers say how many seeds)."""
    return runs.sort_values("seed").drop_duplicates(subset=[key], keep="first")
