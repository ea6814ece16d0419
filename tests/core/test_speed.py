"""bdia.speed on the CPU: the network speed options (precision, channels_last, compile) around a tiny random EDM
network, the solver state they leave in float64, BDIA's exact inversion with a reduced-precision network, batch
invariance with FixedBatchDenoiser, option checks, and auto_batch_size.

Tolerances are derived from the formats' unit round-offs (stated at each bound), never from one machine's
kernels: the module runs again under ``ATEN_CPU_CAPABILITY=default`` and other thread counts (make test-numerics).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from nets import TinyPrecondNet  # tests/support

import bdia
import bdia.speed as speed
from bdia.denoisers import FixedBatchDenoiser
from bdia.networks.edm import Conv2d, EDMPrecond, Linear
from bdia.solvers import gamma_schedule, predicted_roundtrip_error
from bdia.speed import COMPILE_MODES, PRECISIONS, NetworkSpeed, SpeedOptions, auto_batch_size, with_speed

pytestmark = pytest.mark.numerics

SHAPE = (2, 8, 8)
SIGMA_DATA = 0.5
#: unit round-off u = eps / 2 of the autocast formats: bf16 keeps 8 significant bits, fp16 11.
UNIT_ROUNDOFF = {"bf16": torch.finfo(torch.bfloat16).eps / 2, "fp16": torch.finfo(torch.float16).eps / 2}
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
OPTIONS = [(p, cl) for p in PRECISIONS for cl in (False, True)]


def tiny_edm(seed: int = 0, label_dim: int = 0) -> EDMPrecond:
    """A 48k-parameter EDMPrecond + SongUNet (DDPM++ layout, 8x8x2, attention at 4x4). EDM initialises its output
    layers near zero, which would hide the U-Net behind c_skip * x; every weight gets a unit-gain random value."""
    torch.manual_seed(seed)
    net = EDMPrecond(img_resolution=8, img_channels=2, label_dim=label_dim, model_type="SongUNet", model_channels=8,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0, embedding_type="positional",
                     encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def net():
    return tiny_edm()


def lowered_layers(net) -> list:
    """The layers autocast runs in reduced precision: convolutions and linear maps with weights."""
    return [m for m in net.modules() if isinstance(m, (Conv2d, Linear)) and m.weight is not None]


def states(batch=4, sigma=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *SHAPE, generator=g, dtype=torch.float64) * math.sqrt(sigma**2 + SIGMA_DATA**2)


def c_out(sigma: float) -> float:
    return sigma * SIGMA_DATA / math.sqrt(sigma**2 + SIGMA_DATA**2)


def c_skip(sigma: float) -> float:
    return SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)


# --------------------------------------------------------------------------------------------------
# Options and construction.


def test_with_speed_returns_the_denoiser_itself_for_the_defaults(net):
    assert with_speed(net) is net
    assert with_speed(net, "float32", False, None) is net
    assert SpeedOptions().is_default and SpeedOptions().as_dict() == {"precision": "float32", "channels_last": False, "compile": None}
    wrapped = with_speed(net, "bf16")
    assert isinstance(wrapped, NetworkSpeed) and wrapped.denoiser is net and not wrapped.options.is_default
    assert wrapped.sigma_min == net.sigma_min and wrapped.sigma_max == net.sigma_max
    assert wrapped.round_sigma(0.5) == net.round_sigma(0.5)


@pytest.mark.parametrize("kwargs", [
    dict(precision="float16"), dict(precision="bfloat16"), dict(precision="BF16"), dict(precision="fp32"),
    dict(precision=""), dict(precision=None), dict(channels_last=1), dict(channels_last="true"),
    dict(channels_last=None), dict(compile="fast"), dict(compile=True), dict(compile=""), dict(compile=1),
])
def test_speed_options_refuse_bad_values(kwargs, net):
    with pytest.raises(ValueError):
        SpeedOptions(**kwargs)
    with pytest.raises(ValueError):
        with_speed(net, **kwargs)


@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_compiled_wrapper_shares_the_parameters_without_duplicate_keys(mode):
    net = tiny_edm()
    wrapped = with_speed(net, compile=mode)  # construction only: torch.compile compiles on the first call
    keys = list(wrapped.state_dict())
    assert len(keys) == len(set(keys))
    assert keys == [f"denoiser.{k}" for k in net.state_dict()]
    assert sum(1 for _ in wrapped.parameters()) == sum(1 for _ in net.parameters())
    assert all(a is b for a, b in zip(wrapped.parameters(), net.parameters()))


# --------------------------------------------------------------------------------------------------
# One network call.


@pytest.mark.parametrize("precision, channels_last", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_output_has_the_input_shape_and_dtype(net, precision, channels_last, dtype):
    wrapped = NetworkSpeed(copy.deepcopy(net), SpeedOptions(precision, channels_last))
    x = states().to(dtype)
    out = wrapped(x, torch.tensor(1.0, dtype=dtype))
    assert out.shape == x.shape and out.dtype == dtype
    assert out.is_contiguous() and torch.isfinite(out).all()


@pytest.mark.parametrize("precision, channels_last", [o for o in OPTIONS if o != ("float32", False)])
def test_any_denoiser_module_works_not_only_edm_networks(precision, channels_last):
    """A plain module with EDM's protocol (tests/nets.py: convolutions behind EDM's preconditioning, no hook
    installed): float64 in, float64 out, within bf16's round-off of its float32 output."""
    net = TinyPrecondNet(channels=2).requires_grad_(False)
    x, s = states(), torch.tensor(1.0, dtype=torch.float64)
    reference = net(x, s).to(torch.float64)
    out = with_speed(copy.deepcopy(net), precision, channels_last)(x, s)
    assert out.dtype == torch.float64 and out.shape == x.shape
    # 3 lowered layers, each rounding input and weights (<= 2u relative, first order); D = c_skip x + c_out F with
    # c_out <= 1 here, so relative to max|D| with a 10x margin for F's scale beside D's.
    assert float((out - reference).abs().max()) <= 10 * 3 * 2 * UNIT_ROUNDOFF["bf16"] * float(reference.abs().max())


@pytest.mark.parametrize("precision", ["float32", "tf32"])
def test_float32_and_cpu_tf32_are_bit_identical_to_the_unwrapped_network(net, precision):
    """The wrapper with float32 (and tf32, float32 on a CPU) changes nothing: same kernels, same bits."""
    wrapped = NetworkSpeed(net, SpeedOptions(precision))
    for sigma in (0.002, 0.7, 80.0):
        x = states(sigma=sigma)
        s = torch.tensor(sigma, dtype=torch.float64)
        assert torch.equal(wrapped(x, s), net(x, s).to(torch.float64))
    sigmas = bdia.karras_sigmas(4)
    x0 = states() * sigmas[0]
    assert torch.equal(bdia.sample(wrapped, x0, sigmas, solver="bdia_edm"), bdia.sample(net, x0, sigmas, solver="bdia_edm"))


@pytest.mark.parametrize("sigma", [0.002, 0.5, 80.0])
@pytest.mark.parametrize("precision, channels_last", [("bf16", False), ("fp16", False), ("bf16", True)])
def test_reduced_precision_differs_from_float32_within_its_round_off(net, sigma, precision, channels_last):
    """D = c_skip x + c_out F(c_in x): autocast rounds the inputs and weights of each of the L convolutions and
    linear maps of F to the format (relative error <= u each: u = 2^-8 for bf16, 2^-11 for fp16); to first order
    these add up along the network (GroupNorm renormalises, so they do not compound), giving
    |D - D32| <= 2 L u c_out max|F|. (Measured: about 3 u, far inside; the bound is what a format's epsilon
    guarantees, whatever the kernels.) The preconditioning (c_skip x) stays float32, so the error carries c_out."""
    x = states(sigma=sigma)
    s = torch.tensor(sigma, dtype=torch.float64)
    reference = net(x, s).to(torch.float64)
    F = (reference - c_skip(sigma) * x) / c_out(sigma)
    out = with_speed(copy.deepcopy(net), precision, channels_last)(x, s)
    error = float((out - reference).abs().max())
    u = UNIT_ROUNDOFF[precision]
    bound = 2 * len(lowered_layers(net)) * u * c_out(sigma) * float(F.abs().max())
    assert error <= bound, (error, bound)
    # ... and the network did run in the reduced format: where c_out F is not tiny beside c_skip x, far above
    # float32's own rounding of D.
    assert error > (100 * EPS32 * float(reference.abs().max()) if sigma >= 0.5 else 0), error


@pytest.mark.parametrize("sigma", [0.002, 0.5, 80.0])
def test_channels_last_float32_is_close_to_float32(net, sigma):
    """NHWC kernels sum each convolution's fan-in K in another order: per layer a relative change <= K eps32
    (the worst case of a reordered sum), over L layers <= L K eps32 on F, plus float32's rounding of D itself
    (c_skip x is rounded again: <= 2 eps32 max|D|). Not necessarily bit-identical."""
    x = states(sigma=sigma)
    s = torch.tensor(sigma, dtype=torch.float64)
    reference = net(x, s).to(torch.float64)
    F = (reference - c_skip(sigma) * x) / c_out(sigma)
    out = with_speed(copy.deepcopy(net), "float32", channels_last=True)(x, s)
    layers = lowered_layers(net)
    fan_in = max(m.weight[0].numel() for m in layers)
    bound = len(layers) * fan_in * EPS32 * c_out(sigma) * float(F.abs().max()) + 2 * EPS32 * float(reference.abs().max())
    assert float((out - reference).abs().max()) <= bound


def test_autocast_keeps_edm_preconditioning_in_float32_and_leaves_the_network_usable(net):
    """bdia.speed runs only EDM's inner U-Net in reduced precision (a forward hook hands its output back as float32,
    which the preconditioner checks for); outside autocast the hook changes nothing, and wrapping twice adds it once."""
    plain = copy.deepcopy(net)
    x, s = states(), torch.tensor(1.5, dtype=torch.float64)
    before = plain(x, s)
    with_speed(plain, "bf16")
    with_speed(plain, "fp16")
    assert len(plain.model._forward_hooks) == 1
    after = plain(x, s)
    assert after.dtype == torch.float32 and torch.equal(after, before)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the user's own autocast around the bare network works too
        assert plain(x, s).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Through the solvers.


class StateDtypes(torch.nn.Module):
    """Records the dtype of every state a solver hands to the denoiser and of what comes back."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.seen = set()

    def forward(self, x, sigma, class_labels=None, **cond):
        out = self.denoiser(x, sigma, class_labels, **cond)
        self.seen.add((x.dtype, torch.as_tensor(sigma).dtype, out.dtype))
        return out


@pytest.mark.parametrize("solver", bdia.SOLVERS)
@pytest.mark.parametrize("precision, channels_last", [o for o in OPTIONS if o != ("float32", False)])
def test_solver_state_stays_float64(net, solver, precision, channels_last):
    recorder = StateDtypes(with_speed(copy.deepcopy(net), precision, channels_last))
    sigmas = bdia.karras_sigmas(3)
    x0 = states(batch=2) * sigmas[0]
    if solver in bdia.INVERTIBLE_SOLVERS:
        pair = bdia.sample(recorder, x0, sigmas, solver=solver, return_pair=True)
        assert pair.x_end.dtype == pair.x_inner.dtype == torch.float64
        back = bdia.invert(recorder, pair, sigmas, solver=solver)
        assert back.x_end.dtype == back.x_inner.dtype == torch.float64
    else:
        assert bdia.sample(recorder, x0, sigmas, solver=solver).dtype == torch.float64
    assert recorder.seen == {(torch.float64, torch.float64, torch.float64)}


def _roundtrip_error(denoiser, solver, gamma, num_steps, batch=3):
    """Relative error max |recovered - original| / max |x_0| of the initial pair (x_0, x_1) after sample -> invert."""
    sigmas = bdia.karras_sigmas(num_steps)
    x0 = states(batch=batch, sigma=float(sigmas[0]), seed=5)
    # x_1: the first (plain) step, as the full run takes it; a 2-step run returns the pair (x_2, x_1).
    x1 = bdia.sample(denoiser, x0, sigmas[:3], solver=solver, gamma=gamma, return_pair=True).x_inner
    pair = bdia.sample(denoiser, x0, sigmas, solver=solver, gamma=gamma, return_pair=True)
    back = bdia.invert(denoiser, pair, sigmas, solver=solver, gamma=gamma)
    error = max(float((back.x_end - x0).abs().max()), float((back.x_inner - x1).abs().max()))
    return error / float(x0.abs().max()), sigmas


@pytest.mark.parametrize("precision, channels_last", [("bf16", False), ("fp16", False), ("bf16", True)])
def test_bdia_ddim_pair_is_recovered_exactly_with_a_reduced_precision_network(net, precision, channels_last):
    """gamma = 1: inversion does not amplify round-off (1/gamma = 1 per step). The reduced-precision network is just
    another deterministic function of the float64 state, evaluated at the same middle states both ways, so the
    initial pair comes back to float64 round-off: well under 1e-12 relative (a few eps64 per step for 10 steps)."""
    error, _ = _roundtrip_error(with_speed(copy.deepcopy(net), precision, channels_last), "bdia_ddim", 1.0, 10)
    assert error < 1e-12, error


@pytest.mark.parametrize("gamma", [None, 0.25])  # None: bdia_edm's default (0.5)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_bdia_edm_pair_is_recovered_to_amplified_round_off(net, precision, gamma):
    """gamma < 1: each backward step divides by gamma, so round-off grows like prod 1/gamma_k (the model of
    predicted_roundtrip_error: eps64 * prod 1/gamma_k; 2^9 eps64 = 1e-13 for gamma 0.5 over 10 steps, 4^7 eps64 = 4e-12
    for 0.25 over 8). The bound allows 10x that for the per-step constants (several roundings per step, the
    maps' Lipschitz factors)."""
    num_steps = 10 if gamma is None else 8
    g = bdia.solvers.DEFAULT_GAMMA["bdia_edm"] if gamma is None else gamma
    error, sigmas = _roundtrip_error(with_speed(copy.deepcopy(net), precision), "bdia_edm", g, num_steps)
    predicted = predicted_roundtrip_error(gamma_schedule(g, sigmas, "bdia_edm"), torch.float64)
    assert error < 10 * predicted, (error, predicted)


@pytest.mark.parametrize("precision, channels_last", [("bf16", False), ("bf16", True), ("fp16", False)])
def test_fixed_batch_reduced_precision_images_do_not_depend_on_the_batch(net, precision, channels_last):
    """FixedBatchDenoiser pads every network call to the same rows, so under autocast, as in float32, an image is
    bit-identical whether it is sampled alone or in a batch of 5."""
    fixed = FixedBatchDenoiser(with_speed(copy.deepcopy(net), precision, channels_last), 4)
    sigmas = bdia.karras_sigmas(4)
    x0 = states(batch=5, sigma=80.0, seed=3)
    whole = bdia.sample(fixed, x0, sigmas, solver="bdia_edm")
    alone = torch.cat([bdia.sample(fixed, x0[k : k + 1], sigmas, solver="bdia_edm") for k in range(5)])
    three_two = torch.cat([bdia.sample(fixed, x0[:3], sigmas, solver="bdia_edm"),
                           bdia.sample(fixed, x0[3:], sigmas, solver="bdia_edm")])
    assert torch.equal(whole, alone) and torch.equal(whole, three_two)


@pytest.mark.slow
def test_compiled_network_matches_eager(net):
    """torch.compile (mode default) on the CPU: generated kernels may fuse and reorder float32 sums, so close, not
    bit-identical (bound as for channels_last: reordered sums in each layer, plus D's own rounding)."""
    wrapped = with_speed(copy.deepcopy(net), compile="default")
    sigmas = bdia.karras_sigmas(3)
    x0 = states(batch=2) * sigmas[0]
    with torch.no_grad():
        for sigma in (0.002, 0.5, 80.0):
            x = states(batch=2, sigma=sigma)
            s = torch.tensor(sigma, dtype=torch.float64)
            reference = net(x, s).to(torch.float64)
            out = wrapped(x, s)
            assert out.dtype == torch.float64
            assert float((out - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
    compiled = bdia.sample(wrapped, x0, sigmas, solver="bdia_edm")
    eager = bdia.sample(net, x0, sigmas, solver="bdia_edm")
    assert compiled.dtype == torch.float64 and float((compiled - eager).abs().max()) < 1e-3


# --------------------------------------------------------------------------------------------------
# auto_batch_size.


def _per_row_bytes(net, probe_rows=2) -> float:
    """What auto_batch_size's CPU probe measures, counted here independently: the bytes of every module output
    of a ``probe_rows``-row call, per row."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    try:
        with torch.no_grad():
            net(torch.zeros(probe_rows, *SHAPE, dtype=torch.float64), torch.ones(probe_rows, dtype=torch.float64))
    finally:
        for h in handles:
            h.remove()
    return total / probe_rows


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@pytest.mark.parametrize("limit", [1, 7, 64, 100])
@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_auto_batch_size_is_a_power_of_two_within_the_limit(net, limit, precision):
    batch = auto_batch_size(with_speed(copy.deepcopy(net), precision), SHAPE, "cpu", limit=limit)
    assert isinstance(batch, int) and _is_power_of_two(batch) and 1 <= batch <= limit


def test_auto_batch_size_shrinks_with_free_memory(net, monkeypatch):
    per_row = _per_row_bytes(net)
    assert per_row > 0

    def pick(free_bytes, limit=1024):
        monkeypatch.setattr(speed, "_free_bytes", lambda device: int(free_bytes))
        return auto_batch_size(net, SHAPE, "cpu", limit=limit)

    assert pick(1e15) == 1024 and pick(1e15, limit=100) == 64  # plenty of memory: the limit decides
    assert pick(per_row * 5.5 / 0.8) == 4  # room for 5 rows in 80% of free memory: the power of two below
    assert pick(per_row * 40 / 0.8) == 32
    assert pick(per_row * 40 / 0.8, limit=16) == 16
    assert pick(0) == pick(per_row / 2) == 1  # not even one row fits: still 1
    picks = [pick(per_row * r / 0.8) for r in (1, 3, 9, 30, 200)]
    assert picks == sorted(picks) and all(_is_power_of_two(p) for p in picks)


@pytest.mark.parametrize("limit", [0, -4, 2.5, True, "8"])
def test_auto_batch_size_refuses_a_bad_limit(net, limit):
    with pytest.raises(ValueError, match="limit"):
        auto_batch_size(net, SHAPE, "cpu", limit=limit)
