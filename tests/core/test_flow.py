"""Flow-matching models in the core: diffusers' flow grids reproduced exactly, the closed-form flow mixture, the
adapter, and the solvers on flows (flow Euler / Heun transcriptions, BDIA in x_t vs its x-space form, exact round
trips, measured order, bad input)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import bdia
from bdia.analytic import FlowGaussianMixture, gmm_toy
from bdia.flow import FlowDenoiser, flow_schedule, flow_shift_mu, flow_sigmas
from bdia.schedules import flow_sigma, flow_time

F64 = torch.float64


def flow_problem(seed=0, batch=4, shape=(2, 3, 3)):
    mixture = gmm_toy(shape, 5, seed=seed, std=0.3)
    noise = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    return FlowGaussianMixture.from_mixture(mixture), mixture, noise


# --------------------------------------------------------------------------------------------------
# Grids: FlowMatchEulerDiscreteScheduler's, exactly.

SPACINGS = [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}]
SHIFTS = [{}, {"shift": 3.0}, {"shift": 7}, {"use_dynamic_shifting": True, "mu": 0.8},
          {"use_dynamic_shifting": True, "mu": 1.15, "time_shift_type": "linear"},
          {"use_dynamic_shifting": True, "mu": flow_shift_mu(1024, 256, 4096, 0.5, 1.15)}]
EXTRAS = [{}, {"shift_terminal": 0.02}, {"num_train_timesteps": 800}]


def diffusers_grid(num_steps, custom=None, mu=None, **config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    if custom is not None:
        scheduler.set_timesteps(sigmas=custom, mu=mu)
    else:
        scheduler.set_timesteps(num_steps, mu=mu)
    return scheduler.sigmas, scheduler.timesteps


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0/0, as diffusers
@pytest.mark.parametrize("spacing,shifting,extra", list(itertools.product(SPACINGS, SHIFTS, EXTRAS)))
@pytest.mark.parametrize("num_steps", [1, 7, 28])
def test_flow_schedule_is_diffusers_bit_for_bit(spacing, shifting, extra, num_steps):
    config = {**spacing, **shifting, **extra}
    mu = config.pop("mu", None)
    times, timesteps = flow_schedule(num_steps, mu=mu, **config)
    ref_times, ref_timesteps = diffusers_grid(num_steps, mu=mu, **config)
    assert times.dtype == ref_times.dtype == torch.float32
    # equal_nan: one step with shift_terminal is 0/0 in diffusers too
    torch.testing.assert_close(times, ref_times, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(timesteps, ref_timesteps, rtol=0, atol=0, equal_nan=True)
    if num_steps > 1:
        sigmas = flow_sigmas(num_steps, mu=mu, **config)
        assert sigmas.dtype == F64 and sigmas[-1] == 0
        assert torch.equal(flow_time(sigmas).to(torch.float32), ref_times)  # the solvers step on diffusers' t


@pytest.mark.parametrize("config", [{}, {"shift": 3.0}, {"use_dynamic_shifting": True, "mu": 1.1},
                                    {"use_dynamic_shifting": True, "mu": 0.7, "shift_terminal": 0.05},
                                    {"invert_sigmas": True, "shift": 2.0}])
def test_custom_sigmas_and_invert_sigmas_are_diffusers_bit_for_bit(config):
    config = dict(config)
    mu = config.pop("mu", None)
    custom = np.linspace(1.0, 1 / 9, 9)  # what FluxPipeline passes
    times, timesteps = flow_schedule(sigmas=custom, mu=mu, **config)
    ref_times, ref_timesteps = diffusers_grid(None, custom=custom, mu=mu, **config)
    assert torch.equal(times, ref_times) and torch.equal(timesteps, ref_timesteps)
    t = flow_time(flow_sigmas(sigmas=custom, mu=mu, **config))
    expected = 1 - ref_times.double() if config.get("invert_sigmas") else ref_times.double()
    assert (t - expected).abs().max() <= 2e-16


def test_flow_time_and_sigma_are_inverse_maps():
    t = torch.tensor([1.0, 0.999, 0.5, 0.25, 1e-6, 0.0], dtype=F64)
    sigma = flow_sigma(t)
    assert sigma[0] == math.inf and sigma[-1] == 0 and sigma[2] == 1.0
    assert (flow_time(sigma) - t).abs().max() <= 2.3e-16
    assert flow_time(math.inf) == 1.0 and flow_sigma(1.0) == math.inf and flow_time(3.0) == 0.75


def test_flow_shift_mu_is_the_pipelines_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq in (16, 256, 1024, 4096, 6000):
        assert flow_shift_mu(seq, 256, 4096, 0.5, 1.15) == calculate_shift(seq, 256, 4096, 0.5, 1.15)


@pytest.mark.parametrize("bad,needle", [
    (dict(num_steps=0), "num_steps"), (dict(num_steps=10, shift=-1.0), "shift"),
    (dict(num_steps=10, use_dynamic_shifting=True), "mu"), (dict(num_steps=10, wrong_key=1), "wrong_key"),
    (dict(num_steps=10, use_karras_sigmas=True, use_beta_sigmas=True), "only one"),
    (dict(num_steps=10, time_shift_type="cubic"), "time_shift_type"),
    (dict(num_steps=10 ** 9), "num_steps"), (dict(sigmas=[[0.5]]), "custom sigmas"),
    (dict(num_steps=3, sigmas=[1.0, 0.5]), "num_steps"), (dict(sigmas=[1.5, 0.5]), "[0, 1]"),
])
def test_bad_flow_grid_settings_fail_in_one_line(bad, needle):
    with pytest.raises(ValueError) as info:
        flow_sigmas(**bad)
    assert needle in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# The closed-form flow mixture and the adapter.


def test_flow_mixture_velocity_is_the_mixture_denoiser_in_flow_coordinates():
    flow, mixture, z = flow_problem()
    for t in (0.05, 0.3, 0.7, 0.97):
        sigma = torch.tensor(t / (1 - t), dtype=F64)
        v = flow(z, sigma)
        denoised = mixture(z / (1 - t), sigma)  # the EDM-convention mixture, independent code
        assert ((z - t * v) - denoised).abs().max() < 1e-13
    # at t = 1 the latent is the noise itself: v = x_t - E[x0]
    v1 = flow(z, torch.tensor(math.inf, dtype=F64))
    expected_mean = (mixture.weights[:, None, None, None] * mixture.means).sum(0)
    assert (v1 - (z - expected_mean)).abs().max() < 1e-14


def test_flow_mixture_rows_do_not_depend_on_the_batch():
    flow, _, z = flow_problem()
    sigma = torch.tensor(1.7, dtype=F64)
    assert torch.equal(flow(z, sigma)[1:2], flow(z[1:2], sigma))


class _Predicts(torch.nn.Module):
    """A network predicting x0 or eps, made from the closed-form velocity (label = t * 1000, as diffusers')."""

    def __init__(self, flow, kind):
        super().__init__()
        self.flow, self.kind = flow, kind

    def forward(self, z, timestep):
        t = (timestep.double() / 1000).reshape(-1, *([1] * (z.ndim - 1)))
        v = self.flow(z, flow_sigma(t).flatten())
        return z - t * v if self.kind == "sample" else z + (1 - t) * v  # x0 = z - t v, eps = z + (1 - t) v


@pytest.mark.parametrize("kind", ["sample", "epsilon"])
def test_flow_denoiser_turns_every_prediction_into_the_velocity(kind):
    flow, _, z = flow_problem()
    for t in (0.8125, 0.25):  # exact in float32, so the network's label is exact
        sigma = torch.tensor(flow_sigma(t), dtype=F64)
        adapter = FlowDenoiser(_Predicts(flow, kind), prediction_type=kind)
        assert adapter.coordinates == "flow"
        assert (adapter(z, sigma) - flow(z, sigma)).abs().max() < 1e-12
        assert (adapter.denoised(z, sigma) - (z - t * flow(z, sigma))).abs().max() < 1e-12


def test_an_epsilon_flow_cannot_start_at_pure_noise():
    flow, _, z = flow_problem()
    adapter = FlowDenoiser(_Predicts(flow, "epsilon"), prediction_type="epsilon")
    with pytest.raises(ValueError, match="t = 1"):
        bdia.sample(adapter, z, flow_sigmas(4), solver="ddim")
    with pytest.raises(ValueError, match="prediction_type"):
        FlowDenoiser(flow, prediction_type="v")


def test_wrappers_forward_the_flow_coordinates():
    flow, _, z = flow_problem()
    counted = bdia.CountingDenoiser(bdia.denoisers.FixedBatchDenoiser(flow, 3))
    assert counted.coordinates == "flow"
    sigmas = flow_sigmas(6, shift=3.0)
    assert torch.equal(bdia.sample(counted, z, sigmas, solver="ddim"), bdia.sample(flow, z, sigmas, solver="ddim"))
    assert counted.nfe == 6


# --------------------------------------------------------------------------------------------------
# Solvers on flows.


def flow_euler(model, z, sigmas):
    """Flow Euler as FlowMatchEulerDiscreteScheduler writes it, in float64: x_t' = x_t + (t' - t) v."""
    t = flow_time(sigmas)
    for k in range(len(sigmas) - 1):
        z = z + (t[k + 1] - t[k]) * model(z, sigmas[k])
    return z


def flow_heun(model, z, sigmas):
    """FlowMatchHeunDiscreteScheduler's ODE steps in float64: Heun in t, Euler onto t = 0."""
    t = flow_time(sigmas)
    for k in range(len(sigmas) - 1):
        v = model(z, sigmas[k])
        dt = t[k + 1] - t[k]
        if t[k + 1] == 0:
            z = z + v * dt
        else:
            v_next = model(z + v * dt, sigmas[k + 1])
            z = z + 0.5 * (v + v_next) * dt
    return z


@pytest.mark.parametrize("config", [dict(shift=3.0), dict(use_dynamic_shifting=True, mu=1.1), dict()])
def test_ddim_is_flow_euler_bit_for_bit_and_gamma_zero_is_the_base_solver(config):
    flow, _, z = flow_problem()
    config = dict(config)
    sigmas = flow_sigmas(9, mu=config.pop("mu", None), **config)
    assert sigmas[0] == math.inf
    euler = bdia.sample(flow, z, sigmas, solver="ddim")
    assert torch.equal(euler, flow_euler(flow, z, sigmas))
    assert torch.equal(bdia.sample(flow, z, sigmas, solver="bdia_ddim", gamma=0.0), euler)
    heun = bdia.sample(flow, z, sigmas, solver="edm")
    assert (heun - flow_heun(flow, z, sigmas)).abs().max() < 1e-14
    assert torch.equal(bdia.sample(flow, z, sigmas, solver="bdia_edm", gamma=0.0), heun)


def test_edm_on_a_flow_is_diffusers_flow_heun():
    from diffusers import FlowMatchHeunDiscreteScheduler

    flow, _, z = flow_problem()
    scheduler = FlowMatchHeunDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    sample = z.clone()
    for timestep in scheduler.timesteps:
        t = timestep.double() / 1000
        sample = scheduler.step(flow(sample, flow_sigma(t)), timestep, sample).prev_sample
    # the same grid: diffusers' Heun grid is the Euler grid's, each inner level twice
    sigmas = flow_sigmas(6, shift=3.0)
    ours = bdia.sample(flow, z, sigmas, solver="edm")
    assert torch.equal(flow_time(sigmas).float(), torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1::2]]))
    assert (ours - sample).abs().max() < 1e-5  # diffusers steps the sample in float32


def bdia_in_x(mixture, x_start, sigmas, gamma):
    """BDIA-DDIM on EDM's x with the EDM-convention mixture: Euler in sigma, gamma-term scaled by
    c_k = s_{k-1} / s_{k+1}, s = 1 / (1 + sigma) (the combination in x_t written in x)."""
    s = 1 / (1 + sigmas)
    d = lambda x, k: (x - mixture(x, sigmas[k])) / sigmas[k]  # noqa: E731
    x_prev, x = x_start, x_start + (sigmas[1] - sigmas[0]) * d(x_start, 0)
    for k in range(1, len(sigmas) - 1):
        slope = d(x, k)
        fwd, back = x + (sigmas[k + 1] - sigmas[k]) * slope, x + (sigmas[k - 1] - sigmas[k]) * slope
        x_prev, x = x, gamma * s[k - 1] / s[k + 1] * (x_prev - back) + fwd
    return x


def test_bdia_ddim_on_a_flow_is_the_x_space_update_with_the_flow_factor():
    flow, mixture, z = flow_problem()
    sigmas = flow_sigmas(sigmas=np.linspace(0.95, 0.04, 8), shift=3.0)  # finite: x exists at every level
    for gamma in (1.0, 0.6):
        ours = bdia.sample(flow, z, sigmas, solver="bdia_ddim", gamma=gamma)
        x = bdia_in_x(mixture, z / (1 - flow_time(sigmas[0])), sigmas, gamma)
        assert (ours - x * (1 - flow_time(sigmas[-1]))).abs().max() < 1e-12


@pytest.mark.parametrize("solver,gamma,kwargs", [
    ("bdia_ddim", 1.0, {}), ("bdia_ddim", 0.9, {}), ("bdia_ddim", "obelm", {}), ("bdia_edm", 0.5, {}),
    ("bdia_edm", 0.9, {"backward": "taylor"}), ("bdia_edm", 0.9, {"backward": "euler"}),
    ("bdia_edm", 0.9, {"backward": "heun"}), ("bdia_edm", "lte", {}),
])
def test_flow_round_trips_are_exact_in_float64(solver, gamma, kwargs):
    flow, _, z = flow_problem()
    sigmas = flow_sigmas(12, shift=3.0)
    pair = bdia.sample(flow, z, sigmas, solver=solver, gamma=gamma, return_pair=True, **kwargs)
    noise_pair = bdia.invert(flow, pair, sigmas, solver=solver, gamma=gamma, **kwargs)
    assert (noise_pair.x_end - z).abs().max() / z.abs().max() < 1e-11
    again = bdia.sample(flow, noise_pair, sigmas, solver=solver, gamma=gamma, return_pair=True, **kwargs)
    assert (again.x_end - pair.x_end).abs().max() < 1e-11


def test_a_clean_latent_inverts_with_n_network_calls_and_regenerates_exactly():
    flow, _, _ = flow_problem()
    clean = flow.sample_data(3, generator=torch.Generator().manual_seed(5))
    sigmas = flow_sigmas(10, use_dynamic_shifting=True, mu=1.15)
    counted = bdia.CountingDenoiser(flow)
    noise_pair = bdia.invert(counted, clean, sigmas, solver="bdia_ddim", gamma=0.96)
    assert counted.nfe == 10
    again = bdia.sample(flow, noise_pair, sigmas, solver="bdia_ddim", gamma=0.96)
    assert (again - clean).abs().max() / clean.abs().max() < 1e-12


def _order(solver, gamma, shift):
    flow, _, z = flow_problem(shape=(4,), batch=16)
    reference = bdia.sample(flow, z, flow_sigmas(1024, shift=shift), solver="edm")
    errors = []
    for n in (16, 32, 64):
        out = bdia.sample(flow, z, flow_sigmas(n, shift=shift), solver=solver, gamma=gamma)
        errors.append(float((out - reference).square().mean().sqrt()))
    return math.log2(errors[1] / errors[2]), errors


def test_obelm_makes_bdia_over_flow_euler_second_order():
    order, _ = _order("bdia_ddim", "obelm", 3.0)
    euler_order, _ = _order("bdia_ddim", 0.0, 3.0)
    assert 0.8 < euler_order < 1.2
    assert order > 1.7


def test_flow_grids_need_a_flow_model_and_x_space_needs_finite_sigmas():
    flow, mixture, z = flow_problem()
    sigmas = flow_sigmas(6, shift=3.0)
    with pytest.raises(ValueError, match="flow-matching model"):
        bdia.sample(mixture, z, sigmas, solver="ddim")
    with pytest.raises(ValueError, match="space='x'"):
        bdia.sample(flow, z, sigmas, solver="bdia_edm", gamma=0.5, space="x")
    finite = flow_sigmas(sigmas=np.linspace(0.9, 0.05, 6))
    pair = bdia.sample(flow, z, finite, solver="bdia_edm", gamma=0.5, space="x", return_pair=True)
    back = bdia.invert(flow, pair, finite, solver="bdia_edm", gamma=0.5, space="x")
    assert (back.x_end - z).abs().max() < 1e-12
    with pytest.raises(ValueError, match="churn"):
        bdia.sample(flow, z, sigmas, solver="edm", s_churn=1.0)
    with pytest.raises(ValueError, match="NaN"):
        bdia.sample(flow, z, torch.tensor([1.0, math.inf, 0.0], dtype=F64), solver="ddim")


def test_other_solvers_refuse_flow_models_and_reversible_gradients_take_them():
    flow, _, z = flow_problem()
    sigmas = flow_sigmas(8, shift=3.0)
    for solver in (s for s in bdia.SOLVERS if s not in ("ddim", "bdia_ddim", "edm", "bdia_edm")):
        with pytest.raises(ValueError, match="flow-matching"):
            bdia.sample(flow, z, sigmas, solver=solver)
    # reversible backprop steps the same maps with the flow's factors: its output is bdia.sample's
    noise = z.clone().requires_grad_(True)
    out = bdia.sample_with_grad(flow, noise, sigmas, solver="bdia_ddim", gamma=0.9, backprop="reversible")
    assert (out.detach() - bdia.sample(flow, z, sigmas, solver="bdia_ddim", gamma=0.9)).abs().max() < 1e-13
    out.square().sum().backward()
    reference = z.clone().requires_grad_(True)
    bdia.sample_with_grad(flow, reference, sigmas, solver="bdia_ddim", gamma=0.9, backprop="autograd").square().sum().backward()
    assert (noise.grad - reference.grad).abs().max() / reference.grad.abs().max() < 1e-10
