import math

import pytest
import torch

import bdia
from bdia.schedules import sigmas_from_alphas_cumprod


def tweedie(log_density, x, sigma):
    """E[x0 | x] = x + sigma^2 grad log p_sigma(x) (Tweedie's formula), by autograd: an independent check."""
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_density(x).sum(), x)
    return (x + sigma**2 * grad).detach()


@pytest.mark.parametrize("sigma", [0.05, 0.7, 12.0])
def test_gaussian_mixture_posterior_mean_matches_tweedie(sigma):
    g = torch.Generator().manual_seed(0)
    gmm = bdia.GaussianMixtureDenoiser(torch.randn(3, 2, 2, 2, generator=g), [0.3, 0.5, 0.2], weights=[0.2, 0.3, 0.5])
    x = 2 * torch.randn(7, 2, 2, 2, generator=g, dtype=torch.float64)

    def log_p(x):
        return gmm.log_prob_components(x, torch.tensor(sigma, dtype=torch.float64)).logsumexp(-1)

    torch.testing.assert_close(gmm(x, torch.tensor(sigma, dtype=torch.float64)), tweedie(log_p, x, sigma), rtol=1e-10, atol=1e-12)


def test_single_gaussian_closed_form():
    mu, s, sigma = torch.full((1, 3), 0.4, dtype=torch.float64), 0.6, 1.7
    gmm = bdia.GaussianMixtureDenoiser(mu, [s])
    x = torch.randn(5, 3, dtype=torch.float64)
    expected = mu + s**2 / (s**2 + sigma**2) * (x - mu)
    torch.testing.assert_close(gmm(x, torch.tensor(sigma, dtype=torch.float64)), expected, rtol=1e-14, atol=1e-14)


def test_gaussian_mixture_per_row_sigma_and_dtype():
    gmm = bdia.GaussianMixtureDenoiser(torch.randn(2, 4), [0.5, 0.5])
    x = torch.randn(3, 4, dtype=torch.float64)
    sigmas = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    rows = torch.cat([gmm(x[i : i + 1], sigmas[i]) for i in range(3)])
    torch.testing.assert_close(gmm(x, sigmas), rows, rtol=1e-14, atol=0)
    assert gmm(x.float(), torch.tensor(1.0)).dtype == torch.float32


def test_gaussian_mixture_rows_do_not_depend_on_their_batch():
    gmm = bdia.GaussianMixtureDenoiser(torch.randn(50, 1, 4, 4), 0.1)
    x = torch.randn(7, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor(0.3, dtype=torch.float64)
    whole = gmm(x, sigma)
    assert all(torch.equal(gmm(x[i : i + 1], sigma), whole[i : i + 1]) for i in range(7))


def test_gaussian_mixture_rejects_bad_parameters():
    with pytest.raises(ValueError, match="positive"):
        bdia.GaussianMixtureDenoiser(torch.zeros(2, 3), [0.5, 0.0])
    with pytest.raises(ValueError, match="weights"):
        bdia.GaussianMixtureDenoiser(torch.zeros(2, 3), [0.5, 0.5], weights=[1.0])


def test_empirical_denoiser_matches_tweedie_and_recovers_points():
    data = torch.randn(6, 1, 3, 3, dtype=torch.float64)
    emp = bdia.EmpiricalDenoiser(data)
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    sigma = 0.8

    def log_p(x):
        sq = ((x.reshape(x.shape[0], 1, -1) - data.reshape(1, 6, -1)) ** 2).sum(-1)
        return (-sq / (2 * sigma**2)).logsumexp(-1)

    torch.testing.assert_close(emp(x, torch.tensor(sigma, dtype=torch.float64)), tweedie(log_p, x, sigma), rtol=1e-10, atol=1e-12)
    near = data[2:3] + 1e-3 * torch.randn(1, 1, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(emp(near, torch.tensor(1e-2)), data[2:3], rtol=0, atol=1e-12)


class FixedOutput(torch.nn.Module):
    """A 'model' that returns a fixed tensor and records what it was called with."""

    def __init__(self, output):
        super().__init__()
        self.output = output
        self.calls = []

    def forward(self, z, timestep, **cond):
        self.calls.append((z.clone(), timestep.clone(), cond))
        return self.output


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_vp_adapter_recovers_x0_from_exact_predictions(prediction_type):
    abar = bdia.make_alphas_cumprod("scaled_linear", 0.00085, 0.012)
    table = sigmas_from_alphas_cumprod(abar)
    t = 601
    sigma = table[t]
    alpha, sigma_z = abar[t].sqrt(), (1 - abar[t]).sqrt()
    x0, eps = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    z = alpha * x0 + sigma_z * eps
    target = eps if prediction_type == "epsilon" else alpha * eps - sigma_z * x0
    model = FixedOutput(target)
    den = bdia.VPEpsDenoiser(model, abar, prediction_type=prediction_type)
    x = z / alpha  # EDM coordinates: x = x0 + sigma * eps
    torch.testing.assert_close(den(x, sigma), x0, rtol=1e-12, atol=1e-12)
    z_seen, t_seen, _ = model.calls[0]
    torch.testing.assert_close(z_seen, z, rtol=1e-14, atol=1e-14)
    assert torch.equal(t_seen, torch.full((2,), float(t), dtype=torch.float64))
    assert den.sigma_min == pytest.approx(table[0].item()) and den.sigma_max == pytest.approx(table[-1].item())


def test_vp_adapter_integer_labels_and_model_dtype():
    abar = bdia.make_alphas_cumprod()
    table = sigmas_from_alphas_cumprod(abar)
    model = FixedOutput(torch.zeros(1, 2))
    den = bdia.VPEpsDenoiser(model, abar, model_dtype=torch.float32, integer_timesteps=True)
    off_grid = (table[10].log() * 0.4 + table[11].log() * 0.6).exp()
    den(torch.ones(1, 2, dtype=torch.float64), off_grid)
    z_seen, t_seen, _ = model.calls[0]
    assert z_seen.dtype == torch.float32 and t_seen.dtype == torch.int64 and t_seen.item() == 11


def test_vp_adapter_rejects_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction_type"):
        bdia.VPEpsDenoiser(FixedOutput(None), bdia.make_alphas_cumprod(), prediction_type="sample")


class CondDenoiser(torch.nn.Module):
    sigma_min, sigma_max = 0.0, math.inf

    def round_sigma(self, sigma):
        return sigma

    def forward(self, x, sigma, class_labels=None, text=None):
        return torch.tanh(x) * text.reshape(-1, *([1] * (x.ndim - 1))) + sigma


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_classifier_free_guidance(scale):
    inner = bdia.CountingDenoiser(CondDenoiser())
    cfg = bdia.ClassifierFreeGuidance(inner, scale, uncond={"text": torch.zeros(1)})
    x, sigma, text = torch.randn(3, 2, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64), torch.tensor([1.0, 2.0, 3.0])
    cond_out, uncond_out = CondDenoiser()(x, sigma, text=text), CondDenoiser()(x, sigma, text=torch.zeros(3))
    torch.testing.assert_close(cfg(x, sigma, text=text), uncond_out + scale * (cond_out - uncond_out))
    assert inner.nfe == 1  # both halves in one batched call
    with pytest.raises(ValueError, match="no conditional value"):
        cfg(x, sigma)


def test_counting_denoiser_counts_and_forwards_attributes():
    gmm = bdia.GaussianMixtureDenoiser(torch.zeros(1, 2), [1.0], sigma_min=0.01, sigma_max=50.0)
    counted = bdia.CountingDenoiser(gmm)
    for _ in range(3):
        counted(torch.zeros(4, 2), torch.tensor(1.0))
    assert counted.nfe == 3 and counted.sigma_min == 0.01 and counted.sigma_max == 50.0
    counted.reset()
    assert counted.nfe == 0


def test_vp_adapter_runs_a_float32_network_from_a_float64_state():
    net = torch.nn.Conv2d(2, 2, 1)  # float32 parameters
    den = bdia.VPEpsDenoiser(lambda z, t: net(z), bdia.make_alphas_cumprod())
    wrapped = bdia.VPEpsDenoiser(net_with_t := _NetWithTimestep(net), bdia.make_alphas_cumprod())
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    assert wrapped(x, torch.tensor(1.0, dtype=torch.float64)).dtype == torch.float64
    assert net_with_t.seen_dtype == torch.float32
    with pytest.raises(RuntimeError):  # a bare callable has no parameters to infer from: pass model_dtype
        den(x, torch.tensor(1.0, dtype=torch.float64))


class _NetWithTimestep(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.seen_dtype = net, None

    def forward(self, z, timestep):
        self.seen_dtype = z.dtype
        return self.net(z)


def test_sample_does_not_build_an_autograd_graph():
    net = torch.nn.Conv2d(2, 2, 1).double()
    den = bdia.VPEpsDenoiser(_NetWithTimestep(net), bdia.make_alphas_cumprod())
    sigmas = bdia.vp_sigmas(bdia.make_alphas_cumprod(), 4)
    out = bdia.sample(den, torch.randn(1, 2, 3, 3, dtype=torch.float64) * sigmas[0], sigmas, solver="bdia_ddim", gamma=0.5)
    assert not out.requires_grad
