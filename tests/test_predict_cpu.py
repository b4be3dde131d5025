"""predict.py on a CPU (issue 23, target 4): members traded for time (``--ensemble_size K``), the
progress bar over every scan, the inter passes skipped when their weight is 0 (same output), and the
paper-scale benchmark's code (``bench/bench_predict.py``) on the tiny configuration.  No timing is asserted.

Uses the ``runs`` fixture of conftest.py (tiny pretraining and adaptation runs; the adaptation kept 2 best
checkpoints).
"""
from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from builders import exit_message, read_labels, run_predict, run_test_ids
from MultiMedSeg import checkpoints as ck
from MultiMedSeg import predict as predict_cli
from MultiMedSeg.data.preprocessing_plan import load_plan, prepare_scan
from MultiMedSeg.ensemble import ensemble_probabilities, label_volumes, load_ensemble, resolve_checkpoints
from MultiMedSeg.segment_scans import ScanProgress, segment_scan

REPO = Path(__file__).resolve().parents[1]


def _scan(runs, i: int = 0) -> Path:
    """Scan ``i`` of site 2: its test volume first, then the others (any volume is a scan to segment)."""
    test = runs["images"][2] / f"{run_test_ids(runs, 2)[0]}.nii.gz"
    return ([test] + sorted(p for p in runs["images"][2].glob("*.nii.gz") if p != test))[i]


def _slices(runs) -> np.ndarray:
    path = _scan(runs)
    _, slices = prepare_scan(nib.load(str(path)), path, "scan", load_plan(ck.checkpoints_folder(runs["adapt"])))
    return slices


# ------------------------------------------------------------------------------ members for time
def test_ensemble_size_uses_the_k_best_checkpoints(runs, tmp_path, capsys):
    kept = [str(p) for p in ck.BestIndex.load(ck.checkpoints_folder(runs["adapt"])).paths()]
    assert len(kept) >= 2
    labels = {}
    for k in range(1, len(kept) + 1):
        out = tmp_path / f"k{k}"
        summary = run_predict(runs, [_scan(runs)], out, "--ensemble_size", str(k))
        assert summary["checkpoints"] == kept[:k] and summary["ensemble_size"] == k
        assert summary["evaluation_settings"]["ensemble_size"] == "flag"
        labels[k] = read_labels(out / _scan(runs).name)
    assert not np.array_equal(labels[1], labels[len(kept)])  # the members do change the result
    capsys.readouterr()
    # more than the run kept: all it kept, and one note naming best.json
    summary = run_predict(runs, [_scan(runs)], tmp_path / "many", "--ensemble_size", str(len(kept) + 3))
    assert summary["checkpoints"] == kept and summary["ensemble_size"] == len(kept)
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and ck.INDEX_NAME in notes[0] and f"--ensemble_size {len(kept) + 3}" in notes[0]
    assert np.array_equal(read_labels(tmp_path / "many" / _scan(runs).name), labels[len(kept)])


@pytest.mark.parametrize("k", ["0", "-2"])
def test_bad_ensemble_size_is_one_line_exit_2(runs, tmp_path, capsys, k):
    out = tmp_path / "out"
    msg = exit_message(capsys, predict_cli.main, ["-i", str(_scan(runs)), "-o", str(out), "--checkpoint_dir",
                                                  str(runs["adapt"]), "--device", "cpu", "--ensemble_size", k])
    assert "--ensemble_size must be >= 1" in msg and not out.exists()


# ------------------------------------------------------------------------------ faster, same output
def test_zero_inter_weight_skips_the_inter_passes_and_gives_the_same_output(runs):
    members = load_ensemble(resolve_checkpoints(runs["adapt"]))
    slices = _slices(runs)
    calls = [0]
    hooks = [m.net.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1)) for m in members]
    try:
        for weights in ((0.0, 1.0), (0.0, 0.7)):
            calls[0] = 0
            fast = segment_scan(slices, members, True, weights, 4)
            n_batches = -(-len(slices) // 4)
            assert calls[0] == len(members) * n_batches  # intra passes only
            calls[0] = 0
            from torch.utils.data import DataLoader

            from MultiMedSeg.data.images_dataset import SliceArrayDataset
            from MultiMedSeg.data.transforms import eval_transform

            c = members.config
            ds = SliceArrayDataset(slices, 1, eval_transform(c.encoder_input_size), label_nc=c.label_nc,
                                   invert_intensity=c.invert_intensity)
            full = members.predict_volume(DataLoader(ds, batch_size=4), inter=True)  # both passes, as before
            assert calls[0] == 2 * len(members) * n_batches
            assert np.array_equal(fast["labels"], label_volumes(full, weights)["pred"])
            assert np.array_equal(fast["probabilities"], ensemble_probabilities(full, weights)["pred"].numpy())
        calls[0] = 0
        segment_scan(slices, members, True, (0.6, 0.4), 4)  # a positive inter weight: both passes
        assert calls[0] == 2 * len(members) * n_batches
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------------------ progress
def test_scan_progress_estimates_the_scans_still_to_come():
    p = ScanProgress(3, 2, disable=True)
    p.scan_ready("a", 10)
    assert p.total == 3 * 10 * 2  # two scans to come, counted as the mean so far
    p.update(4)
    p.update(16)
    p.scan_ready("b", 20)
    assert p.total == (10 + 20 + 15) * 2 and p.done == 20
    p.scan_failed()  # the third scan refused (--keep_going)
    assert p.total == (10 + 20) * 2


def test_progress_counts_every_member_slice_of_every_scan(runs, tmp_path, monkeypatch):
    seen = {}
    real = ScanProgress.__exit__

    def record(self, *exc):
        seen.update(done=self.done, total=self.total, slices=list(self.slices))
        return real(self, *exc)

    monkeypatch.setattr(ScanProgress, "__exit__", record)
    summary = run_predict(runs, [_scan(runs, 0), _scan(runs, 1)], tmp_path / "out")
    slices = [s["slices"] for s in summary["scans"]]
    assert seen["slices"] == slices
    assert seen["done"] == seen["total"] == sum(slices) * len(summary["checkpoints"])


def _predict_cmd(runs, out: Path) -> list:
    return [sys.executable, "-m", "MultiMedSeg.predict", "-i", str(_scan(runs, 0)), str(_scan(runs, 1)), "-o",
            str(out), "--checkpoint_dir", str(runs["adapt"]), "--device", "cpu"]


def test_progress_bar_on_a_terminal_and_not_in_a_pipe(runs, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", COLUMNS="120")
    # a pipe (a log file, a batch job): no bar, the usual lines only
    res = subprocess.run(_predict_cmd(runs, tmp_path / "pipe"), cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert "member-slices" not in res.stderr and "\r" not in res.stderr + res.stdout
    lines = res.stdout.splitlines()
    assert lines[0].startswith("2 scan(s); run ") and lines[-1].startswith("wrote 2 segmentation(s)")
    # a terminal: one bar over both scans, ending at total/total with the time left
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.run(_predict_cmd(runs, tmp_path / "tty"), cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=slave, text=False, timeout=300, env=env)
    os.close(slave)
    reader.join(timeout=30)
    os.close(master)
    assert proc.returncode == 0
    shown = b"".join(chunks).decode(errors="replace")
    summary = json.loads((tmp_path / "tty" / "predict.json").read_text())
    total = sum(s["slices"] for s in summary["scans"]) * len(summary["checkpoints"])
    assert f"{total}/{total}" in shown and "member-slices" in shown and "<" in shown  # elapsed<left
    assert proc.stdout.decode().splitlines()[-1].startswith("wrote 2 segmentation(s)")
    # the bar changes nothing written
    for scan in summary["scans"]:
        assert np.array_equal(read_labels(tmp_path / "tty" / scan["output"]),
                              read_labels(tmp_path / "pipe" / scan["output"]))


# ------------------------------------------------------------------------------ the benchmark's code
def test_bench_predict_tiny(tmp_path):
    from bench import bench_predict

    out = tmp_path / "b.json"
    torch_threads = torch.get_num_threads()
    try:
        bench_predict.main(["--preset", "tiny", "--members", "2", "--slices", "3", "--batch-size", "2",
                            "--variant-batch", "2", "--reps", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(torch_threads)
    res = json.loads(out.read_text())
    assert res["full"]["slices"] == 3 and res["flops_per_slice"] > 0 and res["sgemm_gflops_before"] > 0
    v = res["variants"]
    # exact variants agree with today's path; bf16 is reported, not required to agree
    for name in ("inference_mode", "batch1", "channels_last", "threads2"):
        assert v[name]["max_prob_diff"] < 1e-4, name
        assert min(v[name]["label_agreement"].values()) >= 0.99, name  # near-ties may flip
    assert v["baseline"]["max_prob_diff"] == 0.0
    assert 0 < res["ceiling"]["profile_conv_share"] <= 1
