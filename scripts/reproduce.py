"""Reproduce one of the paper's tables: run its sweeps (resuming), then write results/<table>.{md,csv,png}.

    python scripts/reproduce.py table2_mini                     # the embedded-model twin, CPU, ~15 min
    python scripts/reproduce.py table2 --ngpu 8                 # torchrun over 8 GPUs per run
    python scripts/reproduce.py table2 --launcher slurm --ngpu 8 hydra.launcher.partition=gpu
    python scripts/reproduce.py table2 --dry-run                # every job (overrides, seeds, ranks); runs nothing
    python scripts/reproduce.py table2_mini --smoke             # smallest size (what the tests run)

Tables are specs in configs/tables/ (bdia.apps.reproduce, bdia.apps.tables). Extra arguments are Hydra overrides given
to every sweep (e.g. solver.gamma=0.3). The make targets reproduce-table1/2/3 and their -mini twins call this.
"""

from __future__ import annotations

import argparse
import sys

from bdia.apps.reproduce import reproduce, spec_names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", help=f"one of: {', '.join(spec_names())}")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides added to every sweep")
    parser.add_argument("--ngpu", type=int, default=1, help="processes (GPUs) per run; >1 uses torchrun")
    parser.add_argument("--launcher", default="local", choices=["local", "slurm"])
    parser.add_argument("--dry-run", action="store_true", help="print every job and exit")
    parser.add_argument("--smoke", action="store_true", help="the smallest size of every sweep (tests)")
    parser.add_argument("--runs-root", default=None, help="put run folders here instead of the spec's runs_root")
    parser.add_argument("--output", default=None, help="table path without suffix (default: the spec's output)")
    parser.add_argument("--results-dir", default=None,
                        help="write the table under this folder instead of results/ (make: results/local unless REGENERATE=1)")
    parser.add_argument("--wandb", action="store_true", help="log every run (offline) and the summary table to W&B")
    args = parser.parse_intermixed_args(argv)  # overrides may come after the options
    try:
        reproduce(args.table, ngpu=args.ngpu, launcher=args.launcher, dry_run=args.dry_run, smoke=args.smoke,
                  extra=args.overrides, runs_root=args.runs_root, output=args.output, wandb=args.wandb,
                  results_dir=args.results_dir)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
