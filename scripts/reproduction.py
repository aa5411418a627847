"""Write REPRODUCTION.md from the committed figure records, keep a figure's record there, or redraw one first:

    python scripts/reproduction.py                          # REPRODUCTION.md from results/ (make reproduction)
    python scripts/reproduction.py --keep multirun/fig5     # copy the newest record below it into results/
    python scripts/reproduction.py --figure fig3 SWEEP_DIR  # redo SWEEP_DIR/aggregate/figure.json, keep it, write

Every figure target writes its record (figure.json) when it ends and keeps it under results/<figure>/<scale>/ (with
its PNGs, runs table and each run's summary.json and config.yaml); each claim's verdict rule lives in its module,
icar/claims/<figure>.py.
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
from icar.orchestration.results import RESULTS_DIR, keep_record, newest_record  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="with --figure: the finished figure sweep")
    parser.add_argument("--figure", help=f"redraw this figure ({', '.join(sweep_figures())})")
    parser.add_argument("--keep", type=Path, metavar="FOLDER",
                        help="copy the newest record below FOLDER (a sweep or fig4 run, or a folder of them) into "
                             "results/<figure>/<scale>/ and stop")
    parser.add_argument("--out", type=Path, default=REPO / "REPRODUCTION.md")
    parser.add_argument("--results", type=Path, default=REPO / RESULTS_DIR, help="where records are kept")
    parser.add_argument("--roots", nargs="+", type=Path, default=None,
                        help="folders searched for figure.json records (default: --results)")
    args = parser.parse_args()
    if args.keep is not None:
        try:
            out = keep_record(newest_record(args.keep), args.results)
        except FileNotFoundError as err:
            sys.exit(f"error: {err}")
        print(f"record kept in {out}")
        return 0
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
        print(f"record kept in {keep_record(args.sweep_dir / 'aggregate' / 'figure.json', args.results)}")
    roots = args.roots or [args.results]
    records = newest_records(roots)
    path = write_reproduction(args.out, roots)
    print(f"{path}: {len(records)} records of {len(FIGURES)} figures at 2 scales")
    for line in path.read_text().splitlines():
        if line.startswith("| ") and re.match(r"\| \d+\.", line):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip("|"))]  # cells hold escaped pipes
            print(f"  {cells[0][:60]:<60} paper: {cells[2].strip('*'):<16} cpu: {cells[3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
