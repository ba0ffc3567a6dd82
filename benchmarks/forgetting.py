"""The forgetting study v2's design as a preset of ``kappatune study``, and v2's record.

v2's design is declared in the study vocabulary in ``benchmarks/results/forgetting_v2/v2_study.json``
(its main phase and task 2 in sequence) and ``v2_long_study.json`` (its long phase); this script runs
them with ``kappatune study`` (guide: docs/guides/study.md), every other option passed through::

    python benchmarks/forgetting.py                       # v2's design -> benchmarks/results/forgetting_v2_rerun
    python benchmarks/forgetting.py --threads 1 &         # ...one worker per core: start it once per core
    python benchmarks/forgetting.py --long                # its long phase -> benchmarks/results/forgetting_v2_rerun_long
    python benchmarks/forgetting.py --dry-run             # the runs and their CPU-hours; --report, --device cuda, --out DIR...
    python benchmarks/forgetting.py --v2-report           # v2's own report again, from its committed run files
    python benchmarks/forgetting.py --v2-report DIR       # ...in a copy of v2's folder (record.json checked)
    python benchmarks/make_docs.py                        # then the pages

v2's own runs (``benchmarks/results/forgetting_v2``, made by its harness, which is in the repository's
history) chose each arm's learning rate on seed 0; a rerun runs every grid point on every seed, so it
holds v2's runs and more. ``--v2-report`` writes v2's ``results.md``, ``summary.json`` and plots from
those run files with :mod:`kappatune.study.v2` (``--no-plot``: keep the figures in the folder), after
checking that the folder is v2's whole record: every file ``record.json`` lists, with its SHA-256, and
no other run file; otherwise it refuses in one line (exit status 2) and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
V2 = ROOT / "benchmarks" / "results" / "forgetting_v2"
STUDIES = {"main": V2 / "v2_study.json", "long": V2 / "v2_long_study.json"}
OUT = {"main": ROOT / "benchmarks" / "results" / "forgetting_v2_rerun",
       "long": ROOT / "benchmarks" / "results" / "forgetting_v2_rerun_long"}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Every other option is kappatune "
                                 "study's (kappatune study --help); the study file sets the design.")
    ap.add_argument("--long", action="store_true", help="v2's long phase (v2_long_study.json)")
    ap.add_argument("--v2-report", nargs="?", const=str(V2), default=None, metavar="DIR",
                    help="write v2's report again from its run files, in DIR (default: the repository's v2 folder; "
                         "a copy of it works too); refused unless the folder is v2's whole record (record.json)")
    ap.add_argument("--no-plot", action="store_true", help="with --v2-report: keep the figures in the folder")
    args, rest = ap.parse_known_args(argv)
    if args.v2_report is not None:
        if rest or args.long:
            ap.error("--v2-report takes no other option than --no-plot")
        from kappatune.study import v2
        from kappatune.study.folder import FolderError

        folder = Path(args.v2_report).expanduser()
        try:
            v2.write_report(folder, plots=not args.no_plot)
        except FolderError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {folder / 'results.md'} and {folder / 'summary.json'}"
              + ("; now: python benchmarks/make_docs.py" if folder.resolve() == V2.resolve() else ""))
        return 0
    from kappatune import cli

    phase = "long" if args.long else "main"
    if "--out" not in rest:
        rest += ["--out", str(OUT[phase])]
    if args.no_plot:
        rest.append("--no-plot")
    return cli.main(["study", "--study", str(STUDIES[phase]), *rest])


if __name__ == "__main__":
    sys.exit(main())
