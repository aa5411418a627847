"""The layers of the package (.importlinter): core <- training <- analysis <- claims <- orchestration, checked by
import-linter on this checkout, and shown to catch what they forbid on a copy with a violation planted in it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports run in `root`: its .importlinter, its `icar` (the current folder comes first on the path)."""
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The package and its contract, copied where a violation can be planted."""
    shutil.copytree(REPO / "icar", tmp_path / "icar", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


@pytest.mark.parametrize("module, planted, contract", [
    # an import that runs upwards, hidden inside a function: the kind of late import that used to break a cycle
    ("icar/training/guards.py", "def _late() -> None:\n    from icar.analysis.analyze import analyze  # noqa\n",
     "core <- training <- analysis <- claims <- orchestration BROKEN"),
    # a core module reaching for a framework
    ("icar/models/diagonal.py", "import lightning.pytorch  # noqa\n",
     "imports no framework BROKEN"),
    # a cycle between two modules of one layer
    ("icar/orchestration/report.py", "from icar.orchestration import sweep  # noqa\n",
     "no cycles between the modules of a package BROKEN"),
])
def test_a_planted_violation_breaks_the_contract(copy: Path, module: str, planted: str, contract: str):
    path = copy / module
    path.write_text(path.read_text() + "\n" + planted)
    result = lint(copy)
    assert result.returncode != 0
    assert contract in " ".join(result.stdout.split()), result.stdout[-3000:]


def test_a_training_job_imports_no_lightning_before_its_config_is_valid():
    """scripts/train.py refuses a bad config before Lightning, the analyses or matplotlib are imported (2 s rather
    than 6): its job module and the Hydra registration stay light."""
    probe = ("import sys, icar.orchestration.job, icar.orchestration.hydra_config; "
             "print(sorted(m for m in ('lightning', 'matplotlib', 'pandas', 'optuna', 'wandb') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
