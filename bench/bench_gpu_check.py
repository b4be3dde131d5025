"""One prepared device check: what a lent GPU must run, in under 8 minutes, to validate and time the code.

Sections (each a group of rows of ONE Markdown table written to stdout; progress goes to stderr):

1. ``env``: GPU, torch, CUDA, cuDNN.
2. ``ext``: JIT build (or cache load) of the two CUDA extensions of ``op/``, with its time.
3. ``selfcheck``: the first-use self-check of each kernel (``op/_backend.py``) in float32, float16 and
   float64: CUDA kernel vs reference path, forward, first and second order gradients.
4. ``optests``: the CUDA tests of ``tests/test_ops.py`` (``pytest -m cuda``: every upfirdn2d
   configuration and fused_leaky_relu vs the reference path, gradcheck and gradgradcheck in float64).
5. ``ops``: forward+backward time of each op on feature maps of the 256 px model, CUDA kernel vs
   reference path (same card, same process).
6. ``phase1``: one node update of phase 1 (``robustmedseg.factory.FactoryTrainer``: D, D+R1, G, G+path
   length; ADA on) at 256 px with the paper's channels, batch 16; images/s over a lazy-regularisation
   cycle with the CUDA kernels, with the reference path, with ``--allow-tf32`` and with
   ``--cudnn-benchmark``; peak GPU memory.
7. ``phase2``: phase-2 training steps (``MultiMedSeg.training.coach.Coach.train_step``) at 256 px: one
   pretraining step (intra branch) and one adaptation step of each kind (intra / inter + cycle), IResNet-50
   encoder, LPIPS on (random AlexNet weights), with ``--amp fp16`` (default; also with the reference ops),
   ``--amp bf16`` and ``--amp off``; peak GPU memory. The data are synthetic slices, the generator is
   randomly initialised (speed and memory do not depend on the weights).

Usage::

    bash bench/gpu_check.sh                           # on a GPU: the full check (< 8 min on an H200)
    python -m bench.bench_gpu_check --device cpu --tiny     # dry run of the structure on CPU (tiny sizes)

``--device cpu`` runs every section on the CPU and reports CPU figures: no extension is built, the
self-check compares the reference path with itself (marked "dry run"), the CUDA op tests are skipped by
pytest, and the "kernels" rows use the automatic op selection, which is the reference path on a CPU.
A section that fails becomes a ``FAILED`` row (traceback on stderr); the others still run. Sections
left when ``--budget-s`` is spent are reported as skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]

import numpy as np
import torch

from model import GeneratorArgs

SECTIONS = ("env", "ext", "selfcheck", "optests", "ops", "phase1", "phase2")


# ----------------------------------------------------------------------------------------------- config
@dataclass
class Sizes:
    """Everything that differs between the real check and the tiny dry run."""

    p1: GeneratorArgs = GeneratorArgs(size=256)  # phase 1's networks (paper widths at 256 px)
    batch: int = 16
    reps: int = 5
    op_batch: int = 16
    op_div: int = 1  # feature-map channels and sides divided by this
    p2: GeneratorArgs = GeneratorArgs(size=256)  # phase 2's decoder
    p2_encoder_depth: int = 50
    p2_encoder_base: int = 64
    p2_lpips: bool = True
    p2_reps: int = 5
    p2_latent_avg_samples: int = 4096

    @classmethod
    def tiny(cls) -> "Sizes":
        tiny = GeneratorArgs(size=32, style_dim=32, n_mlp=2, channel_cap=16, clip_dim=16)
        return cls(p1=tiny, batch=4, reps=1, op_batch=2, op_div=8, p2=tiny, p2_encoder_depth=10, p2_encoder_base=8,
                   p2_lpips=False, p2_reps=1, p2_latent_avg_samples=64)


@dataclass
class Row:
    check: str
    config: str
    result: str
    memory: str = "—"


@dataclass
class Report:
    device: torch.device
    budget_s: float
    rows: List[Row] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def add(self, check: str, config: str, result: str, memory: str = "—") -> None:
        self.rows.append(Row(check, config, result, memory))
        log(f"  {check} | {config} | {result} | {memory}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def table(self) -> str:
        mem = "peak GPU memory" if self.device.type == "cuda" else "peak GPU memory (n/a on CPU)"
        lines = [f"| check | configuration | result | {mem} |", "|---|---|---|---|"]
        for r in self.rows:
            cells = [c.replace("|", "\\|").replace("\n", " ") for c in (r.check, r.config, r.result, r.memory)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], None], reps: int, device: torch.device, warmup: int = 1) -> float:
    """Median seconds of ``reps`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@contextlib.contextmanager
def peak_memory(device: torch.device, out: Dict[str, str]) -> Iterator[None]:
    """Writes the peak allocated GPU memory of the block into ``out['memory']`` ("—" on CPU)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        if device.type == "cuda":
            sync(device)
            out["memory"] = f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
        else:
            out["memory"] = "—"


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def ops_mode(mode: str) -> Iterator[None]:
    """``kernels``: automatic op selection (CUDA kernels on a GPU); ``ref``: the reference path forced."""
    from op import _backend

    with (_backend.forced_impl("ref") if mode == "ref" else contextlib.nullcontext()):
        yield


@contextlib.contextmanager
def backends(allow_tf32: bool = False, cudnn_benchmark: bool = False) -> Iterator[None]:
    """The switches of ``--allow-tf32`` / ``--cudnn-benchmark`` inside the block; previous values after."""
    from robustmedseg.device import configure_backends

    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), \
        (torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "deterministic")
    saved = [getattr(obj, name) for obj, name in flags]
    configure_backends(allow_tf32, cudnn_benchmark)
    try:
        yield
    finally:
        for (obj, name), value in zip(flags, saved):
            setattr(obj, name, value)


# ----------------------------------------------------------------------------------------------- sections
def section_env(rep: Report, sizes: Sizes, args: argparse.Namespace) -> None:
    dev = rep.device
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        rep.add("device", str(dev), f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB, compute capability "
                f"{props.major}.{props.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
        rep.add("software", "torch / CUDA / cuDNN",
                f"{torch.__version__} / {torch.version.cuda} / {torch.backends.cudnn.version()}")
    else:
        rep.add("device", "cpu (dry run)", f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
    rep.add("sizes", "tiny dry run" if args.tiny else "full check",
            f"phase 1: {sizes.p1.size} px, batch {sizes.batch}, latent {sizes.p1.style_dim}, n_mlp {sizes.p1.n_mlp}, "
            f"channels {'paper' if sizes.p1.channel_cap is None else f'capped at {sizes.p1.channel_cap}'}; phase 2: "
            f"{sizes.p2.size} px, IResNet-{sizes.p2_encoder_depth}; median of {sizes.reps} repetitions")


def section_ext(rep: Report, sizes: Sizes, args: argparse.Namespace) -> None:
    from op import _backend

    for name in _backend.EXTENSIONS:
        if rep.device.type != "cuda":
            rep.add("CUDA extension build", name, "not built (CPU dry run)")
            continue
        t = time.perf_counter()
        module = _backend.load_extension(name)
        dt = time.perf_counter() - t
        if module is None:
            rep.add("CUDA extension build", name, f"FAILED after {dt:.1f} s: {_backend.build_error(name)}")
        else:
            rep.add("CUDA extension build", name, f"ok in {dt:.1f} s (JIT build or cache load)")


@contextlib.contextmanager
def reference_as_kernel() -> Iterator[None]:
    """CPU dry run only: the self-check compares the reference path with itself."""
    import op.fused_act as A
    import op.upfirdn as U

    saved = (U._run_kernel, A._run_kernel)
    U._run_kernel = lambda x, k, up, down, pad: U.upfirdn2d_ref(x, k, up, down, pad)
    A._run_kernel = lambda x, b, slope, scale: A._fused_leaky_relu_ref(x, b, slope, scale)
    try:
        yield
    finally:
        U._run_kernel, A._run_kernel = saved


def section_selfcheck(rep: Report, sizes: Sizes, args: argparse.Namespace) -> None:
    import op  # noqa: F401 - registers the checks
    from op import _backend

    cuda = rep.device.type == "cuda"
    dtypes = (torch.float32, torch.float16, torch.float64) if cuda else (torch.float32, torch.float64)
    with (contextlib.nullcontext() if cuda else reference_as_kernel()):
        for name in ("upfirdn2d", "fused_leaky_relu"):
            for dtype in dtypes:
                t = time.perf_counter()
                r = _backend.run_selfcheck(name, rep.device, dtype)
                dt = (time.perf_counter() - t) * 1e3
                verdict = "ok" if r.ok else "FAILED"
                label = f"{name}, {str(dtype).replace('torch.', '')}" + ("" if cuda else " (dry run: ref vs ref)")
                rep.add("kernel self-check", label, f"{verdict}: {r.detail} (tolerance {r.tolerance:g}; {dt:.0f} ms)")


def section_optests(rep: Report, sizes: Sizes, args: argparse.Namespace) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_ops.py"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=max(60.0, rep.budget_s - rep.elapsed()))
    dt = time.perf_counter() - t
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    summary = lines[-1].strip("= ") if lines else f"no output (exit {res.returncode})"
    failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in lines if ln.startswith("FAILED ")]
    if res.returncode not in (0, 5) or failed:  # 5: nothing collected/selected
        log(res.stdout[-6000:] + res.stderr[-3000:])
        summary = f"FAILED ({summary}): {', '.join(f.split('::')[-1] for f in failed[:8])}"
    rep.add("CUDA op tests", "pytest -m cuda tests/test_ops.py", f"{summary} [{dt:.0f} s]")


def _blur(gain: float = 1.0) -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = torch.outer(k, k)
    return k / k.sum() * gain


def section_ops(rep: Report, sizes: Sizes, args: argparse.Namespace) -> None:
    from op import _backend, fused_leaky_relu, upfirdn2d

    dev, b, d = rep.device, sizes.op_batch, sizes.op_div
    k, k4 = _blur().to(dev), _blur(4.0).to(dev)
    cases = [  # (name, shape, fn(x, impl)); the 256 px model's shapes (G: 512/256/128 channels)
        ("upfirdn2d up 2, pad (2, 1) (ToRGB skip)", (b, 512 // d, 64 // d, 64 // d),
         lambda x, impl: upfirdn2d(x, k4, up=2, pad=(2, 1), impl=impl)),
        ("upfirdn2d blur pad (1, 1) (after transposed conv)", (b, 256 // d, 129 // d, 129 // d),
         lambda x, impl: upfirdn2d(x, k4, pad=(1, 1), impl=impl)),
        ("upfirdn2d blur pad (2, 2) (D, before 3x3 stride 2)", (b, 128 // d, 256 // d, 256 // d),
         lambda x, impl: upfirdn2d(x, k, pad=(2, 2), impl=impl)),
        ("upfirdn2d down 2, pad (1, 1)", (b, 128 // d, 256 // d, 256 // d),
         lambda x, impl: upfirdn2d(x, k, down=2, pad=(1, 1), impl=impl)),
    ]
    bias = torch.zeros(128 // d, device=dev, requires_grad=True)
    cases.append(("fused_leaky_relu with bias", (b, 128 // d, 256 // d, 256 // d),
                  lambda x, impl: fused_leaky_relu(x, bias, impl=impl)))
    for name, shape, fn in cases:
        x = torch.randn(shape, device=dev, requires_grad=True)
        with torch.no_grad():
            g = torch.randn_like(fn(x, "ref"))
        ext = "rms_fused_bias_act" if name.startswith("fused") else "rms_upfirdn2d"
        op_name = "fused_leaky_relu" if name.startswith("fused") else "upfirdn2d"
        path = _backend.resolve_impl(None, x, ext, op=op_name)

        def step(impl: Optional[str]) -> Callable[[], None]:
            def run() -> None:
                fn(x, impl).backward(g)
                x.grad = None
            return run

        mem: Dict[str, str] = {}
        with peak_memory(dev, mem):
            t_auto = time_calls(step(None), sizes.reps, dev)
        t_ref = time_calls(step("ref"), sizes.reps, dev)
        shape_s = "x".join(map(str, shape))
        if path == "cuda":
            result = (f"fwd+bwd kernel {t_auto * 1e3:.2f} ms, reference {t_ref * 1e3:.2f} ms, "
                      f"kernel {t_ref / t_auto:.2f}x faster")
        else:
            why = "CPU" if dev.type != "cuda" else "kernel unavailable or failed its self-check"
            result = f"fwd+bwd automatic = reference ({why}) {t_auto * 1e3:.2f} ms, reference {t_ref * 1e3:.2f} ms"
        rep.add("op timing", f"{name}, {shape_s}", result, mem["memory"])
        del x, g
    release(dev)


# --- phase 1
P1_KINDS = {"D": 2, "D+R1": 0, "G": 3, "G+PL": 1}  # trainer.step of each update kind (see trainer.py)


def _phase1_trainer(sizes: Sizes, dev: torch.device):
    from robustmedseg.factory.config import FactoryConfig
    from robustmedseg.factory.network import FactoryModel
    from robustmedseg.factory.optim import AlternatingAdam
    from robustmedseg.factory.trainer import FactoryTrainer

    cfg = FactoryConfig.from_model_args({**sizes.p1.as_dict(), "augment": True, "augment_p": 0.2})
    torch.manual_seed(0)
    model = FactoryModel(cfg).to(dev)
    opt = AlternatingAdam(model.discriminator.parameters(), model.generator.parameters(), 0.002,
                          cfg.d_reg_every, cfg.g_reg_every)
    return FactoryTrainer(model, opt, cfg), cfg


def section_phase1(rep: Report, sizes: Sizes, args: argparse.Namespace) -> None:
    dev = rep.device
    trainer, cfg = _phase1_trainer(sizes, dev)
    gen = torch.Generator().manual_seed(1)
    real = torch.tanh(torch.randn(sizes.batch, 1, sizes.p1.size, sizes.p1.size, generator=gen)).to(dev)
    target = torch.tensor([[i % cfg.n_domains, i % cfg.n_zbins] for i in range(sizes.batch)], device=dev)

    def update(step: int) -> Callable[[], None]:
        def run() -> None:
            trainer.step = step
            trainer.opt.zero_grad()
            trainer.training_step(real, target).backward()
            trainer.opt.step()
        return run

    def cycle(mode: str, tf32: bool = False, bench: bool = False) -> Dict[str, float]:
        with ops_mode(mode), backends(tf32, bench):
            out = {kind: time_calls(update(step), sizes.reps, dev, warmup=2 if bench else 1)
                   for kind, step in P1_KINDS.items()}
        d_cycle = ((cfg.d_reg_every - 1) * out["D"] + out["D+R1"]) / cfg.d_reg_every
        g_cycle = ((cfg.g_reg_every - 1) * out["G"] + out["G+PL"]) / cfg.g_reg_every
        out["img/s"] = sizes.batch / (d_cycle + g_cycle)
        return out

    cap = sizes.p1.channel_cap
    label = (f"{sizes.p1.size} px, {'paper channels' if cap is None else f'cap {cap}'}, "
             f"batch {sizes.batch}, ADA p=0.2, float32")
    base: Optional[Dict[str, float]] = None
    for mode, tf32, bench, name in (("kernels", False, False, "CUDA kernels" if dev.type == "cuda" else
                                     "automatic ops (= reference on CPU)"),
                                    ("ref", False, False, "reference ops"),
                                    ("kernels", True, False, "kernels + --allow-tf32"),
                                    ("kernels", False, True, "kernels + --cudnn-benchmark")):
        if rep.elapsed() > rep.budget_s:
            rep.add("phase 1 node update", f"{label}, {name}", "skipped (time budget spent)")
            continue
        mem: Dict[str, str] = {}
        with peak_memory(dev, mem):
            out = cycle(mode, tf32, bench)
        parts = ", ".join(f"{k} {out[k] * 1e3:.0f} ms" for k in P1_KINDS)
        ratio = "" if base is None else f"; {base['img/s'] / out['img/s']:.2f}x the time of the first row"
        rep.add("phase 1 node update", f"{label}, {name}", f"{out['img/s']:.1f} img/s ({parts}){ratio}",
                mem["memory"])
        base = base or out
    del trainer, real
    release(dev)


# --- phase 2
def _write_phase2_data(root: Path, sizes: Sizes) -> Dict[str, Path]:
    """Synthetic slices (two discs of classes 1 and 2 on a noisy background), a random generator file
    and random LPIPS weights; returns the paths."""
    import model as M
    from robustmedseg.data.slices import save_slice
    from robustmedseg.factory_file import write_factory_file

    s = sizes.p2.size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:s, :s] / s

    def slices(folder: Path, vids: Sequence[str], n: int, labeled: bool) -> Path:
        for vid in vids:
            for z in range(n):
                cx, cy = 0.5 + 0.1 * rng.standard_normal(2)
                r = np.hypot(xx - cx, yy - cy)
                lab = np.where(r < 0.15, 2, np.where(r < 0.3, 1, 0))
                data = np.where(lab > 0, 0.2 * lab, -1.0) + 0.05 * rng.standard_normal((s, s))
                mask = (lab[..., None] == np.arange(3)) if labeled else None
                save_slice(folder / f"{vid}_slice{z:03d}.npz", np.clip(data, -1, 1).astype(np.float32), mask)
        return folder

    paths = {
        "src": slices(root / "src", ["s0", "s1"], 8, True),
        "src_val": slices(root / "src_val", ["s9"], 2, True),
        "tgt_lab": slices(root / "tgt_lab", ["t0"], 8, True),
        "tgt_unl": slices(root / "tgt_unl", ["t1"], 8, False),
        "tgt_val": slices(root / "tgt_val", ["t9"], 2, True),
    }
    torch.manual_seed(0)
    g = M.Generator.from_args(sizes.p2)
    paths["generator"] = write_factory_file(root / "generator.pt", g, sizes.p2)
    if sizes.p2_lpips:
        from torchvision.models import alexnet

        paths["alex_pretr"] = root / "alex_pretr.pth"
        paths["alex"] = root / "alex.pth"
        torch.save(alexnet(weights=None).features.state_dict(), paths["alex_pretr"])
        torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) / c
                    for i, c in enumerate((64, 192, 384, 256, 256))}, paths["alex"])
    return paths


def _coach(mode: str, root: Path, paths: Dict[str, Path], sizes: Sizes, dev: torch.device, amp: str, name: str,
           extra: Sequence[str] = ()):
    from MultiMedSeg.training.coach import Coach
    from MultiMedSeg.options import parse_training_options

    argv = ["--exp_dir", str(root / name), "--overwrite", "--device", dev.type, "--amp", amp, "--src_label", "0",
            "--label_nc", "3", "--start_from_latent_avg", "--latent_avg_samples", str(sizes.p2_latent_avg_samples),
            "--encoder_depth", str(sizes.p2_encoder_depth), "--encoder_base_channels", str(sizes.p2_encoder_base),
            "--source_root", str(paths["src"]), "--test_batch_size", "2"]
    if sizes.p2_lpips:
        argv += ["--alex_model", str(paths["alex"]), "--alex_pretr_model", str(paths["alex_pretr"])]
    else:
        argv += ["--lpips_lambda", "0"]
    if mode == "pretrain":
        argv += ["--stylegan_weights", str(paths["generator"]), "--val_root", str(paths["src_val"])]
    else:
        argv += ["--checkpoint_dir", str(root / "pretrain"), "--tgt_label", "1", "--target_labeled",
                 str(paths["tgt_lab"]), "--target_unlabeled", str(paths["tgt_unl"]), "--val_root",
                 str(paths["tgt_val"])]
    return Coach(parse_training_options(argv + list(extra), mode))


def _time_coach(coach, steps: Sequence[int], reps: int, dev: torch.device) -> Dict[int, float]:
    batches = iter(coach.train_loader)
    batch = next(batches)

    def run(step: int) -> Callable[[], None]:
        def call() -> None:
            coach.global_step = step
            coach.train_step(batch)
        return call

    return {step: time_calls(run(step), reps, dev) for step in steps}


def section_phase2(rep: Report, sizes: Sizes, args: argparse.Namespace) -> None:
    dev = rep.device
    cpu_note = "" if dev.type == "cuda" else " (no effect on CPU)"
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        root = Path(tmp)
        paths = _write_phase2_data(root, sizes)
        label = f"{sizes.p2.size} px, IResNet-{sizes.p2_encoder_depth}, LPIPS {'on' if sizes.p2_lpips else 'off'}"
        mem: Dict[str, str] = {}
        with peak_memory(dev, mem):
            coach = _coach("pretrain", root, paths, sizes, dev, "fp16", "pretrain")
            t = _time_coach(coach, [0], sizes.p2_reps, dev)[0]
        bs = coach.opts.batch_size
        rep.add("phase 2 pretraining step (intra)", f"{label}, batch {bs}, --amp fp16{cpu_note}",
                f"{t * 1e3:.0f} ms/step, {bs / t:.1f} img/s", mem["memory"])
        coach.save_training_state()  # checkpoints/last.pt initialises the adaptation runs
        del coach
        release(dev)
        kern = "CUDA kernels" if dev.type == "cuda" else "automatic ops"
        variants = {  # --amp -> rows (label, ops mode, allow_tf32, cudnn_benchmark); one Coach per --amp
            "fp16": [(kern, "kernels", False, False), ("reference ops", "ref", False, False),
                     (f"{kern} + --cudnn_benchmark", "kernels", False, True)],
            "bf16": [(kern, "kernels", False, False)],
            "off": [(kern, "kernels", False, False), (f"{kern} + --allow_tf32", "kernels", True, False)],
        }
        for amp, rows in variants.items():
            if amp == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
                rep.add("phase 2 adaptation step", f"{label}, --amp bf16", "skipped: no bfloat16 on this GPU")
                continue
            if rep.elapsed() > rep.budget_s:
                rep.add("phase 2 adaptation step", f"{label}, --amp {amp}", "skipped (time budget spent)")
                continue
            coach = _coach("train", root, paths, sizes, dev, amp, f"adapt_{amp}")
            bs = coach.opts.batch_size
            for name, mode, tf32, bench in rows:
                mem = {}
                with peak_memory(dev, mem), ops_mode(mode), backends(tf32, bench):
                    t = _time_coach(coach, [0, 1], sizes.p2_reps, dev)
                rep.add("phase 2 adaptation step", f"{label}, batch {bs}, --amp {amp}{cpu_note}, {name}",
                        f"intra {t[0] * 1e3:.0f} ms + inter/cycle {t[1] * 1e3:.0f} ms; "
                        f"{2 * bs / (t[0] + t[1]):.1f} img/s", mem["memory"])
            del coach
            release(dev)


RUNNERS = {"env": section_env, "ext": section_ext, "selfcheck": section_selfcheck, "optests": section_optests,
           "ops": section_ops, "phase1": section_phase1, "phase2": section_phase2}


def build_parser() -> "CliParser":
    from robustmedseg.cli import CliParser

    p = CliParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Usage::")[1],
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (CPU dry run; figures are not the model's)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per row (default 5, tiny 1)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip the sections (and phase 1/2 variants) left after this many seconds (default 420)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from robustmedseg.device import resolve_device
    from robustmedseg.errors import InputError

    try:
        device = resolve_device(args.device)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    sizes = Sizes.tiny() if args.tiny else Sizes()
    if args.reps:
        sizes.reps = sizes.p2_reps = args.reps
    if device.type == "cpu" and not args.tiny:
        log("note: --device cpu without --tiny runs the full 256 px model on the CPU (slow)")
    from robustmedseg.device import configure_backends

    configure_backends(False, False)  # the project's defaults; rows that differ say so
    rep = Report(device, args.budget_s)
    for name in SECTIONS:
        if name not in wanted:
            continue
        if rep.elapsed() > rep.budget_s:
            rep.add(name, "—", f"skipped (time budget of {args.budget_s:.0f} s spent)")
            continue
        log(f"[{rep.elapsed():6.1f} s] {name}")
        try:
            RUNNERS[name](rep, sizes, args)
        except KeyboardInterrupt:  # e.g. `timeout -s INT` in gpu_check.sh: still print what we have
            rep.add(name, "—", "INTERRUPTED")
            break
        except Exception as exc:  # noqa: BLE001 - one failed section must not hide the others
            traceback.print_exc()
            rep.add(name, "—", f"FAILED: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            release(device)
    rep.add("total", "wall time", f"{rep.elapsed():.0f} s")
    print(rep.table(), flush=True)
    return 0


if __name__ == "__main__":
    from robustmedseg.errors import run_cli

    run_cli(main)
