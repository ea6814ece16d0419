"""The option checks every entry point shares (sample, text2image, edit, the Python API), so one setting is
judged the same way wherever it is given. Each raises ``ValueError`` with one line naming the setting."""

from __future__ import annotations

import inspect
import math

from . import multistep as _multistep
from . import rex as _rex
from . import solvers as _solvers

__all__ = ["MAX_NUM_STEPS", "is_number", "solver_options", "check_solver_options", "check_num_steps", "check_flags",
           "check_grid", "check_image_grid", "check_class_idx", "check_grid_size", "MAX_GRID_BYTES", "check_int",
           "check_number"]

#: Bound on a setting that sizes allocations (solver steps): far above any real run.
MAX_NUM_STEPS = 100_000

#: Arguments of the solver functions that the apps supply themselves (everything else is a solver option).
_SUPPLIED = {"denoiser", "x", "x_init", "sigmas", "gamma", "class_labels", "cond", "progress", "randn_like"}


def check_num_steps(num_steps) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 2 <= num_steps <= MAX_NUM_STEPS:
        raise ValueError(f"need an integer num_steps >= 2 and <= {MAX_NUM_STEPS}, got {num_steps!r}")


def check_flags(**flags) -> None:
    """Each keyword must be ``True`` or ``False``."""
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be true or false, got {flag!r}")


def solver_options(solver: str) -> list[str]:
    params = inspect.signature(getattr(_solvers, solver)).parameters
    return [name for name in params if name not in _SUPPLIED]


def check_solver_options(solver, gamma, solver_kwargs, sigmas, batch_size=1, solvers=None) -> None:
    """A solver's name, gamma and options against ``sigmas`` (``solvers``: the names this entry point runs,
    default all). A base solver (edm, ddim) is gamma = 0: a non-zero gamma for it is a mistake."""
    if solvers is not None and solver not in solvers:
        raise ValueError(f"unknown solver {solver!r} here; choose one of: {', '.join(solvers)}")
    if solver not in _solvers.SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid solvers: {', '.join(_solvers.SOLVERS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    allowed = solver_options(solver)
    unknown = sorted(set(solver_kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"solver {solver!r} has no option(s) {', '.join(unknown)}; its options: {', '.join(allowed) or 'none'}"
        )
    if "backward" in solver_kwargs and solver_kwargs["backward"] not in _solvers.BACKWARD_MAPS:
        raise ValueError(f"backward must be one of {list(_solvers.BACKWARD_MAPS)}, got {solver_kwargs['backward']!r}")
    if "space" in solver_kwargs and solver_kwargs["space"] not in _solvers.SPACES:
        raise ValueError(f"space must be one of {list(_solvers.SPACES)}, got {solver_kwargs['space']!r}")
    if "sigma_data" in solver_kwargs and not (is_number(solver_kwargs["sigma_data"]) and solver_kwargs["sigma_data"] > 0):
        raise ValueError(f"sigma_data must be a positive number, got {solver_kwargs['sigma_data']!r}")
    for name in ("s_churn", "s_min", "s_max", "s_noise"):
        value = solver_kwargs.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if solver in _multistep.MULTISTEP_SOLVERS:
        _multistep.check_options(solver, solver_kwargs)
    if solver == "rex":
        _rex.check_options(**solver_kwargs)
    numbers = isinstance(gamma, (list, tuple)) and all(isinstance(g, (int, float)) and not isinstance(g, bool)
                                                       for g in gamma)
    if isinstance(gamma, bool) or not (gamma is None or isinstance(gamma, (int, float, str)) or numbers):
        shown = repr(gamma) if len(repr(gamma)) <= 60 else repr(gamma)[:57] + "..."
        raise ValueError(f"gamma must be a number in [0, 1], a list of numbers or a schedule name, got {shown}")
    if solver in _solvers.GAMMA_SOLVERS:
        _solvers.gamma_schedule(1.0 if gamma is None else gamma, sigmas, solver)  # raises on bad gamma
    elif gamma is not None and not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma == 0):
        hint = f"is gamma = 0 (use bdia_{solver})" if f"bdia_{solver}" in _solvers.GAMMA_SOLVERS else "has no gamma"
        raise ValueError(f"gamma applies to the BDIA solvers only; {solver!r} {hint}")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_grid(sigma_min=0.002, sigma_max=80.0, rho=7.0, grid_nrow=None, grid_scale=1, grid_padding=0) -> None:
    """The noise grid's and the image grid's settings, checked before anything is loaded or sampled."""
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        if not is_number(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not sigma_min < sigma_max:
        raise ValueError(f"need sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    check_image_grid(grid_nrow, grid_scale, grid_padding)


def check_image_grid(grid_nrow, grid_scale, grid_padding) -> None:
    if grid_nrow is not None and (isinstance(grid_nrow, bool) or not isinstance(grid_nrow, int) or grid_nrow < 1):
        raise ValueError(f"grid_nrow must be a positive integer or null, got {grid_nrow!r}")
    if isinstance(grid_scale, bool) or not isinstance(grid_scale, int) or not 1 <= grid_scale <= 64:
        raise ValueError(f"grid_scale must be an integer in 1..64, got {grid_scale!r}")
    if isinstance(grid_padding, bool) or not isinstance(grid_padding, int) or not 0 <= grid_padding <= 1024:
        raise ValueError(f"grid_padding must be an integer in 0..1024, got {grid_padding!r}")


#: Bound on an image grid's size (``grid.png``, built in memory before it is encoded): 1 GiB of pixels.
MAX_GRID_BYTES = 2**30


def check_grid_size(num_images: int, image_shape, grid_nrow, grid_padding, grid_scale, max_bytes: int = MAX_GRID_BYTES):
    """Refuse a grid (:func:`bdia.imageio.image_grid`'s layout) larger than ``max_bytes``, before any sampling."""
    channels, height, width = (int(s) for s in image_shape)
    nrow = grid_nrow or math.ceil(math.sqrt(max(num_images, 1)))
    cols, rows = min(nrow, num_images), math.ceil(num_images / nrow)
    grid = (grid_padding + rows * (height * grid_scale + grid_padding)) * \
        (grid_padding + cols * (width * grid_scale + grid_padding)) * channels
    tiles = num_images * channels * height * width * grid_scale**2  # the enlarged images, before tiling
    if max(grid, tiles) > max_bytes:
        raise ValueError(f"the image grid of {num_images} images (grid_nrow={grid_nrow}, grid_scale={grid_scale}, "
                         f"grid_padding={grid_padding}) would take {max(grid, tiles) / 2**30:.1f} GiB, more than the "
                         f"{max_bytes / 2**30:.0f} GiB allowed; lower grid_scale or grid_padding")


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an integer in ``[low, high]`` (a bool, float or string is refused), naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low) or \
            (high is not None and value > high):
        where = f" in {low}..{high}" if low is not None and high is not None else \
            f" >= {low}" if low is not None else f" <= {high}" if high is not None else ""
        raise ValueError(f"{name} must be an integer{where}, got {value!r}")
    return value


def check_number(name: str, value, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False) -> float:
    """``value`` as a finite number in the interval (``low_open``/``high_open``: excluding that end), naming ``name``."""
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}, "
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        where = f" in {lo or '(-inf, '}{hi or 'inf)'}" if (low is not None or high is not None) else ""
        raise ValueError(f"{name} must be a finite number{where}, got {value!r}")
    return float(value)


def check_class_idx(label_dim: int, class_idx) -> None:
    if class_idx is None:
        return
    if isinstance(class_idx, bool) or not isinstance(class_idx, int):
        raise ValueError(f"class_idx must be an integer class index or null, got {class_idx!r}")
    if not label_dim:
        raise ValueError(f"class_idx={class_idx} needs a class-conditional model; this one is unconditional")
    if not 0 <= class_idx < label_dim:
        raise ValueError(f"class_idx={class_idx} is outside the model's classes 0..{label_dim - 1}")
