"""The switches that restore the original's behaviour (issue 21; docs/differences.md names each flag).

One test group per switch: its default keeps the project's behaviour, its other value gives the
original's.  Tiny CPU models (tests/builders.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import pytest
import torch

from builders import generate_volumes, make_cfg, quiet, tiny_generation_config, write_checkpoints
from MultiMedSeg import generation as gen
from MultiMedSeg.ensemble import Ensemble, Member, SegmentationEnsemble, resolve_checkpoints
from MultiMedSeg.models.psp import PSP

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory) -> Path:
    """Two best checkpoints at steps 20000 (scale 1) and 5000 (scale 0.5)."""
    exp = tmp_path_factory.mktemp("src_run")
    write_checkpoints(exp, tiny_generation_config())
    return exp


# ------------------------------------------------------------------ generation feature scale (item 9)
def _spy_scales(monkeypatch) -> List[float]:
    seen: List[float] = []
    real = PSP.forward

    def spy(self, *a, feature_scale=1.0, **kw):
        seen.append(float(feature_scale))
        return real(self, *a, feature_scale=feature_scale, **kw)

    monkeypatch.setattr(PSP, "forward", spy)
    return seen


@pytest.mark.parametrize("source,expected", [("best", [1.0, 1.0]), ("each", [1.0, 0.5])])
def test_generation_feature_scale_from(gen_run, tmp_path, monkeypatch, source, expected):
    seen = _spy_scales(monkeypatch)
    out = tmp_path / "fake"
    summary = gen.generate(make_cfg(gen_run, out, feature_scale_from=source), log=quiet, progress=False)
    monkeypatch.undo()
    # the two members alternate in every batch: the scales each one ran with
    assert len(seen) % 2 == 0 and seen[:2] == expected and seen[0::2] == [expected[0]] * (len(seen) // 2) \
        and seen[1::2] == [expected[1]] * (len(seen) // 2)
    stored = json.loads((out / "generation.json").read_text())
    assert stored["settings"]["feature_scale_from"] == source == summary["settings"]["feature_scale_from"]
    assert stored["feature_scales"] == expected and stored["checkpoint_feature_scales"] == [1.0, 0.5]


def test_generation_feature_scale_default_is_the_originals_and_flag_parses(gen_run, tmp_path):
    assert gen.GenerationConfig(ckpt_dir=gen_run, label=0, n_volumes=1, slices_in_one_z=1, n_segmentation_labels=3,
                                out_dir=tmp_path).feature_scale_from == "best"
    parser = generate_volumes.build_parser()
    base = ["--checkpoint_dir", str(gen_run), "--label", "0", "--n_volumes", "1", "--slices_in_one_z", "1",
            "--label_nc", "3", "--out_dir", str(tmp_path / "o")]
    assert parser.build(parser.parse_args(base + ["--feature_scale_from", "each"])).feature_scale_from == "each"
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--feature_scale_from", "worst"])


def test_ensemble_scales_best_uses_the_first_members(gen_run):
    paths = resolve_checkpoints(gen_run)
    each = SegmentationEnsemble.load(paths, 0, feature_scale_from="each")
    assert each.scales == [1.0, 0.5]
    best = Ensemble(each.members, feature_scale_from="best")
    assert best.scales == [1.0, 1.0]
    with pytest.raises(ValueError):
        Ensemble(each.members, feature_scale_from="mean")
