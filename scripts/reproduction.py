"""Write REPRODUCTION.md from the newest figure records, or redraw one figure from a finished sweep first:

    python scripts/reproduction.py                          # REPRODUCTION.md from multirun/ and runs/
    python scripts/reproduction.py --figure fig3 SWEEP_DIR  # redo SWEEP_DIR/aggregate/figure.json, then the above

The records (figure.json) are written at the end of every figure target (make fig3, ..., make figures); each
claim's verdict rule lives in its module, icar/claims/<figure>.py.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from icar.claims.registry import FIGURES  # noqa: E402
from icar.orchestration.figures import make_figure, sweep_figures  # noqa: E402
from icar.orchestration.reproduction import newest_records, write_reproduction  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="with --figure: the finished figure sweep")
    parser.add_argument("--figure", help=f"redraw this figure ({', '.join(sweep_figures())})")
    parser.add_argument("--out", type=Path, default=REPO / "REPRODUCTION.md")
    parser.add_argument("--roots", nargs="+", type=Path, default=[REPO / "multirun", REPO / "runs"],
                        help="folders searched for figure.json records (default: the checkout's multirun/ and runs/)")
    args = parser.parse_args()
    if args.figure:
        if args.sweep_dir is None or not args.sweep_dir.is_dir():
            parser.error(f"--figure {args.figure} needs the sweep folder it was run in, got {args.sweep_dir}")
        if args.figure not in sweep_figures():
            parser.error(f"--figure must be one of {', '.join(sweep_figures())}, got {args.figure!r}")
        try:
            record = make_figure(args.figure, args.sweep_dir)
        except (FileNotFoundError, ValueError) as err:  # no finished runs, or runs of another sweep
            sys.exit(f"error: cannot draw {args.figure}: {err}")
        print(f"{args.figure}: {', '.join(record.figures)}")
    records = newest_records(args.roots)
    path = write_reproduction(args.out, args.roots)
    print(f"{path}: {len(records)} of {len(FIGURES)} figures recorded")
    for line in path.read_text().splitlines():
        if line.startswith("| ") and "**" in line:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip("|"))]  # cells hold escaped pipes
            print(f"  {cells[0][:60]:<60} {cells[3].strip('*')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
