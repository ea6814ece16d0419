"""Remove what the runs of this project wrote under results/ (``make clean``), and nothing else.

    python scripts/clean.py                 # remove; prints what went and what stayed
    python scripts/clean.py --dry-run       # only print
    python scripts/clean.py --root /scratch/results

Removed: in every run folder below ``results/{sample,text2image,edit,train,optimize}/`` (a folder holding the
marker ``.bdia-run.json`` that bdia writes first), the regular files its app writes (images, records, end-of-run
files, settings/config/env, the marker and lock, temporaries of killed runs), then the folder if that left it
empty; Hydra's ``multirun.yaml`` of a sweep folder and ``scripts/summarize.py``'s ``summary.*`` there; the tiny random
models (``results/tiny_sd``, ``tiny_clip``, ...: folders of ``results/`` holding ``RANDOM_WEIGHTS.txt``, their model
files); the
tables and benchmark outputs of ``make`` in ``results/local/`` (``.md``, ``.csv``, ``.png``, ``.json``). A run folder
whose lock is held (a run in progress) is skipped. Kept: anything else -- your own files, W&B's offline runs
(``wandb/``: sync them first), symbolic links, the tracked ``results/`` tables -- listed at the end.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import stat
import sys
from pathlib import Path

MARKER, LOCK = ".bdia-run.json", ".bdia-run.lock"
RUN_FILES = ("settings.json", "config.yaml", "env.json", MARKER, LOCK)
TEMPORARY = re.compile(r"\.(.+)\.tmp-[0-9]+")
ITEMS = {"sample": r"[0-9]{6,}", "text2image": r"p[0-9]{5,}_s[0-9]{6,}"}
END_OF_RUN = ("images.npz", "grid.png", "metrics.json", "prompts.json", "prompts.txt")
#: Regular-expression patterns (full match, relative to the run folder) of what each app writes.
WRITTEN = {
    "sample": [rf"images/{ITEMS['sample']}\.png", rf"records/{ITEMS['sample']}\.npz", *map(re.escape, END_OF_RUN)],
    "text2image": [rf"images/{ITEMS['text2image']}\.png", rf"records/{ITEMS['text2image']}\.npz",
                   *map(re.escape, END_OF_RUN)],
    "edit": [r"(bdia|ddim|edict|null_text|rf_inversion|rf_solver|fireflow)\.png",  # = bdia.apps.edit.EDIT_WRITTEN
             r"(bdia|ddim|edict|null_text|rf_inversion|rf_solver|fireflow)_inversion\.npz", r"bdia_pair\.npz",
             r"edit_grid\.png", r"metrics\.json"],
    "train": [r"checkpoint-[0-9]{9,}\.safetensors", r"training_log\.jsonl", r"final\.safetensors"],
    "optimize": [r"state\.npz", r"images\.npz", r"before\.png", r"after\.png", r"before_after\.png", r"metrics\.json",
                 r"loss\.png", r"loss\.csv", r"history\.json"],
}
RUN_ROOTS = ("sample", "text2image", "edit", "train", "optimize")
MODEL_FILE = re.compile(r".+\.(json|safetensors|txt|bin|model)")


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _app(folder: Path) -> str | None:
    marker = folder / MARKER
    if not _regular(marker) or marker.stat().st_size > 2**20:
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    app = data.get("app") if isinstance(data, dict) else None
    return app if app in WRITTEN else None


def _locked(folder: Path) -> bool:
    """A run holds the folder's lock (a run in progress)."""
    if not _regular(folder / LOCK):
        return False
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


class Cleaner:
    def __init__(self, dry_run: bool):
        self.dry_run, self.removed, self.kept, self.skipped = dry_run, 0, [], []

    def remove(self, path: Path) -> None:
        if not self.dry_run:
            path.unlink()
        self.removed += 1

    def rmdir_if_empty(self, folder: Path) -> None:
        if self.dry_run or not folder.is_dir() or folder.is_symlink():
            return
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty: something of the user's is in it

    def run_folder(self, folder: Path, app: str) -> None:
        if _locked(folder):
            self.skipped.append(f"{folder} (a run holds its lock)")
            return
        patterns = [re.compile(p) for p in WRITTEN[app]] + [re.compile(re.escape(n)) for n in RUN_FILES]
        for sub in ("", "images", "records"):
            base = folder / sub if sub else folder
            if not base.is_dir() or base.is_symlink():
                continue
            for entry in sorted(base.iterdir()):
                name = f"{sub}/{entry.name}" if sub else entry.name
                ours = TEMPORARY.fullmatch(entry.name) or any(p.fullmatch(name) for p in patterns)
                if ours and _regular(entry) and entry.name != MARKER:
                    self.remove(entry)
                elif not (sub == "" and entry.name in ("images", "records", MARKER)):
                    self.kept.append(str(entry))
            if sub:
                self.rmdir_if_empty(base)
        if self.dry_run:
            self.removed += 1  # the marker, when nothing else stays
        elif not [e for e in folder.iterdir() if e.name != MARKER]:
            self.remove(folder / MARKER)  # last: the folder stays recognisable until its files are gone
            self.rmdir_if_empty(folder)

    def tree(self, root: Path) -> None:
        """Every run folder below ``root``; sweep folders' Hydra and summarize files; then empty folders."""
        from bdia.apps.tables import written_by_summarize

        folders = [p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()
                   and not any(part == "wandb" or part.startswith(".") for part in p.relative_to(root).parts)]
        runs = {folder for folder in folders if _app(folder) is not None}
        for folder in sorted(folders, key=lambda p: -len(p.parts)):
            if any(parent in runs for parent in folder.parents):
                continue  # images/, records/ of a run: its run folder handles them
            if folder in runs:
                self.run_folder(folder, _app(folder))
                continue
            for entry in sorted(folder.iterdir()):
                if entry.is_dir() and not entry.is_symlink():
                    continue
                if entry.name == "multirun.yaml" and _regular(entry):
                    self.remove(entry)
                elif re.fullmatch(r"summary\.(md|csv|png)", entry.name) and written_by_summarize(entry):
                    self.remove(entry)
                else:
                    self.kept.append(str(entry))
            self.rmdir_if_empty(folder)
        for entry in sorted(root.iterdir()) if root.is_dir() else ():
            if not entry.is_dir() or entry.is_symlink():
                self.kept.append(str(entry))
        self.rmdir_if_empty(root)

    def tiny_model(self, folder: Path) -> None:
        if not _regular(folder / "RANDOM_WEIGHTS.txt"):
            if folder.exists():
                self.kept.append(f"{folder} (no RANDOM_WEIGHTS.txt: not a model bdia.testing wrote)")
            return
        for sub in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: -len(p.parts)):
            self._model_files(sub)
            self.rmdir_if_empty(sub)
        self._model_files(folder)
        self.rmdir_if_empty(folder)

    def _model_files(self, folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                continue
            if MODEL_FILE.fullmatch(entry.name) and _regular(entry):
                self.remove(entry)
            else:
                self.kept.append(str(entry))

    def local_results(self, root: Path) -> None:
        for folder in sorted((p for p in [root, *root.rglob("*")] if p.is_dir() and not p.is_symlink()),
                             key=lambda p: -len(p.parts)):
            for entry in sorted(folder.iterdir()):
                if entry.is_dir() and not entry.is_symlink():
                    continue
                if re.fullmatch(r".+\.(md|csv|png|json)", entry.name) and _regular(entry):
                    self.remove(entry)
                else:
                    self.kept.append(str(entry))
            self.rmdir_if_empty(folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="results", help="the results folder (default results/)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    args = parser.parse_args(argv)
    root = Path(args.root)
    cleaner = Cleaner(args.dry_run)
    for name in RUN_ROOTS:
        if (root / name).is_dir() and not (root / name).is_symlink():
            cleaner.tree(root / name)
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        if folder.is_dir() and not folder.is_symlink() and _regular(folder / "RANDOM_WEIGHTS.txt"):
            cleaner.tiny_model(folder)  # results/tiny_sd, tiny_clip, tiny_sd3, tiny_flux ...
    if (root / "local").is_dir() and not (root / "local").is_symlink():
        cleaner.local_results(root / "local")
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {cleaner.removed} file(s) written by runs under {root}/")
    for line in cleaner.skipped:
        print(f"skipped {line}")
    if cleaner.kept:
        print(f"kept {len(cleaner.kept)} other file(s), e.g.: " + ", ".join(cleaner.kept[:5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
