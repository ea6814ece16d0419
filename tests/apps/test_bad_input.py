"""Red-team cases for the apps' command lines and run folders: each bad input ends in one line (or is handled
as documented in bdia.runfolder) and nothing that the run did not create is changed or lost.

Snapshot / cache / loader cases live in tests/core/test_bad_input_loader.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from app_helpers import REPO, cli, subprocess_env

from bdia.apps.sample import sample_run
from bdia.apps.sample import seeds_done
from bdia.runfolder import MARKER_FILE, RunFolderError, open_run

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = ["dataset=digits", "seeds=0-3", "solver.num_steps=2", "progress=false", "batch_size=2"]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its sha256 (the folder's content, to compare before/after)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line(message, *needles):
    assert isinstance(message, str), f"expected an error line, got {message!r}"
    assert message.startswith("error: ") and "\n" not in message.strip(), message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.fixture
def finished_run(tmp_path, monkeypatch):
    """A finished digits run folder (4 images, NFE 3)."""
    out = tmp_path / "run"
    assert cli(monkeypatch, tmp_path, *DIGITS, f"out_dir={out}") is None
    return out


# --------------------------------------------------------------------------------------------------
# 1. Data loss: an out_dir that is not a run folder is refused, byte-identical afterwards.


@pytest.mark.parametrize("content", ["images/holiday.jpg", "notes.txt", "records/x.npz", "config.yaml"])
def test_sample_refuses_a_folder_that_is_not_a_run_folder(tmp_path, monkeypatch, content):
    folder = tmp_path / "d"
    (folder / content).parent.mkdir(parents=True)
    (folder / content).write_bytes(b"precious")
    before = snapshot(folder)
    message = cli(monkeypatch, tmp_path, *DIGITS, f"out_dir={folder}")
    assert_one_line(message, "not a bdia run folder", str(folder))
    assert snapshot(folder) == before and not (folder / MARKER_FILE).exists()
    assert sorted(p.name for p in folder.iterdir()) == [Path(content).parts[0]]  # nothing added either


def test_sample_refuses_a_folder_of_another_app(tmp_path, monkeypatch):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / MARKER_FILE).write_text(json.dumps({"app": "text2image", "format": 1}))
    (folder / "prompts.txt").write_text("a cat\n")
    before = snapshot(folder)
    assert_one_line(cli(monkeypatch, tmp_path, *DIGITS, f"out_dir={folder}"), "'text2image' app")
    assert snapshot(folder) == before


def test_text2image_refuses_a_folder_that_is_not_a_run_folder(tmp_path):
    from bdia.apps.text2image import text_to_image

    folder = tmp_path / "d"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "holiday.jpg").write_bytes(b"precious")
    before = snapshot(folder)

    class NoModel:  # the folder is refused before the model is used
        def sigmas(self, num_steps):
            import bdia

            return bdia.karras_sigmas(num_steps)

        def latent_shape(self, height, width):
            return (4, 8, 8)

        vae_scale_factor = 8
        device = __import__("torch").device("cpu")

        def describe(self):
            return {}

    with pytest.raises(RunFolderError, match="not a bdia run folder"):
        text_to_image(NoModel(), ["a cat"], seeds="0", num_steps=2, out_dir=folder, progress=False)
    assert snapshot(folder) == before


def test_edit_refuses_a_folder_that_is_not_a_run_folder(tmp_path):
    from bdia.apps.edit import edit_run

    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "metrics.json").write_text("{}")
    before = snapshot(folder)
    with pytest.raises(RunFolderError, match="not a bdia run folder"):
        edit_run(object(), folder, image_size=8)  # refused before the model is touched
    assert snapshot(folder) == before


@pytest.mark.parametrize("script", ["sample.py", "text2image.py", "edit.py"])
def test_out_dir_that_is_a_file_is_one_line(tmp_path, monkeypatch, script):
    target = tmp_path / "a_file"
    target.write_bytes(b"keep me")
    args = DIGITS if script == "sample.py" else ["model=tiny-sd", "model.path=/nonexistent"]
    message = cli(monkeypatch, tmp_path, *args, f"out_dir={target}", script=REPO / "scripts" / script)
    assert_one_line(message, "is a file, not a folder")
    assert target.read_bytes() == b"keep me"


def test_out_dir_not_writable_is_one_line(tmp_path, monkeypatch):
    import bdia.runfolder

    folder = tmp_path / "locked"
    folder.mkdir()
    # As root every folder is writable; what the check does with a folder that is not is shown by its answer.
    real_access = os.access
    monkeypatch.setattr(bdia.runfolder.os, "access", lambda p, mode: False if Path(p) == folder else real_access(p, mode))
    assert_one_line(cli(monkeypatch, tmp_path, *DIGITS, f"out_dir={folder}"), "is not writable")
    assert_one_line(cli(monkeypatch, tmp_path, *DIGITS, f"out_dir={folder}/sub"), "cannot be created")
    assert list(folder.iterdir()) == []


def test_an_empty_folder_and_a_new_one_are_used(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(monkeypatch, tmp_path, *DIGITS, f"out_dir={empty}") is None
    assert cli(monkeypatch, tmp_path, *DIGITS, f"out_dir={tmp_path}/new/deeper") is None
    for folder in (empty, tmp_path / "new" / "deeper"):
        assert json.loads((folder / MARKER_FILE).read_text())["app"] == "sample"
        assert (folder / "metrics.json").is_file() and len(list((folder / "images").iterdir())) == 4


# --------------------------------------------------------------------------------------------------
# 2. Unknown settings are never kept; 8. a refused rerun changes nothing.


@pytest.mark.parametrize("damage", [b'{"solver": "bdia_e', b"", b"\xff\xfe", b"[1, 2]"])
def test_unreadable_settings_are_refused_and_nothing_changes(finished_run, tmp_path, monkeypatch, damage):
    (finished_run / "settings.json").write_bytes(damage)
    before = snapshot(finished_run)
    message = cli(monkeypatch, tmp_path, *DIGITS, "solver.gamma=0.5", f"out_dir={finished_run}")
    assert_one_line(message, "settings.json is unreadable", "resume=false")
    assert snapshot(finished_run) == before

    # resume=false replaces the run: every image is from the new settings.
    assert cli(monkeypatch, tmp_path, *DIGITS, "solver.gamma=0.5", "resume=false", f"out_dir={finished_run}") is None
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["gamma"] == 0.5 and metrics["num_sampled"] == 4 and metrics["num_resumed"] == 0
    assert json.loads((finished_run / "settings.json").read_text())["gamma"] == 0.5


def test_images_without_settings_are_refused(finished_run, tmp_path, monkeypatch):
    (finished_run / "settings.json").unlink()
    before = snapshot(finished_run)
    assert_one_line(cli(monkeypatch, tmp_path, *DIGITS, f"out_dir={finished_run}"), "no settings.json")
    assert snapshot(finished_run) == before


def test_changed_settings_are_refused_in_a_short_line_and_leave_the_run_as_it_was(finished_run, tmp_path, monkeypatch):
    (finished_run / "notes.txt").write_text("mine")
    before = snapshot(finished_run)
    message = cli(monkeypatch, tmp_path, *DIGITS, "solver.num_steps=3", f"out_dir={finished_run}")
    assert_one_line(message, "other settings", "num_steps: 2 there, 3 now", "sigmas: ")
    assert snapshot(finished_run) == before  # config.yaml included: it still shows the run's settings
    assert not (finished_run / ".hydra").exists() and not list(finished_run.glob("*.log"))

    # resume=false removes what the run wrote, and nothing else.
    assert cli(monkeypatch, tmp_path, *DIGITS, "solver.num_steps=3", "resume=false", f"out_dir={finished_run}") is None
    assert (finished_run / "notes.txt").read_text() == "mine"
    assert json.loads((finished_run / "metrics.json").read_text())["nfe"] == 5


def test_settings_mismatch_summarises_long_lists():
    import bdia
    from bdia.runfolder import settings_mismatch

    old = {"sigmas": bdia.karras_sigmas(18).tolist(), "gamma": 0.5, "x": 1, "y": 2, "z": 3}
    new = {"sigmas": bdia.karras_sigmas(35).tolist(), "gamma": 1.0, "x": 0, "y": 0, "z": 0}
    line = settings_mismatch(old, new)
    assert "sigmas: [19 values: 80.0 ... 0.0] there, [36 values: 80.0 ... 0.0] now" in line
    assert line.endswith("; and 2 more") and len(line) < 300, line


def test_failed_checks_leave_no_folder_behind(tmp_path, monkeypatch):
    for bad in ("rho=0", "grid_scale=0", "grid_nrow=-1", "solver.gamma=2"):
        folder = tmp_path / bad.replace("=", "_")
        assert_one_line(cli(monkeypatch, tmp_path, *DIGITS, bad, f"out_dir={folder}"))
        assert not folder.exists(), bad
    assert not (tmp_path / "results").exists() and not list(tmp_path.glob("*.log"))


# --------------------------------------------------------------------------------------------------
# 5. Resume trusts only complete images; end-of-run files stay until new ones replace them.


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_records_and_wrong_size_pngs_are_sampled_again(finished_run, tmp_path, monkeypatch):
    from PIL import Image

    originals = {name: (finished_run / "images" / name).read_bytes() for name in ("000001.png", "000002.png")}
    record = finished_run / "records" / "000001.npz"
    _flip_byte(record, record.read_bytes().index(b"\x93NUMPY") + 128)  # the first array's data: its CRC fails
    Image.new("L", (5, 5)).save(finished_run / "images" / "000002.png")  # a valid PNG of the wrong size
    assert seeds_done(finished_run, [0, 1, 2], {"class_label"}, (1, 16, 16)) == [0]

    assert cli(monkeypatch, tmp_path, *DIGITS, f"out_dir={finished_run}") is None
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["num_sampled"] == 2 and metrics["num_resumed"] == 2
    for name, data in originals.items():  # regenerated byte-identically
        assert (finished_run / "images" / name).read_bytes() == data


@pytest.mark.parametrize("offset", [0, 10, 40, -30, -5])
def test_any_flipped_byte_in_a_record_is_caught_or_harmless(finished_run, offset):
    record = finished_run / "records" / "000003.npz"
    original = record.read_bytes()
    _flip_byte(record, offset % len(original))
    if seeds_done(finished_run, [3], {"class_label"}, (1, 16, 16)):
        # Accepted only when every array still reads back unchanged (a flip in zip metadata that no reader uses).
        with np.load(record) as damaged, np.load(__import__("io").BytesIO(original)) as intact:
            assert damaged.files == intact.files
            for key in intact.files:
                assert np.array_equal(damaged[key], intact[key])


def test_resumed_run_keeps_end_of_run_files_until_it_replaces_them(finished_run):
    settings = json.loads((finished_run / "settings.json").read_text())
    assembled = {name: (finished_run / name).read_bytes() for name in ("images.npz", "grid.png", "metrics.json")}
    with open_run(finished_run, "sample", settings, resume=True, subfolders=("images", "records")):
        pass
    for name, data in assembled.items():
        assert (finished_run / name).read_bytes() == data, name


# --------------------------------------------------------------------------------------------------
# 6, 7, 9. One line, and checks before any sampling.


@pytest.mark.parametrize("override, needles", [
    ("rho=0", ["rho must be a positive number"]),
    ("sigma_min=-1", ["sigma_min must be a positive number, got -1"]),
    ("sigma_max=nan", ["sigma_max must be a positive number"]),
    ("grid_scale=0", ["grid_scale must be an integer in 1..64"]),
    ("grid_nrow=-1", ["grid_nrow must be a positive integer"]),
    ("grid_padding=-2", ["grid_padding must be an integer"]),
    ("solver.gamma=true", ["gamma must be a number in [0, 1]"]),
])
def test_bad_settings_fail_in_one_line_before_sampling(tmp_path, monkeypatch, override, needles):
    import bdia.apps.sample

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the settings were checked")

    monkeypatch.setattr(bdia.apps.sample._solvers, "sample", no_sampling)
    assert_one_line(cli(monkeypatch, tmp_path, *DIGITS, override, f"out_dir={tmp_path}/run"), *needles)


@pytest.mark.parametrize("override, needles", [
    ("network_batch=100000000", ["network_batch must be auto, an integer in 1..65536"]),
    ("solver.num_steps=1000000000", ["integer num_steps >= 2 and <= 100000"]),
    ("dataset=gmm model.image_size=100000", ["image_size must be an integer in 1..256"]),
])
def test_settings_that_size_allocations_are_bounded(tmp_path, monkeypatch, override, needles):
    args = [*DIGITS, *override.split()]
    assert_one_line(cli(monkeypatch, tmp_path, *args, f"out_dir={tmp_path}/run"), *needles)
    assert not (tmp_path / "run").exists()


def test_out_of_memory_is_one_line(tmp_path, monkeypatch):
    import bdia.apps.sample

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 143760000000000 bytes.")

    monkeypatch.setattr(bdia.apps.sample._solvers, "sample", exhausted)
    message = cli(monkeypatch, tmp_path, *DIGITS, f"out_dir={tmp_path}/run")
    assert_one_line(message, "error: out of memory", "lower batch_size or network_batch")

    def bug(*args, **kwargs):
        raise RuntimeError("a programming error")

    monkeypatch.setattr(bdia.apps.sample._solvers, "sample", bug)
    # Other errors are not dressed up as memory problems: Hydra reports them with their traceback (exit 1).
    assert cli(monkeypatch, tmp_path, *DIGITS, f"out_dir={tmp_path}/run2") == 1


def test_rho_zero_in_the_api_is_a_value_error():
    import bdia

    with pytest.raises(ValueError, match="rho must be a positive number"):
        bdia.karras_sigmas(10, rho=0)
    with pytest.raises(ValueError, match="rho"):
        sample_run(bdia.GaussianMixtureDenoiser(np.zeros((1, 1, 2, 2)), stds=[1.0]), rho=float("inf"))


def test_file_size_limit_ends_in_one_line(tmp_path):
    """A full disk / ``ulimit -f``: the write fails with an OSError (Python ignores SIGXFSZ), reported as one
    line; files written before the limit are complete (atomic writes)."""
    limit = 4096  # bytes: enough for the marker and settings, not for a PNG plus its record

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "run"
    # grid_padding=1: the 4.2 kB grid.png this test was written with (the app's default is sample_run's, 0)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "sample.py"), *DIGITS, "seeds=0-15",
                             "dataset.grid_scale=8", "grid_padding=1", f"out_dir={out}"], cwd=tmp_path,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300, preexec_fn=set_limit)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read or write a file"), result.stderr[-2000:]
    assert "File too large" in lines[0]
    assert not list(out.rglob(".*.tmp-*"))  # no half-written file is left behind


def _png_header_only(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_huge_image_for_edit_is_refused_before_decoding(tmp_path):
    from bdia.apps.edit import load_image

    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 20000, 20000)  # 74 bytes claiming 400 megapixels
    with pytest.raises(ValueError, match="image=.*bomb.png: too large to read safely"):
        load_image(str(bomb), 64)
    big = tmp_path / "big.png"
    _png_header_only(big, 9000, 9000)  # under PIL's warning limit, over ours
    with pytest.raises(ValueError, match="9000x9000 pixels, more than this app reads"):
        load_image(str(big), 64)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="not an image PIL can read"):
        load_image(str(garbage), 64)


def test_evaluate_on_a_truncated_images_npz_is_one_line(finished_run, tmp_path, monkeypatch):
    npz = finished_run / "images.npz"
    npz.write_bytes(npz.read_bytes()[: len(npz.read_bytes()) // 2])
    before = snapshot(finished_run)
    message = cli(monkeypatch, tmp_path, f"run_dir={finished_run}", "metrics=digits",
                  script=REPO / "scripts" / "evaluate.py")
    assert_one_line(message, "cannot read", "images.npz")
    assert snapshot(finished_run) == before


def test_bad_inputs_do_not_break_a_later_good_run(finished_run, tmp_path, monkeypatch):
    """After every refusal above, the run folder still resumes: nothing to sample, same images."""
    before = snapshot(finished_run / "images")
    assert cli(monkeypatch, tmp_path, *DIGITS, f"out_dir={finished_run}") is None
    assert json.loads((finished_run / "metrics.json").read_text())["num_resumed"] == 4
    assert snapshot(finished_run / "images") == before


@pytest.mark.parametrize("architecture, needle", [
    ({"channels": [16, 4096 * 64], "feature_dim": 64, "image_size": 16, "num_classes": 10}, "channels must be two integers"),
    ({"channels": [16, 32], "feature_dim": 10**9, "image_size": 16, "num_classes": 10}, "feature_dim must be an integer"),
    ({"channels": [16, 32], "feature_dim": 64, "image_size": True, "num_classes": 10}, "image_size must be an integer"),
    ({"channels": [16, 32], "depth": 3}, "no valid 'architecture'"),
    ([1, 2], "no valid 'architecture'"),
])
def test_digits_classifier_card_is_bounded_before_building(tmp_path, architecture, needle):
    from bdia.metrics.digits_classifier import ASSET_WEIGHTS, load_digits_classifier

    weights = tmp_path / "clf.safetensors"
    weights.write_bytes(ASSET_WEIGHTS.read_bytes())
    weights.with_suffix(".json").write_text(json.dumps({"architecture": architecture}))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=needle):
        load_digits_classifier(weights)
    assert snapshot(tmp_path) == before


def test_digits_classifier_with_foreign_weights_is_one_line(tmp_path):
    from bdia.metrics.digits_classifier import ASSET_CARD, load_digits_classifier

    weights = tmp_path / "clf.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # a valid, empty safetensors file
    weights.with_suffix(".json").write_text(Path(ASSET_CARD).read_text())
    with pytest.raises(ValueError, match="does not hold this classifier's weights"):
        load_digits_classifier(weights)


@pytest.mark.parametrize("override, needle", [
    ("solver.space=z", "space must be one of"),
    ("solver.sigma_data=0", "sigma_data must be a positive number"),
    ("solver.backward=rk4", "backward must be one of"),
])
def test_bdia_edm_options_are_checked_before_sampling(tmp_path, monkeypatch, override, needle):
    import bdia.apps.sample

    monkeypatch.setattr(bdia.apps.sample._solvers, "sample", lambda *a, **k: pytest.fail("sampled before the check"))
    assert_one_line(cli(monkeypatch, tmp_path, *DIGITS, "solver=bdia_edm", override, f"out_dir={tmp_path}/run"),
                    needle)


# --------------------------------------------------------------------------------------------------
# Issue 20: one line naming the key for every mistake, checked before anything runs.

TEXT2IMAGE = REPO / "scripts" / "text2image.py"
EDIT = REPO / "scripts" / "edit.py"
EVALUATE = REPO / "scripts" / "evaluate.py"
FID_REF = REPO / "scripts" / "fid_ref.py"


@pytest.mark.parametrize("script, args, needles", [
    ("sample", ["solver.gamma={a:1}"], ["gamma must be a number in [0, 1]", "{'a': 1}"]),
    ("sample", ["solver.num_steps=many"], ["num_steps", "'many'"]),
    ("sample", ["+foo=1"], ["unknown setting 'foo' (+foo=1)"]),
    ("sample", ["+num_step=5"], ["unknown setting 'num_step'"]),
    ("sample", ["out_dir=null"], ["out_dir must be a folder path, got None"]),
    ("sample", ["metrics=reconstruction"], ["metrics.reconstruction.reference is not set"]),
    ("sample", ["solver.gamma=0.5,2"], ["is a sweep: add -m"]),
    ("sample", ["-m", "fooo=1,2"], ["fooo"]),
    ("sample", ["-m", "solver.gamma=0.5,2"], ["gamma must lie in [0, 1]", "(sweep job 2 of 2: ", "no job was run"]),
    ("text2image", ["height=tall"], ["height must be an integer in 8..4096, got 'tall'"]),
    ("text2image", ["height=0"], ["height must be an integer in 8..4096, got 0"]),
    ("text2image", ["width=1000000"], ["width must be an integer in 8..4096"]),
    ("text2image", ["prompts=[[a,b]]"], ["prompts[0] must be a string"]),
    ("text2image", ["out_dir=null"], ["out_dir must be a folder path"]),
    ("edit", ["image_size=0"], ["image_size must be an integer in 8..4096, got 0"]),
    ("edit", ["image_size=1000000"], ["image_size must be an integer in 8..4096"]),
    ("edit", ["grid_scale=100000"], ["grid_scale must be an integer in 1..64"]),
    ("edit", ["p=5"], ["p (EDICT's mixing weight) must be a number in (0, 1]"]),
    ("edit", ["num_inner_steps=-1"], ["num_inner_steps"]),
    ("edit", ["strength=0"], ["strength"]),
    ("edit", ["out_dir=null"], ["out_dir must be a folder path"]),
    ("evaluate", ["metrics=bogus", "run_dir=/nonexistent"], ["unknown metrics 'bogus'"]),
    ("fid_ref", ["foo=1"], ["foo"]),
    ("fid_ref", ["features=pixels"], ["features must be 'inception' or 'digits'"]),
])
def test_mistakes_are_one_line_before_anything_runs(tmp_path, monkeypatch, script, args, needles):
    """Checked by bdia.apps.cli.preflight (every job of a sweep composed and checked by the app before any
    runs): nothing is loaded, no folder is created, nothing runs."""
    import bdia.apps.sample

    monkeypatch.setattr(bdia.apps.sample, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    extra = ["model=tiny-sd", "model.path=/nonexistent"] if script in ("text2image", "edit") else []
    extra += DIGITS if script == "sample" and "-m" not in args else []
    extra += [f"out_dir={tmp_path}/run"] if script in ("sample", "text2image", "edit") and "out_dir=null" not in args \
        and "-m" not in args else []
    message = cli(monkeypatch, tmp_path, *extra, *args, script=REPO / "scripts" / f"{script}.py")
    assert_one_line(message, *needles)
    assert not (tmp_path / "run").exists() and not (tmp_path / "results").exists()


def test_evaluate_without_the_reconstruction_reference_and_with_a_garbage_reference(finished_run, tmp_path, monkeypatch):
    before = snapshot(finished_run)
    assert_one_line(cli(monkeypatch, tmp_path, str(finished_run), "metrics=reconstruction", script=EVALUATE),
                    "metrics.reconstruction.reference is not set")
    garbage = tmp_path / "ref.npz"
    garbage.write_bytes(b"PK\x03\x04 garbage")
    assert_one_line(cli(monkeypatch, tmp_path, str(finished_run), "metrics=digits", f"metrics.digits.ref={garbage}",
                        script=EVALUATE), "metrics.digits.ref=", "ref.npz", "not a readable .npz")
    (finished_run / "metrics.json").write_bytes(b"\x00\xff binary")
    before = snapshot(finished_run)
    assert_one_line(cli(monkeypatch, tmp_path, str(finished_run), "metrics=digits", script=EVALUATE),
                    f"{finished_run / 'metrics.json'}", "not text")
    assert snapshot(finished_run) == before


def test_fid_ref_cards_that_are_not_its_own_are_named(tmp_path, monkeypatch):
    out = tmp_path / "ref.npz"
    (tmp_path / "ref.npz.json").write_text("[1, 2, 3]")
    before = snapshot(tmp_path)
    args = ["source=digits-test", "features=digits", "progress=false", f"out={out}"]
    assert_one_line(cli(monkeypatch, tmp_path, *args, script=FID_REF), "ref.npz.json", "was not written by fid_ref")
    assert snapshot(tmp_path) == before
    assert_one_line(cli(monkeypatch, tmp_path, "source=digits-test", "features=digits", "weights=/nonexistent.safetensors",
                        f"out={tmp_path}/other.npz", script=FID_REF), "weights=")


def test_a_binary_prompt_file_is_named(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xff\xd8\xff\xe0 a jpeg")
    message = cli(monkeypatch, tmp_path, "model=tiny-sd", "model.path=/nonexistent", "prompts=null",
                  f"prompt_file={prompts}", f"out_dir={tmp_path}/run", script=TEXT2IMAGE)
    assert_one_line(message, f"prompt_file={prompts}", "not UTF-8 text")


def test_reproduce_dry_run_checks_its_arguments(tmp_path, monkeypatch, capsys):
    from app_helpers import load_script

    main = load_script("scripts/reproduce.py").main
    for bad, needle in (("solver.num_steps=many", "num_steps"), ("bogus=1", "bogus"), ("solver.gamma=7", "gamma")):
        monkeypatch.chdir(tmp_path)
        assert main(["table2_mini", "--dry-run", "--smoke", bad]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: table2_mini multirun 0") and needle in err[0], err
    assert not (tmp_path / "results").exists()
