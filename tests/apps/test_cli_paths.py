"""Paths on the command line: the shared configs come from the checkout whose script runs (not from wherever the
installed ``bdia`` package lives), and a run folder the apps print is accepted as typed."""

from __future__ import annotations

import shutil
import textwrap

import pytest
from omegaconf import OmegaConf

from app_helpers import REPO, cli
from bdia.apps.cli import APP_CONFIGS, CONFIG_DIR, config_dirs, group_options, override_value, preflight


def _other_checkout(tmp_path):
    """A copy of this checkout's ``configs/`` and ``scripts/sample.py`` in another folder, with a logger option
    only the copy has (the installed package is still this repository's)."""
    checkout = tmp_path / "other-clone"
    shutil.copytree(REPO / "configs", checkout / "configs")
    (checkout / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "sample.py", checkout / "scripts" / "sample.py")
    (checkout / "configs" / "loggers" / "logger" / "only_here.yaml").write_text(textwrap.dedent("""\
        _target_: bdia.logger.NullLogger
        """))
    (checkout / "configs" / "launchers" / "launcher" / "local.yaml").write_text(
        (REPO / "configs" / "launchers" / "launcher" / "local.yaml").read_text() + "\n# copied\n")
    return checkout


def test_shared_config_folders_are_the_ones_beside_the_app_folder(tmp_path):
    checkout = _other_checkout(tmp_path)
    for app, shared in APP_CONFIGS.items():
        folders = config_dirs(checkout / "configs" / app)
        assert folders == [checkout / "configs" / app, *(checkout / "configs" / name for name in shared)], app
        assert all(folder.is_dir() for folder in folders), app
    assert "only_here" in group_options(checkout / "configs" / "sample", "logger")
    assert "only_here" not in group_options(CONFIG_DIR / "sample", "logger")
    # An app folder copied on its own (no shared folders beside it) still finds this package's.
    alone = tmp_path / "alone" / "sample"
    shutil.copytree(REPO / "configs" / "sample", alone)
    assert config_dirs(alone)[1:] == [CONFIG_DIR / name for name in APP_CONFIGS["sample"]]
    # A folder that is not an app's has no shared folders.
    assert config_dirs(tmp_path / "mine") == [tmp_path / "mine"]


def test_a_script_of_another_checkout_composes_from_that_checkouts_configs(tmp_path, monkeypatch, capsys):
    """The issue: with the venv of another clone, ``scripts/sample.py`` could not find ``launcher/local``. Here
    the script and configs are a copy outside the installed package's checkout."""
    checkout = _other_checkout(tmp_path)
    script = checkout / "scripts" / "sample.py"
    assert preflight(["logger=only_here"], checkout / "configs" / "sample", "sample") is None
    assert cli(monkeypatch, tmp_path, "logger=only_here", "--cfg", "job", script=script) is None
    job = OmegaConf.create(capsys.readouterr().out)
    assert job.logger["_target_"] == "bdia.logger.NullLogger" and job.solver.name == "bdia_edm"
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("path", [
    "results/sample/default/dataset=digits,solver=bdia_edm",
    "a b/it's here",
    "back\\slash\\",
    "quote\\'and ${interpolation}",
    "[list],{dict}:*?",
])
def test_override_value_gives_hydra_the_path_verbatim(path, tmp_path):
    from hydra import compose, initialize_config_dir

    from bdia.apps.cli import app_config_dir

    with initialize_config_dir(str(app_config_dir("evaluate")), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"run_dir={override_value(path)}"])
    assert cfg.run_dir == path


def test_help_describes_the_apps_keys_from_its_yaml_comments(tmp_path, monkeypatch, capsys):
    import re

    from bdia.apps.cli import config_help

    text = config_help(REPO / "configs" / "sample" / "sample.yaml")
    assert text.startswith("scripts/sample.py: sample one image per seed")
    assert re.search(r"\n  seeds +0-63 +one image per seed", text)
    assert re.search(r"\n  sigma_max +80\.0 +clamped to the network's supported range", text)
    assert "defaults" not in text.split("== Keys")[1] and "sweep:" not in text  # no defaults list, no hydra block
    assert re.search(r"\n  train\.lr +0\.002", config_help(REPO / "configs" / "train" / "train.yaml"))
    # The app's --help shows it (with $ kept as typed), then the groups, then the composed config.
    assert cli(monkeypatch, tmp_path, "--help") is None
    out = capsys.readouterr().out
    assert out.index("== Keys") < out.index("== Configuration groups ==") < out.index("== Config ==")
    assert "${hydra:sweep.dir}/${bdia.run_name:${hydra:job.override_dirname}}" in out
    assert not list(tmp_path.iterdir())
