"""Every config of the sampling app composes, every experiment file runs end to end on a tiny model, and each app's
``--help`` lists only the config groups and options of its own search path."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from app_helpers import (
    CONFIG_DIR,
    FAST,
    TINY_GMM,
    RecordingLogger,
    cli,
    compose,
    hydra_configs,
    write_tiny_digits_network,
    write_tiny_edm,
)
from bdia.apps.cli import group_options
from bdia.apps.sample import sample_from_config
from bdia.download import AssetUnavailableError
from bdia.models import ModelNotShippedError, load_model
from bdia.networks.registry import CHECKPOINTS

FAST_DIGITS_METRIC = ["metrics.digits.kid=false", "metrics.digits.real_floor=false"]
GROUPS = ("dataset", "model", "solver", "metrics", "logger", "launcher", "experiment")
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))  # configs/sample/experiment/
DATASET_MODELS = {
    "cifar10": "edm-cifar10-32x32-cond-vp",
    "ffhq": "edm-ffhq-64x64-uncond-vp",
    "afhqv2": "edm-afhqv2-64x64-uncond-vp",
    "imagenet64": "edm-imagenet-64x64-cond-adm",
}


def options(group):
    """The options of ``group`` on the sampling app's search path (configs/sample/ and its shared folders)."""
    return group_options(CONFIG_DIR, group) or []


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_edm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nets")
    return {"cond": write_tiny_edm(folder / "cond.pkl", label_dim=10), "uncond": write_tiny_edm(folder / "uncond.pkl", label_dim=0)}


# --------------------------------------------------------------------------------------------------
# Composition.


def test_every_group_option_composes_and_resolves(tmp_path):
    assert set(options("dataset")) >= {"cifar10", "ffhq", "afhqv2", "imagenet64", "digits", "gmm"}
    assert set(options("launcher")) == {"local", "torchrun", "slurm"}
    assert {"none", "wandb"} <= set(options("logger")) and "none" in options("metrics")
    with hydra_configs():
        for group in GROUPS:
            # every EDM model config is composed by the registry test below; here the other models
            for option in [o for o in options(group) if group != "model" or o not in CHECKPOINTS]:
                cfg = compose(f"{group}={option}", f"out_dir={tmp_path}")
                resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
                assert resolved["solver"]["num_steps"] >= 2, (group, option)
                assert "_target_" in resolved["model"], (group, option)


def test_every_registry_checkpoint_has_a_model_config_and_loads_offline_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BDIA_CACHE", str(tmp_path / "cache"))
    edm_models = {name for name in options("model") if name.startswith(("edm-", "baseline-"))}
    assert edm_models == set(CHECKPOINTS)
    with hydra_configs():
        for name in sorted(edm_models):
            cfg = compose(f"model={name}")
            assert cfg.model.name == name and cfg.model.path is None
            with pytest.raises(AssetUnavailableError) as info:
                load_model(cfg.model)
            message = str(info.value)
            assert CHECKPOINTS[name].url in message and str(tmp_path / "cache") in message and "model.path=" in message


@pytest.mark.parametrize("dataset, model", sorted(DATASET_MODELS.items()))
def test_a_dataset_selects_its_model_and_recommended_steps(dataset, model):
    with hydra_configs():
        cfg = compose(f"dataset={dataset}")
        assert cfg.model.name == model and cfg.solver.num_steps == CHECKPOINTS[model].num_steps
        assert cfg.dataset.fid_ref_url == CHECKPOINTS[model].fid_ref_url
        other = next(n for n, c in sorted(CHECKPOINTS.items()) if c.dataset == CHECKPOINTS[model].dataset and n != model)
        assert compose(f"dataset={dataset}", f"model={other}").model.name == other  # model=<name> wins
        assert compose(f"dataset={dataset}", "solver=ddim", "solver.num_steps=7").solver.num_steps == 7


def test_default_config_is_the_analytic_digits_mixture_and_digits_is_the_embedded_model():
    with hydra_configs():
        cfg = compose()
        assert cfg.model._target_ == "bdia.analytic.digits_gmm" and cfg.dataset.name == "gmm"
        assert compose("dataset=digits").model._target_ == "bdia.models.digits_network"
        net = load_model(compose("dataset=digits").model)  # the shipped embedded model
        assert type(net).__name__ == "EDMPrecond" and net.img_resolution == 16 and net.img_channels == 1


def test_missing_embedded_weights_say_how_to_train_them(monkeypatch, tmp_path):
    import bdia.models

    monkeypatch.setattr(bdia.models, "DIGITS_WEIGHTS", tmp_path / "gone.safetensors")
    with hydra_configs():
        with pytest.raises(ModelNotShippedError, match="missing from this installation.*scripts/train.py.*model.path="):
            load_model(compose("dataset=digits").model)


def test_launchers_configure_hydra_and_the_process_group(tmp_path):
    with hydra_configs():
        slurm = compose("launcher=slurm", f"out_dir={tmp_path}", hydra=True).hydra.launcher
        assert slurm._target_.endswith("SlurmLauncher")
        assert slurm.partition is None and slurm.gpus_per_node == 1 and slurm.tasks_per_node == 1
        assert slurm.timeout_min > 0 and slurm.array_parallelism > 0
        assert compose("launcher=local", hydra=True).hydra.launcher._target_.endswith("BasicLauncher")
        assert compose("launcher=torchrun").distributed == "required"
        assert compose().distributed == "auto"


def test_run_folders_of_sweeps_are_named_after_the_overrides():
    with hydra_configs():
        cfg = compose("experiment=digits_demo", hydra=True)
        sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
        assert sweep["subdir"] == "${hydra.job.override_dirname}"
        assert sweep["dir"] == "results/sample/${experiment_name}" and cfg.hydra.sweep.dir == "results/sample/digits_demo"
        assert "batch_size" in cfg.hydra.job.config.override_dirname.exclude_keys


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_sweeps_name_valid_choices_and_compose(experiment, tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with hydra_configs():
        cfg = compose(f"experiment={experiment}", f"out_dir={tmp_path}", hydra=True)
        assert cfg.experiment_name == experiment
        params = cfg.hydra.sweeper.params
        assert params, "an experiment file sweeps something"
        parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
        axes = [[(o.key_or_group, v) for v in o.sweep_string_iterator()] for o in parsed]
        jobs = list(itertools.product(*axes))
        assert len(jobs) >= 2
        for job in (jobs[0], jobs[-1]):
            overrides = [f"{k}={v}" for k, v in job]
            composed = compose(f"experiment={experiment}", *overrides, f"out_dir={tmp_path}")
            assert OmegaConf.to_container(composed, resolve=True)["solver"]["name"] in ("ddim", "bdia_ddim", "edm", "bdia_edm")


# --------------------------------------------------------------------------------------------------
# Every experiment file end to end, on a tiny model.


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_end_to_end_on_a_tiny_model(experiment, tmp_path, tiny_edm):
    with hydra_configs():
        base = compose(f"experiment={experiment}")
        if base.model._target_ == "bdia.analytic.digits_gmm":
            tiny = ["model.num_components=40", *FAST_DIGITS_METRIC]  # 16x16: what the digits metric reads
        elif base.model._target_ == "bdia.models.digits_network":  # the embedded model's loader, tiny weights
            tiny = [f"model.path={write_tiny_digits_network(tmp_path / 'net.safetensors')}", *FAST_DIGITS_METRIC]
        else:  # an EDM network config: the same loader, reading a tiny snapshot in NVIDIA's format
            conditional = base.dataset.get("num_classes", 0) > 0
            tiny = [f"model.path={tiny_edm['cond' if conditional else 'uncond']}"]
            assert "fid" in base.metrics
            tiny.append("metrics=none")  # FID needs Inception weights and reference statistics: not offline
        cfg = compose(f"experiment={experiment}", *tiny, *FAST, "batch_size=1", f"out_dir={tmp_path / 'run'}")
    metrics = sample_from_config(cfg)
    tmp_path = tmp_path / "run"
    if "digits" in cfg.metrics:
        evaluation = json.loads((tmp_path / "metrics.json").read_text())["evaluation"]["digits"]
        assert evaluation["num_images"] == 2 and evaluation["fd"] > 0 and metrics["evaluation"]["digits"]["fd"] == evaluation["fd"]
    assert metrics["num_images"] == 2 and metrics["num_steps"] == 2 and metrics["nfe"] in (2, 3)
    assert (tmp_path / "grid.png").is_file() and json.loads((tmp_path / "metrics.json").read_text()) == metrics
    data = np.load(tmp_path / "images.npz")
    assert data["images"].shape[0] == 2 and data["seeds"].tolist() == [0, 1]
    if metrics["label_dim"]:
        assert data["class_labels"].shape == (2,)


def test_embedded_digits_config_samples_a_network_written_by_train(tmp_path, monkeypatch):
    network = write_tiny_digits_network(tmp_path / "final.safetensors")
    with hydra_configs():
        cfg = compose("dataset=digits", f"model.path={network}", *FAST, f"out_dir={tmp_path / 'run'}")
    metrics = sample_from_config(cfg)
    assert metrics["image_shape"] == [1, 16, 16] and metrics["model"]["target"] == "bdia.models.digits_network"


def test_multirun_sweep_writes_one_folder_per_override_set(tmp_path, monkeypatch):
    code = cli(monkeypatch, tmp_path, "-m", "experiment=digits_demo", "solver=ddim,bdia_edm", *FAST, *TINY_GMM, "metrics=none")
    assert code is None
    sweep = tmp_path / "results" / "sample" / "digits_demo"
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(folders) == 2 and all("solver.num_steps=2" in f for f in folders)
    assert any(f.endswith("solver=ddim") for f in folders) and any(f.endswith("solver=bdia_edm") for f in folders)
    for folder in folders:
        metrics = json.loads((sweep / folder / "metrics.json").read_text())
        assert metrics["num_images"] == 2 and (sweep / folder / "config.yaml").is_file()
        assert metrics["model"]["config"] == "gmm-digits"


def test_the_logger_gets_config_metrics_grid_and_table_grouped_by_experiment(tmp_path):
    RecordingLogger.calls.clear()
    with hydra_configs():
        cfg = compose("experiment=digits_demo", "logger._target_=app_helpers.RecordingLogger", *FAST, *TINY_GMM,
                      "metrics=none", f"out_dir={tmp_path}")
    sample_from_config(cfg)
    calls = dict(RecordingLogger.calls)
    assert [c[0] for c in RecordingLogger.calls] == ["init", "start", "log_metrics", "log_image", "log_table", "finish"]
    assert calls["start"]["group"] == "digits_demo" and calls["start"]["run_dir"] == str(tmp_path)
    assert calls["start"]["config"]["solver"]["name"] == "bdia_edm"
    assert calls["log_metrics"]["nfe"] == 3 and "levels" not in calls["log_metrics"]["sigmas"]
    assert calls["log_image"] == ("grid", str(tmp_path / "grid.png"), True)
    key, columns, rows = calls["log_table"]
    assert columns[:3] == ["solver", "gamma", "num_steps"] and rows[0][:3] == ["bdia_edm", 0.5, 2]
    assert calls["finish"] is None


def test_wandb_logger_config_runs_disabled_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with hydra_configs():
        cfg = compose("logger=wandb", *FAST, *TINY_GMM, f"out_dir={tmp_path}")
    assert sample_from_config(cfg)["num_images"] == 2
    assert not (tmp_path / "wandb").exists()


# --------------------------------------------------------------------------------------------------
# Each app's --help: only the groups and options of its own config search path.

#: What ``scripts/<app>.py --help`` lists under "Configuration groups" (group -> options).
#: The flow-matching model configs (configs/flow/model/), on the text2image and edit search paths.
FLOW_MODELS = ["flux-dev", "flux-schnell", "sd3-medium", "sd3.5-large", "sd3.5-medium", "tiny-flux", "tiny-sd3"]
HELP_GROUPS = {
    "sample": {
        "dataset": ["afhqv2", "cifar10", "digits", "ffhq", "gmm", "imagenet64"],
        "experiment": ["digits_demo", "table2_afhqv2", "table2_cifar10", "table2_digits", "table2_ffhq",
                       "table2_imagenet64"],
        "launcher": ["local", "slurm", "torchrun"],
        "logger": ["none", "wandb"],
        "metrics": ["digits", "fid", "fid_edm", "inversion", "none", "reconstruction"],
        "model": sorted([*CHECKPOINTS, "digits", "gmm-digits"]),
        "solver": ["bdia_ddim", "bdia_edm", "ddim", "dpmpp_2m", "edm", "ipndm", "rex", "unipc"],
    },
    "text2image": {
        "experiment": ["table1_sd", "table1_tiny"],
        "launcher": ["local", "slurm", "torchrun"],
        "logger": ["none", "wandb"],
        "metrics": ["clip", "fid", "fid_edm", "none", "reconstruction"],
        "model": sorted(["sd14", "sd15", "sd21_base", "tiny-sd", *FLOW_MODELS]),
        "solver": ["bdia_ddim", "ddim"],
    },
    "edit": {
        "launcher": ["local", "slurm", "torchrun"],
        "logger": ["none", "wandb"],
        "model": sorted(["sd14", "sd15", "sd21_base", "tiny-sd", *FLOW_MODELS]),
    },
    "evaluate": {
        "logger": ["none", "wandb"],
        "metrics": ["clip", "digits", "fid", "fid_edm", "inversion", "none", "reconstruction"],
    },
    "fid_ref": {},
    "train": {},
}
#: Words that must not appear anywhere in an app's --help (other apps' models, data sets, experiments, solvers).
HELP_NEVER = {
    "sample": ["sd14", "sd15", "sd21_base", "tiny-sd", "table1", "clip"],
    "text2image": ["edm-", "baseline-", "digits", "gmm", "dataset", "bdia_edm", "table2"],
    "edit": ["edm-", "baseline-", "digits", "gmm", "dataset", "solver:"],
}


def _help_groups(text: str) -> dict:
    section = text.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    groups = {}
    for line in section.splitlines():
        if line.strip() and not line.startswith("Compose your configuration"):
            group, _, options = line.partition(": ")
            groups[group] = [o.strip() for o in options.split(",")]
    return groups


def test_each_apps_help_lists_only_its_own_groups_and_options(tmp_path):
    """``python scripts/<app>.py --help`` (subprocesses, started together) from outside the repository."""
    import subprocess
    import sys

    from app_helpers import REPO, subprocess_env

    procs = {app: subprocess.Popen([sys.executable, str(REPO / "scripts" / f"{app}.py"), "--help"], cwd=tmp_path,
                                   env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for app in HELP_GROUPS}
    outputs = {app: proc.communicate(timeout=300) for app, proc in procs.items()}
    for app, (out, err) in outputs.items():
        assert procs[app].returncode == 0, (app, err[-2000:])
        assert _help_groups(out) == HELP_GROUPS[app], app
        for word in HELP_NEVER.get(app, ()):
            assert word not in out, (app, word)
    assert not list(tmp_path.iterdir())  # --help writes nothing (no outputs/, no .hydra/)


def test_preflight_lists_the_options_of_the_apps_own_search_path():
    from bdia.apps.cli import preflight

    assert preflight(["-m", "logger=none,wandb", "launcher=local"]) is None  # shared groups of the sampling app
    assert preflight(["-m", "metrics=clip,none"]) == (
        "unknown metrics 'clip' (metrics=clip); choose one of: digits, fid, fid_edm, inversion, none, reconstruction")
    assert preflight(["model=sd15"]).startswith("unknown model 'sd15' (model=sd15); choose one of: baseline-")
    assert preflight(["-m", "solver=edm,ddim"], config_name="text2image") == (
        "unknown solver 'edm' (solver=edm); choose one of: bdia_ddim, ddim")
    assert preflight(["model=edm-cifar10-32x32-cond-vp"], config_name="text2image") == (
        "unknown model 'edm-cifar10-32x32-cond-vp' (model=edm-cifar10-32x32-cond-vp); "
        "choose one of: flux-dev, flux-schnell, sd14, sd15, sd21_base, sd3-medium, sd3.5-large, sd3.5-medium, "
        "tiny-flux, tiny-sd, tiny-sd3")
    assert preflight(["-m", "solver=ddim,bdia_ddim", "solver.num_steps=10,20"], config_name="text2image") is None
    assert preflight(["metrics=digits"], config_name="text2image").startswith("unknown metrics 'digits'")
