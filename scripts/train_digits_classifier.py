"""Train the digits classifier whose features give "FD in digits-classifier features" and KID on the embedded
data set, and write it to bdia/assets/ (safetensors + a JSON card with the settings and held-out accuracy).

    python scripts/train_digits_classifier.py                 # the shipped asset (about 20 s on one CPU thread)
    python scripts/train_digits_classifier.py --epochs 5 --out /tmp/clf.safetensors

Deterministic: fixed seed, a fixed thread count (``--threads``, default 1) and
``torch.use_deterministic_algorithms(True)``; rerunning with the same torch build writes the same bytes.
Data: scikit-learn's digits, preprocessed as ``bdia.analytic.digits_gmm`` does (see
``bdia.metrics.digits_classifier``); trained on the fixed "train" split, accuracy reported on the held-out
"test" split (index % 4 == 3), which the classifier never sees.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bdia.metrics.digits_classifier import ASSET_WEIGHTS, save_digits_classifier, train_digits_classifier  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ASSET_WEIGHTS, help="safetensors path (card: same name, .json)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("--epochs, --batch-size and --threads must be positive")
    model, report = train_digits_classifier(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                            weight_decay=args.weight_decay, seed=args.seed, threads=args.threads,
                                            progress=not args.quiet)
    report["command"] = "python scripts/train_digits_classifier.py " + " ".join(argv if argv is not None else sys.argv[1:])
    path = save_digits_classifier(model, report, args.out)
    card = json.loads(path.with_suffix(".json").read_text())
    print(f"held-out accuracy {card['accuracy']['test']:.4f} ({card['data']['num_test']} digits), "
          f"{card['train_seconds']} s -> {path} (sha256 {card['weights']['sha256'][:12]}…)")
    return card


if __name__ == "__main__":
    main()
