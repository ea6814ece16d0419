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
