"""A model that is neither local nor cached fails at once when the Hub cannot be reached, also without
HF_HUB_OFFLINE=1 (the Hub client would otherwise retry for about 30 s), naming the URL, the cache path and the key."""

from __future__ import annotations

import time

import pytest

from bdia.download import AssetUnavailableError, hub_reachable
from bdia.metrics.clip_score import load_clip


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    for var in ("HF_HUB_OFFLINE", "BDIA_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, refused at once
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


def test_the_probe_says_why_the_hub_is_unreachable(no_hub):
    problem = hub_reachable(timeout=2.0)
    assert problem is not None and "127.0.0.1" in problem


def test_clip_without_offline_mode_fails_fast_when_the_hub_is_unreachable(no_hub):
    import transformers  # noqa: F401  (its import takes seconds on a busy machine; not what is timed)

    start = time.monotonic()
    with pytest.raises(AssetUnavailableError) as info:
        load_clip("openai/clip-vit-base-patch32", config_key="metrics.clip.path")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "unreachable" in message and "https://huggingface.co/openai/clip-vit-base-patch32" in message
    assert "metrics.clip.path=" in message
