"""Smoke test of the vessel demo (``python -m demo.run --preset vessels-quick``, issue 24): the vessel preset's
stages at smoke-test cost, every one real.  Structure only -- files, commands, table rows and columns, summary
keys, projections -- no quality figure is asserted (the settings are far too small for that)."""
from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
ROWS = ("source_only", "target_only", "adapted_real", "adapted_synthetic", "target_supervised")


@pytest.fixture(scope="module")
def vessel_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vessel_demo") / "out"
    proc = subprocess.run([sys.executable, "-m", "demo.run", "--preset", "vessels-quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _commands(out: Path, stage: str):
    return [ln for ln in (out / "logs" / f"{stage}.log").read_text().splitlines() if ln.startswith("$ ")]


def test_vessel_stages_use_the_originals_vessel_inputs_and_flags(vessel_demo: Path) -> None:
    assert not (vessel_demo / ".stages" / "predict.json").exists()  # no predict stage in the vessel preset
    phantom = _commands(vessel_demo, "phantom")
    assert phantom and all("--task vessels" in c for c in phantom)
    prep = _commands(vessel_demo, "preprocess")
    assert len(prep) == 4 and all("--brain-masks" in c and "--weights" in c for c in prep)
    assert not any("--discard-outside-labels" in c for c in prep)
    for stage in ("pretrain", "adapt"):
        for c in _commands(vessel_demo, stage):
            assert "--ce_weights 0.1,0.2,0.7" in c and "--dice_weights 0.1,0.2,0.7" in c, c
            assert "--consider_only_vessels_within_brain" in c and "--optimize_mode" in c, c
    assert all("--consider_only_vessels_within_brain" in c for c in _commands(vessel_demo, "inference"))
    assert not any("--keep-largest-component" in c for c in _commands(vessel_demo, "generate"))
    meta = json.loads((vessel_demo / "prep" / "site2" / "metadata.json").read_text())
    assert meta["num_classes"] == 3 and meta["options"]["brain_masks"]
    assert {v["z_split_by"] for v in meta["volumes"].values()} == {"brain"}  # extracerebral slices discarded


def test_vessel_report_table_and_metrics(vessel_demo: Path) -> None:
    report = (vessel_demo / "REPORT.md").read_text()
    assert report.startswith("# RobustMedSeg demo report: the vessel case")
    lines = report.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| method |"))
    header = lines[start]
    for column in ("Dice vessel", "clDice", "thin-vessel detection", "HD95 vessel (mm)"):
        assert column in header
    table = [ln for ln in itertools.takewhile(lambda ln: ln.startswith("|"), lines[start + 2:])]
    rows = [ln for ln in table if ln.startswith(("| source only", "| target only", "| adapted with",
                                                 "| target supervised"))]
    assert len(table) == 5
    assert len(rows) == 5 and all(ln.count("|") == header.count("|") for ln in rows)
    assert "Gap closed" in report and "- [" in report
    summary = json.loads((vessel_demo / "summary.json").read_text())
    assert summary["task"] == "vessels"
    for key in ("dice_mean", "cldice_mean", "small_detection_mean", "hd95_mean", "dice_brain_mean"):
        assert set(summary[key]) == set(ROWS), key
    for row in ROWS:
        for metric in ("dice", "cldice"):
            value = summary["dice_mean" if metric == "dice" else "cldice_mean"][row]
            assert value is not None and 0.0 <= value <= 1.0, (row, metric)
        assert set(summary["per_volume"][row]) == set(summary["test_volumes"])
    assert set(summary["gap_closed"]) == {"real", "synthetic"} and set(summary["gap_closed_cldice"]) == {"real", "synthetic"}
    assert set(summary["targets"]) == {"adapted_beats_source_only_dice", "adapted_beats_target_only_dice",
                                       "adapted_beats_source_only_cldice", "adapted_beats_target_only_cldice",
                                       "gap_closed_real", "synthetic_gain"}
    assert summary["small_centreline_voxels"] > 0 and math.isclose(summary["small_radius_mm"], 0.75 * 6.0)
    assert set(summary["phantom"]) == {"0", "1", "2"}
    # the ground truth is scored in the slices' layout: class 2 = vessel of the label file
    csv = (vessel_demo / "inference" / "target_supervised" / "metrics.csv").read_text().splitlines()
    assert any(",2," in ln for ln in csv[1:])


def test_vessel_report_projections(vessel_demo: Path) -> None:
    report = (vessel_demo / "REPORT.md").read_text()
    for png in ("phantom_montage.png", "generator_mip.png", "generator_grid.png", "synthetic_montage.png",
                "segmentation_mip.png"):
        assert (vessel_demo / png).stat().st_size > 1000, png
        assert f"]({png})" in report, png
