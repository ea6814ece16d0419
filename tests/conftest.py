import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


#: Modules whose assertions depend on floating-point results (tolerances, bit-identity across batch sizes,
#: processes or stored images): CI runs them a second time under another CPU capability and thread count
#: (`make test-numerics`), so a tolerance that holds only for one kernel or thread split is caught.
NUMERICS_MODULES = {
    "test_solvers.py", "test_schedules.py", "test_denoisers.py", "test_diffusers_parity.py", "test_sd_scheduler.py",
    "test_edm_networks.py", "test_edm_loader.py", "test_digits_model.py", "test_metrics_frechet.py",
    "test_metrics_digits.py", "test_metrics_distributed.py", "test_app_run.py", "test_editing.py", "test_train.py",
    "test_solver_study.py", "test_text2image.py", "test_metrics_editing.py", "test_demo.py", "test_invert_records.py",
    "test_reversible.py", "test_optimize.py", "test_flow.py", "test_flow_dropin.py", "test_flow_networks.py", "test_flow_editing.py", "test_flow_apps.py", "test_multistep.py", "test_rex.py", "test_sampler_study.py",
    "test_obelm_ei.py",
    "test_bad_input_core.py",
}


def pytest_collection_modifyitems(config, items):
    numerics = pytest.mark.numerics
    for item in items:
        if item.path.name in NUMERICS_MODULES:
            item.add_marker(numerics)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --------------------------------------------------------------------------------------------------
# Fixtures shared by the layers' test folders (helpers for them live in tests/support/).


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest, and steadiest on a busy machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """Path of a tiny random SD diffusers folder (:func:`bdia.testing.build_tiny_sd`, seed 0, 32x32 pixels,
    8x8x4 latents), written once per session."""
    from bdia.testing import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "tiny-sd", seed=0, sample_size=32)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """Path of a tiny random SD3 diffusers folder (:func:`bdia.testing.build_tiny_sd3`, seed 0, 32x32 pixels,
    16x16x4 latents, no T5), written once per session."""
    from bdia.testing import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3") / "tiny-sd3", seed=0, sample_size=32)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """Path of a tiny random FLUX.1 diffusers folder (:func:`bdia.testing.build_tiny_flux`, seed 0, 32x32 pixels,
    16x16x4 latents packed into 64 tokens, guidance embedding), written once per session."""
    from bdia.testing import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "tiny-flux", seed=0, sample_size=32)


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir):
    """:class:`bdia.networks.sd.StableDiffusion` loaded from ``tiny_sd_dir`` (float32, CPU), once per session;
    tests must not modify its modules (load your own with ``load_sd(path=tiny_sd_dir, dtype=...)``)."""
    from bdia.networks.sd import load_sd

    return load_sd(path=tiny_sd_dir, dtype=torch.float32)
