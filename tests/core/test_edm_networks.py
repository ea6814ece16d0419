"""Our EDM architectures (bdia.networks.edm): sizes of the published configurations, the preconditioning
formulas against closed forms, EDM's parameter naming, tiny forward passes, and sampling with BDIA-EDM.

Bit-for-bit parity with NVIDIA's reference code (same initial weights for the same seed, identical forward
outputs, a snapshot written by EDM's own persistence loading through bdia's loader) was checked once
outside the repository, since EDM's code is CC BY-NC-SA and is not vendored; the tests below are
independent of it.
"""

import math

import pytest
import torch

import bdia
from bdia.networks import edm
from bdia.networks.edm import (
    EDM_CLASSES,
    AttentionOp,
    Conv2d,
    DhariwalUNet,
    EDMPrecond,
    PositionalEmbedding,
    SongUNet,
    UNetBlock,
    VEPrecond,
    VPPrecond,
    iDDPMPrecond,
)

# EDM's train.py: --arch=ddpmpp / --arch=ncsnpp (CIFAR-10 settings), --arch=adm.
DDPMPP = dict(
    model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
    channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
)
NCSNPP = dict(
    model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
    channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2],
)
ADM = dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4])

# Tiny versions for forward tests: 16x16, three levels, attention at 8x8.
TINY_SONG = dict(model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], dropout=0.1)
TINY_DDPMPP = dict(DDPMPP, **TINY_SONG)
TINY_NCSNPP = dict(NCSNPP, **TINY_SONG)
TINY_ADM = dict(model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.1)


def count(net):
    return sum(p.numel() for p in net.parameters())


# --------------------------------------------------------------------------------------------------
# 1. Sizes of the real configurations.


@pytest.mark.parametrize(
    "arch, label_dim, expected",
    [
        # EDM's published CIFAR-10 network sizes (32x32x3, augment_dim 9).
        (DDPMPP, 0, 55_733_891),
        (DDPMPP, 10, 55_735_299),
        (NCSNPP, 0, 56_397_827),
        (NCSNPP, 10, 56_400_643),
    ],
    ids=["ddpmpp-uncond", "ddpmpp-cond", "ncsnpp-uncond", "ncsnpp-cond"],
)
def test_cifar10_parameter_counts(arch, label_dim, expected):
    with torch.device("meta"):  # shapes only: same count as a real build, no 56M random draws
        net = EDMPrecond(img_resolution=32, img_channels=3, label_dim=label_dim, augment_dim=9, dropout=0.13, **arch)
    assert count(net) == expected


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        # Not published figures: measured with NVIDIA's reference code (NVlabs/edm training/networks.py)
        # in a one-off cross-check, where ours matched it parameter by parameter.
        ("imagenet-64-adm-cond", dict(img_resolution=64, label_dim=1000, **ADM), 295_899_267),
        ("ffhq-64-ddpmpp", dict(img_resolution=64, label_dim=0, augment_dim=9, **dict(DDPMPP, channel_mult=[1, 2, 2, 2])), 61_805_571),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_64px_parameter_counts(name, kwargs, expected):
    with torch.device("meta"):
        net = EDMPrecond(img_channels=3, **kwargs)
    assert count(net) == expected


# --------------------------------------------------------------------------------------------------
# 2. Preconditioning against closed forms, with a fake inner network that records what it is given.


class RecordingUNet(torch.nn.Module):
    """Stands in for the U-Net: records (input, noise labels, class labels, extra kwargs) and returns a fixed
    random output ``F`` (float64 copy kept for the closed-form check)."""

    def __init__(self, out_channels, shape=(3, 8, 8), seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.F = torch.randn(shape[0], out_channels, *shape[1:], generator=g, dtype=torch.float64)
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None, **kwargs):
        self.calls.append(dict(x=x, noise_labels=noise_labels, class_labels=class_labels, kwargs=kwargs))
        return self.F.to(x.dtype)


def tiny_precond(cls, label_dim=0, **kw):
    arch = TINY_ADM if cls is iDDPMPrecond else TINY_DDPMPP
    net = cls(img_resolution=16, img_channels=3, label_dim=label_dim, **dict(arch, **kw)).eval()
    net.model = RecordingUNet(out_channels=6 if cls is iDDPMPrecond else 3)
    return net


def vp_sigma_inv(sigma, beta_d=19.9, beta_min=0.1):
    return (math.sqrt(beta_min**2 + 2 * beta_d * math.log(1 + sigma**2)) - beta_min) / beta_d


def iddpm_u_table(M=1000, C_1=0.001, C_2=0.008):
    """u_M = 0, u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1) / abar(j), C_1) - 1), abar(j) = sin(pi/2 j / (M (1 + C_2)))^2."""
    abar = [math.sin(0.5 * math.pi * j / (M * (1 + C_2))) ** 2 for j in range(M + 1)]
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(abar[j - 1] / abar[j], C_1) - 1)
    return torch.tensor(u, dtype=torch.float64)


def closed_form(cls, sigma, sigma_data=0.5):
    """(c_skip, c_out, c_in, c_noise) in float64; for iDDPM c_noise needs the u table."""
    s = sigma
    if cls is EDMPrecond:
        sd = sigma_data
        return sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2), 1 / math.sqrt(s**2 + sd**2), math.log(s) / 4
    if cls is VPPrecond:
        return 1.0, -s, 1 / math.sqrt(s**2 + 1), 999 * vp_sigma_inv(s)
    if cls is VEPrecond:
        return 1.0, s, 1.0, math.log(0.5 * s)
    u = iddpm_u_table()
    j = int((u - s).abs().argmin())
    return 1.0, -s, 1 / math.sqrt(s**2 + 1), 999 - j


@pytest.mark.parametrize("cls", [EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond])
@pytest.mark.parametrize("label_dim", [0, 4])
def test_preconditioning_matches_closed_forms(cls, label_dim):
    net = tiny_precond(cls, label_dim=label_dim)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64) * 3
    labels = torch.eye(label_dim)[[0, 2, 3]] if label_dim else None
    sigmas = [0.03, 0.7, 2.0, 40.0]
    if cls is iDDPMPrecond:  # levels near (not at the midpoint between) two grid points
        u = iddpm_u_table()
        sigmas = [float(u[j]) * (1 + 1e-3) for j in (990, 700, 400, 30)]
    for sigma in sigmas:
        net.model.calls.clear()
        denoised = net(x, torch.tensor(sigma, dtype=torch.float64), labels, augment_labels=torch.zeros(3, 9))
        assert denoised.dtype == torch.float32 and denoised.shape == x.shape
        (call,) = net.model.calls
        c_skip, c_out, c_in, c_noise = closed_form(cls, sigma)
        assert call["x"].dtype == torch.float32
        torch.testing.assert_close(call["x"].double(), c_in * x, rtol=1e-5, atol=1e-6)
        assert call["noise_labels"].shape == (1,)
        # VP: EDM evaluates log(1 + sigma^2) in float32, which loses ~1e-4 relative at small sigma.
        rel = 2e-4 if cls is VPPrecond else 1e-5
        assert float(call["noise_labels"]) == pytest.approx(c_noise, rel=rel, abs=1e-5)
        assert "augment_labels" in call["kwargs"]  # extra model kwargs are passed through
        if label_dim:
            torch.testing.assert_close(call["class_labels"], labels.float())
        else:
            assert call["class_labels"] is None
        expected = c_skip * x + c_out * net.model.F[:, :3]
        torch.testing.assert_close(denoised.double(), expected, rtol=1e-5, atol=1e-4 * max(1.0, sigma))


def test_edm_precond_custom_sigma_data_and_per_row_sigma():
    net = tiny_precond(EDMPrecond, sigma_data=1.3)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.0, 60.0], dtype=torch.float64)
    denoised = net(x, sigma)
    (call,) = net.model.calls
    for row, s in enumerate(sigma.tolist()):
        c_skip, c_out, c_in, c_noise = closed_form(EDMPrecond, s, sigma_data=1.3)
        assert float(call["noise_labels"][row]) == pytest.approx(c_noise, rel=1e-6)
        torch.testing.assert_close(call["x"][row].double(), c_in * x[row], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(denoised[row].double(), c_skip * x[row] + c_out * net.model.F[row], rtol=1e-5, atol=1e-4)


def test_missing_class_labels_mean_zeros():
    net = tiny_precond(EDMPrecond, label_dim=5)
    net(torch.randn(3, 3, 8, 8), torch.tensor(1.0))
    torch.testing.assert_close(net.model.calls[0]["class_labels"], torch.zeros(1, 5))


def test_sigma_ranges_and_round_sigma():
    edm_net = tiny_precond(EDMPrecond)
    assert (edm_net.sigma_min, edm_net.sigma_max, edm_net.sigma_data) == (0, float("inf"), 0.5)
    ve = tiny_precond(VEPrecond)
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)

    vp = tiny_precond(VPPrecond)
    # sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) at t = epsilon_t and t = 1. EDM evaluates it in
    # float32, where exp(1e-6) - 1 rounds to 2^-20, so sigma_min is exactly 2^-10 (closed form 0.0010000).
    assert vp.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-6)
    assert vp.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5)), rel=0.03)
    assert vp.sigma_min == 2.0**-10

    s = torch.tensor([0.003, 0.5, 17.0], dtype=torch.float64)
    for net in (edm_net, ve, vp):  # identity
        out = net.round_sigma(s)
        assert out.dtype == s.dtype and torch.equal(out, s)

    iddpm = tiny_precond(iDDPMPrecond)
    u = iddpm_u_table()
    assert iddpm.u.shape == (1001,) and iddpm.u.dtype == torch.float32
    torch.testing.assert_close(iddpm.u.double(), u, rtol=2e-3, atol=0)  # float32 recursion drifts ~5e-4
    assert iddpm.sigma_min == float(iddpm.u[999]) and iddpm.sigma_max == float(iddpm.u[0])
    assert iddpm.sigma_min == pytest.approx(float(u[999]), rel=1e-3)
    idx = [999, 800, 500, 100, 3]
    query = iddpm.u[idx].double() * (1 + 1e-3)
    assert torch.equal(iddpm.round_sigma(query), iddpm.u[idx].double())
    assert iddpm.round_sigma(query).dtype == torch.float64
    assert iddpm.round_sigma(query, return_index=True).tolist() == idx
    assert iddpm.round_sigma(torch.tensor(1e-9)).item() == 0.0  # u_M = 0 is also on the grid
    assert iddpm.round_sigma(torch.tensor(2.5)).shape == ()


# --------------------------------------------------------------------------------------------------
# 3. Tiny real networks: shapes, determinism, fp16.


@pytest.mark.parametrize(
    "arch",
    [
        TINY_DDPMPP,
        TINY_NCSNPP,
        dict(TINY_NCSNPP, encoder_type="skip", decoder_type="skip"),
        TINY_ADM,
    ],
    ids=["ddpmpp", "ncsnpp", "ncsnpp-skip-skip", "adm"],
)
@pytest.mark.parametrize("label_dim", [0, 10])
def test_tiny_networks_forward(arch, label_dim):
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=16, img_channels=3, label_dim=label_dim, augment_dim=9, **arch).eval()
    with torch.no_grad():  # give the zero-initialised output layers weights, so outputs depend on everything
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    labels = torch.eye(10)[[3, 7]] if label_dim else None
    sigma = torch.tensor([0.5, 3.0], dtype=torch.float64)
    with torch.no_grad():
        a = net(x, sigma, labels)
        b = net(x, sigma, labels)
        c = net(x, sigma, labels, augment_labels=torch.randn(2, 9))
        d = net(x, torch.tensor(0.5), labels)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)  # deterministic in eval mode
    assert not torch.equal(a, c)  # augmentation labels reach the embedding
    torch.testing.assert_close(d[0], a[0])  # 0-dim sigma broadcasts over the batch
    if label_dim:
        other = net(x, sigma, torch.eye(10)[[4, 7]])
        assert not torch.equal(other[0], a[0])
        torch.testing.assert_close(other[1], a[1])


def test_iddpm_uses_noise_half_of_a_six_channel_network():
    net = iDDPMPrecond(img_resolution=16, img_channels=3, **TINY_ADM).eval()
    assert net.model.out_conv.out_channels == 6
    y = net(torch.randn(2, 3, 16, 16), torch.tensor(1.0))
    assert y.shape == (2, 3, 16, 16)


def test_use_fp16_is_inert_on_cpu_as_in_edm():
    """EDM runs the inner network in float16 only for CUDA tensors (and not with force_fp32)."""
    torch.manual_seed(0)
    kw = dict(img_resolution=16, img_channels=3, label_dim=10, **TINY_DDPMPP)
    net16 = EDMPrecond(use_fp16=True, **kw).eval()
    net32 = EDMPrecond(use_fp16=False, **kw).eval()
    net32.load_state_dict(net16.state_dict())
    seen = []
    net16.model.register_forward_hook(lambda m, args, kwargs_out: seen.append(args[0].dtype))
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor(2.0), torch.eye(10)[:2]
    assert torch.equal(net16(x, sigma, labels), net32(x, sigma, labels))
    assert seen == [torch.float32]
    assert net16.init_kwargs["use_fp16"] is True


@pytest.mark.parametrize("arch", [TINY_DDPMPP, TINY_ADM], ids=["ddpmpp", "adm"])
def test_inner_network_runs_in_half_precision(arch):
    """Each layer casts its weights to its input's dtype; attention logits/softmax are float32 inside."""
    arch = dict(arch)
    cls = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}[arch.pop("model_type")]
    torch.manual_seed(0)
    net = cls(img_resolution=16, in_channels=3, out_channels=3, label_dim=4, **arch).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x, noise, labels = torch.randn(2, 3, 16, 16), torch.randn(2), torch.eye(4)[:2]
    try:
        y16 = net(x.half(), noise, labels)
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"float16 not supported on this CPU build: {e}")
    y32 = net(x, noise, labels)
    assert y16.dtype == torch.float16 and net.map_layer0.weight.dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05 * y32.abs().max().item())


@pytest.mark.gpu
def test_use_fp16_on_cuda():
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, use_fp16=True, **TINY_DDPMPP).eval().cuda()
    seen = []
    net.model.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    x, sigma, labels = torch.randn(2, 3, 16, 16, device="cuda"), torch.tensor(2.0, device="cuda"), torch.eye(10, device="cuda")[:2]
    y = net(x, sigma, labels)
    y32 = net(x, sigma, labels, force_fp32=True)
    assert y.dtype == y32.dtype == torch.float32
    assert seen == [(torch.float16, torch.float16), (torch.float32, torch.float32)]
    torch.testing.assert_close(y, y32, rtol=0.05, atol=0.05)


def test_attention_block_matches_standard_multihead_attention():
    """qkv channels are laid out (head, channel, q/k/v); heads attend over pixels with 1/sqrt(d) scaling."""
    torch.manual_seed(0)
    block = UNetBlock(in_channels=16, out_channels=32, emb_channels=8, attention=True, num_heads=2, skip_scale=0.7, adaptive_scale=False).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    y = block(x, emb)
    block.num_heads = 0
    h = block(x, emb)  # the residual part alone
    block.num_heads = 2
    B, C, H, W = h.shape
    qkv = block.qkv(block.norm2(h)).reshape(B, 2, C // 2, 3, H * W)
    q, k, v = (qkv[:, :, :, i].transpose(-1, -2) for i in range(3))  # [B, heads, L, d]
    attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    attended = attended.transpose(-1, -2).reshape(B, C, H, W)
    torch.testing.assert_close(y, (block.proj(attended) + h) * 0.7, rtol=1e-5, atol=1e-5)


def test_attention_op_gradient():
    q = torch.randn(3, 8, 5, requires_grad=True)
    k = torch.randn(3, 8, 6, requires_grad=True)
    grad = torch.randn(3, 5, 6)
    w = AttentionOp.apply(q, k)
    dq, dk = torch.autograd.grad(w, (q, k), grad)
    q2, k2 = q.detach().requires_grad_(), k.detach().requires_grad_()
    w2 = (torch.einsum("ncq,nck->nqk", q2, k2) / math.sqrt(8)).softmax(dim=2)
    dq2, dk2 = torch.autograd.grad(w2, (q2, k2), grad)
    torch.testing.assert_close(w, w2)
    torch.testing.assert_close(dq, dq2)
    torch.testing.assert_close(dk, dk2)


def test_layers_closed_forms():
    emb = PositionalEmbedding(num_channels=8, endpoint=True)(torch.tensor([2.0]))
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4])
    torch.testing.assert_close(emb[0], torch.cat([(2 * freqs).cos(), (2 * freqs).sin()]))
    conv = Conv2d(4, 4, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    torch.testing.assert_close(conv.resample_filter, (torch.outer(taps, taps) / 64)[None, None])
    x = torch.randn(1, 4, 8, 8)
    assert conv(x).shape == (1, 4, 4, 4)
    torch.testing.assert_close(Conv2d(4, 4, kernel=0, down=True)(x), torch.nn.functional.avg_pool2d(x, 2))
    up = Conv2d(4, 4, kernel=0, up=True)  # [1, 1] filter: nearest-neighbour upsampling
    torch.testing.assert_close(up(x), x.repeat_interleave(2, -1).repeat_interleave(2, -2))
    assert Conv2d(4, 4, kernel=3).resample_filter is None


# --------------------------------------------------------------------------------------------------
# 4. EDM's parameter and module names.


def test_songunet_names_follow_edm():
    torch.manual_seed(0)
    kw = dict(img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, model_channels=16, channel_mult=[1, 2],
              num_blocks=2, attn_resolutions=[16], model_type="SongUNet")
    ncsn = EDMPrecond(embedding_type="fourier", encoder_type="residual", decoder_type="standard", channel_mult_noise=2,
                      resample_filter=[1, 3, 3, 1], **kw)
    sd = ncsn.state_dict()
    modules = dict(ncsn.named_modules())
    for name in [
        "model.map_noise.freqs",
        "model.map_label.weight", "model.map_label.bias", "model.map_augment.weight",
        "model.map_layer0.weight", "model.map_layer1.bias",
        "model.enc.32x32_conv.weight", "model.enc.32x32_conv.bias",
        "model.enc.32x32_block0.norm0.weight", "model.enc.32x32_block0.conv0.weight", "model.enc.32x32_block0.affine.weight",
        "model.enc.32x32_block1.conv1.bias",
        "model.enc.16x16_down.conv0.resample_filter", "model.enc.16x16_down.skip.weight",
        "model.enc.16x16_down.skip.resample_filter",
        "model.enc.16x16_aux_residual.weight", "model.enc.16x16_aux_residual.resample_filter",
        "model.enc.16x16_block0.skip.weight",  # 16 -> 32 channels
        "model.enc.16x16_block0.norm2.weight", "model.enc.16x16_block0.qkv.weight", "model.enc.16x16_block0.proj.bias",
        "model.dec.16x16_in0.qkv.weight", "model.dec.16x16_in1.conv0.weight",
        "model.dec.16x16_block2.qkv.weight",  # the last decoder block of a level attends
        "model.dec.32x32_up.conv0.resample_filter", "model.dec.32x32_block0.skip.weight",
        "model.dec.32x32_aux_norm.weight", "model.dec.32x32_aux_conv.weight", "model.dec.32x32_aux_conv.bias",
    ]:
        assert name in sd, name
    absent = [
        "model.map_augment.bias", "model.dec.16x16_in1.qkv.weight", "model.dec.16x16_block0.qkv.weight",
        "model.dec.16x16_aux_conv.weight", "model.enc.32x32_block0.skip.weight", "model.enc.32x32_block0.conv0.resample_filter",
    ]
    for name in absent:
        assert name not in sd, name
    assert sd["model.enc.16x16_down.conv0.resample_filter"].shape == (1, 1, 4, 4)
    assert sd["model.enc.16x16_block0.qkv.weight"].shape == (96, 32, 1, 1)
    assert sd["model.map_noise.freqs"].shape == (16,)  # noise channels 2 * 16, half of them
    assert sd["model.map_label.weight"].shape == (32, 10)
    assert sd["model.map_layer0.weight"].shape == (64, 32)  # emb channels 4 * 16
    assert sd["model.dec.32x32_aux_conv.weight"].shape == (3, 16, 3, 3)
    assert isinstance(modules["model.enc"], torch.nn.ModuleDict)
    assert list(ncsn.model.enc) == [
        "32x32_conv", "32x32_block0", "32x32_block1", "16x16_down", "16x16_aux_residual", "16x16_block0", "16x16_block1",
    ]
    assert list(ncsn.model.dec) == [
        "16x16_in0", "16x16_in1", "16x16_block0", "16x16_block1", "16x16_block2",
        "32x32_up", "32x32_block0", "32x32_block1", "32x32_block2", "32x32_aux_norm", "32x32_aux_conv",
    ]

    ddpm = EDMPrecond(embedding_type="positional", encoder_type="skip", decoder_type="skip", **kw)
    assert isinstance(ddpm.model.map_noise, PositionalEmbedding)
    assert not any(k.startswith("model.map_noise") for k in ddpm.state_dict())  # no tensors
    assert list(ddpm.model.enc)[3:6] == ["16x16_down", "16x16_aux_down", "16x16_aux_skip"]
    assert list(ddpm.model.dec)[5:8] == ["16x16_aux_norm", "16x16_aux_conv", "32x32_up"]
    assert list(ddpm.model.dec)[-3:] == ["32x32_aux_up", "32x32_aux_norm", "32x32_aux_conv"]
    sd = ddpm.state_dict()
    assert "model.enc.16x16_aux_down.resample_filter" in sd and "model.enc.16x16_aux_down.weight" not in sd
    assert sd["model.enc.16x16_aux_skip.weight"].shape == (16, 3, 1, 1)
    assert "model.dec.32x32_aux_up.resample_filter" in sd


def test_dhariwal_names_follow_edm():
    net = iDDPMPrecond(img_resolution=16, img_channels=3, label_dim=7, augment_dim=2, **TINY_ADM)
    sd = net.state_dict()
    for name in [
        "u", "model.map_label.weight", "model.map_augment.weight", "model.map_layer0.bias",
        "model.enc.16x16_conv.weight", "model.enc.8x8_down.conv0.resample_filter", "model.enc.8x8_block0.skip.weight",
        "model.enc.8x8_block0.qkv.weight", "model.dec.8x8_in0.qkv.weight", "model.dec.8x8_block1.qkv.weight",
        "model.dec.16x16_up.conv0.weight", "model.out_norm.weight", "model.out_conv.weight",
    ]:
        assert name in sd, name
    assert "model.map_label.bias" not in sd and "model.enc.8x8_down.skip.weight" not in sd  # filter-only shortcut
    assert sd["model.enc.8x8_block0.affine.weight"].shape == (2 * 128, 256)  # adaptive scale: (scale, shift)
    assert net.model.enc["8x8_block0"].num_heads == 2  # 128 channels / 64 per head
    assert sd["model.out_conv.weight"].shape == (6, 64, 3, 3)


# --------------------------------------------------------------------------------------------------
# Loader support: class map and recorded constructor arguments.


def test_edm_classes_and_init_kwargs():
    assert set(EDM_CLASSES) == {
        "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding",
        "SongUNet", "DhariwalUNet", "VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond",
    }
    assert all(getattr(edm, name) is cls for name, cls in EDM_CLASSES.items())
    torch.manual_seed(0)
    net = VPPrecond(img_resolution=16, img_channels=3, label_dim=2, augment_dim=9, **TINY_NCSNPP)
    kw = net.init_kwargs
    assert kw["beta_d"] == 19.9 and kw["use_fp16"] is False and kw["model_type"] == "SongUNet"
    assert kw["embedding_type"] == "fourier" and kw["channel_mult"] == [1, 2, 2] and kw["augment_dim"] == 9
    assert net.model.init_kwargs["out_channels"] == 3 and net.model.init_kwargs["num_blocks"] == 1
    rebuilt = VPPrecond(**kw)
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    assert net.model.enc["16x16_conv"].init_kwargs == dict(
        in_channels=3, out_channels=16, kernel=3, bias=True, up=False, down=False, resample_filter=[1, 1],
        fused_resample=False, init_mode="xavier_uniform", init_weight=1, init_bias=0,
    )


# --------------------------------------------------------------------------------------------------
# 5. Sampling and exact inversion with BDIA-EDM on a tiny conditional network.


def test_bdia_edm_samples_and_inverts_tiny_conditional_network():
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, sigma_min=0.002, sigma_max=80, **TINY_DDPMPP).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sigmas = bdia.karras_sigmas(4, sigma_min=net.sigma_min, sigma_max=net.sigma_max, round_sigma=net.round_sigma)
    labels = torch.nn.functional.one_hot(torch.tensor([1, 8]), 10).float()
    latents = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    counting = bdia.CountingDenoiser(net)
    with torch.no_grad():
        pair = bdia.sample(counting, latents * sigmas[0], sigmas, solver="bdia_edm", gamma=0.5, class_labels=labels, return_pair=True)
        nfe = counting.nfe
        x0 = pair.x_end
        noise_pair = bdia.invert(net, pair, sigmas, solver="bdia_edm", gamma=0.5, class_labels=labels)
        again = bdia.sample(net, noise_pair, sigmas, solver="bdia_edm", gamma=0.5, class_labels=labels, return_pair=True)
    assert x0.shape == latents.shape and x0.dtype == torch.float64 and torch.isfinite(x0).all()
    assert nfe == 2 * 4 - 1  # same NFE as EDM's Heun sampler
    torch.testing.assert_close(noise_pair[0], latents * sigmas[0], rtol=0, atol=1e-6 * float(sigmas[0]))
    torch.testing.assert_close(again[0], pair[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(again[1], pair[1], rtol=0, atol=1e-6)
