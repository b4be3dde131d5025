"""Benchmark: synthetic volume generation, MultiMedSeg.generation vs the reference algorithm
(docs/method.md#generation).

Both run in this process on the same phase-2 "best" checkpoints (written here through the phase-2
API) and the same generator:

* current  -- ``MultiMedSeg.generation.build_factory`` + ``VolumeFactory.volume``: checkpoints read
  once, one batched mapping pass for the z-bin latents, N = (n_zbins - 1)·s + 1 slices;
* baseline -- the reference algorithm re-implemented below: latents per batch of bins through
  the full generator forward (images discarded), per-batch interpolation that duplicates the
  boundary latent and skips one point (28·s slices for 29 bins), synthesis with
  ``g_synthesis`` (random noise), and for EVERY batch EVERY checkpoint reloaded from disk
  (``torch.load`` + load into the one network) before its forward.

Timing is compute only (no slice files written, the same for both).  Agreement: the baseline's
segmentation (reload per batch) is run on the current path's images and compared label by
label; the baseline's slice count and duplicated latents are printed.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_generate              # tiny config
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_generate --preset small
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_generate --paper-load  # + reload cost of a paper-size checkpoint
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from model import N_ZBINS
from MultiMedSeg import generation as gen
from MultiMedSeg.ensemble import feature_scale_of
from MultiMedSeg.models.psp import PSP, PSPConfig
from MultiMedSeg.training import checkpoints as ck
from robustmedseg.errors import CliParser, run_cli
from robustmedseg.io import load_torch_file

PRESETS: Dict[str, Dict] = {
    # the test configuration
    "tiny": dict(output_size=32, style_dim=32, n_mlp=2, channel_cap=16, encoder_depth=10, encoder_base_channels=8,
                 encoder_input_size=16),
    # paper-like widths where they cost parameters but little compute on CPU (mapping, style head,
    # IResNet-18 encoder), capped synthesis channels
    "small": dict(output_size=64, style_dim=512, n_mlp=8, channel_cap=32, encoder_depth=18,
                  encoder_base_channels=32, encoder_input_size=32),
}


# ------------------------------------------------------------------------------ fixtures
def write_run(folder: Path, config: PSPConfig, k: int) -> List[Path]:
    """k best checkpoints sharing one decoder (frozen-decoder run) with a best.json."""
    torch.manual_seed(0)
    first = PSP(config)
    with torch.no_grad():
        for name, p in first.decoder.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.3)
    first.compute_latent_avg(512, seed=0)
    index = ck.BestIndex(folder / "checkpoints", k=k)
    for i in range(k):
        torch.manual_seed(10 + i)
        net = first if i == 0 else PSP(config)
        if i:
            net.decoder.load_state_dict(first.decoder.state_dict())
            net.latent_avg.copy_(first.latent_avg)
            net.latent_avg_valid.copy_(first.latent_avg_valid)
        index.add(1.0 - 0.1 * i, 20000 + i, {}, net.checkpoint_payload(20000 + i))
    return index.paths()


# ------------------------------------------------------------------------------ the reference algorithm
def reference_path(latents_per_batch: List[torch.Tensor], s: int) -> List[torch.Tensor]:
    """docs/method.md#generation step 3 as-is: per batch, prepend the previous batch's last latent; for every pair emit
    j = 0..s-1, for the last pair j = 0..s-2 and then the final latent itself."""
    out: List[torch.Tensor] = []
    prev = None
    for lat in latents_per_batch:
        seq = ([prev] if prev is not None else []) + list(lat)
        for i in range(len(seq) - 1):
            last = i == len(seq) - 2
            for j in range(s - 1 if last else s):
                out.append(seq[i] + (j / s) * (seq[i + 1] - seq[i]))
            if last:
                out.append(seq[i + 1])
        prev = lat[-1]
    return out


class Reference:
    """The reference generate_volumes.py loop on one network whose weights are reloaded per batch."""

    def __init__(self, paths: List[Path], label: int, s: int, batch: int):
        self.paths, self.label, self.s, self.batch = paths, label, s, batch
        self.net = PSP.from_checkpoint(paths[0]).eval()  # built once, as the reference
        # the best checkpoint's feature scale, for all
        self.fs = feature_scale_of(load_torch_file(paths[0], "phase-2 checkpoint", mapping=True))

    @torch.no_grad()
    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """(B,1,R,R) -> (B,R,R): every checkpoint reloaded from disk, mean probabilities, argmax."""
        x = self.net.face_pool(images)
        label = torch.tensor([[1.0, 0.0]]).expand(x.shape[0], 2)
        total = 0
        for path in self.paths:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            self.net.load_checkpoint(path, payload)
            self.net.eval()
            total = total + self.net(x, label, resize=False, feature_scale=self.fs)[:, 1:]
        return (total / len(self.paths)).argmax(1)

    @torch.no_grad()
    def volume(self) -> Tuple[np.ndarray, np.ndarray, int]:
        g = self.net.decoder
        z = torch.randn(1, g.style_dim)
        bins = list(range(g.n_zbins))
        per_batch = []
        for start in range(0, len(bins), self.batch):
            chunk = bins[start:start + self.batch]
            cond = g.condition(self.label, chunk)
            _, lat = g([z.repeat(len(chunk), 1)], cond, return_latents=True)  # images discarded
            per_batch.append(lat)
        path = torch.stack(reference_path(per_batch, self.s))
        images, labels = [], []
        for start in range(0, path.shape[0], self.batch):
            img, _ = g.g_synthesis(path[start:start + self.batch], randomize_noise=True)
            img = img.clamp(-1, 1)
            labels.append(self.segment(img).numpy())
            images.append(img[:, 0].numpy())
        dup = int(sum(torch.equal(path[i], path[i + 1]) for i in range(path.shape[0] - 1)))
        return np.concatenate(images), np.concatenate(labels), dup


# ------------------------------------------------------------------------------ measurement
def timed(fn, reps: int) -> Tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def paper_reload_cost(folder: Path) -> Tuple[float, float]:
    """(file MiB, seconds) to reload one paper-size checkpoint (512 px, IResNet-50) into a built net."""
    config = PSPConfig(src_tgt_domains=[0])
    net = PSP(config)
    net.latent_avg_valid.fill_(True)
    path = folder / "paper.pt"
    net.save_checkpoint(path, 20000)
    size = path.stat().st_size / 2**20

    def reload():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        net.load_checkpoint(path, payload)

    reload()  # page cache warm, as in a loop over batches
    sec, _ = timed(reload, 3)
    return size, sec


def build_parser() -> CliParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--n_zbins", type=int, default=N_ZBINS)
    p.add_argument("--s", type=int, default=10, help="slices_in_one_z (default 10)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ensemble", type=int, default=5, help="best checkpoints (default 5, the reference's k)")
    p.add_argument("--reps", type=int, default=3, help="volumes timed per path (median)")
    p.add_argument("--paper-load", action="store_true",
                   help="also time the reload of one paper-size checkpoint (writes ~0.7 GB to a temp folder)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    a = build_parser().parse_args(argv)
    torch.set_grad_enabled(False)
    config = PSPConfig(n_zbins=a.n_zbins, src_tgt_domains=[0], label_nc=3, **PRESETS[a.preset])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, preset {a.preset}: {PRESETS[a.preset]}")
    print(f"n_zbins {a.n_zbins}, s {a.s}, batch {a.batch}, ensemble {a.ensemble}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_run(tmp / "run", config, a.ensemble)
        mib = paths[0].stat().st_size / 2**20
        cfg = gen.GenerationConfig(ckpt_dir=tmp / "run", label=0, n_volumes=1, slices_in_one_z=a.s,
                                   n_segmentation_labels=3, out_dir=tmp / "out", batch_size=a.batch, device="cpu")
        t0 = time.perf_counter()
        factory, _ = gen.build_factory(cfg, log=lambda *x: None)
        setup = time.perf_counter() - t0
        reference = Reference(paths, 0, a.s, a.batch)
        counter = iter(range(10**6))
        cur_t, (images, labels) = timed(lambda: factory.volume(next(counter)), a.reps)
        ref_t, (ref_images, _, dup) = timed(reference.volume, a.reps)
        # agreement: the reference segmentation (reload per batch) of the current path's images
        ref_labels = np.concatenate([reference.segment(torch.from_numpy(images[i:i + a.batch, None])).numpy()
                                     for i in range(0, images.shape[0], a.batch)])
    agree = float((ref_labels == labels).mean())
    n_cur, n_ref = images.shape[0], ref_images.shape[0]
    cur_vpm, ref_vpm = 60.0 / cur_t, 60.0 / ref_t
    print(f"checkpoint file {mib:.2f} MiB each; current setup (load {a.ensemble} checkpoints once) {setup:.2f} s")
    print(f"slices/volume: current {n_cur} = ({a.n_zbins}-1)*{a.s}+1, reference {n_ref} with {dup} duplicated")
    print(f"current   {cur_t:8.2f} s/volume  {cur_vpm:8.2f} volumes/min  ({1e3 * cur_t / n_cur:.1f} ms/slice)")
    print(f"reference {ref_t:8.2f} s/volume  {ref_vpm:8.2f} volumes/min  ({1e3 * ref_t / n_ref:.1f} ms/slice)")
    print(f"ratio (volumes/min current / reference): {cur_vpm / ref_vpm:.2f}x  "
          f"(per slice {(ref_t / n_ref) / (cur_t / n_cur):.2f}x)")
    print(f"same labels on identical images: {100 * agree:.3f} % of pixels")
    if a.paper_load:
        with tempfile.TemporaryDirectory() as tmp:
            size, sec = paper_reload_cost(Path(tmp))
        slices = gen.slice_count(N_ZBINS, 10)
        batches = -(-(slices - 1) // a.batch)
        print(f"paper-size checkpoint: {size:.0f} MiB, reload {sec:.2f} s -> the reference spends "
              f"{a.ensemble} x {batches} x {sec:.2f} = {a.ensemble * batches * sec / 60:.1f} min per volume on "
              f"reloads alone ({N_ZBINS} bins, s 10, batch {a.batch}); the current path {a.ensemble * sec:.1f} s "
              "per run")


if __name__ == "__main__":
    run_cli(main)
