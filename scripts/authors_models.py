"""The authors' model classes (../shared/reference/ical, MIT), loaded for side-by-side timing only.

Their two scripts import jax and scipy at the top for data generation; the model classes need only torch. We exec
each file's source up to its data code (the line `sigma = ...`) with those imports removed, and return the
`Transformer` class it defines. Nothing of theirs is part of icar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "ical"
SCRIPTS = {"augmented": "augmented.py", "non_augmented": "non_augmented.py"}


def authors_transformer(script: str, reference: Path = REFERENCE) -> Any:
    """The `Transformer` class of the authors' augmented.py (Figure 5) or non_augmented.py (Figure 7)."""
    path = reference / SCRIPTS[script]
    if not path.is_file():
        raise FileNotFoundError(f"the authors' script {path} is missing: the benchmark needs ../shared/reference/ical")
    source = path.read_text()
    source = source[: source.index("\nsigma =")]  # the model classes end where the data generation starts
    lines = [ln for ln in source.splitlines() if not ln.startswith(("import jax", "from scipy", "import numpy"))]
    namespace: dict[str, Any] = {"__name__": f"ical_{script}"}
    exec(compile("\n".join(lines), str(path), "exec"), namespace)  # noqa: S102 - a pinned, vendored file
    return namespace["Transformer"]
