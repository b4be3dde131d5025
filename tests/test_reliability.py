"""Reliability of every script (docs/bad-input.md): no input is ever lost, no temporary output survives,
every failure is one line ``error: <file>: <problem>`` with exit status 2.

One section per class of failure:

1. an output may not be, contain or lie inside an input; ``--overwrite`` replaces an old output only
   once the new one is complete, and a failed run leaves no skeleton;
2. SIGTERM / SIGHUP clean up like Ctrl-C; a SIGKILL's leftovers are removed by the next run and never
   read by anyone;
3. operating-system errors (not a folder, is a folder, permission, full disk) are one line naming the path;
4. bad values (NaN / inf voxels or slices, huge intensities, values outside [-1, 1], wrong or empty
   arrays) follow one documented rule each;
5. ``prepare_data.py --size`` follows train.py's rule.  (Metadata/slice mismatches and missing ground
   truth: tests/test_mms_training.py, which has a trained run.)
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, List, Sequence

import nibabel as nib
import numpy as np
import pytest
import torch

import generate_volumes
import prepare_data
import save_global_model
from MultiMedSeg import inference as inference_cli
from MultiMedSeg import preprocess as preprocess_cli
from MultiMedSeg import pretrain as pretrain_cli
from MultiMedSeg import train as train_cli
from builders import tiny_generator_file
from robustmedseg.data.slices import list_slices, load_slice, save_slice
from robustmedseg.errors import InputError, run_cli
from robustmedseg import io as rio

REPO = Path(__file__).resolve().parents[1]
TINY = ["--encoder_depth", "10", "--encoder_base_channels", "8", "--encoder_input_size", "32",
        "--latent_avg_samples", "64", "--batch_size", "4", "--test_batch_size", "8", "--board_interval", "100",
        "--image_interval", "100", "--lpips_lambda", "0", "--device", "cpu"]


# ------------------------------------------------------------------------------------------------ helpers
def cli_error(capsys, main: Callable, argv: Sequence[str]) -> str:
    """Run a script's main through run_cli in-process: exit 2 and exactly one ``error:`` line; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(main, list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2, err
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    return errors[0]


def hidden(folder: Path) -> List[str]:
    """Hidden entries anywhere below ``folder`` (temporaries are hidden)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_generator(path: Path) -> Path:
    return tiny_generator_file(path)


def slice_site(folder: Path, n: int = 2, size: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for z in range(n):
        save_slice(folder / f"v_slice{z:03d}.npz", rng.uniform(-1, 1, (size, size, 1)).astype(np.float32))
    return folder


def child(code: str, **kw) -> subprocess.Popen:
    """A Python child running ``code`` from the repository (stdout/stderr piped)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory) -> Path:
    return write_generator(tmp_path_factory.mktemp("gen") / "final_global_model.pt")


# ================================================================ 1. outputs apart from inputs, replace on completion
def test_check_apart_equal_contains_inside_and_symlink(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(data)
    for out, how in ((data, "is"), (tmp_path, "contains"), (data / "sub" / "out", "lies inside"),
                     (tmp_path / "link" / "out", "lies inside")):
        with pytest.raises(InputError, match=f"--out {how} the input --in"):
            rio.check_apart({"--out": out}, {"--in": data})
    rio.check_apart({"--out": tmp_path / "elsewhere"}, {"--in": data, "--none": None})


def test_preprocess_out_containing_images_is_refused_with_overwrite(phantom_dir, tmp_path, capsys):
    site = tmp_path / "site"
    shutil.copytree(phantom_dir / "site0", site)
    before = snapshot(site)
    err = cli_error(capsys, preprocess_cli.main, ["--images", str(site / "images"), "--labels", str(site / "labels"),
                                                  "--out", str(site), "--overwrite", "--size", "32"])
    assert str(site) in err and "contains the input --images" in err
    assert snapshot(site) == before
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    err = cli_error(capsys, preprocess_cli.main, ["--convert-legacy", str(legacy), str(legacy / "npz"), "--overwrite"])
    assert "DST lies inside the input SRC" in err


def test_generate_volumes_out_dir_equal_to_ckpt_dir_is_refused(tmp_path, capsys):
    run = tmp_path / "pretrain"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.json").write_text("[]")
    err = cli_error(capsys, generate_volumes.main, ["--ckpt_dir", str(run), "--out_dir", str(run), "--overwrite",
                                                    "--label", "0", "--n_volumes", "1", "--slices_in_one_z", "1",
                                                    "--n_segmentation_labels", "3"])
    assert "--out_dir is the input --checkpoint_dir" in err
    assert (run / "checkpoints" / "best.json").read_text() == "[]"


def test_phase2_exp_dir_apart_from_every_input(preprocessed_sites, generator_file, tmp_path, capsys):
    site0, site2 = preprocessed_sites[0], preprocessed_sites[2]
    pre = tmp_path / "pretrain"
    (pre / "checkpoints").mkdir(parents=True)
    (pre / "opt.json").write_text("{}")
    err = cli_error(capsys, train_cli.main, ["--exp_dir", str(pre), "--overwrite", "--checkpoint_dir", str(pre),
                                             "--source_data", str(site0), "--target_data", str(site2),
                                             "--src_label", "0", "--tgt_label", "2", *TINY])
    assert "--exp_dir is the input --checkpoint_dir" in err
    err = cli_error(capsys, inference_cli.main, ["--exp_dir", str(site2), "--overwrite", "--checkpoint_dir", str(pre),
                                                 "--target_data", str(site2)])
    assert "--exp_dir is the input --target_data" in err
    err = cli_error(capsys, pretrain_cli.main, ["--exp_dir", str(site0 / "run"), "--source_data", str(site0),
                                                "--stylegan_weights", str(generator_file), "--src_label", "0", *TINY])
    assert "--exp_dir lies inside the input --source_data" in err
    assert (pre / "opt.json").is_file() and (site2 / "metadata.json").is_file() and not (site0 / "run").exists()


def test_save_global_model_out_inside_breakpoint_is_refused(tmp_path, capsys):
    bkpt = tmp_path / "breakpoint_0001"
    bkpt.mkdir()
    err = cli_error(capsys, save_global_model.main, ["--breakpoint", str(bkpt), "--out", str(bkpt / "g.pt")])
    assert "--out lies inside the input --breakpoint" in err


def _pretrain_argv(exp: Path, site0: Path, gen: Path, *extra: str) -> List[str]:
    return ["--exp_dir", str(exp), "--source_data", str(site0), "--stylegan_weights", str(gen), "--src_label", "0",
            "--max_steps", "2", "--val_interval", "2", *TINY, *extra]


def test_pretrain_overwrite_keeps_the_old_run_until_the_new_one_completes(preprocessed_sites, generator_file,
                                                                          tmp_path, capsys, monkeypatch):
    from MultiMedSeg.training.coach import Coach

    exp = tmp_path / "runs" / "pretrain"
    (exp / "checkpoints").mkdir(parents=True)
    (exp / "opt.json").write_text('{"old": true}')
    before = snapshot(exp)

    def corrupt_validation(self):
        raise InputError("corrupt validation slice", "val/x_slice000.npz")

    monkeypatch.setattr(Coach, "validate", corrupt_validation)
    err = cli_error(capsys, pretrain_cli.main, _pretrain_argv(exp, preprocessed_sites[0], generator_file,
                                                              "--overwrite"))
    assert "corrupt validation slice" in err
    assert snapshot(exp) == before and hidden(tmp_path) == []  # old run intact, no temporary left
    monkeypatch.undo()
    assert pretrain_cli.main(_pretrain_argv(exp, preprocessed_sites[0], generator_file, "--overwrite")) == 0
    assert json.loads((exp / "opt.json").read_text()).get("old") is None
    assert (exp / "checkpoints" / "last.pt").is_file() and hidden(tmp_path) == []


def test_failed_new_run_leaves_no_skeleton_and_interrupted_one_stays_resumable(preprocessed_sites, generator_file,
                                                                               tmp_path, capsys, monkeypatch):
    from MultiMedSeg.training.coach import Coach

    exp = tmp_path / "pretrain"
    original = Coach.train_step

    def failing_step(self, batch):
        if self.global_step == 1:
            raise InputError("bad batch", "x_slice001.npz")
        return original(self, batch)

    monkeypatch.setattr(Coach, "train_step", failing_step)
    cli_error(capsys, pretrain_cli.main, _pretrain_argv(exp, preprocessed_sites[0], generator_file))
    assert not exp.exists() and hidden(tmp_path) == []  # the rerun is not blocked

    def interrupted_step(self, batch):
        if self.global_step == 1:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Coach, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        pretrain_cli.main(_pretrain_argv(exp, preprocessed_sites[0], generator_file))
    assert torch.load(exp / "checkpoints" / "last.pt", weights_only=True)["global_step"] == 1
    monkeypatch.undo()
    assert pretrain_cli.main(["--resume", *_pretrain_argv(exp, preprocessed_sites[0], generator_file)]) == 0


# ================================================================ 2. signals, stale temporaries, readers
SLOW_PREPARE = """
    import sys, time
    import robustmedseg.data.lmdb_store as store
    from robustmedseg.errors import run_cli
    import prepare_data
    original = store._load_one
    def slow(item, **kw):
        if item[0] == 1:
            print("writing", flush=True)
            time.sleep(60)
        return original(item, **kw)
    store._load_one = slow
    run_cli(prepare_data.main, sys.argv[1:])
"""


def _start_slow_prepare(src: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SLOW_PREPARE), str(src), "--out", str(out),
                             "--size", "32", "--label", "0", "--clip-model", "none", "--quiet"], cwd=REPO, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_remove_the_temporary_output(tmp_path, sig):
    src = slice_site(tmp_path / "site", n=3)
    proc = _start_slow_prepare(src, tmp_path / "lmdb")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".lmdb.rmstmp-new-")]  # mid-write
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and err.strip() == f"interrupted ({signal.Signals(sig).name})"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_sigkill_leftovers_are_removed_by_the_next_run_and_never_read(tmp_path):
    data = tmp_path / "data"
    src = slice_site(data / "site", n=3)
    out = tmp_path / "lmdb"
    proc = _start_slow_prepare(src, out)
    proc.kill()
    proc.communicate(timeout=60)
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.startswith(".lmdb.rmstmp-new-")]
    # a reader never picks up a temporary: a hidden folder of slices is not part of a slice folder
    shutil.copytree(src, data / ".site.rmstmp-new-000000-1-abc")
    assert [p.name for p in list_slices(data, recursive=True)] == [p.name for p in list_slices(src)]
    meta = prepare_data.main([str(data), "--recursive", "--out", str(out), "--size", "32", "--label", "0",
                              "--clip-model", "none", "--quiet"])
    assert meta == 0 and not leftover.exists()
    assert json.loads((out / "meta.json").read_text())["length"] == 3


def test_stale_temporaries_of_dead_processes_only(tmp_path):
    target = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    mine = rio.temp_sibling(target)
    stale = Path(str(rio.temp_sibling(target)).replace(f"-{os.getpid()}-", f"-{dead_pid}-"))
    old = Path(str(rio.temp_sibling(target, "old")).replace(f"-{os.getpid()}-", f"-{dead_pid}-"))
    other = tmp_path / ".other.rmstmp-new-000000-1-abc"
    for folder in (mine, stale, old, other):
        folder.mkdir()
    (old / "result.txt").write_text("previous output")
    rio.clean_stale_temporaries(target)  # the final path is missing: the set-aside old output comes back
    assert (target / "result.txt").read_text() == "previous output"
    assert mine.exists() and other.exists() and not stale.exists() and not old.exists()


def test_preprocess_ignores_hidden_folders(phantom_dir, tmp_path):
    from MultiMedSeg.data.volumes_to_slices import find_images

    images = tmp_path / "images"
    shutil.copytree(phantom_dir / "site0" / "images", images)
    shutil.copytree(images, images / ".out.rmstmp-new-000000-1-abc")
    assert [p.name for p in find_images(images)] == sorted(p.name for p in images.glob("*.nii.gz"))


# ================================================================ 3. operating-system errors
def test_output_below_a_regular_file(tmp_path, phantom_dir, capsys):
    src = slice_site(tmp_path / "site")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = cli_error(capsys, prepare_data.main, [str(src), "--out", str(blocker / "lmdb"), "--size", "32",
                                                "--label", "0", "--clip-model", "none"])
    assert err == f"error: {blocker / 'lmdb'}: cannot create it: {blocker} is a file, not a folder"
    err = cli_error(capsys, preprocess_cli.main, ["--images", str(phantom_dir / "site0" / "images"), "--out",
                                                  str(blocker / "prep"), "--size", "32", "--quiet"])
    assert "is a file, not a folder" in err and "already exists" not in err


def test_folder_where_a_file_is_expected(tmp_path, preprocessed_sites, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    err = cli_error(capsys, save_global_model.main, ["--breakpoint", str(tmp_path / "nope"), "--out", str(folder)])
    assert err == f"error: {folder}: is a folder; --out takes the path of the file to write"
    err = cli_error(capsys, pretrain_cli.main, ["--exp_dir", str(tmp_path / "run"), "--source_data",
                                                str(preprocessed_sites[0]), "--stylegan_weights", str(folder),
                                                "--src_label", "0", *TINY])
    assert str(folder) in err and "is a folder" in err
    with pytest.raises(InputError, match="is a folder"):
        with rio.atomic_path(folder):
            pass


def test_run_cli_turns_os_errors_into_one_line(capsys):
    def main(argv):
        raise PermissionError(13, "Permission denied", "/some/output")

    assert cli_error(capsys, main, []) == "error: /some/output: Permission denied"


def test_full_disk_names_the_final_output(tmp_path):
    """write(2) reports a full disk (ENOSPC, here EFBIG under a file-size limit) without a file name."""
    target = tmp_path / "out.bin"
    with pytest.raises(OSError) as info:
        with rio.atomic_path(target) as tmp:
            with open(tmp, "wb"):
                raise OSError(28, "No space left on device")
    assert info.value.filename == str(target) and not target.exists() and hidden(tmp_path) == []
    with pytest.raises(OSError) as info:
        with rio.atomic_dir(tmp_path / "folder") as tmp:
            raise OSError(28, "No space left on device", str(tmp / "a" / "b.npz"))
    assert info.value.filename == str(tmp_path / "folder" / "a" / "b.npz") and hidden(tmp_path) == []


@pytest.mark.parametrize("script", ["prepare_data", "preprocess"])
def test_file_size_limit_is_one_line_and_leaves_nothing(tmp_path, phantom_dir, script):
    out = tmp_path / "out"
    if script == "prepare_data":
        src = slice_site(tmp_path / "site", n=40, size=64)
        argv = ["prepare_data.py", str(src), "--out", str(out), "--size", "64", "--label", "0", "--clip-model",
                "none", "--quiet"]
    else:
        argv = ["-m", "MultiMedSeg.preprocess", "--images", str(phantom_dir / "site0" / "images"), "--out", str(out),
                "--size", "64", "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # noqa: E731
    res = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                         preexec_fn=limit, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {out}"), res.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_output_folder(tmp_path, capsys):
    src = slice_site(tmp_path / "site")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        err = cli_error(capsys, prepare_data.main, [str(src), "--out", str(locked / "lmdb"), "--size", "32",
                                                    "--label", "0", "--clip-model", "none"])
        assert err.startswith(f"error: {locked / 'lmdb'}") and "Permission denied" in err
    finally:
        locked.chmod(0o700)


# ================================================================ 4. bad values
def _nifti_site(phantom_dir: Path, folder: Path, edit_image=None, edit_label=None) -> Path:
    """A copy of phantom site 0, with image / label arrays of sub-000 edited."""
    shutil.copytree(phantom_dir / "site0", folder)
    for kind, edit in (("images", edit_image), ("labels", edit_label)):
        if edit is None:
            continue
        path = folder / kind / "sub-000.nii.gz"
        img = nib.load(str(path))
        data = edit(np.asarray(img.get_fdata(), dtype=np.float32))
        nib.save(nib.Nifti1Image(data, img.affine), str(path))
    return folder


def _prep_argv(site: Path, out: Path) -> List[str]:
    return ["--images", str(site / "images"), "--labels", str(site / "labels"), "--out", str(out), "--size", "32",
            "--quiet", "--val-frac", "0.25", "--test-frac", "0.25"]


def _all_slices(out: Path) -> dict:
    return {p.name: load_slice(p)["data"] for p in sorted(out.rglob("*.npz"))}


def test_nan_and_inf_voxels_are_repaired_with_a_counted_warning(phantom_dir, tmp_path, capsys):
    def poke(a):
        a[0, 0, 0], a[1, 0, 0], a[2, 0, 0] = np.nan, np.inf, -np.inf
        return a

    site = _nifti_site(phantom_dir, tmp_path / "site", edit_image=poke)
    assert preprocess_cli.main(_prep_argv(site, tmp_path / "out")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    image = np.asarray(nib.load(str(site / "images" / "sub-000.nii.gz")).get_fdata(), dtype=np.float32)
    smallest = float(image[np.isfinite(image)].min())
    assert err == [f"warning: {(site / 'images' / 'sub-000.nii.gz').resolve()}: 3 of {image.size} voxel(s) are NaN "
                   f"or inf: set to the volume's smallest finite value {smallest:.6g}"]
    assert all(np.isfinite(d).all() for d in _all_slices(tmp_path / "out").values())


def test_nan_labels_are_refused(phantom_dir, tmp_path, capsys):
    def poke(a):
        a[5, 5, 5] = np.nan
        return a

    site = _nifti_site(phantom_dir, tmp_path / "site", edit_label=poke)
    err = cli_error(capsys, preprocess_cli.main, _prep_argv(site, tmp_path / "out"))
    assert err == (f"error: {site / 'labels' / 'sub-000.nii.gz'}: label volume has 1 of {33 * 39 * 32} voxel(s) "
                   "that are NaN or inf")
    assert not (tmp_path / "out").exists()


def test_huge_intensities_standardise_in_float64(phantom_dir, tmp_path):
    """(x - mean) / std is scale invariant: the image times 1e38 must give the same slices, never NaN."""
    site = _nifti_site(phantom_dir, tmp_path / "site", edit_image=lambda a: a * np.float32(3e38 / a.max()))
    assert preprocess_cli.main(_prep_argv(site, tmp_path / "big")) == 0
    assert preprocess_cli.main(_prep_argv(phantom_dir / "site0", tmp_path / "ref")) == 0
    big, ref = _all_slices(tmp_path / "big"), _all_slices(tmp_path / "ref")
    assert big.keys() == ref.keys()
    assert max(float(np.abs(big[k] - ref[k]).max()) for k in ref) < 1e-3


def test_empty_volume_is_refused(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((0, 4, 4), np.float32), np.eye(4)), str(tmp_path / "images" / "a.nii.gz"))
    err = cli_error(capsys, preprocess_cli.main, ["--images", str(tmp_path / "images"), "--out", str(tmp_path / "o")])
    assert err == f"error: {(tmp_path / 'images' / 'a.nii.gz').resolve()}: empty volume (shape (0, 4, 4))"


@pytest.mark.parametrize("case, message", [
    ("range", r"'data' values must lie in \[-1, 1\], found \[-0\.\d+, 1\.5\]"),
    ("nan", r"'data' has 1 non-finite value\(s\) \(NaN or inf\)"),
    ("npy", r"not an .npz archive"),
    ("empty", r"'data' is empty \(shape \(0, 0, 1\)\)"),
])
def test_bad_slice_files_are_refused_by_every_reader(tmp_path, case, message, preprocessed_sites, generator_file,
                                                     capsys):
    src = tmp_path / "site" / "train"
    shutil.copytree(preprocessed_sites[0] / "train", src)
    shutil.copytree(preprocessed_sites[0] / "val", tmp_path / "site" / "val")
    bad = sorted(src.glob("*.npz"))[1]
    data = load_slice(bad)["data"]
    if case == "range":
        data[0, 0, 0] = 1.5
    elif case == "nan":
        data[0, 0, 0] = np.nan
    elif case == "empty":
        data = np.zeros((0, 0, 1), np.float32)
    if case == "npy":
        with open(bad, "wb") as fh:
            np.save(fh, data)
    else:
        np.savez(bad, data=data)
    with pytest.raises(InputError, match=message):
        load_slice(bad)
    err = cli_error(capsys, prepare_data.main, [str(src), "--out", str(tmp_path / "lmdb"), "--size", "32",
                                                "--label", "0", "--clip-model", "none", "--quiet"])
    assert str(bad) in err
    err = cli_error(capsys, pretrain_cli.main, _pretrain_argv(tmp_path / "run", tmp_path / "site", generator_file))
    assert str(bad) in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "lmdb").exists() and hidden(tmp_path) == []


def test_dataloader_worker_errors_keep_the_one_line(tmp_path):
    from torch.utils.data import DataLoader, Dataset

    class Bad(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise InputError("'data' has 1 non-finite value(s)", "/data/x_slice000.npz")

    with pytest.raises(InputError) as info:
        next(iter(DataLoader(Bad(), num_workers=1)))
    assert str(info.value) == "/data/x_slice000.npz: 'data' has 1 non-finite value(s)"


def test_checkpoint_with_nan_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"w": torch.tensor([1.0, float("nan")])}, "step": 3}, path)
    with pytest.raises(InputError, match=r"holds NaN or inf values \(in state_dict.w\)"):
        rio.load_torch_file(path, "checkpoint")


# ================================================================ 5. prepare_data --size follows train.py's rule
@pytest.mark.parametrize("size", ["33", "8", "2048"])
def test_prepare_data_refuses_sizes_train_would_refuse(tmp_path, capsys, size):
    from robustmedseg.factory.config import FactoryConfig

    with pytest.raises(ValueError, match="power of two"):
        FactoryConfig(size=int(size)).validate()
    src = slice_site(tmp_path / "site")
    err = cli_error(capsys, prepare_data.main, [str(src), "--out", str(tmp_path / "lmdb"), "--size", size,
                                                "--resample", "area", "--label", "0", "--clip-model", "none"])
    assert f"--size {size}: size must be a power of two in [16, 1024]" in err
    assert not (tmp_path / "lmdb").exists()


# ================================================================ 6. phase-1 failures: one line naming the file or the node
def _fake_breakpoint(root: Path) -> Path:
    """A researcher component with one experiment and one breakpoint (JSON state + parameter files),
    as Fed-BioMed 6.4.1 lays them out; the parameters are a real factory state dict."""
    from fedbiomed.common.serializer import Serializer

    from robustmedseg.factory.config import FactoryConfig
    from robustmedseg.factory.network import FactoryModel

    cfg = FactoryConfig(size=16, style_dim=8, n_mlp=1, n_zbins=3, clip_dim=4, channel_cap=4, run_id="r1")
    folder = root / "var" / "experiments" / "Experiment_0000" / "breakpoint_0001"
    folder.mkdir(parents=True)
    weights = folder / "model_params_1.mpk"
    Serializer.dump({k: v.numpy() for k, v in FactoryModel(cfg).state_dict().items()}, str(weights))
    aggregated = folder / "aggregated_params_1.mpk"
    Serializer.dump({"a": 1}, str(aggregated))
    (root / "etc").mkdir()
    (folder / "breakpoint_0001.json").write_text(json.dumps({
        "id": "exper_1", "round_current": 1, "model_args": cfg.to_model_args(), "model_weights_path": str(weights),
        "aggregated_params": {"0": {"params_path": str(aggregated)}}}))
    return folder


def test_train_resume_refuses_a_missing_or_damaged_breakpoint_in_one_line(tmp_path, capsys):
    import train

    err = cli_error(capsys, train.main, ["--researcher-dir", str(tmp_path / "none"), "--resume"])
    assert err == f"error: {tmp_path / 'none'}: researcher component folder not found (nothing to resume or export)"
    assert not (tmp_path / "none").exists()  # nothing created
    (tmp_path / "empty" / "var" / "experiments" / "Experiment_0000").mkdir(parents=True)  # an experiment, no round
    err = cli_error(capsys, train.main, ["--researcher-dir", str(tmp_path / "empty"), "--resume"])
    assert "no breakpoint in this researcher component" in err
    root = tmp_path / "res"
    folder = _fake_breakpoint(root)
    state = folder / "breakpoint_0001.json"
    text = state.read_text()
    state.write_text(text[:-5])  # corrupt JSON
    err = cli_error(capsys, train.main, ["--researcher-dir", str(root), "--resume"])
    assert err.startswith(f"error: {state}: cannot read breakpoint state")
    state.write_text(text)
    for name in ("model_params_1.mpk", "aggregated_params_1.mpk"):  # truncated parameter files
        path = folder / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        err = cli_error(capsys, train.main, ["--researcher-dir", str(root), "--resume", str(folder)])
        assert err.startswith(f"error: {path}: cannot read breakpoint") and "truncated" in err
        path.write_bytes(data)


def test_train_refuses_a_folder_without_a_researcher_component_at_once(tmp_path, capsys):
    """#22: a mistyped --researcher-dir is one line naming it, before Fed-BioMed creates anything there
    and before any wait for nodes; an existing folder without a component likewise."""
    import train

    start = time.monotonic()
    err = cli_error(capsys, train.main, ["--researcher-dir", str(tmp_path / "typo"), "--wait-nodes", "120"])
    assert err.startswith(f"error: {tmp_path / 'typo'}: not a Fed-BioMed researcher component (no such folder)")
    assert "--create_researcher_dir" in err and not (tmp_path / "typo").exists()
    (tmp_path / "plain").mkdir()
    err = cli_error(capsys, train.main, ["--researcher-dir", str(tmp_path / "plain")])
    assert "(no etc/config.ini in it)" in err and not any((tmp_path / "plain").iterdir())
    assert time.monotonic() - start < 20  # no wait for nodes


@pytest.mark.slow
def test_train_creates_a_missing_researcher_component_only_when_asked_and_says_so(tmp_path):
    """#22: --create-researcher-dir lets Fed-BioMed create the component (~25 s: its gRPC server waits for
    nodes before giving up), and the run says so before it waits for the nodes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FBM_")}
    env["PYTHONPATH"] = str(REPO)
    run = subprocess.run([sys.executable, str(REPO / "train.py"), "--researcher-dir", str(tmp_path / "new"),
                          "--create-researcher-dir", "--wait-nodes", "1", "--workdir", str(tmp_path / "w")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert f"created a new Fed-BioMed researcher component in {tmp_path / 'new'}" in run.stdout
    assert (tmp_path / "new" / "etc" / "config.ini").is_file() and not (tmp_path / "w").exists()
    assert run.stderr.strip().splitlines()[-1].startswith("error: waited 1 s for 1 nodes but 0 answered")


def test_the_wait_for_nodes_shows_progress_then_names_what_is_missing():
    from robustmedseg.federation.researcher import FederationError, await_nodes

    now = [0.0]
    lines: List[str] = []
    answers = iter([[]] * 12 + [["NODE_a"]] * 100)  # one ping a second: NODE_a from t = 12 s

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(FederationError) as err:
        await_nodes(lambda: next(answers), 2, timeout=25, report_every=10, where="researcher component R",
                    hint="node logs: x.log", clock=lambda: now[0], sleep=sleep, report=lines.append)
    assert lines == ["waiting for nodes: 0 of 2 answered (none yet), 15 s left",
                     "waiting for nodes: 1 of 2 answered (NODE_a), 5 s left"]
    assert str(err.value) == ("waited 25 s for 2 nodes but 1 answered (NODE_a): check that the nodes run and use "
                              "this researcher's address (researcher component R); node logs: x.log")
    now[0] = 0.0
    assert await_nodes(lambda: ["NODE_b", "NODE_a"], 2, clock=lambda: now[0], sleep=sleep,
                       report=lines.append) == ["NODE_a", "NODE_b"]


def test_researcher_failures_follow_run_cli_policy(capsys):
    """One policy: Fed-BioMed's own errors become one FederationError line (with the clean-up note),
    bad input passes unchanged, an interruption prints the note and stays an interruption."""
    from robustmedseg.federation.researcher import FederationError, reported_failures

    class FedbiomedSomethingError(Exception):
        pass

    def boom(exc: BaseException) -> None:
        with reported_failures(lambda: "the experiment folder of this run was removed"):
            raise exc

    with pytest.raises(FederationError) as err:
        boom(FedbiomedSomethingError("FB600: no\n reply"))
    assert str(err.value) == ("Fed-BioMed: FedbiomedSomethingError: FB600: no reply (the experiment folder of this "
                              "run was removed)")
    with pytest.raises(FederationError, match=r"^round 2 failed, node a: gone \(the experiment"):
        boom(FederationError("round 2 failed, node a: gone"))
    with pytest.raises(InputError, match="bad flag") as err:
        boom(InputError("bad flag"))
    assert not isinstance(err.value, FederationError)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        boom(KeyboardInterrupt())
    assert capsys.readouterr().err == "the experiment folder of this run was removed\n"


def test_save_global_model_on_a_truncated_breakpoint_and_good_one(tmp_path, capsys):
    folder = _fake_breakpoint(tmp_path / "res")
    out = tmp_path / "final.pt"
    assert save_global_model.main(["--breakpoint", str(folder), "--out", str(out)]) == 0
    assert torch.load(out, weights_only=True)["args"]["size"] == 16
    weights = folder / "model_params_1.mpk"
    weights.write_bytes(weights.read_bytes()[:3000])
    err = cli_error(capsys, save_global_model.main, ["--researcher-dir", str(tmp_path / "res"), "--out",
                                                     str(tmp_path / "again.pt")])
    assert err.startswith(f"error: {weights}: cannot read breakpoint parameters (truncated or corrupt file?")
    assert not (tmp_path / "again.pt").exists() and hidden(tmp_path) == []


def test_save_global_model_into_a_folder_it_may_not_write(tmp_path, capsys):
    """Issue 22: torch's serializer raised ``RuntimeError: ... open file failed ... Operation not permitted``
    (a traceback, exit 1). An immutable folder (chattr +i, refused even to root) stands for any folder
    the user may not write in."""
    folder = _fake_breakpoint(tmp_path / "res")
    locked = tmp_path / "locked"
    locked.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(locked)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("chattr +i not possible here (needs root and a file system with attributes)")
    try:
        out = locked / "final.pt"
        err = cli_error(capsys, save_global_model.main, ["--breakpoint", str(folder), "--out", str(out)])
        assert err == f"error: {out}: Operation not permitted"
        assert list(locked.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_a_node_error_message_replaces_no_reply():
    from robustmedseg.federation.strategy import NO_REPLY, NodeFailureError

    err = NodeFailureError(0, {"NODE_a": NO_REPLY, "NODE_b": "training failed on the node: boom"})
    err.add_node_errors({"NODE_a": "FB313: dataset not found"})
    assert err.reasons == {"NODE_a": "the node answered with an error: FB313: dataset not found",
                           "NODE_b": "training failed on the node: boom"}
    assert "FB313: dataset not found" in str(err)


# ================================================================ 7. security defaults
def test_run_id_cannot_name_a_path():
    from robustmedseg.factory.config import FactoryConfig
    from robustmedseg.factory.state import run_dir

    for bad in ("..", ".", "../x", "a/b", "", "x" * 65, ".hidden"):
        with pytest.raises(ValueError, match="run_id"):
            FactoryConfig.from_model_args({"run_id": bad})
    root = Path("/node/state")
    for hostile in ("..", ".", "../..", "a/../../b", "/etc"):  # a node does not trust model_args
        path = run_dir(hostile, "..", root)
        assert path.parent.parent == root and ".." not in path.parts


def test_best_index_entries_stay_in_the_checkpoint_folder(tmp_path):
    from MultiMedSeg import checkpoints as ck

    for name in ("../outside.pt", "sub/x.pt", "/abs/x.pt", "..pt", ".hidden.pt", "x.pth"):
        (tmp_path / ck.INDEX_NAME).write_text(json.dumps([{"file": name, "score": 0.5, "step": 1}]))
        with pytest.raises(InputError, match="not a checkpoint file of this folder"):
            ck.BestIndex.load(tmp_path)
    (tmp_path / ck.INDEX_NAME).write_text(json.dumps([{"file": "best_step0000001.pt", "score": 0.5, "step": 1}]))
    assert ck.BestIndex.load(tmp_path).entries[0].file == "best_step0000001.pt"


def test_prune_keeps_only_the_plan_copies_and_replies_the_kept_breakpoints_use(tmp_path):
    from robustmedseg.federation.researcher import prune_experiment

    exp_dir = tmp_path / "Experiment_0000"
    exp_dir.mkdir()
    plans = []
    for r in range(4):  # Fed-BioMed: one plan copy per breakpoint, linked from it, plus node replies
        plan = exp_dir / f"model_{r}abc.py"
        plan.write_text("class Plan:\n    pass\n")
        (exp_dir / f"params_NODE_{r}.mpk").write_bytes(b"x")
        bk = exp_dir / f"breakpoint_{r:04d}"
        bk.mkdir()
        (bk / f"model_{r:04d}.py").symlink_to(Path("..") / plan.name)
        (bk / f"breakpoint_{r:04d}.json").write_text(json.dumps({"p": str(exp_dir / f"params_NODE_{r}.mpk")}))
        plans.append(plan)
    (exp_dir / "model_unused.py").write_text("x = 1\n")  # the copy of a creation or of a failed round

    class Exp:
        def experimentation_path(self):
            return str(exp_dir)

        def training_plan(self):
            return object()

    prune_experiment(Exp(), keep=1)
    assert sorted(p.name for p in exp_dir.iterdir()) == ["breakpoint_0003", "model_3abc.py", "params_NODE_3.mpk"]
    assert (exp_dir / "breakpoint_0003" / "model_0003.py").read_text().startswith("class Plan")


def test_local_federation_turns_plan_approval_on(tmp_path):
    import configparser

    from robustmedseg.federation.local import plan_source, set_node_security

    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "config.ini").write_text("[default]\nid = NODE_x\n\n[security]\ntraining_plan_approval = False\n"
                                    "allow_default_training_plans = True\n")
    set_node_security(tmp_path, training_plan_approval=True)
    cfg = configparser.ConfigParser()
    cfg.read(etc / "config.ini")
    assert cfg["security"]["training_plan_approval"] == "True"
    assert cfg["security"]["allow_default_training_plans"] == "False"
    source = plan_source()  # what Fed-BioMed ships and hashes: the dependencies and the plan class
    assert "class FactoryTrainingPlan(TorchTrainingPlan):" in source and "from robustmedseg" in source


# ================================================================ every script follows the policy
def test_every_script_runs_through_run_cli():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True).stdout.split()
    scripts = [f for f in files if not f.startswith(("tests/", "tools/"))  # tools/: developer tools, not the CLI
               and 'if __name__ == "__main__"' in (REPO / f).read_text()]
    assert len(scripts) >= 12
    for script in scripts:
        text = (REPO / script).read_text()
        block = text.split('if __name__ == "__main__":')[1]
        assert "run_cli(main)" in block or ("cli()" in block and "run_cli(main, argv)" in text), script
