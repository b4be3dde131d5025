"""The switches that restore the original's behaviour (issue 21; docs/differences.md names each flag).

One test group per switch: its default keeps the project's behaviour, its other value gives the
original's.  Tiny CPU models (tests/builders.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import List

import pytest
import torch

from builders import MMS_TINY, generate_volumes, make_cfg, quiet, tiny_generation_config, tiny_generator_file
from builders import tiny_psp_config, write_checkpoints
from MultiMedSeg import generation as gen
from MultiMedSeg.ensemble import Ensemble, Member, SegmentationEnsemble, resolve_checkpoints
from MultiMedSeg.models.psp import PSP
from MultiMedSeg.options import AdaptOptions, parse_training_options, stored_training_options
from MultiMedSeg.training.coach import Coach
from MultiMedSeg.training.setup import BACKBONE_NOTE, backbone_note, pretrain_config

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


# ------------------------------------------------------------------ synthesis noise in eval (item 4)
def _noisy_psp(eval_noise: str) -> PSP:
    torch.manual_seed(0)
    net = PSP(tiny_psp_config(src_tgt_domains=[0], eval_noise=eval_noise))
    with torch.no_grad():  # NoiseInjection weights start at 0: make the noise matter
        for name, p in net.decoder.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.3)
    net.compute_latent_avg(64, seed=0)
    return net.eval()


@pytest.mark.parametrize("eval_noise", ["fixed", "random"])
def test_eval_noise_fixed_or_random(eval_noise):
    net = _noisy_psp(eval_noise)
    x, label = torch.rand(2, 1, 32, 32) * 2 - 1, torch.tensor([[1.0, 0.0]] * 2)
    with torch.no_grad():
        a, b = net(x, label, resize=False), net(x, label, resize=False)
    assert torch.equal(a, b) == (eval_noise == "fixed")
    net.train()
    with torch.no_grad():  # in train() the noise is always fresh
        assert not torch.equal(net(x, label, resize=False), net(x, label, resize=False))


def test_eval_noise_is_stored_in_checkpoints_and_older_ones_read_as_fixed(tmp_path):
    payload = _noisy_psp("random").checkpoint_payload(10)
    assert payload["config"]["eval_noise"] == "random"
    assert PSP.from_checkpoint(tmp_path / "x.pt", payload).config.eval_noise == "random"
    older = {**payload, "config": {k: v for k, v in payload["config"].items() if k != "eval_noise"}}
    assert PSP.from_checkpoint(tmp_path / "x.pt", older).config.eval_noise == "fixed"


def test_eval_noise_flag_reaches_the_model_config(tmp_path):
    gen_file = tiny_generator_file(tmp_path / "g.pt")
    argv = ["--exp_dir", str(tmp_path / "e"), "--source_root", str(tmp_path / "s"), "--val_root", str(tmp_path / "v"),
            "--stylegan_weights", str(gen_file), "--src_label", "0", *MMS_TINY]
    default = parse_training_options(argv, "pretrain")
    assert default.eval_noise == "fixed" and pretrain_config(default).eval_noise == "fixed"
    opts = parse_training_options(argv + ["--eval_noise", "random", "--bn_mode", "batch"], "pretrain")
    assert opts.eval_noise == "random" and pretrain_config(opts).eval_noise == "random"
    assert stored_training_options(json.loads(json.dumps(opts.to_dict()))).eval_noise == "random"
    assert stored_training_options({k: v for k, v in default.to_dict().items() if k != "eval_noise"}).eval_noise \
        == "fixed"  # an opt.json written before the option


# ------------------------------------------------------------------ a class absent from both volumes (item 7)
def _pretrain_argv(tmp_path: Path, *extra: str) -> List[str]:
    gen_file = tiny_generator_file(tmp_path / "g.pt")
    return ["--exp_dir", str(tmp_path / "e"), "--source_root", str(tmp_path / "s"), "--val_root", str(tmp_path / "v"),
            "--stylegan_weights", str(gen_file), "--src_label", "0", *MMS_TINY, *extra]


def _one_hot(labels: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, n).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("score,dice2,hd2", [("perfect", 1.0, 0.0), ("original", 0.0, math.inf)])
def test_coach_volume_metrics_score_a_class_absent_from_both(tmp_path, score, dice2, hd2):
    argv = _pretrain_argv(tmp_path) + ([] if score == "perfect" else ["--empty_class_score", score])
    opts = parse_training_options(argv, "pretrain")
    assert opts.empty_class_score == score
    gt = torch.zeros(3, 8, 8, dtype=torch.long)
    gt[:, 2:5, 2:5] = 1  # class 2 absent from the ground truth ...
    pred = gt.clone()
    pred[0, 5, 5] = 1  # ... and from the prediction; class 1 nearly right
    parts = {"mask": [_one_hot(gt, 3).bool()], "weight": [torch.ones(3, 1, 8, 8)], "intra": [_one_hot(pred, 3)]}
    metrics = Coach._volume_metrics(SimpleNamespace(opts=opts), parts)[0]
    assert metrics["intra_dice_2"] == dice2 and metrics["intra_hausdorff_2"] == hd2
    assert 0.9 < metrics["intra_dice_1"] < 1.0  # present classes are scored alike under both rules
    assert stored_training_options(opts.to_dict()).empty_class_score == score


def test_empty_class_score_flags_and_names(tmp_path):
    from MultiMedSeg.evaluation.metrics import BOTH_EMPTY
    from MultiMedSeg.options import EMPTY_CLASS_SCORES, parse_inference_options, parse_select_evaluation_options

    assert set(EMPTY_CLASS_SCORES) == set(BOTH_EMPTY)
    inf = ["--exp_dir", str(tmp_path / "o"), "--checkpoint_dir", str(tmp_path / "c"), "--test_root", str(tmp_path / "t"),
           "--metadata", str(tmp_path / "m.json")]
    assert parse_inference_options(inf).empty_class_score == "perfect"
    assert parse_inference_options(inf + ["--empty_class_score", "original"]).empty_class_score == "original"
    sel = ["--checkpoint_dir", str(tmp_path / "c")]
    assert parse_select_evaluation_options(sel).empty_class_score is None  # the run's opt.json decides
    assert parse_select_evaluation_options(sel + ["--empty_class_score", "original"]).empty_class_score == "original"


@pytest.mark.parametrize("score", ["perfect", "original"])
def test_evaluation_settings_candidates_use_the_empty_class_score(monkeypatch, score):
    """choose_settings passes the rule to every candidate's validation Dice and records it."""
    from MultiMedSeg.evaluation import selection

    seen = []

    def fake_scores(*a, both_empty="perfect", **kw):
        seen.append(both_empty)
        return ["v0"], [{"inter": 0.6, "intra": 0.4, "mean_dice": 0.5, "dice": {"1": 0.5, "2": 0.5}}]

    monkeypatch.setattr(selection, "validation_scores", fake_scores)
    monkeypatch.setattr("MultiMedSeg.ensemble.resolve_checkpoints", lambda folder: [Path("best_step1.pt")])
    members = [SimpleNamespace(net=SimpleNamespace(config=SimpleNamespace(label_nc=3, src_tgt_domains=[0, 1])))]
    record = selection.choose_settings(Path("ckpts"), "validation", dataset=object(), inter=True, members=members,
                                       both_empty=score)
    assert seen == [score] and record["validation"]["empty_class_score"] == score


# ------------------------------------------------------------------ the encoder's initialisation (item 6)
def test_pretraining_without_backbone_weights_says_so_once(preprocessed_sites, tmp_path, capsys):
    from MultiMedSeg import pretrain as pretrain_cli

    gen_file = tiny_generator_file(tmp_path / "g.pt")
    argv = ["--source_data", str(preprocessed_sites[0]), "--stylegan_weights", str(gen_file), "--src_label", "0",
            "--lpips_lambda", "0", "--max_steps", "1", "--val_interval", "1", *MMS_TINY]
    pretrain_cli.main(["--exp_dir", str(tmp_path / "random"), *argv])
    assert capsys.readouterr().err.count(BACKBONE_NOTE) == 1
    assert BACKBONE_NOTE.startswith("note: no --backbone_weights")

    weights = tmp_path / "backbone.pth"  # a tiny ArcFace-format file: an encoder backbone's own state dict
    torch.manual_seed(7)
    backbone = PSP(tiny_psp_config(src_tgt_domains=[0])).encoder.backbone.state_dict()
    torch.save(backbone, weights)
    pretrain_cli.main(["--exp_dir", str(tmp_path / "arcface"), *argv, "--backbone_weights", str(weights)])
    assert "note:" not in capsys.readouterr().err


def test_backbone_note_only_for_a_new_pretraining(tmp_path):
    opts = parse_training_options(_pretrain_argv(tmp_path), "pretrain")
    assert backbone_note(opts) == BACKBONE_NOTE
    assert backbone_note(dataclasses.replace(opts, resume=True)) is None  # the encoder comes from last.pt
    assert backbone_note(dataclasses.replace(opts, backbone_weights=tmp_path / "b.pth")) is None
    assert backbone_note(AdaptOptions(**{k: v for k, v in vars(opts).items()})) is None  # from the checkpoint


def test_paper_pretrain_command_names_the_backbone():
    from MultiMedSeg.options import PAPER_PRETRAIN, training_parser

    assert "--backbone_weights" in PAPER_PRETRAIN and PAPER_PRETRAIN in training_parser("pretrain").epilog


# ------------------------------------------------------------------ the range of _trans (item 12a)
class _Overshoot(torch.nn.Module):
    """A stand-in pSp whose reconstructed / translated image is 3x its input (beyond [-1, 1])."""

    config = SimpleNamespace(invert_intensity=False, label_nc=3, src_tgt_domains=[0, 1])

    def forward(self, x, label, resize=False, feature_scale=1.0):
        probs = torch.full((x.shape[0], 3, *x.shape[-2:]), 1.0 / 3)
        return torch.cat([3 * x, probs], 1)


@pytest.mark.parametrize("clamp", [True, False])
def test_trans_clamp_switch(clamp):
    x = torch.linspace(-1, 1, 2 * 8 * 8).reshape(2, 1, 8, 8)
    label = torch.tensor([[0.0, 1.0]] * 2)
    ensemble = Ensemble([Member(_Overshoot(), 1.0, None)], torch.device("cpu"), trans_clamp=clamp)
    trans = ensemble.predict_batch(x, label)["trans"]
    assert torch.equal(trans, (3 * x).clamp(-1, 1) if clamp else 3 * x)
    assert (trans.abs().max() > 1) == (not clamp)
    default = Ensemble([Member(_Overshoot(), 1.0, None)], torch.device("cpu")).predict_batch(x, label)["trans"]
    assert default.abs().max() == 1.0  # clamped by default


def test_trans_clamp_flag(tmp_path):
    from MultiMedSeg.options import parse_inference_options

    argv = ["--exp_dir", str(tmp_path / "o"), "--checkpoint_dir", str(tmp_path / "c"), "--test_root",
            str(tmp_path / "t"), "--metadata", str(tmp_path / "m.json")]
    assert parse_inference_options(argv).trans_clamp is True
    assert parse_inference_options(argv + ["--no_trans_clamp"]).trans_clamp is False
    assert parse_inference_options(argv + ["--no-trans-clamp", "--trans_clamp"]).trans_clamp is True


# ------------------------------------------------------------------ volumes without a label file (item 3)
def _three_volumes(root: Path) -> Path:
    """vol0, vol1 with a label file (class 1 inside a brain mask on slices 2..9 of 12), vol2 without."""
    from builders import brain_dataset

    return brain_dataset(root, n=3, labeled=2, seed=3)


@pytest.mark.parametrize("brain", [False, True])
def test_missing_labels_empty_gives_all_zero_labels(tmp_path, brain):
    import numpy as np

    from MultiMedSeg.data.volumes_to_slices import PreprocessConfig, preprocess
    from robustmedseg.data.slices import load_slice

    root = _three_volumes(tmp_path / "raw")
    base = dict(images=root / "images", labels=root / "labels", size=32, val_frac=0.34, test_frac=0.0,
                target_spacing=(1, 1, 2), crop=False, brain_masks=(root / "brain") if brain else None)
    plain = preprocess(PreprocessConfig(out=tmp_path / "none", **base), log=quiet)
    empty = preprocess(PreprocessConfig(out=tmp_path / "empty", missing_labels="empty", **base), log=quiet)
    assert plain["splits"] == empty["splits"] and "vol2" in empty["splits"]["train"]
    assert set(empty["splits"]["val"]) <= {"vol0", "vol1"}  # validation stays annotated
    before, after = plain["volumes"]["vol2"], empty["volumes"]["vol2"]
    assert after["label"] is None and after["empty_label"] and "empty_label" not in before
    assert after["z_split"] == before["z_split"] == ([2, 10] if brain else [0, 12])  # the same z-split
    assert all("mask" not in np.load(tmp_path / "none" / rel) for rel in before["slices"])  # default: no mask
    masks = np.stack([load_slice(tmp_path / "empty" / rel, require_mask=True)["mask"] for rel in after["slices"]])
    classes = masks.argmax(-1)
    assert masks.shape[-1] == empty["num_classes"] == (3 if brain else 2) and np.all(masks.sum(-1) == 1)
    assert not masks[..., -1].any()  # the label channel is empty everywhere
    assert (set(np.unique(classes)) == {0, 1}) if brain else not classes.any()  # [background, brain] / background
    labeled = next(v for k, v in empty["volumes"].items() if k in empty["splits"]["train"] and v["label"])
    assert np.stack([load_slice(tmp_path / "empty" / rel)["mask"] for rel in labeled["slices"]])[..., -1].any()


def test_missing_labels_refusals(tmp_path, capsys):
    from builders import exit_message
    from MultiMedSeg.data.volumes_to_slices import PreprocessConfig
    from MultiMedSeg.preprocess import main as preprocess_main
    from robustmedseg.errors import InputError

    with pytest.raises(InputError, match="--missing-labels empty .*--annotation-required"):
        PreprocessConfig(images=tmp_path, labels=tmp_path, out=tmp_path / "o", missing_labels="empty",
                         annotation_required=True).check()
    with pytest.raises(InputError, match="--missing-labels"):
        PreprocessConfig(images=tmp_path, labels=tmp_path, out=tmp_path / "o", missing_labels="zeros").check()
    err = exit_message(capsys, preprocess_main, ["--images", str(tmp_path), "--labels", str(tmp_path), "--out",
                                                 str(tmp_path / "o"), "--missing-labels", "empty",
                                                 "--annotation-required"])
    assert "--missing-labels empty" in err and "--annotation-required" in err


# ------------------------------------------------------------------ inference metrics space (item 8)
@pytest.fixture(scope="module")
def tiny_run(preprocessed_sites, tmp_path_factory) -> Path:
    """A 4-step pretraining on the conftest phantom's site 0."""
    from MultiMedSeg import pretrain as pretrain_cli

    root = tmp_path_factory.mktemp("metrics_space")
    gen_file = tiny_generator_file(root / "g.pt")
    pretrain_cli.main(["--exp_dir", str(root / "run"), "--source_data", str(preprocessed_sites[0]), "--stylegan_weights",
                       str(gen_file), "--src_label", "0", "--lpips_lambda", "0", "--max_steps", "4", "--val_interval",
                       "2", *MMS_TINY])
    return root / "run"


def test_metrics_space_preprocessed_is_medpy_on_the_slice_stacks(tiny_run, preprocessed_sites, tmp_path, monkeypatch):
    import csv

    import numpy as np
    from medpy.metric.binary import dc, hd

    from MultiMedSeg import inference as inference_cli
    from MultiMedSeg.evaluation import test_volumes
    from MultiMedSeg.evaluation.metrics import read_metrics_csv
    from robustmedseg.data.slices import load_slice

    site = preprocessed_sites[0]
    stacks = []  # the label stacks inference scores, in volume order
    real = test_volumes.label_volumes

    def spy(*a, **kw):
        out = real(*a, **kw)
        stacks.append(out["intra"])
        return out

    monkeypatch.setattr(test_volumes, "label_volumes", spy)
    argv = ["--checkpoint_dir", str(tiny_run), "--target_data", str(site), "--device", "cpu"]
    inference_cli.main(["--exp_dir", str(tmp_path / "vox"), *argv, "--metrics_space", "preprocessed"])
    monkeypatch.undo()
    inference_cli.main(["--exp_dir", str(tmp_path / "mm"), *argv])

    meta = json.loads((site / "metadata.json").read_text())
    test_ids = meta["splits"]["test"]
    assert len(stacks) == len(test_ids) >= 1
    with open(tmp_path / "vox" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["unit"] == "voxel" and r["hd95"] == "" for r in rows)
    checked = 0
    for vid, pred in zip(sorted(test_ids), stacks):
        gt = np.stack([load_slice(site / rel, require_mask=True)["mask"].argmax(-1)
                       for rel in meta["volumes"][vid]["slices"]])
        assert gt.shape == pred.shape
        for r in (r for r in rows if r["volume"] == vid and r["class"] != "foreground"):
            p, g = pred == int(r["class"]), gt == int(r["class"])
            if p.any() and g.any():
                assert float(r["dice"]) == pytest.approx(dc(p, g), abs=1e-6)
                assert float(r["hd"]) == pytest.approx(hd(p, g), abs=1e-5)  # voxels: no spacing
                checked += 1
    assert checked >= 2
    info = json.loads((tmp_path / "vox" / "inference.json").read_text())
    assert info["metrics_space"] == "preprocessed" and info["metrics_unit"] == "voxel"
    with open(tmp_path / "mm" / "metrics.csv", newline="") as fh:
        mm_rows = list(csv.DictReader(fh))
    assert mm_rows and all(r["unit"] == "mm" and r["hd95"] != "" for r in mm_rows)  # the default: unchanged figures
    assert json.loads((tmp_path / "mm" / "inference.json").read_text())["metrics_space"] == "restored"
    vox = read_metrics_csv(tmp_path / "vox" / "metrics.csv", "intra")  # the reader: empty hd95 is nan
    assert all(math.isnan(s["hd95"]) for v in vox.values() for s in v.values())


def test_metrics_csv_readers_take_old_and_new_files(tmp_path):
    from MultiMedSeg.evaluation.metrics import METRICS_UNIT, read_metrics_csv, volume_statistics
    from MultiMedSeg.options import METRICS_SPACES

    assert set(METRICS_SPACES) == set(METRICS_UNIT)
    old = tmp_path / "old.csv"
    old.write_text("volume,prediction,class,dice,hd95,hd\nv0,pred,1,0.5,2.0,3.0\nv0,pred,2,0.7,1.0,4.0\n")
    new = tmp_path / "new.csv"
    new.write_text("volume,prediction,class,dice,hd95,hd,unit\nv0,pred,1,0.5,,3.0,voxel\nv0,pred,2,0.7,,4.0,voxel\n")
    assert read_metrics_csv(old, "pred")["v0"]["1"] == {"hd": 3.0, "hd95": 2.0, "dice": 0.5}
    stats = volume_statistics(read_metrics_csv(new, "pred"), (("1", "A"), ("2", "B")))
    assert stats["A"]["dice"]["mean"] == 0.5 and math.isnan(stats["A"]["hd95"]["mean"])


# ------------------------------------------------------------------ step count (item 12b)
def test_step_schedule_updates_and_original():
    from MultiMedSeg.training.coach import last_training_step, step_after_update

    def plan(step_count):
        steps = range(last_training_step(4, step_count) + 1)
        return [(s, *step_after_update(s, 4, 2, step_count)) for s in steps]

    # today: 4 updates (steps 0..3); step k validated after k updates: after updates 2 and 4
    assert plan("updates") == [(0, 1, False, False), (1, 2, True, False), (2, 3, False, False), (3, 4, True, True)]
    # the original: steps 0..4 = 5 updates; step k validated after its own update (k + 1 updates); 0 never
    assert plan("original") == [(0, 0, False, False), (1, 1, False, False), (2, 2, True, False),
                                (3, 3, False, False), (4, 4, True, True)]


@pytest.mark.parametrize("step_count,updates,validated", [("updates", 4, [(2, 2), (4, 4)]),
                                                          ("original", 5, [(2, 3), (4, 5)])])
def test_step_count_of_a_tiny_run(preprocessed_sites, tmp_path, monkeypatch, step_count, updates, validated):
    """max_steps 4, val_interval 2: how many updates, and (validated step, updates made before it)."""
    from MultiMedSeg import pretrain as pretrain_cli

    made, seen = [], []
    real_step, real_validate = Coach.train_step, Coach.validate

    def train_step(self, batch):
        made.append((self.global_step, self.feature_scale()))
        return real_step(self, batch)

    def validate(self):
        seen.append((self.global_step, len(made)))
        return real_validate(self)

    monkeypatch.setattr(Coach, "train_step", train_step)
    monkeypatch.setattr(Coach, "validate", validate)
    gen_file = tiny_generator_file(tmp_path / "g.pt")
    exp = tmp_path / "run"
    pretrain_cli.main(["--exp_dir", str(exp), "--source_data", str(preprocessed_sites[0]), "--stylegan_weights",
                       str(gen_file), "--src_label", "0", "--lpips_lambda", "0", "--max_steps", "4", "--val_interval",
                       "2", "--step_count", step_count, *MMS_TINY])
    assert len(made) == updates and [s for s, _ in made] == list(range(updates))
    assert [fs for _, fs in made] == pytest.approx([min(1.0, 0.1 * s) for s in range(updates)])
    assert seen == validated
    best = json.loads((exp / "checkpoints" / "best.json").read_text())
    assert sorted(e["step"] for e in best) == [2, 4]  # the best checkpoints are named by the validated steps
    assert json.loads((exp / "opt.json").read_text())["step_count"] == step_count
    assert (exp / "checkpoints" / "iteration_4.pt").is_file()
