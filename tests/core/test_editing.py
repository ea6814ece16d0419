"""Inversion and editing (bdia.apps.edit) on tiny Stable Diffusion components through the full CFG path.

Correctness comes from closed forms and independent transcriptions: EDICT's and DDIM inversion's loops are
re-written here the way their papers' code writes them (diffusers-style ``alphas_cumprod[t]`` coefficients, the
UNet called directly with integer timesteps and guidance on eps), never golden numbers.

Latents are unit normals (the scale of SD's scaled VAE latents); the tiny random VAE's own latents are ~0.04.
"""

from __future__ import annotations

import math

import pytest
import torch

import bdia
from bdia.inversion import METHODS, edict_invert, edict_sample, latent_to_state, null_text_invert, state_to_latent, tail_sigmas, vp_eps
from bdia.apps.edit import invert_and_edit

N = 10
W = 3.0  # guidance scale


@pytest.fixture(scope="module")
def sd64(tiny_sd_dir):  # noqa: F811
    from bdia.networks.sd import load_sd

    return load_sd(path=tiny_sd_dir, dtype=torch.float64)


def _prompts(sd):
    return (sd.encode_prompts(["a photo of the cat"]), sd.encode_prompts([""]),
            sd.encode_prompts(["an oil painting of a mountain lake"]))


@pytest.fixture(scope="module")
def setup64(sd64):
    source, uncond, edit = _prompts(sd64)
    z0 = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigmas = sd64.sigmas(N)
    return dict(base=sd64.eps_denoiser(), x=latent_to_state(z0, sigmas), z0=z0, sigmas=sigmas,
                source=source, uncond=uncond, edit=edit)


def rel(a, b) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).norm() / b.norm())


def run(method, s, **kwargs):
    return invert_and_edit(method, s["base"], s["x"], s["sigmas"], s["source"], s["uncond"], s.get("edit"),
                           guidance_scale=kwargs.pop("guidance_scale", W), **kwargs)


# --------------------------------------------------------------------------------------------------
# Coordinates.


def test_latent_is_z_at_the_last_level(setup64):
    sigmas = setup64["sigmas"]
    alpha_N = 1 / math.sqrt(1 + float(sigmas[-1]) ** 2)
    assert 0.9995 < alpha_N < 1  # SD's final level sigma ~0.0292: alpha ~0.99957, not 1
    torch.testing.assert_close(setup64["x"], setup64["z0"] / alpha_N, rtol=1e-15, atol=0)
    torch.testing.assert_close(state_to_latent(setup64["x"], sigmas), setup64["z0"], rtol=1e-15, atol=1e-15)


def test_tail_sigmas_takes_the_clean_end():
    sigmas = torch.linspace(10, 1, 11, dtype=torch.float64)
    assert torch.equal(tail_sigmas(sigmas, 1.0), sigmas)
    assert torch.equal(tail_sigmas(sigmas, 0.45), sigmas[-6:])  # ceil(4.5) = 5 steps, 6 levels
    assert len(tail_sigmas(sigmas, 0.01)) == 3  # at least 2 steps (a BDIA pair)
    with pytest.raises(ValueError, match="strength"):
        tail_sigmas(sigmas, 0.0)


# --------------------------------------------------------------------------------------------------
# BDIA-DDIM: exact round trip through the CFG path; cost equal to DDIM's.


@pytest.mark.parametrize("gamma", [0.92, 0.96, 1.0])
def test_bdia_round_trip_is_exact_in_float64(setup64, gamma):
    result = run("bdia", setup64, gamma=gamma)
    assert rel(result.reconstruction, setup64["x"]) <= 1e-10  # measured ~1e-14
    assert rel(result.edit, setup64["x"]) > 1e-2  # the edit prompt changes the image (so it is not trivial)
    # NFE measured: inversion N (one approximate DDIM step, then N - 1 exact ones), regeneration from the pair N - 1;
    # every call is one batched CFG call on 2 rows per image.
    assert result.cost["inversion"]["nfe"] == N and result.cost["inversion"]["network_rows"] == 2 * N
    assert result.cost["reconstruction"]["nfe"] == N - 1 and result.cost["edit"]["nfe"] == N - 1
    assert result.cost["reconstruction"]["network_rows"] == 2 * (N - 1)
    pair = result.representation
    assert pair["x_end"].shape == setup64["x"].shape and not torch.equal(pair["x_end"], pair["x_inner"])


def test_bdia_pair_is_what_bdia_invert_returns_with_the_sd_denoiser(sd64, setup64):
    """The editing path is bdia.invert / bdia.sample with part A's CFG denoiser (the same numbers)."""
    result = run("bdia", setup64, gamma=0.96)
    denoiser = sd64.denoiser(W, setup64["uncond"])
    cond = {"encoder_hidden_states": setup64["source"]}
    pair = bdia.invert(denoiser, setup64["x"], setup64["sigmas"], solver="bdia_ddim", gamma=0.96, cond=cond)
    assert rel(pair.x_end, result.representation["x_end"]) < 1e-14


def test_bdia_round_trip_float32(tiny_sd):  # noqa: F811
    """float32 network: with a float64 state the round trip stays at float64 round-off (the same states reach the
    network, so the same eps comes back); with a float32 state it is at float32 round-off. Measured (N = 10,
    guidance 3, tiny SD, unit-normal latents): float64 state ~1e-14, float32 state ~2e-6 relative."""
    source, uncond, edit = _prompts(tiny_sd)
    z0 = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigmas = tiny_sd.sigmas(N)
    for state_dtype, bound in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        x = latent_to_state(z0, sigmas).to(state_dtype)
        s = dict(base=tiny_sd.eps_denoiser(), x=x, sigmas=sigmas, source=source, uncond=uncond, edit=None)
        result = run("bdia", s, gamma=0.96)
        assert result.reconstruction.dtype == state_dtype
        assert rel(result.reconstruction, x) <= bound


def test_bdia_strength_inverts_the_tail_of_the_grid(setup64):
    result = run("bdia", setup64, gamma=0.96, strength=0.5)
    assert rel(result.reconstruction, setup64["x"]) <= 1e-10
    assert result.settings["num_steps"] == 5
    assert result.cost["inversion"]["nfe"] == 5 and result.cost["edit"]["nfe"] == 4


@pytest.mark.parametrize("method, calls_per_step", [("ddim", 1), ("edict", 2)])
def test_strength_applies_to_every_method(setup64, method, calls_per_step):
    result = run(method, setup64, strength=0.3)  # ceil(0.3 * 10) = 3 steps at the clean end
    assert result.settings["num_steps"] == 3
    assert result.cost["inversion"]["nfe"] == 3 * calls_per_step == result.cost["edit"]["nfe"]
    if method == "edict":
        assert rel(result.reconstruction, setup64["x"]) <= 1e-10


# --------------------------------------------------------------------------------------------------
# DDIM inversion: not exact; equal to the transcription of the standard loop.


def test_ddim_inversion_is_not_exact(setup64):
    result = run("ddim", setup64)
    assert rel(result.reconstruction, setup64["x"]) > 1e-3  # measured O(1) on the random tiny UNet
    assert result.cost["inversion"]["nfe"] == N and result.cost["reconstruction"]["nfe"] == N


def _diffusers_coefficients(sd, t, t_to):
    abar = sd.alphas_cumprod
    a_t = abar[t] if t >= 0 else abar[0]  # SD's final alpha-bar (set_alpha_to_one False) for t < 0
    a_to = abar[t_to] if t_to >= 0 else abar[0]
    return a_t, a_to


def _eps_cfg(sd, z, t, source, uncond, w):
    """Guidance on eps with the UNet called directly (diffusers pipelines' way)."""
    out = sd.unet(torch.cat([z, z]), torch.tensor([t, t]), encoder_hidden_states=torch.cat([uncond, source])).sample
    eps_u, eps_c = out.chunk(2)
    return eps_u + w * (eps_c - eps_u)


def test_ddim_invert_matches_the_null_text_ddim_loop(sd64, setup64):
    """Null-text's ``ddim_loop``/``next_step``: from timestep t - T/N to t with eps(z, t) of the current latent."""
    from bdia.inversion import ddim_invert

    s = setup64
    cfg = bdia.ClassifierFreeGuidance(s["base"], W, {"encoder_hidden_states": s["uncond"]})
    ours = ddim_invert(cfg, s["x"], s["sigmas"], {"encoder_hidden_states": s["source"]}) * bdia.vp_alpha(s["sigmas"][0])
    timesteps = bdia.vp_timesteps(N, 1000, "leading", 1)  # 901, 801, ..., 1
    z = s["z0"]
    with torch.no_grad():
        for t in timesteps[::-1]:
            t_from = int(t) - 1000 // N
            abar_from, abar_to = _diffusers_coefficients(sd64, t_from, int(t))
            eps = _eps_cfg(sd64, z, int(t), s["source"], s["uncond"], W)
            x0 = (z - (1 - abar_from).sqrt() * eps) / abar_from.sqrt()
            z = abar_to.sqrt() * x0 + (1 - abar_to).sqrt() * eps
    assert rel(ours, z) < 1e-12


# --------------------------------------------------------------------------------------------------
# EDICT: exact round trip, 2 calls per step, equal to a transcription of its coupled loop.


def test_edict_round_trip_is_exact_in_float64(setup64):
    result = run("edict", setup64)
    assert rel(result.reconstruction, setup64["x"]) <= 1e-10  # measured ~1e-14
    for phase in ("inversion", "reconstruction", "edit"):
        assert result.cost[phase]["nfe"] == 2 * N and result.cost[phase]["network_rows"] == 4 * N
    assert rel(result.edit, setup64["x"]) > 1e-2
    assert not torch.equal(result.representation["x"], result.representation["y"])


def test_edict_sample_matches_the_paper_loop(sd64, setup64):
    """EDICT's denoising loop as its code writes it: a_t = sqrt(abar_prev / abar_t),
    b_t = sqrt(1 - abar_prev) - a_t sqrt(1 - abar_t), model input the other chain (the intermediate one for the
    second update), leapfrog order swap on odd steps, then the two mixing lines."""
    s, p = setup64, 0.93
    noise = torch.randn(2, 1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sigmas = s["sigmas"]
    x0 = noise[0] / bdia.vp_alpha(sigmas[0])  # pair as EDM-convention states at sigmas[0]
    y0 = noise[1] / bdia.vp_alpha(sigmas[0])
    cfg = bdia.ClassifierFreeGuidance(s["base"], W, {"encoder_hidden_states": s["uncond"]})
    ours = edict_sample(cfg, (x0, y0), sigmas, {"encoder_hidden_states": s["source"]}, p=p, leapfrog=True)

    pair = [noise[0].clone(), noise[1].clone()]  # VP latents z
    with torch.no_grad():
        for i, t in enumerate(bdia.vp_timesteps(N, 1000, "leading", 1)):
            abar_t, abar_prev = _diffusers_coefficients(sd64, int(t), int(t) - 1000 // N)
            a_t = (abar_prev / abar_t).sqrt()
            b_t = (1 - abar_prev).sqrt() - a_t * (1 - abar_t).sqrt()
            for k in range(2):
                j = k ^ 1
                if i % 2 == 1:
                    k, j = j, k
                eps = _eps_cfg(sd64, pair[j], int(t), s["source"], s["uncond"], W)
                pair[k] = a_t * pair[k] + b_t * eps
            pair[0] = p * pair[0] + (1 - p) * pair[1]
            pair[1] = p * pair[1] + (1 - p) * pair[0]
    alpha_N = bdia.vp_alpha(sigmas[-1])
    assert rel(ours.x * alpha_N, pair[0]) < 1e-12 and rel(ours.y * alpha_N, pair[1]) < 1e-12


@pytest.mark.parametrize("leapfrog", [True, False])
def test_edict_invert_undoes_edict_sample_from_any_pair(setup64, leapfrog):
    s = setup64
    cfg = bdia.ClassifierFreeGuidance(s["base"], W, {"encoder_hidden_states": s["uncond"]})
    cond = {"encoder_hidden_states": s["source"]}
    noise = torch.randn(2, 1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 15
    end = edict_sample(cfg, (noise[0], noise[1]), s["sigmas"], cond, p=0.9, leapfrog=leapfrog)
    back = edict_invert(cfg, end, s["sigmas"], cond, p=0.9, leapfrog=leapfrog)
    assert rel(back.x, noise[0]) < 1e-10 and rel(back.y, noise[1]) < 1e-10


# --------------------------------------------------------------------------------------------------
# Null-text inversion.


def test_null_text_without_iterations_is_ddim_inversion_at_guidance_one(setup64):
    """With 0 Adam iterations the embeddings stay the empty prompt's: the reconstruction is exactly null-text's
    baseline, the guidance-1 DDIM inversion (the pivot) regenerated at guidance w."""
    plain = run("null_text", setup64, num_inner_steps=0)
    pivot = run("ddim", setup64, ddim_inversion_guidance=1.0)
    assert rel(plain.reconstruction, pivot.reconstruction) < 1e-12
    assert pivot.cost["inversion"]["network_rows"] == N  # guidance 1: one conditional half-size call per step


@pytest.fixture(scope="module")
def null_text_result(setup64):
    return run("null_text", setup64, num_inner_steps=10)


def test_null_text_reduces_ddim_inversion_error(setup64, null_text_result):
    s, null_text = setup64, null_text_result
    pivot = run("ddim", s, ddim_inversion_guidance=1.0)  # the DDIM inversion null-text starts from
    ddim_w = run("ddim", s)  # DDIM inversion at the reconstruction's guidance
    err_nt, err_pivot, err_w = (rel(r.reconstruction, s["x"]) for r in (null_text, pivot, ddim_w))
    # measured (N = 10, w = 3, K = 10): null-text 1.15, pivot 1.36, DDIM at w both ways 1.38 (random tiny UNet)
    assert err_nt < 0.9 * err_pivot and err_nt < err_w, (err_nt, err_pivot, err_w)
    # cost measured: pivot N unguided calls; per step 1 conditional + K_k unconditional (each with a backward
    # pass) + 1 guided call; reconstruction N guided calls.
    inner = null_text.settings["inner_steps"]
    assert len(inner) == N and all(0 < k <= 10 for k in inner)
    c = null_text.cost["inversion"]
    assert c["nfe"] == N + sum(2 + k for k in inner)
    assert c["network_rows"] == N + sum(1 + k + 2 for k in inner)
    assert c["backward_passes"] == sum(inner)
    assert null_text.cost["reconstruction"]["nfe"] == N and null_text.cost["reconstruction"]["backward_passes"] == 0
    assert null_text.representation["uncond_embeds"].shape == (N, *s["uncond"].shape)


def test_null_text_early_stop_and_loss_target(setup64, null_text_result):
    s = setup64
    cond = s["source"]
    stopped = null_text_invert(s["base"], s["x"], s["sigmas"], cond, s["uncond"], W, num_inner_steps=5, early_stop=1e9)
    assert stopped.inner_steps == [1] * N  # the first loss is already below the threshold
    # the optimised embedding makes the guided DDIM step land nearer the pivot than the empty prompt's
    from bdia.inversion import ddim_invert, ddim_z, guided

    levels = s["sigmas"].tolist()
    pivot = ddim_invert(s["base"], s["x"], levels, {"encoder_hidden_states": cond}, return_trajectory=True)
    z0, z1 = pivot[0] * bdia.vp_alpha(levels[0]), pivot[1] * bdia.vp_alpha(levels[1])
    tuned = null_text_result.representation["uncond_embeds"][0]
    with torch.no_grad():
        miss = [float((ddim_z(z0, vp_eps(guided(s["base"], W, e), z0, levels[0], {"encoder_hidden_states": cond}),
                              levels[0], levels[1]) - z1).pow(2).mean()) for e in (s["uncond"], tuned)]
    assert miss[1] < 0.9 * miss[0]


def test_unknown_method_is_a_value_error(setup64):
    with pytest.raises(ValueError, match="unknown editing method"):
        run("p2p", setup64)
    assert set(METHODS) == {"bdia", "ddim", "edict", "null_text"}


# --------------------------------------------------------------------------------------------------
# The registry.


def test_registry_options_are_one_dataclass_per_method_and_mistakes_are_refused(setup64):
    from bdia.inversion import METHOD_REGISTRY, METHODS, BDIAOptions, EDICTOptions, method_options

    assert METHODS == tuple(METHOD_REGISTRY) == ("bdia", "ddim", "edict", "null_text")
    settings = {"gamma": 0.93, "p": 0.9, "leapfrog": False, "num_inner_steps": 3}
    assert method_options("bdia", settings) == BDIAOptions(gamma=0.93)
    assert method_options("edict", settings) == EDICTOptions(p=0.9, leapfrog=False)
    with pytest.raises(ValueError, match="unknown editing method"):
        method_options("pix2pix")
    with pytest.raises(ValueError, match=r"unknown editing option\(s\) \['gama'\]"):
        run("bdia", setup64, gama=0.9)
    with pytest.raises(ValueError, match="bdia takes BDIAOptions, got EDICTOptions"):
        run("bdia", setup64, options=EDICTOptions())
    # The dataclass and the keywords are the same request.
    by_keywords = run("bdia", setup64, gamma=0.94)
    by_options = run("bdia", setup64, options=BDIAOptions(gamma=0.94))
    assert torch.equal(by_keywords.reconstruction, by_options.reconstruction)
    assert by_options.settings["gamma"] == 0.94


def test_null_text_learning_rate_stays_positive_on_long_grids(monkeypatch):
    """The authors' decay ``lr (1 - 0.01 k)`` would reach 0 at step 100 and go negative after it (Adam refuses a
    negative rate); the floor keeps every step's rate at least ``lr * lr_decay``."""
    rates = []
    adam = torch.optim.Adam

    def recording_adam(params, lr):
        rates.append(lr)
        return adam(params, lr=lr)

    monkeypatch.setattr(torch.optim, "Adam", recording_adam)

    def base(x, sigma, class_labels=None, encoder_hidden_states=None):  # a smooth toy denoiser of x and e
        return 0.5 * x + encoder_hidden_states.mean() * torch.ones_like(x)

    alphas_cumprod = bdia.make_alphas_cumprod("scaled_linear", beta_start=0.00085, beta_end=0.012)
    sigmas = bdia.vp_sigmas(alphas_cumprod, 120, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    embeds = torch.zeros(1, 3, 4, dtype=torch.float64)
    null_text_invert(base, x, sigmas, embeds + 1, embeds, guidance_scale=3.0, num_inner_steps=1)
    assert len(rates) == 120 and min(rates) == pytest.approx(1e-2 * 0.01) and rates[0] == pytest.approx(1e-2)
