"""Smoke test of the one-command demo (``python -m demo.run --quick``): every stage runs for real.

Runs the whole pipeline once (phantom, preprocessing, LMDBs, 3 local Fed-BioMed nodes with
``train.py`` + ``save_global_model.py``, pretraining, synthetic volumes, two adaptations, three
inferences, predict on new scans, report) with the quick settings, then checks what a user looks at: REPORT.md with the
three-way Dice/HD95 table holding numbers, the PNG figures it links, the per-stage logs and markers,
that no node process is left running, and the resume/refusal behaviour of the driver.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STAGES = ("phantom", "preprocess", "prepare_data", "federated", "pretrain", "generate", "adapt", "inference",
          "predict", "report")


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FBM_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "demo.run", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo_output"
    proc = _run("--quick", "--out", str(out))
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


def test_every_stage_ran_and_logged(demo_out: Path) -> None:
    for stage in STAGES:
        assert (demo_out / ".stages" / f"{stage}.json").is_file(), stage
        log = (demo_out / "logs" / f"{stage}.log").read_text()
        assert "$ " in log and f"=== stage {stage} done" in log, stage
    assert (demo_out / "final_global_model.pt").is_file()
    assert any((demo_out / "synthetic_site0").glob("fakeVolume0_slice*.npz"))


def test_report_has_three_way_table_with_numbers(demo_out: Path) -> None:
    report = (demo_out / "REPORT.md").read_text()
    rows = {}
    for label in ("source only", "adapted with the real source", "adapted with the synthetic source"):
        line = next((ln for ln in report.splitlines() if ln.startswith(f"| {label}")), None)
        assert line is not None, f"missing table row '{label}'"
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        assert len(cells) == 6
        dice = [float(c) for c in cells[:3]]  # Dice GM, WM, mean are always finite
        assert all(0.0 <= d <= 1.0 for d in dice)
        assert abs(dice[2] - (dice[0] + dice[1]) / 2) < 1.5e-3
        for c in cells[3:]:
            assert c == "inf" or float(c) >= 0.0
        rows[label] = dice
    # the table is read from the inference metrics, not invented: compare one value with metrics.csv
    import csv

    with open(demo_out / "inference" / "source_only" / "metrics.csv", newline="") as fh:
        gm = [float(r["dice"]) for r in csv.DictReader(fh) if r["prediction"] == "intra" and r["class"] == "1"]
    assert abs(rows["source only"][0] - sum(gm) / len(gm)) < 1e-3


def test_report_figures_exist_and_are_linked(demo_out: Path) -> None:
    report = (demo_out / "REPORT.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"phantom_montage.png", "generator_grid.png", "synthetic_montage.png",
            "segmentation_overlay.png", "predict_overlay.png"} <= set(links)
    for link in links:
        png = demo_out / link
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
    for stage in STAGES[:-1]:
        assert re.search(rf"^\| {stage} \| [0-9.]+ \|", report, re.M), stage


def test_predict_stage_segments_reoriented_nrrd_scans(demo_out: Path) -> None:
    """The target test volumes stored as NRRD in another axis order get labels in NRRD on their own
    grid, scored in the report's new-scans table."""
    import SimpleITK as sitk

    scans = sorted((demo_out / "predict" / "scans").glob("*.nrrd"))
    assert scans
    report = (demo_out / "REPORT.md").read_text()
    for scan in scans:
        image, seg = sitk.ReadImage(str(scan)), sitk.ReadImage(str(demo_out / "predict" / "segmentations" / scan.name))
        assert (seg.GetSize(), seg.GetOrigin(), seg.GetSpacing(), seg.GetDirection()) == (
            image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection())
        row = next(ln for ln in report.splitlines() if ln.startswith(f"| `{scan.name}`"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "PIL" and all(0.0 <= float(c) <= 1.0 for c in cells[3:6])


def test_nodes_are_stopped(demo_out: Path) -> None:
    manifest = json.loads((demo_out / "federation" / "federation.json").read_text())
    assert manifest["nodes"] and all(node["pid"] is None for node in manifest["nodes"])


def test_existing_output_refused_and_resume_skips(demo_out: Path) -> None:
    refused = _run("--quick", "--out", str(demo_out), timeout=120)
    assert refused.returncode == 2 and "already exists" in refused.stderr
    before = (demo_out / "REPORT.md").stat().st_mtime_ns
    (demo_out / ".stages" / "report.json").unlink()  # pretend the report stage was interrupted
    resumed = _run("--quick", "--resume", "--out", str(demo_out), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("skipped") == len(STAGES) - 1
    assert (demo_out / "REPORT.md").stat().st_mtime_ns != before


def test_full_prints_paper_commands() -> None:
    proc = _run("--full", timeout=120)
    assert proc.returncode == 0
    text = proc.stdout
    for needle in ("--size 512", "ViT-L-14", "--rounds 350", "--num_updates_per_round 2000", "--rounds 385",
                   "--clip-weight 50", "save_global_model.py", "--max_steps 15000", "--batch_size 8",
                   "generate_volumes.py", "--max_steps 20000", "--one_target_slice", "inference.py"):
        assert needle in text, needle


def test_failing_stage_names_stage_and_log(tmp_path: Path) -> None:
    """A stage whose command fails stops the demo with one line naming the stage and its log."""
    out = tmp_path / "broken"
    (out / ".stages").mkdir(parents=True)
    (out / "logs").mkdir()
    (out / "demo.json").write_text(json.dumps({"config": "quick", "target": 2, "clip_model": "none",
                                               "clip_pretrained": None}))
    (out / ".stages" / "phantom.json").write_text(json.dumps({"seconds": 1.0}))  # ...but no phantom data
    proc = _run("--quick", "--resume", "--out", str(out), timeout=120)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "preprocess" in errors[0] and str(out / "logs" / "preprocess.log") in errors[0]
    assert not (out / ".stages" / "preprocess.json").exists()
