import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pins_from_environment_yml():
    lines = (ROOT / "environment.yml").read_text().splitlines()
    return {line.strip()[2:] for line in lines if re.match(r"\s+- [A-Za-z]", line) and "=" in line and "python=" not in line}


def test_environment_yml_pins_equal_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    assert _pins_from_environment_yml() == pins


def test_required_pins():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps
    assert "omegaconf>=2.3,<2.4" in deps and any(d.startswith("hydra-core==1.3.") for d in deps)


def test_demo_requirements_met_except_gradios_pillow_cap():
    """requirements-demo.txt is installed with --no-deps (gradio caps pillow below this project's pin): every
    other requirement of the pinned gradio and gradio-client must be met by what is installed, and every pin in
    the file must be what is installed."""
    import importlib.metadata as md

    import pytest
    from packaging.requirements import Requirement

    pins = [line.split("#")[0].strip() for line in (ROOT / "requirements-demo.txt").read_text().splitlines()]
    pins = [Requirement(p) for p in pins if p]
    try:
        installed = {r.name: md.version(r.name) for r in pins}
    except md.PackageNotFoundError as e:
        pytest.fail(f"{e.name} from requirements-demo.txt is not installed (make venv installs it)")
    for r in pins:
        assert r.specifier.contains(installed[r.name]), f"{r} pinned, {installed[r.name]} installed"
    unmet = []
    for dist in ("gradio", "gradio-client"):
        for text in md.requires(dist) or []:
            req = Requirement(text)
            if req.name == "pillow" or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
                continue
            try:
                version = md.version(req.name)
            except md.PackageNotFoundError:
                unmet.append(f"{dist}: {req} (not installed)")
                continue
            if not req.specifier.contains(version, prereleases=True):
                unmet.append(f"{dist}: {req} ({version} installed)")
    assert not unmet, unmet
