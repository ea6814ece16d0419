"""BDIA over flow Euler as drop-in diffusers schedulers, for Stable Diffusion 3 and FLUX pipelines.

    from diffusers import FluxPipeline
    from bdia.flow_schedulers import BDIAFlowMatchEulerScheduler

    pipe = FluxPipeline.from_pretrained(...)
    pipe.scheduler = BDIAFlowMatchEulerScheduler.from_config(pipe.scheduler.config, gamma=0.5)
    image = pipe("a photo of a cat", num_inference_steps=20).images[0]

**Drop-in.** :class:`BDIAFlowMatchEulerScheduler` *is* a ``FlowMatchEulerDiscreteScheduler`` (a subclass): every
config key, attribute and method (``set_timesteps(num_inference_steps, sigmas=, mu=, timesteps=)``, ``scale_noise``,
``set_begin_index``, ``shift`` ...) is diffusers' own, so its grid is diffusers' grid for every key combination,
plus one key, ``gamma``. **The default ``gamma = 0`` is flow Euler bit for bit**: ``step`` then is
``FlowMatchEulerDiscreteScheduler.step``. ``stochastic_sampling=True`` is refused: BDIA integrates the ODE.

**The update** is BDIA over flow Euler in the latents the pipeline carries (``x_t``, flow time ``t`` =
``scheduler.sigmas``):

    x_{k+1} = E(x_k; t_k -> t_{k+1}) + gamma * (x_{k-1} - E(x_k; t_k -> t_{k-1})),   E(x; t -> t') = x + (t' - t) v,

one network call per step, the first step plain flow Euler. The first term is diffusers' own output. In float64
(``sample.dtype``) with ``gamma > 0`` both Euler steps are taken in float64; diffusers rounds the sample to float32
before its step (``FlowMatchEulerDiscreteScheduler.step`` upcasts to float32, which for a float64 pipeline is a
downcast), which is kept at ``gamma = 0`` for bit-identity and dropped for BDIA, whose round trips should be exact
to float64 round-off. Otherwise the BDIA term is added in float32 at least and the sum cast back as diffusers casts.

**State.** ``step(model_output, timestep, sample)`` sees only the current latent, so the scheduler remembers the
previous step's input and index (:attr:`state`), a small explicit value; ``set_timesteps`` clears it, and a step
that does not continue the remembered one starts a new trajectory.

**Exact inversion.** :class:`BDIAFlowMatchInverseScheduler` runs the same maps backwards. Its ``timesteps`` are
``[t_{N-1}, t_{N-1}, t_{N-2}, ..., t_1]`` (the sampling grid ``t_0 = 1 > t_1 > ... > t_N = 0``): the first step takes
the clean latent (``t = 0``) to ``t_{N-1}`` with one ordinary flow-Euler inversion step (approximate, with the
velocity at the clean latent labelled ``t_{N-1}``), each later step at ``t_k`` is exact:

    x_{k-1} = (x_{k+1} - E(x_k; t_k -> t_{k+1})) / gamma + E(x_k; t_k -> t_{k-1}).

The result is the pair ``(x_0, x_1)`` (:attr:`BDIAFlowMatchInverseScheduler.inverted_pair`, a
:class:`bdia.schedulers.BDIAInvertedPair`); a pipeline carries only ``x_0``, so hand the pair to the sampling
scheduler with :meth:`BDIAFlowMatchEulerScheduler.regenerate_from`: its step from ``x_0`` then returns ``x_1`` (that
one network call is spent for nothing) and the rest regenerates the latent up to round-off, amplified about
``1 / gamma`` per step. :func:`bdia.pipelines.invert_with_pipeline` does all of it with a loaded pipeline.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import NamedTuple

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from .schedulers import BDIAInvertedPair

__all__ = ["BDIAFlowMatchEulerScheduler", "BDIAFlowMatchInverseScheduler", "BDIAFlowState"]


class BDIAFlowState(NamedTuple):
    """What a BDIA step needs from the previous one: the latent that step started from and its grid index."""

    sample: torch.Tensor
    step_index: int


def _flow_keys() -> dict:
    signature = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__)
    return {k: p.default for k, p in signature.parameters.items() if k != "self"}


def _euler(sample, model_output, sigma_from, sigma_to, exact: bool):
    """``E(x; t -> t') = x + (t' - t) v``. ``exact=False``: FlowMatchEulerDiscreteScheduler.step's operations (the
    sample in float32, the float32 step ``t' - t``, the result in the model output's dtype); ``exact=True``
    (float64 samples): all in float64, the step the exact difference of the two float32 levels."""
    if exact:
        return sample.to(torch.float64) + (sigma_to.to(torch.float64) - sigma_from.to(torch.float64)) * \
            model_output.to(torch.float64)
    return (sample.to(torch.float32) + (sigma_to - sigma_from) * model_output).to(model_output.dtype)


class _BDIAFlowMixin:
    """Config checks shared by the sampling and the inverse scheduler."""

    @staticmethod
    def _check_config(gamma, stochastic_sampling, low: float):
        if stochastic_sampling:
            raise ValueError("stochastic_sampling=True draws fresh noise every step; BDIA integrates the deterministic "
                             "flow ODE (use FlowMatchEulerDiscreteScheduler for stochastic sampling)")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or \
                not (low < gamma <= 1 if low == 0 else 0 <= gamma <= 1):
            interval = "(0, 1] (the inverse divides by gamma)" if low == 0 else "[0, 1] (0 = flow Euler)"
            raise ValueError(f"gamma must lie in {interval}, got {gamma!r}")

    def _sigma(self, index: int) -> torch.Tensor:
        return self.sigmas[index]

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``; a ``FlowMatchEulerDiscreteScheduler`` key this class does not take (one a newer
        diffusers may add) is warned about instead of silently dropped."""
        given = dict(getattr(config, "config", config) or {})
        ours = set(inspect.signature(cls.__init__).parameters)
        missing = sorted(k for k in set(_flow_keys()) - ours if k in given or k in kwargs)
        if missing:
            warnings.warn(f"{cls.__name__} does not implement the FlowMatchEulerDiscreteScheduler config key(s) "
                          f"{missing}; they are ignored, so the result may differ from it", UserWarning, stacklevel=2)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)


class BDIAFlowMatchEulerScheduler(_BDIAFlowMixin, FlowMatchEulerDiscreteScheduler):
    """BDIA over flow Euler as a drop-in ``FlowMatchEulerDiscreteScheduler`` (see the module notes): every config
    key of diffusers' scheduler plus ``gamma`` in [0, 1], **default 0 = flow Euler bit for bit**.

    ``step`` takes diffusers' arguments; ``s_churn`` & co. are ignored as diffusers ignores them, ``generator`` is
    unused, ``per_token_timesteps`` works at ``gamma = 0`` only. State: :attr:`state`, cleared by ``set_timesteps``
    and :meth:`reset`; :meth:`regenerate_from` registers an inverted pair.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: float | None = 0.5, max_shift: float | None = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, invert_sigmas: bool = False, shift_terminal: float = None,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False, gamma: float = 0.0):
        self._check_config(gamma, stochastic_sampling, low=-1.0)
        super().__init__(num_train_timesteps=num_train_timesteps, shift=shift, use_dynamic_shifting=use_dynamic_shifting,
                         base_shift=base_shift, max_shift=max_shift, base_image_seq_len=base_image_seq_len,
                         max_image_seq_len=max_image_seq_len, invert_sigmas=invert_sigmas,
                         shift_terminal=shift_terminal, use_karras_sigmas=use_karras_sigmas,
                         use_exponential_sigmas=use_exponential_sigmas, use_beta_sigmas=use_beta_sigmas,
                         time_shift_type=time_shift_type, stochastic_sampling=stochastic_sampling)
        self.state: BDIAFlowState | None = None
        self.start_pair: BDIAInvertedPair | None = None

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None,
                      timesteps=None):
        """``FlowMatchEulerDiscreteScheduler.set_timesteps`` (same arguments, same grid); clears the BDIA state."""
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        self.state = None

    def reset(self) -> None:
        """Forget the remembered latent: the next ``step`` starts a new trajectory."""
        self.state = None

    def regenerate_from(self, pair: BDIAInvertedPair | None) -> None:
        """Make the next trajectories that start from ``pair.upper`` at the grid's first level continue exactly with
        ``pair.lower`` (the pair :class:`BDIAFlowMatchInverseScheduler` produced) instead of an Euler step; kept across
        ``set_timesteps`` until ``regenerate_from(None)``."""
        if pair is not None:
            pair.check_regenerates_with(self.config.gamma)
        self.start_pair = pair

    def _starts_the_pair(self, index: int, timestep, sample) -> bool:
        pair = self.start_pair
        if pair is None or pair.upper.shape != sample.shape or index != 0:
            return False
        if not torch.equal(pair.upper.to(device=sample.device, dtype=sample.dtype), sample):
            return False
        if float(timestep) != float(pair.timestep):
            warnings.warn(f"the sample equals the registered pair's upper latent but the first step is at timestep "
                          f"{float(timestep)}, not {float(pair.timestep)}: another grid; stepping without the pair (not "
                          "an exact regeneration)", UserWarning, stacklevel=3)
            return False
        return True

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, per_token_timesteps=None,
             return_dict: bool = True):
        """One BDIA step (module notes) from ``sample`` at ``timestep`` given the velocity ``model_output``; at
        ``gamma = 0`` (and on a trajectory's first step) diffusers' flow Euler step itself."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            return super().step(model_output, timestep, sample)  # diffusers' own error for integer indices
        if self.step_index is None:
            self._init_step_index(timestep)
        index = self.step_index
        gamma = float(self.config.gamma)
        state = self.state if self.state is not None and self.state.step_index == index - 1 else None
        if self._starts_the_pair(index, timestep, sample):
            prev_sample = self.start_pair.lower.to(device=sample.device, dtype=model_output.dtype).clone()
            self._step_index += 1
        elif gamma == 0.0:
            prev_sample = super().step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                                       per_token_timesteps, return_dict=False)[0]
        else:
            if per_token_timesteps is not None:
                raise ValueError("per_token_timesteps are not supported by BDIA (gamma > 0)")
            exact = sample.dtype == torch.float64
            sigma = self._sigma(index)
            prev_sample = _euler(sample, model_output, sigma, self._sigma(index + 1), exact)
            if state is not None:  # else the first step of a trajectory: plain flow Euler
                backward = _euler(sample, model_output, sigma, self._sigma(index - 1), exact)
                work = torch.promote_types(prev_sample.dtype, torch.float32)
                prev_sample = (prev_sample.to(work) + gamma * (state.sample.to(work) - backward.to(work))).to(
                    model_output.dtype)
            self._step_index += 1
        self.state = BDIAFlowState(sample.detach().clone(), index)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)


class BDIAFlowMatchInverseScheduler(_BDIAFlowMixin, FlowMatchEulerDiscreteScheduler):
    """The exact inverse of :class:`BDIAFlowMatchEulerScheduler` (module notes).

    Config: the same keys (build both from one config, with the same ``gamma``); ``gamma`` in (0, 1], **default 1**
    (no round-off amplification; about ``gamma^-N`` otherwise). ``set_timesteps`` takes diffusers' arguments and
    builds the sampling grid as the sampling scheduler does (:attr:`grid`, the flow times with the terminal 0), then
    the inverse's ``timesteps``. Call ``step`` once per entry of ``timesteps``, in order, with the velocity at the
    current latent and that entry's label; :attr:`inverted_pair` holds ``(output, input)`` after each step."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: float | None = 0.5, max_shift: float | None = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, invert_sigmas: bool = False, shift_terminal: float = None,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False, gamma: float = 1.0):
        self._check_config(gamma, stochastic_sampling, low=0.0)
        super().__init__(num_train_timesteps=num_train_timesteps, shift=shift, use_dynamic_shifting=use_dynamic_shifting,
                         base_shift=base_shift, max_shift=max_shift, base_image_seq_len=base_image_seq_len,
                         max_image_seq_len=max_image_seq_len, invert_sigmas=invert_sigmas,
                         shift_terminal=shift_terminal, use_karras_sigmas=use_karras_sigmas,
                         use_exponential_sigmas=use_exponential_sigmas, use_beta_sigmas=use_beta_sigmas,
                         time_shift_type=time_shift_type, stochastic_sampling=stochastic_sampling)
        self.grid: torch.Tensor | None = None
        self.grid_timesteps: torch.Tensor | None = None
        self.state: torch.Tensor | None = None
        self.inverted_pair: BDIAInvertedPair | None = None

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None,
                      timesteps=None):
        """The sampling grid for diffusers' ``set_timesteps`` arguments (kept as :attr:`grid` / :attr:`grid_timesteps`),
        then the inverse's ``timesteps`` ``[t_{N-1}, t_{N-1}, ..., t_1]`` (as labels); clears the state."""
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        self.grid, self.grid_timesteps = self.sigmas, self.timesteps
        if len(self.grid_timesteps) < 2:
            raise ValueError("BDIA inversion needs at least 2 steps")
        ascending = self.grid_timesteps.flip(0)  # t_{N-1}, ..., t_0
        self.timesteps = torch.cat([ascending[:1], ascending[:-1]])
        self.state = None
        self.inverted_pair = None
        self._step_index = 0

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        """One inversion step (module notes): the first from the clean latent, the others exact."""
        if self.grid is None:
            raise ValueError("call set_timesteps(...) before step()")
        i = self._step_index
        N = len(self.grid_timesteps)
        if i >= N:
            raise ValueError(f"all {N} inversion steps are done; call set_timesteps to start again")
        exact = sample.dtype == torch.float64
        if i == 0:  # flow Euler inversion from the clean latent (t_N = 0) up to t_{N-1}
            prev_sample = _euler(sample, model_output, self.grid[N], self.grid[N - 1], exact)
        else:
            k = N - i  # the latent is at t_k
            forward = _euler(sample, model_output, self.grid[k], self.grid[k + 1], exact)
            backward = _euler(sample, model_output, self.grid[k], self.grid[k - 1], exact)
            work = torch.promote_types(forward.dtype, torch.float32)
            gamma = float(self.config.gamma)
            prev_sample = ((self.state.to(work) - forward.to(work)) / gamma + backward.to(work)).to(model_output.dtype)
        self.state = sample.detach().clone()
        self._step_index = i + 1
        label = self.grid_timesteps[N - i - 1]
        self.inverted_pair = BDIAInvertedPair(prev_sample.detach().clone(), sample.detach().clone(), float(label),
                                              float(self.config.gamma))
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)
