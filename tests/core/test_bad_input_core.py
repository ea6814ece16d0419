"""Red-team cases for the core and service APIs (issue 20): every silently-wrong or unbounded input is refused
with one line naming the setting, before anything large is allocated.

Run-folder and command-line cases: tests/apps/test_bad_input.py, tests/apps/test_bad_input_runfolder.py;
snapshot files: tests/core/test_bad_input_loader.py.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch

import bdia
from bdia.apps.cli import one_line


def one_line_error(call, *needles, exc=ValueError):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and one_line(info.value) == message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# --------------------------------------------------------------------------------------------------
# Grids and state pairs.


def test_a_two_dimensional_sigma_grid_is_refused():
    sigmas = bdia.karras_sigmas(3)
    one_line_error(lambda: bdia.sample(lambda x, s, c=None: x * 0, torch.zeros(1, 1, 2, 2), sigmas[None], solver="ddim"),
                   "1-D grid", "[1, 4]")


def test_karras_sigmas_bounds_the_step_count_before_allocating():
    one_line_error(lambda: bdia.karras_sigmas(10**9), "num_steps in 2..1000000")


@pytest.mark.parametrize("entry", ["sample", "invert"])
def test_a_pair_whose_halves_differ_in_batch_size_is_not_broadcast(entry):
    pair = (torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.zeros(1, 1, 2, 2, dtype=torch.float64))
    sigmas = bdia.karras_sigmas(3)
    call = bdia.sample if entry == "sample" else bdia.invert
    one_line_error(lambda: call(lambda x, s, c=None, **k: x * 0, pair, sigmas, solver="bdia_ddim"),
                   "one shape", "[2, 1, 2, 2]", "[1, 1, 2, 2]")


# --------------------------------------------------------------------------------------------------
# The diffusers drop-in scheduler.


@pytest.mark.parametrize("kwargs, needle", [
    (dict(num_train_timesteps=10**10), "num_train_timesteps must be an integer in 1..100000"),
    (dict(num_train_timesteps=0), "num_train_timesteps must be an integer"),
    (dict(num_train_timesteps=10.5), "num_train_timesteps must be an integer"),
    (dict(beta_start=-0.1), "beta_start must be a number in [0, 1]"),
    (dict(beta_end=float("nan")), "beta_end must be a number in [0, 1]"),
    (dict(trained_betas=[0.1, -0.2, 0.3], num_train_timesteps=3), "betas must be finite numbers in [0, 1]"),
    (dict(trained_betas=[0.1, float("nan"), 0.3], num_train_timesteps=3), "betas must be finite numbers in [0, 1]"),
    (dict(trained_betas=[0.1, 0.2]), "trained_betas must be 1000 numbers"),
    (dict(gamma="half"), "gamma must lie in [0, 1]"),
])
def test_scheduler_settings_that_would_give_nan_or_huge_schedules_are_refused(kwargs, needle):
    from bdia.schedulers import BDIADDIMScheduler

    one_line_error(lambda: BDIADDIMScheduler(**kwargs), needle)


@pytest.mark.parametrize("steps", [10.5, 0, True, "10"])
def test_set_timesteps_takes_integers_only(steps):
    from bdia.schedulers import BDIADDIMScheduler

    one_line_error(lambda: BDIADDIMScheduler().set_timesteps(steps), "num_inference_steps must be a positive integer")


def _stepping_scheduler(gamma=0.5):
    from bdia.schedulers import BDIADDIMScheduler

    scheduler = BDIADDIMScheduler(gamma=gamma, clip_sample=False)
    scheduler.set_timesteps(5)
    return scheduler


def test_step_refuses_a_model_output_of_another_batch_size():
    scheduler = _stepping_scheduler()
    t = scheduler.timesteps[0]
    one_line_error(lambda: scheduler.step(torch.zeros(1, 4, 8, 8), t, torch.zeros(3, 4, 8, 8)),
                   "model_output has shape [1, 4, 8, 8] but sample [3, 4, 8, 8]")


def test_step_refuses_a_batch_size_change_in_the_middle_of_a_trajectory():
    scheduler = _stepping_scheduler()
    t0, t1 = scheduler.timesteps[:2]
    scheduler.step(torch.zeros(2, 4, 8, 8), t0, torch.zeros(2, 4, 8, 8))
    one_line_error(lambda: scheduler.step(torch.zeros(3, 4, 8, 8), t1, torch.zeros(3, 4, 8, 8)),
                   "a new batch is a new trajectory")
    # a new trajectory (from the top again) may have another batch size
    scheduler.step(torch.zeros(3, 4, 8, 8), t0, torch.zeros(3, 4, 8, 8))


@pytest.mark.parametrize("timestep", [-1, 7, 999, 2.5])
def test_step_refuses_negative_and_off_grid_timesteps(timestep):
    scheduler = _stepping_scheduler()
    one_line_error(lambda: scheduler.step(torch.zeros(1, 4, 8, 8), timestep, torch.zeros(1, 4, 8, 8)), "timestep")


def test_inverse_scheduler_checks_its_steps_too():
    from bdia.schedulers import BDIADDIMInverseScheduler

    scheduler = BDIADDIMInverseScheduler(clip_sample=False)
    scheduler.set_timesteps(5)
    one_line_error(lambda: scheduler.step(torch.zeros(1, 4, 8, 8), 3, torch.zeros(1, 4, 8, 8)),
                   "not one of this loop's timesteps")
    one_line_error(lambda: scheduler.step(torch.zeros(2, 4, 8, 8), scheduler.timesteps[0], torch.zeros(1, 4, 8, 8)),
                   "model_output has shape")


# --------------------------------------------------------------------------------------------------
# Inversion options (edit app, Python API).


@pytest.mark.parametrize("p", [5, 0, -0.5, float("nan"), True])
def test_edict_mixing_weight_outside_zero_one_is_refused_before_any_step(p):
    from bdia.inversion import EDICTOptions, edict_invert

    one_line_error(lambda: EDICTOptions(p=p), "p (EDICT's mixing weight) must be a number in (0, 1]")
    one_line_error(lambda: edict_invert(lambda *a, **k: pytest.fail("stepped"), torch.zeros(1, 4, 2, 2),
                                        bdia.karras_sigmas(3), p=p), "(0, 1]")


@pytest.mark.parametrize("kwargs, needle", [
    (dict(num_inner_steps=-1), "num_inner_steps"),
    (dict(num_inner_steps=10**9), "0..1000"),
    (dict(num_inner_steps=2.5), "num_inner_steps"),
    (dict(lr=0), "lr (null-text's learning rate) must be a positive number"),
    (dict(lr=float("inf")), "lr"),
    (dict(early_stop=-1), "early_stop"),
])
def test_null_text_options_are_bounded(kwargs, needle):
    from bdia.inversion import NullTextOptions, null_text_invert

    one_line_error(lambda: NullTextOptions(**kwargs), needle)
    one_line_error(lambda: null_text_invert(lambda *a, **k: pytest.fail("stepped"), torch.zeros(1, 4, 2, 2),
                                            bdia.karras_sigmas(3), None, None, **kwargs), needle)


def test_bdia_inversion_gamma_zero_is_refused():
    from bdia.inversion import BDIAOptions

    one_line_error(lambda: BDIAOptions(gamma=0), "gamma (BDIA's weight) must be a number in (0, 1]")


# --------------------------------------------------------------------------------------------------
# Metrics' file readers.


def _reference(path, mu, sigma):
    np.savez(path, mu=mu, sigma=sigma, num_images=np.int64(100))
    return path


@pytest.mark.parametrize("damage, needle", [
    ("asymmetric", "not symmetric"),
    ("negative", "negative eigenvalue"),
    ("nan", "NaN or Inf"),
])
def test_a_reference_that_is_not_a_covariance_is_refused(tmp_path, damage, needle):
    """A non-PSD or non-symmetric "covariance" gave FD = -301.95; it is refused instead."""
    from bdia.metrics.fid import load_reference

    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 8))
    sigma = a @ a.T
    if damage == "asymmetric":
        sigma[0, 1] += 1.0
    elif damage == "negative":
        sigma = sigma - 2 * np.linalg.eigvalsh(sigma).max() * np.eye(8) * (np.arange(8) == 0)
    else:
        sigma[2, 2] = np.nan
    path = _reference(tmp_path / "ref.npz", rng.standard_normal(8), sigma)
    one_line_error(lambda: load_reference(str(path), config_key="metrics.fid.ref"), "metrics.fid.ref=", needle)


def test_a_covariance_with_float32_round_off_is_accepted():
    from bdia.metrics.frechet import check_covariance

    x = np.random.default_rng(1).standard_normal((50, 64)).astype(np.float32)
    sigma = np.cov(x, rowvar=False).astype(np.float32)  # rank 49 < 64: eigenvalues at round-off around 0
    check_covariance(sigma, "float32 covariance")


def test_a_garbage_reference_npz_is_one_line_naming_it(tmp_path):
    from bdia.metrics.fid import load_reference

    path = tmp_path / "ref.npz"
    path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    one_line_error(lambda: load_reference(str(path), config_key="metrics.digits.ref"), "metrics.digits.ref=", "ref.npz",
                   "not a readable .npz")


def _forged_npz(path, key: str, shape, dtype="|u1", data: bytes = b"\x00" * 16, compress=zipfile.ZIP_STORED):
    """An .npz whose member's .npy header declares ``shape`` while holding only ``data``."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    member = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data
    with zipfile.ZipFile(path, "w", compression=compress) as archive:
        archive.writestr(f"{key}.npy", member)
    return path


def test_images_npz_declaring_gigabytes_is_refused_before_unpacking(tmp_path, monkeypatch):
    import bdia.metrics.images as images

    forged = _forged_npz(tmp_path / "forged.npz", "images", (10**6, 3, 64, 64))  # 12 GB declared in 16 bytes
    one_line_error(lambda: images.open_images(forged), "declares [1000000, 3, 64, 64]", "more than its")
    # A real archive whose images would not fit: refused from the header, before np.load unpacks them.
    real = tmp_path / "real.npz"
    np.savez_compressed(real, images=np.zeros((64, 3, 32, 32), np.uint8))
    monkeypatch.setattr(images, "MAX_IMAGES_BYTES", 2**16)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("unpacked before the size was checked"))
    one_line_error(lambda: images.open_images(real), "declares 0.00 GiB of images", "more than")


def test_images_npz_of_the_wrong_kind_is_named_before_unpacking(tmp_path):
    from bdia.metrics.images import open_images

    path = tmp_path / "floats.npz"
    np.savez(path, images=np.zeros((2, 3, 4, 4), np.float32))
    one_line_error(lambda: open_images(path), "must be uint8 images", "float32")


def test_npz_members_reads_headers_only_and_bounds_the_total(tmp_path):
    from bdia.runfolder import npz_members, read_npz

    path = tmp_path / "a.npz"
    np.savez(path, x=np.zeros(1000), y=np.arange(3))
    assert npz_members(path, 2**20, "a")["x"] == ((1000,), np.dtype("float64"))
    one_line_error(lambda: npz_members(path, 4000, "a.npz"), "a.npz", "more than")
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "obj.npz", "w") as archive:
        archive.writestr("x.npy", pickled.getvalue())
    one_line_error(lambda: read_npz(tmp_path / "obj.npz", 2**20, "obj.npz"), "Python objects")


# --------------------------------------------------------------------------------------------------
# Files named in messages.


@pytest.mark.parametrize("kind", ["folder", "fifo", "binary", "missing"])
def test_prompt_files_that_are_not_text_name_the_file(tmp_path, kind):
    import os

    from bdia.prompts import load_prompts

    path = tmp_path / "prompts.txt"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    needle = {"folder": "a folder", "fifo": "not a regular file", "binary": "not UTF-8 text",
              "missing": "no such file"}[kind]
    one_line_error(lambda: load_prompts(prompt_file=str(path)), f"prompt_file={path}", needle)


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_an_edit_image_that_is_a_folder_or_fifo_is_not_called_missing(tmp_path, kind):
    import os

    from bdia.apps.edit import load_image

    path = tmp_path / "photo.png"
    path.mkdir() if kind == "folder" else os.mkfifo(path)
    one_line_error(lambda: load_image(str(path), 32), "a folder" if kind == "folder" else "not a regular file")


def test_list_valued_prompts_are_refused(tiny_sd):
    from bdia.apps.text2image import text_to_image

    one_line_error(lambda: text_to_image(tiny_sd, [["a", "b"]], out_dir="unused"), "prompts[0] must be a string")
    one_line_error(lambda: text_to_image(tiny_sd, "a cat", out_dir="unused"), "prompts must be a list of strings")


def test_json_helpers_never_see_a_binary_metrics_file(tmp_path):
    from bdia.metrics.evaluate import merge_metrics_json

    run = tmp_path / "run"
    run.mkdir()
    (run / ".bdia-run.json").write_text(json.dumps({"app": "sample", "format": 2, "state": "complete"}))
    for content, needle in ((b"\xff\xfe\x00binary", "not text"), (b"[1, 2]", "expected a JSON object"),
                            (b'{"evaluation": [1]}', "'evaluation' entry is a list")):
        (run / "metrics.json").write_bytes(content)
        one_line_error(lambda: merge_metrics_json(run, {"digits": {"fd": 1.0}}), str(run / "metrics.json"), needle)
        assert (run / "metrics.json").read_bytes() == content
