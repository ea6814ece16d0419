"""The shipped digits classifier (embedded data set feature extractor) and FD / KID in its features."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bdia.metrics import DigitsFD, DigitsFeatures, digits_split, digits_uint8, frechet_distance
from bdia.metrics.digits_classifier import (
    ASSET_CARD,
    ASSET_WEIGHTS,
    evaluate_accuracy,
    load_digits_classifier,
    split_fingerprint,
    train_digits_classifier,
)
from bdia.metrics.features import feature_statistics

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def card():
    return json.loads(ASSET_CARD.read_text())


def test_shipped_classifier_matches_its_card(card):
    assert ASSET_WEIGHTS.stat().st_size < 400_000
    assert hashlib.sha256(ASSET_WEIGHTS.read_bytes()).hexdigest() == card["weights"]["sha256"]
    model = load_digits_classifier()
    assert sum(p.numel() for p in model.parameters()) == card["num_parameters"]
    accuracy = evaluate_accuracy(model, "test")
    assert accuracy == pytest.approx(card["accuracy"]["test"], abs=1e-12)
    assert accuracy >= 0.97 and card["data"]["num_test"] == 597


def test_held_out_split_is_still_the_one_the_classifier_never_saw(card):
    # bdia.data owns the split; if it changes, the classifier could have trained on today's held-out digits.
    assert split_fingerprint("test") == card["data"]["test_split_sha256"], (
        "bdia.data's test split changed: retrain with python scripts/train_digits_classifier.py")
    train, _ = digits_split("train")
    test, _ = digits_split("test")
    assert len(train) == card["data"]["num_train"] and len(train) + len(test) == 1797


def test_preprocessing_is_the_analytic_models(card):
    from bdia.analytic import digits_gmm

    all_digits, _ = digits_split("all")
    assert torch.equal(digits_gmm(image_size=16).means, all_digits)
    assert all_digits.shape == (1797, 1, 16, 16) and all_digits.min() >= -1 and all_digits.max() <= 1


def test_training_is_deterministic_and_the_script_writes_safetensors_and_card(tmp_path):
    first, report = train_digits_classifier(epochs=1, batch_size=128)
    second, _ = train_digits_classifier(epochs=1, batch_size=128)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert report["training"]["deterministic_algorithms"] and report["features"]["dim"] == 64

    spec = importlib.util.spec_from_file_location("train_digits_classifier", REPO / "scripts" / "train_digits_classifier.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "clf.safetensors"
    card = script.main(["--epochs", "1", "--batch-size", "128", "--out", str(out), "--quiet"])
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert card["weights"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    features = DigitsFeatures(weights=out)
    assert features(torch.from_numpy(digits_uint8("test")[0][:3])).shape == (3, 64)


def test_features_reject_other_images():
    extractor = DigitsFeatures()
    with pytest.raises(ValueError, match=r"\[N, 1, 16, 16\]"):
        extractor(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        extractor(torch.zeros(2, 1, 16, 16))


def test_fd_separates_real_digits_from_wrong_ones():
    """FD in classifier features is ~0 for the reference itself, small for other real digits, large for a
    single class and for noise."""
    extractor = DigitsFeatures()
    test, _ = digits_uint8("test")
    train, labels = digits_uint8("train")
    ref, _ = feature_statistics(test, extractor)

    def fd(images):
        s, _ = feature_statistics(images, extractor)
        return frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma)

    assert fd(test) == pytest.approx(0.0, abs=1e-6)
    real = fd(train)
    only_threes = fd(train[labels == 3])
    noise = fd(np.random.default_rng(0).integers(0, 256, (400, 1, 16, 16), dtype=np.uint8))
    assert real < 0.2 < only_threes < noise


def test_digits_metric_reports_label_reference_floor_and_kid(tmp_path):
    train, _ = digits_uint8("train")
    out = DigitsFD(kid_subsets=5)(train[:120])
    assert out["label"] == "FD in digits-classifier features (not FID)"
    assert out["reference"]["source"] == "digits-test" and out["reference"]["num_images"] == 597
    assert out["num_images"] == 120 and out["kid_subset_size"] == 120
    assert out["floor_matched_num_images"] == 120 and out["floor_halves_num_images"] == [899, 898]
    assert out["floor_matched_fd"] == pytest.approx(out["fd"])  # the run *is* the first 120 train digits
    assert np.isfinite(out["kid"]) and out["feature_extractor"]["weights_sha256"]
    with pytest.raises(ValueError, match="digits-classifier features"):
        from bdia.metrics import load_reference

        load_reference("digits-test", extractor=None)
