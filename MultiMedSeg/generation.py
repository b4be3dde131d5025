"""Synthetic labelled source volumes from the data factory (docs/method.md#generation, with the
docs/differences.md#d9-40 fixes).

For each volume one noise vector ``z`` is shared by all z-bins.  The W+ latents of the
``n_zbins`` conditions ``[one-hot(label); one-hot(bin)]`` (plus the optional CLIP encoding) are
computed in ONE batched mapping pass, then interpolated linearly between consecutive bins with
``s = slices_in_one_z`` points per gap.  Slice ``k`` (``0 <= k < N``) sits at position ``k / s`` on
the bin axis, so

    N = (n_zbins - 1) * s + 1

slices: bin ``i`` is slice ``i * s`` exactly, the volume starts on the first bin's latent and
ends exactly on the last bin's latent, and no latent is emitted twice or skipped whatever the
batch size (docs/differences.md#d9-40: the reference re-emitted the boundary latent and skipped one point at every
batch boundary, e.g. 280 slices with 7 duplicates for 29 bins, s = 10, batch 4; here 281,
none duplicated).

The slices are synthesised in batches (``--batch_size``; generator forward on W+ without
feature collection, equivalent to ``g_synthesis``) with reproducible noise and segmented
by the ensemble of the best phase-2 checkpoints, each file read ONCE and the networks kept in
memory (the reference reloaded every checkpoint from disk for every batch).  Class
probabilities are averaged over the ensemble and the argmax is taken; optionally only the
largest 2-D connected component(s) of every foreground label are kept (8-connected, ties kept).  Output, in the phase-2
slice format so that the folder can be used directly as the source folder of
``MultiMedSeg/train.py``::

    <out_dir>/fakeVolume<i>_slice<NNN>.npz     data float32 (R,R,1) in [-1,1], mask bool one-hot (R,R,L)
    <out_dir>/nifti/fakeVolume<i>.nii.gz       image float32 (R,R,N)   (--nifti, default on)
    <out_dir>/nifti/fakeVolume<i>_label.nii.gz label uint8 (R,R,N)
    <out_dir>/montage/fakeVolume<i>.png        a few slices with the label overlay (--montage, default on)
    <out_dir>/generation.json                  the settings, checkpoints and slice count

The folder is written atomically (``robustmedseg.io.atomic_dir``).  NIfTI files use an
identity affine: the generator has no physical pixel spacing, so the spacing is 1 (mm) on every
axis.

Choices made explicit here (the reference hard-coded them):

* synthesis generator: the decoder stored in the best phase-2 checkpoint, i.e. the ``g_ema``
  copy the segmentation heads were trained with (as the reference); ``generator`` (CLI
  ``--generator final_global_model.pt``) overrides it with a phase-1 file, the segmentation
  networks keep their own decoders;
* segmentation ensemble and head (:mod:`MultiMedSeg.ensemble`): ``head='auto'`` uses the head
  of the checkpoint domain equal to ``label`` (``source`` = one-hot [1, 0], ``target`` = [0, 1]);
  a ``label`` that is not a checkpoint domain is an error unless the head is named (the
  reference always used [1, 0]);
* feature scale: each checkpoint uses its own ``min(1, rate * global_step)``, as inference;
* noise: ``'slice'`` (default) fresh noise per slice, as the original (which drew it unseeded;
  here it is seeded), ``'volume'`` one seeded noise set per volume shared by its slices (slices
  then differ only by their latent: smoother along z), ``'fixed'`` the generator's stored noise
  buffers.  ``z`` and the noise of volume ``i`` depend only on ``(seed, i)``.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from model import Generator
from MultiMedSeg.ensemble import SegmentationEnsemble, resolve_checkpoints
from MultiMedSeg.options import NOISE_MODES, GenerationConfig
from robustmedseg.data.slices import one_hot, save_slice, slice_name
from robustmedseg.device import resolve_device
from robustmedseg.errors import InputError
from robustmedseg.factory_file import load_factory_file
from robustmedseg.io import atomic_dir, atomic_path, check_apart, check_new_output, write_text_atomic

VOLUME_PREFIX = "fakeVolume"
MONTAGE_SLICES = 6
# Overlay colours of labels 1, 2, ... (RGB in [0, 1]); cycled for more labels.
PALETTE = np.array([[0.90, 0.10, 0.10], [0.10, 0.75, 0.20], [0.15, 0.35, 0.95], [0.95, 0.80, 0.10],
                    [0.80, 0.20, 0.85], [0.10, 0.85, 0.85], [0.95, 0.50, 0.10], [0.55, 0.35, 0.15]])


# ------------------------------------------------------------------------------- latent path
def slice_count(n_zbins: int, slices_in_one_z: int) -> int:
    """Number of slices of a volume: ``(n_zbins - 1) * s + 1`` (one slice when there is one bin)."""
    if n_zbins < 1 or slices_in_one_z < 1:
        raise ValueError(f"n_zbins and slices_in_one_z must be >= 1, got {n_zbins}, {slices_in_one_z}")
    return (n_zbins - 1) * slices_in_one_z + 1


def interpolation_plan(n_zbins: int, slices_in_one_z: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lower bin index, fraction) of every slice: slice k lies at bin position k / s.

    Returns ``idx`` (N,) int64 and ``frac`` (N,) float64 in [0, 1); the last slice is
    (n_zbins - 1, 0).
    """
    n = slice_count(n_zbins, slices_in_one_z)
    k = torch.arange(n)
    return k // slices_in_one_z, (k % slices_in_one_z).double() / slices_in_one_z


def interpolate_latents(bin_latents: torch.Tensor, slices_in_one_z: int) -> torch.Tensor:
    """Linear path through the bin latents (n_zbins, ...) -> (N, ...), N = :func:`slice_count`.

    ``L_i + t (L_{i+1} - L_i)`` with ``t = j / s``; bin latents are reproduced exactly (t = 0).
    """
    idx, frac = interpolation_plan(bin_latents.shape[0], slices_in_one_z)
    extended = torch.cat([bin_latents, bin_latents[-1:]], 0)  # the last slice pairs the last bin with itself
    idx = idx.to(bin_latents.device)
    lower, upper = extended[idx], extended[idx + 1]
    t = frac.to(device=bin_latents.device, dtype=bin_latents.dtype).view(-1, *([1] * (bin_latents.ndim - 1)))
    return lower + t * (upper - lower)


@torch.no_grad()
def bin_latents(generator: Generator, z: torch.Tensor, domain: int,
                encoding: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W+ latents (n_zbins, n_latent, style_dim) of one ``z`` (1, style_dim) under every z-bin condition.

    One batched mapping pass; equals the latents ``generator([z], (c, e), return_latents=True)``
    returns per bin, without synthesising the images.
    """
    n = generator.n_zbins
    cond = generator.condition(domain, list(range(n)))
    e = None if encoding is None else encoding.to(cond).expand(n, -1)
    w = generator.get_latent(z.to(cond).expand(n, -1), cond, e)
    return w.unsqueeze(1).expand(n, generator.n_latent, generator.style_dim).contiguous()


# ------------------------------------------------------------------------------- randomness
def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit torch seed that depends only on ``(seed, *keys)`` (numpy SeedSequence)."""
    words = np.random.SeedSequence([int(seed) % 2**63, *[int(k) for k in keys]]).generate_state(2, np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))


def draw_noise(generator: Generator, rng: torch.Generator, batch: int = 1) -> List[torch.Tensor]:
    """One noise tensor (batch, 1, r, r) per synthesis layer, drawn on the CPU from ``rng``."""
    return [torch.randn(batch, *getattr(generator.noises, f"noise_{j}").shape[1:], generator=rng)
            for j in range(generator.num_layers)]


# ------------------------------------------------------------------------------- post-processing
def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Per 2-D slice and per foreground label, keep only the largest connected component(s).

    ``labels`` (H, W) or (B, H, W) integer label maps; removed pixels become background (0).
    As the original's helper (acvl_utils ``remove_all_but_largest_component`` with its default
    connectivity = the number of dimensions): components are 8-connected (diagonal neighbours join),
    and every component tied for the largest size is kept.
    """
    from scipy import ndimage

    single = labels.ndim == 2
    maps = labels[None] if single else labels
    out = maps.copy()
    full = np.ones((3, 3), dtype=bool)  # 8-connectivity
    for b in range(maps.shape[0]):
        for value in np.unique(maps[b]):
            if value == 0:
                continue
            comp, n = ndimage.label(maps[b] == value, structure=full)
            if n > 1:
                sizes = np.bincount(comp.ravel())[1:]
                keep = np.flatnonzero(sizes == sizes.max()) + 1
                out[b][(comp > 0) & ~np.isin(comp, keep)] = 0
    return out[0] if single else out


# ------------------------------------------------------------------------------- inputs
def load_encoding(path: Path, clip_dim: int) -> torch.Tensor:
    """``clip_mean.npy`` as float32 (1, clip_dim); a (clip_dim,) vector is accepted."""
    path = Path(path)
    if not path.is_file():
        raise InputError("CLIP mean file not found", path)
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - corrupt or pickled file
        raise InputError(f"cannot read CLIP mean ({type(err).__name__}: {err})", path) from None
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape != (1, clip_dim) or not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"CLIP mean must be a float (1, {clip_dim}) array, got {array.dtype} {array.shape}", path)
    if not np.all(np.isfinite(array)):
        raise InputError("CLIP mean contains NaN or inf", path)
    return torch.from_numpy(array.astype(np.float32))


# ------------------------------------------------------------------------------- the factory
class VolumeFactory:
    """Generator + segmentation ensemble + settings; :meth:`volume` makes one labelled volume.

    Build it with :meth:`from_config` (loads everything once).  ``generator`` is used in eval
    mode on the ensemble's device.
    """

    def __init__(self, generator: Generator, ensemble: SegmentationEnsemble, label: int, slices_in_one_z: int,
                 batch_size: int = 4, encoding: Optional[torch.Tensor] = None, noise: str = "slice",
                 seed: int = 0, keep_largest_component: bool = False):
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        if generator.size != ensemble.config.output_size:
            raise ValueError(f"generator size {generator.size} != segmentation size {ensemble.config.output_size}")
        self.generator = generator.eval()
        self.ensemble = ensemble
        self.label = int(label)
        self.s = int(slices_in_one_z)
        self.batch_size = int(batch_size)
        self.encoding = encoding
        self.noise = noise
        self.seed = int(seed)
        self.keep_largest_component = keep_largest_component

    @property
    def n_slices(self) -> int:
        return slice_count(self.generator.n_zbins, self.s)

    @property
    def device(self) -> torch.device:
        return self.ensemble.device

    def latents(self, index: int) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]]]:
        """W+ path (N, n_latent, style_dim) of volume ``index`` and its per-volume noise (or None)."""
        rng = torch.Generator().manual_seed(derived_seed(self.seed, index))
        z = torch.randn(1, self.generator.style_dim, generator=rng)
        noise = [n.to(self.device) for n in draw_noise(self.generator, rng)] if self.noise == "volume" else None
        w = bin_latents(self.generator, z.to(self.device), self.label, self.encoding)
        return interpolate_latents(w, self.s), noise

    def _batch_noise(self, index: int, start: int, stop: int,
                     volume_noise: Optional[List[torch.Tensor]]) -> Optional[List[torch.Tensor]]:
        if self.noise == "fixed":
            return None
        if self.noise == "volume":
            return volume_noise
        per_slice = [draw_noise(self.generator, torch.Generator().manual_seed(derived_seed(self.seed, index, k)))
                     for k in range(start, stop)]
        return [torch.cat(layer, 0).to(self.device) for layer in zip(*per_slice)]

    @torch.no_grad()
    def synthesize(self, latents: torch.Tensor, noise: Optional[List[torch.Tensor]]) -> torch.Tensor:
        """(B, n_latent, D) W+ -> (B, 1, R, R) images clamped to [-1, 1] (no feature collection)."""
        images, _ = self.generator([latents], input_is_latent=True, noise=noise, randomize_noise=False)
        return images.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def volume(self, index: int, on_batch: Optional[Callable[[int], None]] = None
               ) -> Tuple[np.ndarray, np.ndarray]:
        """Volume ``index``: images float32 (N, R, R) and labels uint8 (N, R, R)."""
        path, volume_noise = self.latents(index)
        images, labels = [], []
        for start in range(0, path.shape[0], self.batch_size):
            stop = min(start + self.batch_size, path.shape[0])
            img = self.synthesize(path[start:stop], self._batch_noise(index, start, stop, volume_noise))
            lab = self.ensemble.predict(img).to(torch.uint8).cpu().numpy()
            if self.keep_largest_component:
                lab = keep_largest_components(lab)
            images.append(img[:, 0].float().cpu().numpy())
            labels.append(lab)
            if on_batch is not None:
                on_batch(stop - start)
        return np.concatenate(images), np.concatenate(labels)


def build_factory(cfg: GenerationConfig, log: Callable[[str], None] = print) -> Tuple[VolumeFactory, List[Path]]:
    """Load the checkpoints (once), the generator and the encoding; check every compatibility rule."""
    device = resolve_device(cfg.device)
    paths = resolve_checkpoints(cfg.ckpt_dir, cfg.ensemble_size)
    ensemble = SegmentationEnsemble.load(paths, cfg.label, cfg.head, device, cfg.feature_scale_from)
    pc = ensemble.config
    if pc.label_nc != cfg.n_segmentation_labels:
        raise InputError(f"checkpoint segments {pc.label_nc} labels but --label_nc is "
                         f"{cfg.n_segmentation_labels}", paths[0])
    if cfg.generator is not None:
        generator, _ = load_factory_file(cfg.generator)
        source: Any = cfg.generator
        if generator.size != pc.output_size:
            raise InputError(f"generator is {generator.size} px but the checkpoints segment {pc.output_size} px",
                             cfg.generator)
        generator.to(device)
    else:
        generator, source = ensemble.members[0].net.decoder, paths[0]
    _check_generator(cfg, generator, source)
    encoding = load_encoding(cfg.clip_mean, generator.clip_dim).to(device) if cfg.clip_mean is not None else None
    log(f"segmentation: {len(paths)} checkpoint(s), {ensemble.head} head, label_nc {pc.label_nc}; "
        f"synthesis: {'phase-1 file ' + str(cfg.generator) if cfg.generator else 'decoder of ' + str(paths[0])} "
        f"({generator.size} px, {generator.n_zbins} z-bins); device {device}")
    factory = VolumeFactory(generator, ensemble, cfg.label, cfg.slices_in_one_z, cfg.batch_size, encoding,
                            cfg.noise, cfg.seed, cfg.keep_largest_component)
    return factory, paths


def _check_generator(cfg: GenerationConfig, generator: Generator, source: Any) -> None:
    if cfg.n_domains is not None and cfg.n_domains != generator.n_domains:
        raise InputError(f"generator has n_domains = {generator.n_domains} but --n_domains is {cfg.n_domains}", source)
    if not 0 <= cfg.label < generator.n_domains:
        raise InputError(f"--label {cfg.label} is not a domain of the generator (n_domains = {generator.n_domains})",
                         source)
    if cfg.z_depth is not None and cfg.z_depth != generator.n_zbins:
        raise InputError(f"generator has {generator.n_zbins} z-bins but --n_zbins is {cfg.z_depth}", source)


# ------------------------------------------------------------------------------- writing
def volume_name(index: int) -> str:
    return f"{VOLUME_PREFIX}{index}"


def write_slices(folder: Path, name: str, images: np.ndarray, labels: np.ndarray, n_classes: int) -> None:
    """``<name>_slice<NNN>.npz`` per slice: data (R,R,1) float32, mask bool one-hot (R,R,L), no weight."""
    for k in range(images.shape[0]):
        save_slice(folder / slice_name(name, k), images[k][:, :, None], one_hot(labels[k], n_classes))


def write_nifti(folder: Path, name: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Image float32 and label uint8 volumes (R, R, N), identity affine (spacing 1, see module doc)."""
    import nibabel as nib

    for suffix, array, dtype in (("", images, np.float32), ("_label", labels, np.uint8)):
        img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(1, 2, 0)).astype(dtype), np.eye(4))
        img.header.set_data_dtype(dtype)
        img.header.set_xyzt_units("mm")
        with atomic_path(folder / f"{name}{suffix}.nii.gz", suffix=".nii.gz") as tmp:
            nib.save(img, str(tmp))


def montage_image(images: np.ndarray, labels: np.ndarray, n: int = MONTAGE_SLICES, alpha: float = 0.45,
                  min_tile: int = 128) -> np.ndarray:
    """RGB float (T, m·(T+2)−2, 3): ``n`` evenly spaced slices, labels >= 1 overlaid in colour.

    Tiles smaller than ``min_tile`` px are enlarged by an integer factor (nearest) to stay legible.
    """
    picks = np.unique(np.linspace(0, images.shape[0] - 1, min(n, images.shape[0])).round().astype(int))
    zoom = max(1, min_tile // images.shape[1])
    tiles = []
    for k in picks:
        gray = np.clip((images[k] + 1.0) / 2.0, 0.0, 1.0)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        fg = labels[k] > 0
        colours = PALETTE[(labels[k].astype(int) - 1) % len(PALETTE)]
        rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colours[fg]
        rgb = rgb.repeat(zoom, axis=0).repeat(zoom, axis=1)
        tiles.append(rgb)
        tiles.append(np.ones((rgb.shape[0], 2, 3)))
    return np.concatenate(tiles[:-1], axis=1)


def write_montage(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from matplotlib import image as mpimg

    with atomic_path(path, suffix=".png") as tmp:
        mpimg.imsave(tmp, montage_image(images, labels), format="png")


# ------------------------------------------------------------------------------- driver
def generate(cfg: GenerationConfig, log: Callable[[str], None] = print, progress: bool = True) -> Dict[str, Any]:
    """Run the whole job (see module doc); returns the summary also written to ``generation.json``."""
    cfg.validate()
    out = Path(cfg.out_dir)
    check_apart({"--out_dir": out}, {"--checkpoint_dir": cfg.ckpt_dir, "--generator": cfg.generator,
                                     "--clip_mean": cfg.clip_mean})
    check_new_output(out, cfg.overwrite)
    factory, paths = build_factory(cfg, log)
    n = factory.n_slices
    log(f"{cfg.n_volumes} volume(s) of N = (n_zbins - 1) * s + 1 = ({factory.generator.n_zbins} - 1) * "
        f"{cfg.slices_in_one_z} + 1 = {n} slices -> {out}")
    from tqdm import tqdm

    bar = tqdm(total=cfg.n_volumes * n, unit="slice", disable=not progress, dynamic_ncols=True)
    try:
        with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
            for i in range(cfg.n_volumes):
                images, labels = factory.volume(i, on_batch=bar.update)
                name = volume_name(i)
                write_slices(tmp, name, images, labels, factory.ensemble.label_nc)
                if cfg.nifti:
                    write_nifti(tmp / "nifti", name, images, labels)
                if cfg.montage:
                    write_montage(tmp / "montage" / f"{name}.png", images, labels)
            summary = _summary(cfg, factory, paths)
            write_text_atomic(tmp / "generation.json", json.dumps(summary, indent=2) + "\n")
    finally:
        bar.close()
    return summary


def _summary(cfg: GenerationConfig, factory: VolumeFactory, paths: Sequence[Path]) -> Dict[str, Any]:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    return {"settings": settings, "n_zbins": factory.generator.n_zbins, "slices_per_volume": factory.n_slices,
            "slice_count_formula": "(n_zbins - 1) * slices_in_one_z + 1", "head": factory.ensemble.head,
            "checkpoints": [str(p) for p in paths],
            "feature_scales": factory.ensemble.scales,  # what each member ran with (--feature_scale_from)
            "checkpoint_feature_scales": [m.feature_scale for m in factory.ensemble.members],
            "synthesis_generator": str(cfg.generator) if cfg.generator else f"decoder of {paths[0]}",
            "nifti_spacing_mm": [1.0, 1.0, 1.0]}
