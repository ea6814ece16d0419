"""Red-team cases for the run-folder contract (issue 20, "data loss and mixed runs" 1-8 and resource bounds):
every app writes only through bdia.runfolder (marker, lock, settings, written names, no links, done = ours), and
after each refusal the folder is byte-identical.

Most cases call the apps' plain functions in-process on an analytic model (milliseconds per run); the command
line is used where it is the point (train's keys, one-line messages).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from app_helpers import REPO, cli, compose, hydra_configs, subprocess_env

import bdia
from bdia.apps.sample import sample_run, seeds_done
from bdia.runfolder import LOCK_FILE, MARKER_FILE, RunFolderError, open_run

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = REPO / "scripts" / "train.py"


def snapshot(folder: Path) -> dict:
    """Every entry under ``folder`` (links not followed) with its content's sha256, or its link target."""
    out = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in sorted(dirs + files):
            path = Path(root, name)
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                out[rel] = f"-> {os.readlink(path)}"
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def assert_one_line(message, *needles):
    assert isinstance(message, str), f"expected an error line, got {message!r}"
    assert message.startswith("error: ") and "\n" not in message.strip(), message
    for needle in needles:
        assert needle in message, (needle, message)


def refused(call, *needles):
    with pytest.raises(RunFolderError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def mixture():
    means = np.stack([np.full((1, 8, 8), -0.5), np.full((1, 8, 8), 0.5)])
    return bdia.GaussianMixtureDenoiser(means, stds=[0.3, 0.2])


def run(out_dir, **kwargs):
    """A tiny analytic sampling run (4 images of 1x8x8, 2 steps)."""
    settings = dict(seeds="0-3", num_steps=2, batch_size=2, progress=False, solver="bdia_edm", gamma=0.5)
    return sample_run(mixture(), out_dir=out_dir, **{**settings, **kwargs})


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "run"
    run(out)
    return out


def user_folder(folder: Path) -> Path:
    """What a user keeps in a folder: images, a settings.json, a config and a log (as issue 20 found them)."""
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "000000.png").write_bytes(b"holiday photo")
    (folder / "images" / "cat.jpg").write_bytes(b"cat")
    (folder / "settings.json").write_text(json.dumps({"solver": "adam"}))
    (folder / "config.yaml").write_text("lr: 0.1\n")
    (folder / "training_log.jsonl").write_text('{"loss": 1}\n')
    (folder / "metrics.json").write_text('{"accuracy": 0.9}')
    return folder


# --------------------------------------------------------------------------------------------------
# 1, 2. Only bdia's own run folders (the marker) are written, by every app.


def test_train_refuses_a_user_folder_and_another_apps_run_folder(tmp_path, monkeypatch, finished):
    mine = user_folder(tmp_path / "mine")
    for folder, needle in ((mine, "no run marker"), (finished, "run folder of the 'sample' app")):
        before = snapshot(folder)
        message = cli(monkeypatch, tmp_path, f"out_dir={folder}", "train.total_images=8", "progress=false",
                      script=TRAIN)
        assert_one_line(message, str(folder), needle)
        assert snapshot(folder) == before


@pytest.mark.parametrize("app", ["sample", "text2image", "edit", "train"])
@pytest.mark.parametrize("resume", [True, False])
def test_a_user_folder_with_images_and_settings_is_never_taken_for_a_run(tmp_path, app, resume):
    """A folder of the user's holding images/ and settings.json was taken for a pre-marker run, and resume=false
    then deleted the images: only the marker proves a folder is bdia's, and the refusal says so."""
    folder = user_folder(tmp_path / "d")
    before = snapshot(folder)
    if app == "sample":
        call = lambda: run(folder, resume=resume)  # noqa: E731
    elif app == "text2image":
        from bdia.apps.text2image import text_to_image

        class NoModel:  # refused before the model is used
            vae_scale_factor, device = 8, __import__("torch").device("cpu")

            def sigmas(self, num_steps):
                return bdia.karras_sigmas(num_steps)

            def latent_shape(self, height, width):
                return (4, 8, 8)

            def describe(self):
                return {}

        call = lambda: text_to_image(NoModel(), ["a cat"], seeds="0", num_steps=2, out_dir=folder,  # noqa: E731
                                     resume=resume, progress=False)
    elif app == "edit":
        from bdia.apps.edit import edit_run

        call = lambda: edit_run(object(), folder, num_steps=2, resume=resume)  # noqa: E731
    else:
        from bdia.apps.train import TrainConfig, train

        call = lambda: train(np.zeros((2, 1, 8, 8), np.float32), TrainConfig(), folder,  # noqa: E731
                             progress=False, resume=resume)
    message = refused(call, "no run marker", "only the marker proves", "nothing was changed")
    assert "resume=false" not in message  # never the advice that deleted the user's files
    assert snapshot(folder) == before


# --------------------------------------------------------------------------------------------------
# 3. resume=false removes only the regular files with the names the run writes.


def test_resume_false_removes_only_the_files_the_run_wrote(finished, tmp_path):
    foreign = tmp_path / "foreign.png"
    foreign.write_bytes(b"someone else's")
    mine = {
        "images/holiday.png": b"a photo of mine", "images/notes.txt": b"notes", "records/mine.npz": b"not a record",
        "mine.txt": b"top level", "images/keep/000007.png": b"in a folder of mine",
    }
    for name, data in mine.items():
        (finished / name).parent.mkdir(parents=True, exist_ok=True)
        (finished / name).write_bytes(data)
    (finished / "images" / "000099.png").symlink_to(foreign)  # a run's name, but a link: not the run's file
    old = {p.name: p.read_bytes() for p in (finished / "images").glob("00000[0-3].png")}

    run(finished, gamma=0.9, resume=False)
    for name, data in mine.items():
        assert (finished / name).read_bytes() == data, name
    assert (finished / "images" / "000099.png").is_symlink() and foreign.read_bytes() == b"someone else's"
    new = {p.name: p.read_bytes() for p in (finished / "images").glob("00000[0-3].png")}
    assert new.keys() == old.keys() and new != old  # the run's own images were replaced (other gamma)
    metrics = json.loads((finished / "metrics.json").read_text())
    assert metrics["gamma"] == 0.9 and metrics["num_sampled"] == 4


# --------------------------------------------------------------------------------------------------
# 4. fid_ref never overwrites a file it did not create.


def test_fid_ref_never_overwrites_a_file_it_did_not_write(tmp_path):
    from bdia.metrics.digits_classifier import DigitsFeatures, digits_uint8
    from bdia.metrics.fid import write_reference_stats

    images = digits_uint8("test")[0][:64]
    features = DigitsFeatures()
    out = tmp_path / "ref.npz"
    out.write_bytes(b"my statistics")
    refused(lambda: write_reference_stats(images, features, out, progress=False), "was not written by fid_ref")
    assert out.read_bytes() == b"my statistics" and not (tmp_path / "ref.npz.json").exists()

    own = tmp_path / "own.npz"
    card = write_reference_stats(images, features, own, progress=False)
    write_reference_stats(images[:32], features, own, progress=False)  # its own file: replaced
    assert json.loads((tmp_path / "own.npz.json").read_text())["num_images"] == 32 != card["num_images"]
    own.write_bytes(own.read_bytes() + b"\0")  # changed since: no longer what fid_ref wrote
    before = snapshot(tmp_path)
    refused(lambda: write_reference_stats(images, features, own, progress=False), "was not written by fid_ref")
    for card_text in ("[1, 2, 3]", "garbage {"):
        (tmp_path / "x.npz.json").write_text(card_text)
        before = snapshot(tmp_path)
        refused(lambda: write_reference_stats(images, features, tmp_path / "x.npz", progress=False), "x.npz.json")
        assert snapshot(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".lock")]


# --------------------------------------------------------------------------------------------------
# 5. One writer at a time: a lock held for the run; a dead holder's lock is taken over.

HOLDER = """
import sys, time
from bdia.runfolder import open_run
with open_run(sys.argv[1], "sample", {"holder": 1}, resume=True, subfolders=("images", "records")):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_while_the_first_runs_and_a_dead_ones_lock_is_taken_over(finished, tmp_path):
    with open_run(finished, "sample", None, resume=True):  # this process writes there
        before = snapshot(finished)
        for resume in (True, False):
            refused(lambda: run(finished, resume=resume, gamma=0.9), "is in use by a sample run", f"pid {os.getpid()}")
        assert snapshot(finished) == before

    other = tmp_path / "other"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(other)], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(other)
        message = refused(lambda: run(other, resume=False), "in use by a sample run", f"pid {holder.pid}")
        assert "wait for it to finish" in message and snapshot(other) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it
        holder.wait(timeout=30)
    assert json.loads((other / LOCK_FILE).read_text())["pid"] == holder.pid  # its record stays behind
    run(other, resume=False)  # taken over
    assert len(seeds_done(other, range(4), {"class_label"}, (1, 8, 8))) == 4
    assert (other / LOCK_FILE).read_text() == ""  # released cleanly


# --------------------------------------------------------------------------------------------------
# 6. Links are never followed out of a run folder.


@pytest.mark.parametrize("sub", ["images", "records"])
def test_a_subfolder_replaced_by_a_link_is_refused_and_nothing_is_written_through_it(finished, tmp_path, sub):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "000000.png").write_bytes((finished / "images" / "000000.png").read_bytes())  # a "done" image
    (foreign / "000000.npz").write_bytes((finished / "records" / "000000.npz").read_bytes())
    (finished / sub).rename(tmp_path / "moved")
    (finished / sub).symlink_to(foreign)
    before, outside = snapshot(finished), snapshot(foreign)
    for resume in (True, False):
        refused(lambda: run(finished, resume=resume), f"{sub} is a symbolic link", "never writes or resumes through links")
    assert snapshot(finished) == before and snapshot(foreign) == outside


def test_an_image_replaced_by_a_link_is_not_adopted_and_not_written_through(finished, tmp_path):
    foreign = tmp_path / "foreign.png"
    foreign.write_bytes((finished / "images" / "000001.png").read_bytes())  # the same bytes, but not the run's file
    (finished / "images" / "000001.png").unlink()
    (finished / "images" / "000001.png").symlink_to(foreign)
    assert seeds_done(finished, range(4), {"class_label"}, (1, 8, 8)) == [0, 2, 3]  # read without following it
    refused(lambda: run(finished), "000001.png is a symbolic link")
    assert foreign.read_bytes() == (tmp_path / "foreign.png").read_bytes() and (finished / "images" / "000001.png").is_symlink()


# --------------------------------------------------------------------------------------------------
# 7. Done means the bytes the run wrote (the record holds the PNG's sha256).


def test_a_png_replaced_by_a_jpeg_or_another_png_is_sampled_again(finished):
    from PIL import Image

    images_npz = np.load(finished / "images.npz")["images"].copy()
    png = finished / "images" / "000001.png"
    size = len(png.read_bytes())
    jpeg = __import__("io").BytesIO()
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(jpeg, format="JPEG")
    png.write_bytes(jpeg.getvalue().ljust(size, b"\0"))  # same size, named .png, decodes to the right shape
    Image.fromarray(np.full((8, 8), 61, np.uint8)).save(finished / "images" / "000002.png")  # a valid PNG, not ours
    assert seeds_done(finished, range(4), {"class_label"}, (1, 8, 8)) == [0, 3]
    metrics = run(finished)
    assert metrics["num_sampled"] == 2
    assert np.array_equal(np.load(finished / "images.npz")["images"], images_npz)  # regenerated byte for byte


@pytest.mark.parametrize("damage", ["no class_label", "nfe as text", "nfe as a vector", "compressed", "forged header"])
def test_a_record_that_is_not_the_runs_is_sampled_again_never_a_traceback(finished, damage):
    """A record missing class_label or with a malformed nfe left the run stuck with a traceback on every rerun."""
    import io
    import zipfile

    path = finished / "records" / "000002.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    if damage == "no class_label":
        del arrays["class_label"]
    elif damage == "nfe as text":
        arrays["nfe"] = np.str_("three")
    elif damage == "nfe as a vector":
        arrays["nfe"] = np.array([3, 3])
    if damage == "compressed":
        np.savez_compressed(path, **arrays)
    elif damage == "forged header":  # a member whose header declares 16 GB: never allocated
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        header = b"{'descr': '<f8', 'fortran_order': False, 'shape': (2000000000,), }"
        header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
        with zipfile.ZipFile(buffer, "a") as archive:
            archive.writestr("forged.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 64)
        path.write_bytes(buffer.getvalue())
    else:
        np.savez(path, **arrays)
    assert seeds_done(finished, range(4), {"class_label"}, (1, 8, 8)) == [0, 1, 3]
    assert run(finished)["num_sampled"] == 1


# --------------------------------------------------------------------------------------------------
# 8. The edit app follows the same contract: settings check, resume or refusal, no stale files mixed.


def test_edit_checks_settings_and_never_mixes_an_earlier_runs_files(tiny_sd, tmp_path, monkeypatch):
    import bdia.apps.edit as edit

    out = tmp_path / "edit"
    settings = dict(num_steps=2, image_size=32, progress=False) if "progress" in \
        __import__("inspect").signature(edit.edit_run).parameters else dict(num_steps=2, image_size=32)
    edit.edit_run(tiny_sd, out, methods=["bdia", "ddim"], **settings)
    assert {"bdia.png", "bdia_pair.npz", "ddim.png", "ddim_inversion.npz"} <= {p.name for p in out.iterdir()}

    before = snapshot(out)
    refused(lambda: edit.edit_run(tiny_sd, out, methods=["edict"], **settings), "other settings", "methods")
    assert snapshot(out) == before

    monkeypatch.setattr(edit, "invert_and_edit", lambda *a, **k: pytest.fail("redone although finished"))
    again = edit.edit_run(tiny_sd, out, methods=["bdia", "ddim"], **settings)  # the same settings: kept
    assert set(again["methods"]) == {"bdia", "ddim"}
    monkeypatch.undo()

    edit.edit_run(tiny_sd, out, methods=["edict"], resume=False, **settings)
    names = {p.name for p in out.iterdir()}
    assert {"edict.png", "edict_inversion.npz", "metrics.json"} <= names
    assert not names & {"bdia.png", "bdia_pair.npz", "ddim.png", "ddim_inversion.npz"}  # no stale method files
    assert set(json.loads((out / "metrics.json").read_text())["methods"]) == {"edict"}


def test_edit_checks_every_setting_before_loading_the_model_or_claiming_the_folder(tmp_path, monkeypatch):
    import bdia.apps.edit as edit

    out = tmp_path / "edit"
    monkeypatch.setattr(edit, "load_image", lambda *a, **k: pytest.fail("image read before the checks"))
    for bad, needle in ((dict(strength=2.0), "strength"), (dict(gamma=1.5), "gamma"), (dict(p=5), "p (EDICT"),
                        (dict(num_inner_steps=10**9), "num_inner_steps"), (dict(image_size=0), "image_size"),
                        (dict(image_size=10**6), "image_size"), (dict(grid_scale=100000), "grid_scale"),
                        (dict(image="/nonexistent.png"), "no such file"), (dict(methods=[]), "methods")):
        with pytest.raises(ValueError, match=__import__("re").escape(needle)):
            edit.edit_run(object(), out, **bad)  # object(): the model is never touched
        assert not out.exists()


# --------------------------------------------------------------------------------------------------
# Train through the run folder.


def test_train_writes_through_its_run_folder_and_resumes_a_finished_run(tmp_path):
    import torch

    from bdia.apps.train import TrainConfig, train

    config = TrainConfig(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0,
                         batch_size=8, total_images=32, checkpoint_every_images=16, log_every_images=16)
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    out = tmp_path / "train"
    ema, rows = train(images, config, out, progress=False)
    assert json.loads((out / MARKER_FILE).read_text()) == {"app": "train", "format": 2, "state": "complete"}
    assert {"final.safetensors", "training_log.jsonl", "settings.json", "checkpoint-000000016.safetensors"} <= {
        p.name for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    again, rows_again = train(images, config, out, progress=False)  # finished, same settings: nothing retrained
    assert rows_again == rows and snapshot(out) == before | {LOCK_FILE: before[LOCK_FILE]}
    refused(lambda: train(images, TrainConfig(**{**config.__dict__, "lr": 1e-3}), out, progress=False),
            "other settings", "train")
    train(images, TrainConfig(**{**config.__dict__, "total_images": 16}), out, progress=False, resume=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "checkpoint-000000032.safetensors").exists()  # the earlier run's checkpoint is gone


def test_train_out_dir_that_is_a_file_a_dangling_link_or_unwritable_is_one_line(tmp_path, monkeypatch):
    import bdia.runfolder

    target = tmp_path / "a_file"
    target.write_bytes(b"keep")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(bdia.runfolder.os, "access", lambda p, m: False if Path(p) == locked else real_access(p, m))
    for out, needle in ((target, "is a file, not a folder"), (dangling, "symbolic link to nothing"),
                        (locked, "is not writable"), ("null", "out_dir must be a folder path")):
        assert_one_line(cli(monkeypatch, tmp_path, f"out_dir={out}", "progress=false", script=TRAIN), needle)
    assert target.read_bytes() == b"keep" and not (tmp_path / "nowhere").exists() and not list(locked.iterdir())


def test_train_under_a_file_size_limit_ends_in_one_line(tmp_path):
    import resource

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # the marker and settings fit, a checkpoint not

    out = tmp_path / "train"
    result = subprocess.run([sys.executable, str(TRAIN), f"out_dir={out}", "progress=false", "train.total_images=16",
                             "train.batch_size=8", "train.checkpoint_every_images=8", "train.log_every_images=8",
                             "threads=1"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300, preexec_fn=set_limit)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read or write a file"), result.stderr[-2000:]
    assert not list(out.rglob(".*.tmp-*"))


@pytest.mark.parametrize("override, needle", [
    ("train.total_images=0", "train.total_images must be an integer"),
    ("train.total_images=-100", "train.total_images must be an integer"),
    ("train.batch_size=0", "train.batch_size must be an integer"),
    ("train.lr=nan", "train.lr must be a finite number"),
    ("train.model_channels=1000000", "train.model_channels must be an integer in 1..1024"),
    ("train.channel_mult=[]", "train.channel_mult must be a list"),
    ("threads=0", "threads must be an integer"),
    ("image_size=100000", "image_size must be an integer in 8..256"),
    ("train.dropout=2", "train.dropout must be a finite number in [0, 1)"),
    ("train.bogus=1", "train.bogus"),
    ("+train.bogus=1", "unknown train setting(s) ['bogus']"),
    ("+foo=1", "unknown setting 'foo'"),
])
def test_train_settings_end_in_one_line_naming_the_key(tmp_path, monkeypatch, override, needle):
    assert_one_line(cli(monkeypatch, tmp_path, override, f"out_dir={tmp_path}/run", script=TRAIN), needle)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# Evaluate writes only into finished bdia run folders, under the lock.


def test_evaluate_writes_only_into_a_finished_run_folder_it_has_locked(finished, tmp_path):
    from bdia.metrics.evaluate import evaluate_run

    metric = {"count": lambda images, run_dir=None: {"n": len(images)}}
    evaluate_run(finished, metric)
    assert json.loads((finished / "metrics.json").read_text())["evaluation"]["count"]["n"] == 4

    with open_run(finished, "sample", None):  # a run is writing there
        before = snapshot(finished)
        refused(lambda: evaluate_run(finished, metric), "in use by a sample run")
        assert snapshot(finished) == before
    (finished / MARKER_FILE).write_text(json.dumps({"app": "sample", "format": 2, "state": "running"}))
    refused(lambda: evaluate_run(finished, metric), "has not finished")
    (finished / MARKER_FILE).unlink()
    before = snapshot(finished)
    refused(lambda: evaluate_run(finished, metric), "no bdia run marker", "write=false")
    assert evaluate_run(finished, metric, write=False)["count"]["n"] == 4 and snapshot(finished) == before


# --------------------------------------------------------------------------------------------------
# Resource bounds checked before the work that would need them.


def test_a_huge_grid_is_refused_before_any_sampling(tmp_path, monkeypatch):
    import bdia.apps.sample

    monkeypatch.setattr(bdia.apps.sample._solvers, "sample", lambda *a, **k: pytest.fail("sampled first"))
    with pytest.raises(ValueError, match="the image grid of 5000 images .* GiB, more than the 1 GiB allowed"):
        run(tmp_path / "grid", seeds="0-4999", grid_scale=64, grid_padding=1024)
    assert not (tmp_path / "grid").exists()


def test_out_of_memory_advice_names_only_settings_the_app_has():
    from omegaconf import OmegaConf

    from bdia.apps.cli import _memory_advice

    with hydra_configs("edit"):
        edit_cfg = compose("model=tiny-sd", app="edit")
    with hydra_configs("sample"):
        sample_cfg = compose()
    assert _memory_advice(edit_cfg) == "; lower image_size"
    assert _memory_advice(sample_cfg) == "; lower batch_size or network_batch"
    assert _memory_advice(OmegaConf.create({"train": {"batch_size": 8}})) == "; lower train.batch_size"


def test_ctrl_c_ends_in_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    import bdia.apps.sample

    original = bdia.apps.sample._solvers.sample
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what SIGINT raises in the main thread
        return original(*args, **kwargs)

    monkeypatch.setattr(bdia.apps.sample._solvers, "sample", interrupted)
    args = ["dataset=digits", "seeds=0-3", "batch_size=2", "solver.num_steps=2", "progress=false", f"out_dir={tmp_path}/r"]
    assert cli(monkeypatch, tmp_path, *args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "interrupted; rerun the same command to resume" and not any("Traceback" in line for line in err)
    monkeypatch.setattr(bdia.apps.sample._solvers, "sample", original)
    assert cli(monkeypatch, tmp_path, *args) is None
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["num_resumed"] == 2
