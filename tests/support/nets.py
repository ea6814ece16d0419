"""Tiny networks for tests: real layers, random weights, EDM's preconditioning."""

import math

import torch
from torch import nn


class TinyPrecondNet(nn.Module):
    """A small conv net behind EDM's preconditioning (sigma_data = 0.5), run in float32 like EDM's networks
    (or float64, for tests that need the network to be a smooth function at round-off level).

    c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2), c_noise = ln(s) / 4.
    """

    def __init__(self, channels=2, hidden=16, label_dim=0, seed=0, dtype=torch.float32):
        super().__init__()
        self.dtype = dtype
        g = torch.Generator().manual_seed(seed)
        self.sigma_min, self.sigma_max, self.sigma_data = 0.002, 80.0, 0.5
        self.label_dim = label_dim
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.emb = nn.Linear(1 + label_dim, hidden)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(p[0].numel(), 1)))
        self.to(dtype)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, **cond):
        x32 = x.to(self.dtype)
        sigma = torch.as_tensor(sigma, device=x.device).to(self.dtype).reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = (sigma.log() / 4).reshape(-1, 1).expand(x.shape[0], 1)
        if self.label_dim:
            labels = torch.zeros(x.shape[0], self.label_dim, dtype=self.dtype) if class_labels is None else class_labels.to(self.dtype)
            c_noise = torch.cat([c_noise, labels.reshape(x.shape[0], -1)], dim=1)
        h = torch.nn.functional.silu(self.conv_in(c_in * x32) + self.emb(c_noise)[:, :, None, None])
        h = torch.nn.functional.silu(self.conv_mid(h))
        F_x = self.conv_out(h)
        return c_skip * x32 + c_out * F_x
