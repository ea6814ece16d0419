"""Fréchet distance and KID: closed forms, float64 statistics, and agreement with torch-fidelity and clean-fid
on the same features (a local feature extractor injected through each library's extension point)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bdia.metrics import DigitsFeatures, FeatureStats, digits_uint8, frechet_distance, kernel_distance, polynomial_mmd2
from bdia.metrics.features import feature_statistics


def _random_orthogonal(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


# --------------------------------------------------------------------------------------------------
# Closed forms.


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_closed_form_commuting_covariances(method):
    # Sigma_k = Q diag(a_k) Q^T share eigenvectors: FD = |mu1 - mu2|^2 + sum (sqrt(a1) - sqrt(a2))^2.
    d = 12
    rng = np.random.default_rng(0)
    q = _random_orthogonal(d, 1)
    a1, a2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    sigma1, sigma2 = (q * a1) @ q.T, (q * a2) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a1) - np.sqrt(a2)) ** 2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2, method) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu1, sigma1, mu1, sigma1, method) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_closed_form_non_commuting(method):
    # Sigma1 = c I: tr((c Sigma2)^{1/2}) = sqrt(c) sum sqrt(eig(Sigma2)), for any Sigma2; and the 1-D formula.
    rng = np.random.default_rng(2)
    a = rng.standard_normal((6, 6))
    sigma2 = a @ a.T + 0.1 * np.eye(6)
    c = 0.7
    expected = 6 * c + np.trace(sigma2) - 2 * np.sqrt(c) * np.sqrt(np.linalg.eigvalsh(sigma2)).sum()
    assert frechet_distance(np.zeros(6), c * np.eye(6), np.zeros(6), sigma2, method) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]], method) == pytest.approx(2.0**2 + (2.0 - 3.0) ** 2)


def test_frechet_distance_singular_covariances_stay_real():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 20))  # 5 samples in 20-D: rank-4 covariance
    sigma = np.cov(x, rowvar=False)
    fd = frechet_distance(x.mean(0), sigma, x.mean(0) + 0.1, sigma)
    # Exact value 0.2; the square root of round-off-sized eigenvalues (~1e-16) costs ~1e-8 each, so singular
    # covariances (fewer images than feature dimensions) are only good to ~1e-6 absolute — in every method.
    assert np.isfinite(fd) and fd == pytest.approx(20 * 0.01, abs=1e-5)


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="magic")


def test_feature_stats_equal_numpy_and_add_over_shards():
    rng = np.random.default_rng(4)
    f = rng.standard_normal((101, 7)) * 3 + 5
    whole = FeatureStats(7).update(torch.from_numpy(f))
    np.testing.assert_allclose(whole.mu, f.mean(0), rtol=1e-13)
    np.testing.assert_allclose(whole.sigma, np.cov(f, rowvar=False), rtol=1e-10, atol=1e-12)
    shards = FeatureStats(7).update(torch.from_numpy(f[::2])) + FeatureStats(7).update(torch.from_numpy(f[1::2]))
    assert shards.n == 101
    np.testing.assert_allclose(shards.sigma, whole.sigma, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        whole.update(torch.zeros(2, 6))


def test_polynomial_mmd2_matches_a_direct_double_sum():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)) + 0.5

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    m = 6
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    expected = (xx + yy) / (m * (m - 1)) - 2 * xy / m**2
    assert polynomial_mmd2(x, y) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# Agreement with the libraries on the same features.


@pytest.fixture(scope="module")
def digit_sets():
    """Two image sets: 'generated' = train digits with grain (uint8), reference = held-out digits."""
    from bdia.metrics.digits_classifier import digits_split
    from bdia.imageio import quantize

    x, _ = digits_split("train")
    noisy = x[:300] + 0.08 * torch.randn(x[:300].shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    generated = quantize(noisy).numpy()
    reference, _ = digits_uint8("test")
    return generated, reference


@pytest.fixture(scope="module")
def extractor():
    return DigitsFeatures()


@pytest.fixture(scope="module")
def ours(digit_sets, extractor):
    generated, reference = digit_sets
    s1, f1 = feature_statistics(generated, extractor, return_features=True)
    s2, f2 = feature_statistics(reference, extractor, return_features=True)
    return s1, f1, s2, f2


class _UInt8Dataset(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = torch.from_numpy(images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_fd_and_kid_agree_with_torch_fidelity_through_a_registered_extractor(digit_sets, ours):
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class DigitsForTorchFidelity(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.digits = DigitsFeatures()

        @staticmethod
        def get_provided_features_list():
            return ("digits64",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "digits64"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

        def forward(self, x):
            return (self.digits(x).double(),)

    name = "bdia-digits-classifier-test"
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(name, DigitsForTorchFidelity)
    generated, reference = digit_sets
    theirs = torch_fidelity.calculate_metrics(
        input1=_UInt8Dataset(generated), input2=_UInt8Dataset(reference), fid=True, kid=True, feature_extractor=name,
        cuda=False, cache=False, verbose=False, save_cpu_ram=True, batch_size=128, kid_subsets=20, kid_subset_size=250,
    )
    s1, f1, s2, f2 = ours
    fd = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert fd > 0
    assert fd == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    kid = kernel_distance(f1, f2, subsets=20, subset_size=250)  # same subsets: torch-fidelity's rng scheme
    assert kid.mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9)
    assert kid.std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-9)


def test_fd_and_kid_agree_with_clean_fid_custom_extractor_and_fid_from_feats(digit_sets, ours, extractor, tmp_path):
    from cleanfid import fid as cleanfid
    from PIL import Image

    s1, f1, s2, f2 = ours
    fd = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert fd == pytest.approx(cleanfid.fid_from_feats(f1.numpy(), f2.numpy()), rel=1e-6)

    # The whole clean-fid pipeline on PNG folders, our extractor passed as custom_feat_extractor.
    generated, reference = digit_sets
    for name, images in (("generated", generated[:120]), ("reference", reference[:150])):
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image[0]).save(tmp_path / name / f"{i:06d}.png")

    def custom(batch):  # clean-fid hands over float RGB 0..255 [B, 3, H, W]
        return extractor(batch[:, :1].round().to(torch.uint8)).double()

    theirs = cleanfid.compute_fid(str(tmp_path / "generated"), str(tmp_path / "reference"), mode="legacy_tensorflow",
                                  custom_feat_extractor=custom, num_workers=0, batch_size=64, device=torch.device("cpu"),
                                  verbose=False)
    a, _ = feature_statistics(generated[:120], extractor)
    b, _ = feature_statistics(reference[:150], extractor)
    assert frechet_distance(a.mu, a.sigma, b.mu, b.sigma) == pytest.approx(theirs, rel=1e-6)

    # clean-fid's KID: with one subset as large as both sets every draw is a permutation, so the values agree.
    m = 250
    ours_kid = kernel_distance(f1[:m], f2[:m], subsets=1, subset_size=m).mean
    assert ours_kid == pytest.approx(cleanfid.kernel_distance(f1[:m].numpy(), f2[:m].numpy(), num_subsets=1,
                                                              max_subset_size=m), rel=1e-9)


def test_pinned_library_urls_equal_the_installed_libraries():
    from cleanfid.downloads_helper import inception_url
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    from bdia.metrics.features import CLEAN_FID_INCEPTION_URL, TORCH_FIDELITY_INCEPTION_URL

    assert TORCH_FIDELITY_INCEPTION_URL == URL_INCEPTION_V3
    assert CLEAN_FID_INCEPTION_URL == inception_url
