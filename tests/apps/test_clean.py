"""``make clean`` (scripts/clean.py) removes what runs wrote under results/ and nothing else: a user's file in a run
folder, beside it, or in results/local/ stays, and a run holding its lock is skipped."""

from __future__ import annotations

import fcntl
import os

import pytest

from app_helpers import load_script
from bdia.analytic import digits_gmm
from bdia.apps.sample import sample_run
from bdia.apps.tables import summarize, write_summary

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(folder):
    sample_run(digits_gmm(image_size=8, num_components=10), solver="edm", num_steps=2, seeds="0-2", out_dir=folder,
               progress=False)


def test_clean_removes_the_runs_files_and_keeps_everything_else(tmp_path, capsys):
    root = tmp_path / "results"
    sweep = root / "sample" / "demo"
    _run(sweep / "solver=edm")
    _run(sweep / "solver=ddim,mine")
    (sweep / "solver=ddim,mine" / "notes.txt").write_text("my notes\n")  # a user's file inside a run folder
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    write_summary(summarize(sweep), sweep / "summary", "python scripts/summarize.py x")
    (sweep / "README.md").write_text("mine\n")
    (root / "local" / "mini").mkdir(parents=True)
    (root / "local" / "mini" / "table1.md").write_text("# generated\n")
    (root / "local" / "keep.py").write_text("print()\n")
    main = load_script("scripts/clean.py").main

    assert main(["--root", str(root), "--dry-run"]) == 0
    assert (sweep / "solver=edm" / "images.npz").is_file()  # a dry run removes nothing

    assert main(["--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert not (sweep / "solver=edm").exists() and not (sweep / "summary.md").exists()
    assert not (sweep / "multirun.yaml").exists() and not (root / "local" / "mini").exists()
    assert (sweep / "README.md").read_text() == "mine\n" and (root / "local" / "keep.py").is_file()
    kept = sweep / "solver=ddim,mine"
    assert sorted(p.name for p in kept.iterdir()) == [".bdia-run.json", "notes.txt"]  # still recognisable as a run
    assert "kept 3 other file(s)" in out


def test_clean_skips_a_run_in_progress(tmp_path, capsys):
    root = tmp_path / "results"
    run = root / "edit" / "x"
    _run(root / "sample" / "busy")
    busy = root / "sample" / "busy"
    fd = os.open(busy / ".bdia-run.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert load_script("scripts/clean.py").main(["--root", str(root)]) == 0
    finally:
        os.close(fd)
    assert (busy / "images.npz").is_file() and "a run holds its lock" in capsys.readouterr().out
    assert not run.exists()
