"""Fidelity evaluator of the data factory (robustmedseg.fidelity): metric, training, file, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model import Generator, GeneratorArgs
from robustmedseg.errors import InputError
from robustmedseg.factory_file import write_factory_file
from robustmedseg import fidelity as F


def _write_site(folder: Path, domain: int, n_volumes: int = 2, depth: int = 6, size: int = 16, seed: int = 0):
    """Slices whose brightness tells the domain and whose bright square's row tells the height."""
    rng = np.random.default_rng([seed, domain])
    folder.mkdir(parents=True)
    for v in range(n_volumes):
        for k in range(depth):
            img = np.full((size, size, 1), -0.8 + 0.9 * domain, np.float32)
            img[2 * k:2 * k + 3, 4:12] = 0.9
            img += 0.02 * rng.standard_normal(img.shape).astype(np.float32)
            np.savez(folder / f"d{domain}v{v}_slice{k:03d}.npz", data=np.clip(img, -1, 1))


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    for d in (0, 1):
        _write_site(root / f"train{d}", d, n_volumes=3, seed=1)
        _write_site(root / f"held{d}", d, n_volumes=2, seed=2)
    return root


def test_kid_is_zero_for_one_distribution_and_grows_with_a_shift():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 8, generator=gen), torch.randn(300, 8, generator=gen)
    same = F.kid(a, b)
    shifted = F.kid(a, b + 1.0)
    assert abs(same) < 0.05
    assert shifted > 10 * max(abs(same), 1e-3)
    assert F.kid(a[:1], b) != F.kid(a[:1], b)  # nan for a single sample


def test_volume_halves_alternate_by_volume():
    halves = F.volume_halves(["0:a", "0:a", "0:b", "0:c", "0:c"]).tolist()
    assert halves == [0, 0, 1, 0, 0]


def test_classifier_shapes_and_size_check():
    net = F.SliceClassifier(F.EvaluatorConfig(size=16, n_domains=3, n_zbins=5, width=4, feat_dim=8))
    d, z, f = net(torch.zeros(2, 1, 16, 16))
    assert d.shape == (2, 3) and z.shape == (2, 5) and f.shape == (2, 8)
    with pytest.raises(ValueError):
        F.SliceClassifier(F.EvaluatorConfig(size=24))


def test_train_evaluator_learns_separable_sites_and_scores_a_generator(sites, tmp_path):
    cfg = F.EvaluatorConfig(size=16, n_domains=2, n_zbins=6, width=4, feat_dim=16)
    train = F.RealSlices.concat([F.load_slice_folder(sites / f"train{d}", d, 16, 6) for d in (0, 1)])
    held = F.RealSlices.concat([F.load_slice_folder(sites / f"held{d}", d, 16, 6) for d in (0, 1)])
    assert len(train) == 36 and train.zbins.max() == 5
    payload = F.train_evaluator(train, held, cfg, steps=150, batch=16)
    assert payload["real"]["domain_accuracy"] == 1.0
    assert payload["real"]["zbin_within1"] > 0.5
    path = tmp_path / "ev.pt"
    torch.save(payload, path)
    ev = F.Evaluator.load(path)  # weights_only load
    g = Generator(16, style_dim=8, n_mlp=1, n_domains=2, n_zbins=6, clip_dim=4, channel_cap=8)
    score = ev.score(g, n_per_domain=10, seed=0)
    assert 0.0 <= score["domain_accuracy"] <= 1.0
    assert set(score["kid"]) == {"0", "1"} and all(np.isfinite(v) for v in score["kid"].values())
    assert sum(map(sum, score["confusion"])) == 20
    flat = F.scalar_summary(score)
    assert {"domain_accuracy", "zbin_within1", "kid_domain0", "domain_accuracy_domain1"} <= set(flat)
    # per z-bin figures cover every conditioned bin; the score does not depend on (nor move) the global stream
    assert sum(v["n"] for v in score["per_zbin"].values()) == 20
    torch.manual_seed(123)
    again = ev.score(g, n_per_domain=10, seed=0)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))
    assert again["kid"] == score["kid"] and again["per_zbin"] == score["per_zbin"]
    with pytest.raises(InputError):
        ev.check_generator(Generator(16, style_dim=8, n_mlp=1, n_domains=3, n_zbins=6, clip_dim=4, channel_cap=8))


def test_cli_train_and_score(sites, tmp_path, capsys):
    ev = tmp_path / "ev.pt"
    args = ["train", "--out", str(ev), "--size", "16", "--n-zbins", "6", "--steps", "30", "--batch", "8",
            "--width", "4", "--json", str(tmp_path / "ev.json")]
    for d in (0, 1):
        args += ["--train", f"{d}={sites / f'train{d}'}", "--heldout", f"{d}={sites / f'held{d}'}"]
    assert F.main(args) == 0
    real = json.loads((tmp_path / "ev.json").read_text())
    assert {"domain_accuracy", "zbin_accuracy", "kid_real", "confusion"} <= set(real)
    args_g = GeneratorArgs(size=16, style_dim=8, n_mlp=1, n_domains=2, n_zbins=6, clip_dim=4, channel_cap=8)
    write_factory_file(tmp_path / "g.pt", Generator.from_args(args_g), args_g)
    assert F.main(["score", "--evaluator", str(ev), "--generator", str(tmp_path / "g.pt"), "--n", "6",
                   "--json", str(tmp_path / "s.json")]) == 0
    assert "domain accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["per_domain"]["0"]["n"] == 6


def test_bad_evaluator_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"format": "something-else"}, bad)
    with pytest.raises(InputError, match="not a fidelity evaluator"):
        F.Evaluator.load(bad)
    with pytest.raises(InputError, match="not found"):
        F.Evaluator.load(tmp_path / "missing.pt")
    with pytest.raises(InputError, match="no '<volume>_slice"):
        (tmp_path / "empty").mkdir()
        F.load_slice_folder(tmp_path / "empty", 0, 16, 6)
