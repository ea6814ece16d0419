"""Build a table's Markdown, CSV and plot from its run folders' metrics.json (never from typed-in numbers).

    python scripts/make_tables.py table2_mini          # -> results/embedded/table2.{md,csv,png}
    python scripts/make_tables.py table2 --runs-root /scratch/results/sample
    python scripts/make_tables.py --all                # every table whose runs exist
    python scripts/make_tables.py --all --results-dir results/local   # ... without touching the tracked results/

Table specs: configs/tables/<name>.yaml (bdia.apps.tables explains the keys).
"""

from __future__ import annotations

import argparse
import sys

from bdia.apps.reproduce import load_spec, run_roots, spec_names, table_output
from bdia.apps.tables import write_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="*", help=f"any of: {', '.join(spec_names())}")
    parser.add_argument("--all", action="store_true", help="every table with at least one run folder")
    parser.add_argument("--runs-root", default=None, help="where the run folders are (default: the spec's runs_root)")
    parser.add_argument("--output", default=None, help="table path without suffix (one table only)")
    parser.add_argument("--results-dir", default=None,
                        help="write the tables under this folder instead of results/ (make: results/local unless REGENERATE=1)")
    args = parser.parse_args(argv)
    names = spec_names() if args.all else args.tables
    if not names:
        parser.error("name a table or pass --all")
    try:
        for name in names:
            spec = load_spec(name)
            if args.all and not any(root.is_dir() for root in run_roots(spec, args.runs_root)):
                continue
            paths = write_table(spec, run_roots(spec, args.runs_root), table_output(spec, args.output, args.results_dir),
                                command=f"python scripts/make_tables.py {spec['name']}")
            print(f"{spec['name']}: " + ", ".join(str(p) for p in paths.values()))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
