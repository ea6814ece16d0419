"""The reproduction suite: table specs expand into the right jobs, the full table's dry run covers every cell,
the mini twin runs end to end at its smallest size, and tables are built from metrics.json correctly."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from bdia.apps.reproduce import (
    REPO_ROOT,
    dry_run_text,
    expand_sweep,
    load_spec,
    plan_jobs,
    plan_sweeps,
    run_roots,
    spec_names,
    split_values,
    sweep_commands,
)
from bdia.apps.tables import render_markdown, table_rows

TABLE2_MODELS = {
    "table2_cifar10": "edm-cifar10-32x32-cond-vp",
    "table2_ffhq": "edm-ffhq-64x64-uncond-vp",
    "table2_afhqv2": "edm-afhqv2-64x64-uncond-vp",
    "table2_imagenet64": "edm-imagenet-64x64-cond-adm",
}


def test_split_values_respects_brackets_and_quotes():
    assert split_values("3,5,8") == ["3", "5", "8"]
    assert split_values("[1,2],obelm,'a,b'") == ["[1,2]", "obelm", "'a,b'"]
    assert split_values("18") == ["18"]


def test_expand_sweep_is_the_cartesian_product_in_hydra_order():
    jobs = expand_sweep(["solver=edm,bdia_edm", "solver.num_steps=3,5", "seeds=0-7"])
    assert jobs == [
        ["solver=edm", "solver.num_steps=3", "seeds=0-7"],
        ["solver=edm", "solver.num_steps=5", "seeds=0-7"],
        ["solver=bdia_edm", "solver.num_steps=3", "seeds=0-7"],
        ["solver=bdia_edm", "solver.num_steps=5", "seeds=0-7"],
    ]
    with pytest.raises(ValueError, match="key=value"):
        expand_sweep(["solver"])


def test_smoke_cut_and_extra_overrides_replace_keys():
    spec = load_spec("table2_mini")
    sweeps = plan_sweeps(spec, extra=["seeds=0-3"], smoke=True)
    bdia_edm = next(s for s in sweeps if "solver=bdia_edm" in s)
    assert "solver.num_steps=3,5" in bdia_edm and "solver.gamma=0.5,1.0" in bdia_edm
    assert [o for o in bdia_edm if o.startswith("seeds=")] == ["seeds=0-3"]  # the extra one wins over smoke's


def test_unknown_table_names_the_valid_ones():
    with pytest.raises(ValueError, match="table2_mini"):
        load_spec("table9")
    assert load_spec("table2-mini")["name"] == "table2_mini"  # make-target spelling


def test_commands_for_torchrun_and_slurm():
    spec = load_spec("table2")
    sweeps = plan_sweeps(spec)
    torchrun = sweep_commands(spec, sweeps, ngpu=8, python="python")
    assert all(c[:5] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"] for c in torchrun)
    assert all("launcher=torchrun" in c and "-m" in c[5:] for c in torchrun)
    slurm = sweep_commands(spec, sweeps, ngpu=4, launcher="slurm", python="python")
    assert all("launcher=slurm" in c and "hydra.launcher.gpus_per_node=4" in c for c in slurm)
    with pytest.raises(ValueError, match="launcher"):
        sweep_commands(spec, sweeps, launcher="kubernetes")


def _sweeper_params(experiment):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO_ROOT / "configs" / "sample")):
        cfg = compose("sample", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    return cfg.hydra.sweeper.params


def test_table2_dry_run_covers_every_model_nfe_solver_cell():
    spec = load_spec("table2")
    sweeps = plan_sweeps(spec)
    jobs = plan_jobs(spec, sweeps)
    planned = {(j["config"].model.name, j["config"].solver.name, int(j["config"].solver.num_steps)) for j in jobs}
    expected = set()
    for experiment, model in TABLE2_MODELS.items():
        params = _sweeper_params(experiment)
        for solver in split_values(str(params["solver"])):
            for steps in split_values(str(params["solver.num_steps"])):
                expected.add((model, solver, int(steps)))
    assert {"edm", "bdia_edm"} == {s for _, s, _ in expected}
    assert planned == expected
    assert len(jobs) == len(expected)  # no cell twice
    for job in jobs:  # EDM's FID protocol in every job
        cfg = job["config"]
        assert cfg.seeds == "0-149999" and cfg.metrics.fid.protocol == "edm" and cfg.metrics.fid.backend == "clean_fid"
    text = dry_run_text(spec, sweeps, ngpu=8)
    job_lines = [line for line in text.splitlines() if line.startswith("  job: ")]
    assert len(job_lines) == len(expected)
    assert all("8 ranks, rank r samples seeds[r::8] (18750 each)" in line for line in job_lines)
    for model, solver, steps in expected:
        experiment = next(e for e, m in TABLE2_MODELS.items() if m == model)
        assert any(f"experiment={experiment} " in line and f"solver={solver} " in line
                   and f"solver.num_steps={steps} " in line for line in job_lines), (model, solver, steps)


def test_every_table_spec_composes_its_jobs():
    for name in spec_names():
        spec = load_spec(name)
        jobs = plan_jobs(spec, plan_sweeps(spec, smoke=True))
        assert jobs and all(j["seeds"] or spec["config"] == "edit" for j in jobs)
        assert all(j["config"].experiment_name in {r.name for r in run_roots(spec)} for j in jobs)


# --------------------------------------------------------------------------------------------------
# Tables from metrics.json.


def _record(tmp_path, name, solver, gamma, nfe, fd, num_images=100, floor=0.08):
    run = tmp_path / name
    run.mkdir()
    record = {"solver": solver, "gamma": gamma, "nfe": nfe, "num_steps": nfe, "num_images": num_images,
              "model": {"config": "digits"},
              "evaluation": {"digits": {"fd": fd, "floor_halves_fd": floor}}}
    (run / "metrics.json").write_text(json.dumps(record))
    return {**record, "run_dir": str(run)}


SPEC = {"name": "t", "title": "T", "section": "model.config", "lines": ["solver", "gamma"], "column": "nfe",
        "metrics": [{"key": "evaluation.digits.fd", "label": "FD", "format": ".3f"}],
        "floors": [{"key": "evaluation.digits.floor_halves_fd", "label": "halves"}]}


def test_table_rows_keep_the_largest_run_and_skip_unfinished(tmp_path):
    runs = [
        _record(tmp_path, "a", "ddim", None, 5, 2.0, num_images=16),
        _record(tmp_path, "b", "ddim", None, 5, 1.5, num_images=1000),
        _record(tmp_path, "c", "bdia_ddim", 0.5, 5, 1.0),
        {**_record(tmp_path, "d", "bdia_ddim", 0.5, 9, 3.0), "evaluation": {}},  # not evaluated yet
    ]
    rows = [r for r in table_rows(SPEC, runs) if r["metric"] == "FD"]
    assert {(r["line"], r["column"], r["value"]) for r in rows} == {("ddim", 5, 1.5), ("bdia_ddim γ=0.5", 5, 1.0)}


def test_markdown_marks_the_best_value_and_counts_bdia_wins(tmp_path):
    runs = [
        _record(tmp_path, "a", "ddim", None, 5, 2.0), _record(tmp_path, "b", "ddim", None, 9, 1.0),
        _record(tmp_path, "c", "bdia_ddim", 0.5, 5, 1.0), _record(tmp_path, "d", "bdia_ddim", 0.5, 9, 1.2),
    ]
    text = render_markdown(SPEC, table_rows(SPEC, runs), "make x", ["runs"])
    assert "| ddim | 2.000 | **1.000** |" in text
    assert "| bdia_ddim γ=0.5 | **1.000** | 1.200 |" in text
    assert "bdia_ddim γ=0.5: better than ddim at 1 of 2 (5); ratio to ddim 0.5–1.2" in text
    assert "halves: 0.08" in text
    assert "`make x`" in text


# --------------------------------------------------------------------------------------------------
# The mini twin end to end (subprocesses, as `make reproduce-table2-mini` runs it).


def test_table2_mini_smoke_runs_end_to_end_and_writes_its_table(tmp_path):
    out = tmp_path / "table2"
    result = subprocess.run(
        [sys.executable, "scripts/reproduce.py", "table2_mini", "--smoke", "--runs-root", str(tmp_path / "runs"),
         "--output", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.with_suffix(".md").read_text()
    # The smoke cut keeps the first two values of every list (two gammas too); BDIA-EDM lines name their
    # coordinates and backward map (the default, and the old x-space form beside it).
    for line in ("| edm |", "| ddim |", "| bdia_edm γ=0.5 vp exp |", "| bdia_edm γ=0.5 x euler |",
                 "| bdia_edm γ=1.0 x euler |", "| bdia_ddim γ=0.5 |", "| bdia_ddim γ=1.0 |", "| dpmpp_2m |",
                 "| rex euler |"):
        assert line in text, line
    assert "NFE 5 | NFE 9" in text
    assert "two disjoint real halves" in text
    with out.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    fd_rows = [r for r in rows if r["metric"].startswith("FD") and r["column"]]
    assert len(fd_rows) == 18  # 9 solver lines x 2 NFE values
    assert all(int(r["num_images"]) == 16 and float(r["value"]) > 0 for r in fd_rows)
    assert out.with_suffix(".png").stat().st_size > 1000
    nfe = {(r["solver"], int(r["num_steps"])): int(r["column"]) for r in fd_rows}
    assert nfe[("edm", 3)] == 5 and nfe[("edm", 5)] == 9 and nfe[("ddim", 5)] == 5 and nfe[("bdia_edm", 3)] == 5
    assert nfe[("rex", 3)] == 5 and nfe[("rex", 5)] == 9 and nfe[("dpmpp_2m", 9)] == 9


def test_planned_nfe_matches_the_solvers_measured_counts():
    """The dry run's NFE column against NFE measured with CountingDenoiser on the same grids."""
    import torch
    from omegaconf import OmegaConf

    import bdia
    from bdia.denoisers import CountingDenoiser
    from bdia.apps.reproduce import planned_nfe

    means = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    for name, backward in (("ddim", None), ("bdia_ddim", None), ("edm", None), ("bdia_edm", "euler"), ("bdia_edm", "heun"),
                           ("dpmpp_2m", None), ("unipc", None), ("ipndm", None), ("rex", None), ("rex", "rk4")):
        for steps in (3, 6):
            counting = CountingDenoiser(bdia.GaussianMixtureDenoiser(means, stds=[0.3, 0.3]))
            kwargs = {} if backward is None else {"tableau" if name == "rex" else "backward": backward}
            gamma = 0.5 if name.startswith("bdia") else None
            bdia.sample(counting, torch.ones(1, 1, 2, 2) * 80, bdia.karras_sigmas(steps), solver=name, gamma=gamma, **kwargs)
            cfg = OmegaConf.create({"solver": {"name": name, "num_steps": steps, **kwargs}})
            assert planned_nfe(cfg) == counting.nfe, (name, backward, steps)


def test_wandb_flag_groups_every_run_of_a_table_and_logs_one_summary(tmp_path, capsys):
    from bdia.apps.reproduce import reproduce
    from bdia.apps.tables import log_table_to_logger

    text = reproduce("table2_mini", dry_run=True, smoke=True, wandb=True)["dry_run"]
    job_lines = [line for line in text.splitlines() if line.startswith("  job: ")]
    assert job_lines and all("logger=wandb logger.group=table2_mini" in line for line in job_lines)

    class Recorder:
        def __init__(self):
            self.tables = []

        def log_table(self, key, columns, rows):
            self.tables.append((key, columns, list(rows)))

    recorder = Recorder()
    runs = [_record(tmp_path, "a", "ddim", None, 5, 2.0), _record(tmp_path, "b", "bdia_ddim", 0.5, 5, 1.0)]
    log_table_to_logger(recorder, SPEC, table_rows(SPEC, runs))
    (key, columns, rows), = recorder.tables
    assert key == "t/summary" and "value" in columns
    assert {(r[1], r[4]) for r in rows if r[3] == "FD"} == {("ddim", 2.0), ("bdia_ddim γ=0.5", 1.0)}


def test_table1_mini_smoke_runs_the_text_to_image_path_end_to_end(tmp_path, tiny_sd_dir):
    from bdia.testing import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    out = tmp_path / "table1"
    result = subprocess.run(
        [sys.executable, "scripts/reproduce.py", "table1_mini", "--smoke", "--runs-root", str(tmp_path / "runs"),
         "--output", str(out), f"model.path={tiny_sd_dir}", f"metrics.clip.path={clip}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.with_suffix(".md").read_text()
    assert "| ddim |" in text and "| bdia_ddim γ=0.5 |" in text and "steps (NFE) 10" in text
    with out.with_suffix(".csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["metric"].startswith("CLIP")]
    assert {(r["solver"], r["column"]) for r in rows} == {("ddim", "10"), ("bdia_ddim", "10")}
    assert all(int(r["num_images"]) == 8 for r in rows)  # 8 prompts x 1 seed


def test_one_process_apps_refuse_torchrun(monkeypatch):
    spec = {**load_spec("table3"), "multi_gpu": False}  # a spec whose script runs on one process
    with pytest.raises(ValueError, match="one process"):
        sweep_commands(spec, plan_sweeps(spec), ngpu=8)


def test_table3_mini_smoke_runs_the_editing_path_and_tabulates_every_method(tmp_path, tiny_sd_dir):
    from bdia.testing import build_tiny_clip

    out = tmp_path / "table3"
    clip = build_tiny_clip(tmp_path / "clip")
    result = subprocess.run(
        [sys.executable, "scripts/reproduce.py", "table3_mini", "--smoke", "--runs-root", str(tmp_path / "runs"),
         "--output", str(out), f"model.path={tiny_sd_dir}", f"clip_path={clip}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with out.with_suffix(".csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "latent relative error"]
    errors = {r["line"]: float(r["value"]) for r in rows}
    assert set(errors) == {"bdia γ=0.96", "bdia γ=0.92", "ddim", "edict", "null_text"}
    assert errors["bdia γ=0.96"] < 1e-10 and errors["bdia γ=0.92"] < 1e-10 and errors["edict"] < 1e-10
    assert errors["ddim"] > 1e-3  # DDIM inversion is approximate
    assert all(r["section"] == "china.jpg" and r["column"] == "10" for r in rows)
    with out.with_suffix(".csv").open() as f:
        labels = {r["metric"] for r in csv.DictReader(f) if r["value"] not in ("", None)}
    assert {"PSNR of the reconstruction (dB)", "SSIM of the reconstruction", "CLIP score of the edit",
            "CLIP directional similarity of the edit"} <= labels
    text = out.with_suffix(".md").read_text()
    assert "## china.jpg" in text and "![china.jpg](table3_china.jpg.png)" in text
    assert (tmp_path / "table3_china.jpg.png").stat().st_size > 500


@pytest.mark.parametrize("name", ["table1_mini", "table3_mini"])
def test_wandb_flag_groups_the_sd_tables_too(name):
    from bdia.apps.reproduce import reproduce

    text = reproduce(name, dry_run=True, smoke=True, wandb=True)["dry_run"]
    commands = [line for line in text.splitlines() if line.startswith("multirun ")]
    assert commands and all(f"logger=wandb logger.group={name}" in line for line in commands)


def test_wandb_is_refused_for_apps_without_a_logger(monkeypatch):
    import bdia.apps.reproduce
    from bdia.apps.reproduce import reproduce

    spec = {**load_spec("table3_mini"), "wandb": False}  # a spec whose script has no logger
    monkeypatch.setattr(bdia.apps.reproduce, "load_spec", lambda name: spec)
    with pytest.raises(ValueError, match="no W&B logger"):
        reproduce("table3_mini", dry_run=True, wandb=True)


def test_table1_runs_on_several_gpus_and_its_dry_run_shows_the_rank_layout():
    """text2image shards its (prompt, seed) items over torchrun ranks, so table 1 takes NGPU > 1."""
    spec = load_spec("table1")
    sweeps = plan_sweeps(spec)
    torchrun = sweep_commands(spec, sweeps, ngpu=8, python="python")
    assert all(c[:5] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"] for c in torchrun)
    assert all("launcher=torchrun" in c and c[5] == "scripts/text2image.py" for c in torchrun)
    slurm = sweep_commands(spec, sweeps, ngpu=4, launcher="slurm", python="python")
    assert all("launcher=slurm" in c and "hydra.launcher.tasks_per_node=4" in c for c in slurm)
    text = dry_run_text(spec, sweeps, ngpu=8)
    job_lines = [line for line in text.splitlines() if line.startswith("  job: ")]
    assert job_lines and all("8 ranks, rank r samples items[r::8] (1250 each)" in line for line in job_lines)
