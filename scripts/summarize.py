"""Tabulate (and plot) any results folder: a sweep, a whole experiment, or one run.

    python scripts/summarize.py results/sample/digits_demo            # after python scripts/sample.py -m ...
    python scripts/summarize.py results/sample/table2_digits --y evaluation.digits.fd --x nfe
    python scripts/summarize.py results/edit/table3_tiny --metrics latent.relative_error,methods.image.psnr
    python scripts/summarize.py results/text2image/default --no-files  # the table on the console only
    make summarize DIR=results/sample/digits_demo

One row per run folder below FOLDER (per method for scripts/edit.py runs). The columns are the overrides that
vary between the runs (a sweep's folders are named after them; otherwise the runs' config.yaml) and the headline
numbers of each run's metrics.json (NFE, FD/KID in digits-classifier features, FID, CLIP score, round-trip
errors, images/s, ...; --metrics picks others, dotted keys into metrics.json). Settings shared by every run are
listed above the table, real-data floors below it.

Writes FOLDER/summary.md, .csv and .png (or --output PREFIX; nothing into a single run's folder): the plot is --y against --x (default: the first
quality metric against NFE, or against the first numeric setting that varies), one line per combination of the
other varying settings. Files it did not write itself are never replaced. Mistakes end in one line
``error: ...`` with exit status 1.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a results folder: a sweep (results/sample/<experiment>), several, or one run")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated metrics.json keys to show (default: the headline numbers present)")
    parser.add_argument("--y", default=None, help="the metric to plot (default: FID / FD / CLIP score / latent error)")
    parser.add_argument("--x", default=None, help="the key to plot it against (default: nfe, else a numeric setting)")
    parser.add_argument("--output", default=None, help="file prefix (default: FOLDER/summary -> .md, .csv, .png)")
    parser.add_argument("--no-files", action="store_true", help="print the table only; write nothing")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from bdia.apps.tables import summarize, summary_markdown, write_summary

    command = shlex.join(["python", "scripts/summarize.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
        summary = summarize(args.folder, metrics)
        print(summary_markdown(summary))
        single_run = (Path(args.folder) / "metrics.json").is_file()
        if single_run and not args.output and not args.no_files:
            print("one run folder: nothing written into it (give --output PREFIX for files)")
        elif not args.no_files:
            output = Path(args.output) if args.output else Path(args.folder) / "summary"
            paths = write_summary(summary, output, command, y=args.y, x=args.x)
            print("wrote " + ", ".join(str(p) for p in paths.values()))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot read or write a file: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
