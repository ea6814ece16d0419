"""Telling the user what happened: a resumed run keeps what was measured, every app ends with a console summary
whose run folder and commands work when pasted, and a sweep is tabulated from its runs' metrics."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from app_helpers import FAST, REPO, cli
from bdia.analytic import digits_gmm
from bdia.apps.cli import speed_text
from bdia.apps.sample import sample_run

pytestmark = pytest.mark.usefixtures("one_thread")

EVALUATE = REPO / "scripts" / "evaluate.py"
FAST_DIGITS_METRIC = ["metrics.digits.kid=false", "metrics.digits.real_floor=false"]


@pytest.fixture(scope="module")
def mixture():
    return digits_gmm(image_size=8, std=0.3)


def _run(mixture, out_dir, seeds):
    return sample_run(mixture, solver="bdia_edm", num_steps=3, seeds=seeds, batch_size=2, out_dir=out_dir,
                      progress=False)


def test_a_resumed_run_keeps_its_timings_and_says_what_it_resumed(mixture, tmp_path):
    first = _run(mixture, tmp_path / "run", "0-3")
    assert first["num_sampled"] == 4 and first["timed_images"] == 4
    assert first["sampling_seconds"] > 0 and first["images_per_second"] > 0

    grown = _run(mixture, tmp_path / "run", "0-7")  # the same run with more seeds: 4 resumed, 4 sampled now
    assert (grown["num_sampled"], grown["num_resumed"], grown["timed_images"]) == (4, 4, 8)
    session = grown["session"]["sampling_seconds"]
    # Every image's own seconds are summed: the first session's (from the records) plus this one's. Each total is
    # rounded to 1e-4 s in metrics.json.
    assert grown["sampling_seconds"] == pytest.approx(first["sampling_seconds"] + session, abs=3e-4)
    assert grown["images_per_second"] == pytest.approx(8 / grown["sampling_seconds"], rel=1e-2)

    again = _run(mixture, tmp_path / "run", "0-7")  # everything resumed: nothing measured now, nothing lost
    assert (again["num_sampled"], again["num_resumed"]) == (0, 8)
    assert again["sampling_seconds"] == pytest.approx(grown["sampling_seconds"], abs=2e-4)
    assert again["images_per_second"] == pytest.approx(grown["images_per_second"], rel=1e-3)
    assert again["session"] == {**again["session"], "num_sampled": 0, "num_resumed": 8, "images_per_second": None}
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["sampling_seconds"] == again["sampling_seconds"]
    text = speed_text(again)
    assert "None" not in text and "images/s" in text and "all 8 images resumed" in text


def test_a_run_folder_without_recorded_times_says_so(mixture, tmp_path):
    """Records written before per-image times were kept: the times of the others are reported, for them only."""
    import numpy as np

    _run(mixture, tmp_path / "run", "0-3")
    for path in sorted((tmp_path / "run" / "records").glob("*.npz"))[:2]:
        with np.load(path) as record:
            arrays = {k: record[k] for k in record.files if not k.startswith("seconds_")}
        np.savez(path, **arrays)
    again = _run(mixture, tmp_path / "run", "0-3")
    assert again["timed_images"] == 2 and again["images_per_second"] > 0
    assert "the other 2 have no recorded time" in speed_text(again)


def test_sample_prints_a_summary_whose_folder_and_command_work_as_typed(tmp_path, monkeypatch, capsys):
    """The issue: the run folder the app prints (named after its overrides, so it holds ``=`` and ``,``) could
    not be passed back to ``scripts/evaluate.py``. Here the printed command is run as printed."""
    assert cli(monkeypatch, tmp_path, "dataset=gmm", "model.num_components=20", *FAST) is None
    out = capsys.readouterr().out
    rows = dict(_row(line) for line in out.splitlines() if line.startswith("  "))
    folder = rows["run folder"]
    assert "=" in folder and "," in folder and (tmp_path / folder / "metrics.json").is_file()
    assert "None" not in out and "images/s" in rows["speed"] and "NFE" in rows["solver"]
    command = shlex.split(rows["evaluate"])
    assert command[:3] == ["python", "scripts/evaluate.py", folder] and command[3] == "metrics=digits"
    assert cli(monkeypatch, tmp_path, *command[2:], *FAST_DIGITS_METRIC, script=EVALUATE) is None
    evaluation = json.loads((tmp_path / folder / "metrics.json").read_text())["evaluation"]
    assert evaluation["digits"]["fd"] > 0
    # The quoted override form works too, and no run folder at all is one line.
    assert cli(monkeypatch, tmp_path, f"run_dir='{folder}'", *command[3:], *FAST_DIGITS_METRIC, script=EVALUATE) is None
    assert cli(monkeypatch, tmp_path, script=EVALUATE) == (
        "error: no run folder: python scripts/evaluate.py <run folder or sweep folder> [metrics=...]")


def _row(line: str) -> tuple[str, str]:
    """A summary row ``  <label>  <text>``: labels are words separated by single spaces, then two or more."""
    label, _, text = line.strip().partition("  ")
    return label, text.strip()


# --------------------------------------------------------------------------------------------------
# scripts/summarize.py: any results folder as a table, built from the runs' metrics.json.

SUMMARIZE = REPO / "scripts" / "summarize.py"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real tiny sweep: two solvers x two step counts on the analytic digits mixture, FD in digits features."""
    import sys

    from _pytest.monkeypatch import MonkeyPatch

    folder = tmp_path_factory.mktemp("sweep")
    patch = MonkeyPatch()
    try:
        torch.set_num_threads(1)
        code = cli(patch, folder, "-m", "experiment=digits_demo", "solver=edm,bdia_edm", "solver.num_steps=2,3",
                   "seeds=0-3", "network_batch=4", "progress=false", "model.num_components=20", *FAST_DIGITS_METRIC)
    finally:
        patch.undo()
        sys.argv = sys.argv[:1]
    assert code is None
    return folder / "results" / "sample" / "digits_demo"


def test_summarize_tabulates_a_sweep_by_its_varying_overrides(sweep):
    from bdia.apps.tables import plot_axes, summarize

    summary = summarize(sweep)
    assert summary["keys"] == ["solver", "solver.num_steps"] and summary["common"]["seeds"] == "0-3"
    assert len(summary["rows"]) == 4
    for row in summary["rows"]:
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert row["settings"]["solver"] == metrics["solver"]
        assert int(row["settings"]["solver.num_steps"]) == metrics["num_steps"]
        assert row["values"]["nfe"] == metrics["nfe"]
        assert row["values"]["evaluation.digits.fd"] == metrics["evaluation"]["digits"]["fd"]
        assert row["values"]["images_per_second"] == metrics["images_per_second"]
    assert [(r["settings"]["solver"], r["values"]["nfe"]) for r in summary["rows"]] == [
        ("bdia_edm", 3), ("bdia_edm", 5), ("edm", 3), ("edm", 5)]
    # The plot: FD against NFE, one line per solver (the step count follows from NFE and the solver).
    assert plot_axes(summary) == ("evaluation.digits.fd", "nfe", ["solver"])
    assert plot_axes(summary, "images_per_second", "solver.num_steps") == ("images_per_second", "solver.num_steps", ["solver"])
    with pytest.raises(ValueError, match="not a column"):
        plot_axes(summary, "evaluation.fid.fid")


def test_summarize_command_writes_table_csv_and_plot_and_never_replaces_other_files(sweep, capsys):
    import csv

    from app_helpers import load_script

    main = load_script("scripts/summarize.py").main
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| solver | solver.num_steps | nfe | evaluation.digits.fd |" in out and "| edm | 3 | 5 |" in out
    assert (sweep / "summary.png").stat().st_size > 5000
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["solver"] for r in rows} == {"edm", "bdia_edm"}
    assert main([str(sweep)]) == 0  # its own files are replaced
    foreign = sweep / "mine"
    foreign.with_suffix(".md").write_text("my notes\n")
    assert main([str(sweep), "--output", str(foreign)]) == 1
    assert "was not written by scripts/summarize.py" in capsys.readouterr().err
    assert foreign.with_suffix(".md").read_text() == "my notes\n" and not foreign.with_suffix(".csv").exists()
    assert main([str(sweep), "--metrics", "no.such.key"]) == 1
    assert "in no run's metrics.json" in capsys.readouterr().err
    assert main([str(sweep / "nothing-here")]) == 1


def test_summarize_reads_config_yaml_where_folder_names_are_not_overrides(sweep, tmp_path):
    """Runs in folders named by hand: the settings that differ come from their config.yaml."""
    from bdia.apps.tables import summarize

    for i, run in enumerate(sorted(p for p in sweep.iterdir() if p.is_dir())[:2]):
        target = tmp_path / f"run{i}"
        shutil.copytree(run, target)
    summary = summarize(tmp_path)
    assert "solver.name" in summary["keys"] or "solver.num_steps" in summary["keys"]
    assert "out_dir" not in summary["keys"] and len(summary["rows"]) == 2


# --------------------------------------------------------------------------------------------------
# Paper tables (bdia.apps.tables): timings survive resumes, no winners inside the noise, no meaningless ratios.

TIMING_SPEC = {"name": "t", "title": "T", "section": "model.config", "lines": ["solver", "gamma"], "column": "nfe",
               "metrics": [{"key": "evaluation.digits.fd", "label": "FD", "format": ".3f"},
                           {"key": "sampling_seconds", "label": "seconds", "format": ".2f", "timing": True, "noise": 0.1},
                           {"key": "ssim", "label": "SSIM", "format": ".3f", "higher_is_better": True}]}


def _table_run(solver, gamma, nfe, fd, seconds, ssim, **extra):
    return {"solver": solver, "gamma": gamma, "nfe": nfe, "num_steps": nfe, "num_images": 8, "model": {"config": "m"},
            "evaluation": {"digits": {"fd": fd}}, "sampling_seconds": seconds, "ssim": ssim,
            "run_dir": f"runs/{solver}-{nfe}", **extra}


def test_tables_keep_timings_of_resumed_runs_and_mark_no_winner_inside_the_noise():
    from bdia.apps.tables import render_markdown, table_rows

    runs = [
        # resumed runs keep their times (timed_images == num_images): shown
        _table_run("ddim", None, 5, 2.0, 1.00, 0.02, num_resumed=8, timed_images=8),
        _table_run("bdia_ddim", 0.5, 5, 1.0, 1.05, -0.01, num_resumed=8, timed_images=8),
        # a run resumed before per-image times were recorded: its time is not the run's
        _table_run("ddim", None, 9, 1.0, 0.1, 0.03, num_resumed=4),
        _table_run("bdia_ddim", 0.5, 9, 1.2, 2.5, 0.01, num_resumed=0),
    ]
    text = render_markdown(TIMING_SPEC, table_rows(TIMING_SPEC, runs), "make x", ["runs"])
    assert "### seconds (lower is better)" in text  # the section stays
    assert "| ddim | 1.00 | — |" in text and "| bdia_ddim γ=0.5 | 1.05 | 2.50 |" in text  # 5 % apart: no bold
    assert "Values within 10% of each other count as equal" in text and "rerun it with resume=false" in text
    assert "bdia_ddim γ=0.5: better than ddim at 0 of 1 (none), equal within 10% at 5; ratio to ddim 1.05–1.05" in text
    assert "| bdia_ddim γ=0.5 | **1.000** | 1.200 |" in text  # FD: a real winner stays bold
    # SSIM can be negative: no ratio to the base solver (it would mean nothing).
    ssim = text.split("### SSIM")[1]
    assert "better than ddim at 0 of 2" in ssim and "ratio" not in ssim


# --------------------------------------------------------------------------------------------------
# The edit app: a labelled grid, a progress bar and a summary that says what the numbers are.


def test_labelled_grid_names_rows_and_columns_around_unchanged_tiles():
    import numpy as np

    from bdia.imageio import image_grid, labelled_grid

    tiles = np.random.default_rng(0).integers(0, 255, (6, 3, 8, 8), dtype=np.uint8)
    plain = image_grid(tiles, nrow=3, padding=1, pad_value=255, scale=2)
    labelled = labelled_grid(tiles, 3, ["bdia", "ddim"], ["original", "reconstruction", "edit"], title="a title",
                             padding=1, scale=2)
    height, width = plain.shape[:2]
    assert np.array_equal(labelled[-height:, -width:], plain)
    left, top = labelled.shape[1] - width, labelled.shape[0] - height
    assert left > 0 and top > 0
    assert (labelled[top:, :left] < 128).any() and (labelled[:top, left:] < 128).any()  # text in both margins
    grey = labelled_grid(tiles[:, :1], 3, None, ["a", "b", "c"])
    assert grey.shape[2] == 3  # drawn in RGB
    with pytest.raises(ValueError, match="row labels"):
        labelled_grid(tiles, 3, ["only one"], None)
    # Tiles named one by one (a class-conditional run's grid.png): a strip of text under each tile.
    named = labelled_grid(tiles, 3, padding=1, scale=4, tile_labels=[f"{k} cat" for k in range(6)], font_size=11)
    assert named.shape[:2] == (1 + 2 * (8 * 4 + 15 + 1), 1 + 3 * (8 * 4 + 1))
    strip = named[1 + 32:1 + 32 + 15, 1:1 + 32]
    assert (strip < 128).any() and (strip == 255).any()  # dark text on the light strip
    with pytest.raises(ValueError, match="tile labels"):
        labelled_grid(tiles, 3, tile_labels=["a"])


def test_edit_ends_with_a_summary_and_a_labelled_grid(tiny_sd, tmp_path):
    from PIL import Image

    from bdia.apps.cli import summary_text
    from bdia.apps.edit import edit_run, summary_rows

    metrics = edit_run(tiny_sd, tmp_path / "edit", num_steps=3, methods=["bdia", "ddim"], guidance_scale=3.0,
                       progress=False)
    text = summary_text("edit", summary_rows(metrics, tmp_path / "edit"))
    rows = dict(_row(line) for line in text.splitlines()[1:])
    assert "latent round trip" in rows["bdia (gamma 0.96)"] and "NFE" in rows["bdia (gamma 0.96)"]
    assert float(rows["bdia (gamma 0.96)"].split("latent round trip ")[1].split()[0]) < 1e-10
    assert "noise by construction" in rows["note"] and str(tmp_path / "edit") in rows["run folder"]
    with Image.open(tmp_path / "edit" / "edit_grid.png") as grid:
        assert grid.size[0] > 3 * 33 + 1 and grid.size[1] > 2 * 33 + 1


# --------------------------------------------------------------------------------------------------
# Grids of one's own: from the command line, and what happens when one does not end at 0.


def test_a_grid_of_ones_own_is_used_as_given_and_a_noisy_end_is_refused_or_warned(mixture, tmp_path):
    import warnings

    import bdia
    from bdia.apps.sample import given_sigmas

    metrics = sample_run(mixture, solver="edm", num_steps=18, sigmas=[80, 20, 5, 1, 0.2, 0], seeds="0-1",
                         out_dir=tmp_path / "run", progress=False)
    assert metrics["sigmas"]["levels"] == [80, 20, 5, 1, 0.2, 0] and metrics["nfe"] == 2 * 5 - 1
    for bad, message in [([80, 20, 5, 1], "keep that much noise"), ([80, 90, 0], "strictly descending"),
                         ("80,1,0", "a list of noise levels"), ([80, True, 0], "numbers")]:
        with pytest.raises(ValueError, match=message):
            given_sigmas(bad)
    # The Python API takes such a grid (a partial trajectory can be what one wants) but says what it returns.
    with pytest.warns(UserWarning, match="still noisy"):
        bdia.sample(mixture, torch.zeros(1, 1, 8, 8), [80.0, 5.0, 1.0], solver="ddim")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bdia.sample(mixture, torch.zeros(1, 1, 8, 8), [80.0, 5.0, 0.0292], solver="ddim")  # SD's grid ends here


def test_sample_takes_a_grid_from_the_command_line(tmp_path, monkeypatch, capsys):
    assert cli(monkeypatch, tmp_path, "dataset=gmm", "model.num_components=20", "model.image_size=8", *FAST,
               "sigmas=[80,10,1,0]", "out_dir=run") is None
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["sigmas"]["levels"] == [80, 10, 1, 0] and metrics["num_steps"] == 3
    assert cli(monkeypatch, tmp_path, "dataset=gmm", "sigmas=[80,10,1]", "out_dir=other") == (
        "error: sigmas end at 1: the images would keep that much noise (x = x0 + sigma n); end the grid at 0 "
        "(e.g. sigmas=[...,0]), as EDM's grids do")
    assert not (tmp_path / "other").exists()
