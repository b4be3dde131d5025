"""Training-step speed (issue 23): the plain paths against the CPU fast paths, side by side in one process.

Sections (``--sections``, default all three):

* ``phase1``: one demo-setting node update of the data factory (:class:`robustmedseg.factory.trainer.FactoryTrainer`,
  driven as Fed-BioMed drives it: zero_grad, training_step, backward, step), averaged over a cycle of 32
  updates (16 D updates with one lazy R1, 16 G updates with four lazy path-length steps); demo settings
  (``demo/stages.py`` DEFAULT): 32 px, latent 64, n_mlp 2, channel cap 32, batch 8, ADA (fixed ``--ada-p``,
  the demo's p stays below ~0.07);
* ``paper``: the non-regularised G+D step of ``bench/bench_model.py`` (D loss fwd+bwd, then G loss fwd+bwd)
  at the paper's channel widths (512 channels up to 64 px), ``--paper-size`` px, batch ``--paper-batch``;
* ``phase2``: the phase-2 pretraining step (intra) and adaptation steps (intra, inter/cycle) of
  :class:`MultiMedSeg.training.coach.Coach` at the demo's settings (32 px decoder as above, IResNet-10 with
  base 16 channels, batch 8, ``--bn_mode batch``, LPIPS off).

"plain" runs the code under :func:`model.plain_paths` (the code as it was before issue 23: NCHW, grouped
modulated convolution; ``RMS_PLAIN_PATHS=1`` does the same for a whole process), "fast" the default paths.
Repetitions alternate plain / fast / sgemm; medians are printed with the ratio plain / fast, the step's
achieved GFLOP/s (FLOPs counted once with torch's flop-counter formulas on the plain path,
divided by each path's median time) and the rate of a 1024x1024 float32 matmul timed in the same loop.
Before timing, each section checks that both paths agree (first-update losses and gradients).

Usage: ``OMP_NUM_THREADS=1 python -m bench.bench_steps [--sections phase1,paper,phase2] [--reps 5]``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import model as M
from robustmedseg.allocator import loaded_in_this_process
from robustmedseg.cli import CliParser
from robustmedseg.errors import InputError, run_cli
from robustmedseg.io import write_text_atomic

SECTIONS = ("phase1", "paper", "phase2")


# ----------------------------------------------------------------------------------------------- timing
class Sgemm:
    """A 1024x1024 float32 matmul (2 * 1024^3 FLOPs), timed alongside the steps."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(1024, 1024, generator=gen)
        self.b = torch.randn(1024, 1024, generator=gen)
        self.times: List[float] = []

    def run(self, n: int = 3) -> None:
        for _ in range(n):
            t = time.perf_counter()
            torch.mm(self.a, self.b)
            self.times.append(time.perf_counter() - t)

    def gflops(self) -> float:
        return 2 * 1024 ** 3 / min(self.times) / 1e9


class _FlopCount(TorchDispatchMode):
    """FLOPs of every op torch's flop counter knows (``torch.utils.flop_counter.flop_registry``: matmuls,
    convolutions and their backward), counted at dispatch. ``FlopCounterMode`` itself cannot be used: its
    module tracker breaks ``autograd.grad`` on a leaf fed straight into a module (R1 without ADA)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            self.total += int(flop_registry[packet](*args, **kwargs, out_val=out))
        return out


def count_flops(fn: Callable[[], None]) -> int:
    with _FlopCount() as counter:
        fn()
    return counter.total


def interleave(cases: Dict[str, Callable[[], None]], reps: int, sgemm: Sgemm, warmup: int = 1,
               chunks: int = 1) -> Dict[str, float]:
    """Median seconds of each case over ``reps`` alternating repetitions (after ``warmup`` rounds).

    With ``chunks`` > 1 each call of a case is one chunk of a repetition (e.g. two updates of a cycle): the
    cases alternate chunk by chunk and a repetition's time is the sum over its chunks, so that load changes
    on a shared machine hit both cases alike."""
    times: Dict[str, List[float]] = {k: [] for k in cases}
    for rep in range(warmup + reps):
        total = {k: 0.0 for k in cases}
        for _ in range(chunks):
            for name, fn in cases.items():
                t = time.perf_counter()
                fn()
                total[name] += time.perf_counter() - t
        if rep >= warmup:
            for name in cases:
                times[name].append(total[name])
        sgemm.run()
    return {k: statistics.median(v) for k, v in times.items()}


def in_mode(plain: bool, fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with M.plain_paths(plain):
            fn()
    return run


#: every row measured in this process: name, plain and fast seconds per step, FLOPs per step, sgemm GFLOP/s
#: (written by ``--json``; bench/bench_allocator.py compares them across processes)
RESULTS: List[Dict[str, object]] = []


def row(name: str, t: Dict[str, float], flops: int, sgemm: Sgemm, unit: int = 1) -> str:
    rate = sgemm.gflops()
    plain, fast = t["plain"] / unit, t["fast"] / unit
    RESULTS.append({"step": name, "plain_s": plain, "fast_s": fast, "flops": flops / unit, "sgemm_gflops": rate})
    gp, gf = flops / unit / plain / 1e9, flops / unit / fast / 1e9
    return (f"| {name} | {1e3 * plain:.1f} | {1e3 * fast:.1f} | **{plain / fast:.2f}x** | {flops / unit / 1e9:.3f} | "
            f"{gp:.1f} ({100 * gp / rate:.0f} %) | {gf:.1f} ({100 * gf / rate:.0f} %) | {rate:.0f} |")


HEADER = ("| step | plain ms | fast ms | plain / fast | GFLOP per step | plain GFLOP/s (% of sgemm) | "
          "fast GFLOP/s (% of sgemm) | sgemm GFLOP/s |\n|---|---:|---:|---:|---:|---:|---:|---:|")


# ----------------------------------------------------------------------------------------------- phase 1
def make_trainer(args: argparse.Namespace):
    from robustmedseg.factory.config import FactoryConfig
    from robustmedseg.factory.network import FactoryModel
    from robustmedseg.factory.optim import AlternatingAdam
    from robustmedseg.factory.trainer import FactoryTrainer

    cfg = FactoryConfig.from_model_args({
        "size": 32, "style_dim": 64, "n_mlp": 2, "channel_cap": 32, "augment": args.ada_p > 0,
        "augment_p": args.ada_p, "r1": 1.0, "lr_mlp": 1.0})
    torch.manual_seed(0)
    model = FactoryModel(cfg)
    opt = AlternatingAdam(model.discriminator.parameters(), model.generator.parameters(), 0.004,
                          cfg.d_reg_every, cfg.g_reg_every)
    return FactoryTrainer(model, opt, cfg)


def phase1_batch(batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    real = torch.tanh(2 * torch.randn(batch, 1, 32, 32, generator=gen))
    target = torch.tensor([[0, i % 29] for i in range(batch)])
    return real, target


def node_updates(trainer, real: torch.Tensor, target: torch.Tensor, n: int) -> List[float]:
    losses = []
    for _ in range(n):
        trainer.opt.zero_grad()
        loss = trainer.training_step(real, target)
        loss.backward()
        trainer.opt.step()
        losses.append(float(loss.detach()))
    return losses


def check_phase1(args: argparse.Namespace, real: torch.Tensor, target: torch.Tensor) -> str:
    """Both paths from the same state and random stream: the losses of one cycle and the parameters after
    its first update (a D update with R1)."""
    out = []
    runs = {}
    for plain in (True, False):
        torch.manual_seed(7)
        with M.plain_paths(plain):
            trainer = make_trainer(args)
            torch.manual_seed(7)
            first = node_updates(trainer, real, target, 1)
            params = [p.detach().clone() for p in trainer.model.discriminator.parameters()]
            rest = node_updates(trainer, real, target, 7)
        runs[plain] = (first + rest, params)
    (lp, pp), (lf, pf) = runs[True], runs[False]
    d_param = max(float((a - b).abs().max()) for a, b in zip(pp, pf))
    d_loss = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(lp, lf))
    out.append(f"after the first update (D + R1): max |delta D parameter| = {d_param:.2e}; "
               f"losses of the first 8 updates: max relative difference {d_loss:.2e}")
    return "; ".join(out)


def section_phase1(args: argparse.Namespace, sgemm: Sgemm) -> List[str]:
    real, target = phase1_batch(8)
    cycle = 32
    with M.plain_paths():
        plain = make_trainer(args)  # its Adam is built on the plain path too
    trainers = {"plain": plain, "fast": make_trainer(args)}
    lines = [f"check: {check_phase1(args, real, target)}"]

    def run(name: str, n: int) -> Callable[[], None]:
        return in_mode(name == "plain", lambda: node_updates(trainers[name], real, target, n))

    flops = count_flops(run("plain", cycle))
    t = interleave({name: run(name, 2) for name in trainers}, args.reps, sgemm, chunks=cycle // 2)
    lines += [HEADER, row(f"phase 1 node update (mean over a {cycle}-update cycle, ADA p={args.ada_p})", t, flops,
                          sgemm, unit=cycle)]
    return lines


# ----------------------------------------------------------------------------------------------- paper
def section_paper(args: argparse.Namespace, sgemm: Sgemm) -> List[str]:
    from bench.bench_model import make_batch, make_models, plain_step

    g, d = make_models(args.paper_size, None, torch.device("cpu"))
    real, z, labels = make_batch(g, args.paper_batch, torch.device("cpu"))
    grads = {}
    for plain in (True, False):
        torch.manual_seed(0)  # the same noise inputs on both paths
        with M.plain_paths(plain):
            plain_step(g, d, real, z, labels)
        grads[plain] = [p.grad.clone() for p in list(g.parameters()) + list(d.parameters()) if p.grad is not None]
    rel = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(grads[True], grads[False]))
    step = lambda: plain_step(g, d, real, z, labels)  # noqa: E731
    flops = count_flops(in_mode(True, step))
    # the op's ceiling: one 512-channel 3x3 convolution fwd+bwd at the step's largest resolution
    x = torch.randn(args.paper_batch, 512, args.paper_size, args.paper_size)
    w = torch.randn(512, 512, 3, 3, requires_grad=True)
    conv_flops = 3 * 2 * x.numel() * 512 * 9
    convs = {}
    for name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        xi = x.contiguous(memory_format=fmt).requires_grad_()

        def conv(xi: torch.Tensor = xi) -> None:
            torch.nn.functional.conv2d(xi, w, padding=1).sum().backward()
        convs[name] = conv
    cases = {"plain": in_mode(True, step), "fast": in_mode(False, step), **convs}
    t = interleave(cases, args.paper_reps, sgemm)
    rate = sgemm.gflops()
    ceiling = "; ".join(f"{name} {conv_flops / t[name] / 1e9:.1f} GFLOP/s ({100 * conv_flops / t[name] / 1e9 / rate:.0f} % "
                        "of sgemm)" for name in convs)
    return [f"check: gradients of G and D, plain vs fast: max |delta| / max |grad| per tensor = {rel:.2e}", HEADER,
            row(f"paper channels G+D step ({args.paper_size} px, batch {args.paper_batch})", t, flops, sgemm),
            "", f"ceiling, one 3x3 512-channel conv fwd+bwd at {args.paper_size} px, batch {args.paper_batch}: {ceiling}"]


# ----------------------------------------------------------------------------------------------- phase 2
def section_phase2(args: argparse.Namespace, sgemm: Sgemm) -> List[str]:
    from bench.bench_gpu_check import Sizes, _coach, _write_phase2_data

    sizes = Sizes(p2=M.GeneratorArgs(size=32, style_dim=64, n_mlp=2, channel_cap=32), p2_encoder_depth=10,
                  p2_encoder_base=16, p2_lpips=False, p2_latent_avg_samples=1024)
    dev = torch.device("cpu")
    lines = []
    with tempfile.TemporaryDirectory(prefix="bench_steps_") as tmp:
        root = Path(tmp)
        paths = _write_phase2_data(root, sizes)
        rows = []
        for mode, name, steps in (("pretrain", "pretrain", (0,)), ("train", "adapt", (0, 1))):
            extra = ["--batch_size", "8", "--bn_mode", "batch"]  # the demo's phase-2 settings (demo/stages.py)
            with M.plain_paths():  # the plain coach's optimisers are built on the plain path too
                coaches = {"plain": _coach(mode, root, paths, sizes, dev, "off", f"{name}_plain", extra=extra)}
            coaches["fast"] = _coach(mode, root, paths, sizes, dev, "off", name, extra=extra)
            batch = next(iter(coaches["fast"].train_loader))
            if batch["data"].shape[0] != 8:
                raise InputError(f"phase-2 bench batch has {batch['data'].shape[0]} slices, expected 8")
            if mode == "pretrain":
                coaches["fast"].save_training_state()  # initialises the adaptation coaches
            labels = {("pretrain", 0): "phase 2 pretraining step (intra)", ("train", 0): "phase 2 adaptation step (intra)",
                      ("train", 1): "phase 2 adaptation step (inter / cycle)"}
            for step in steps:  # checks first, from the same initial state: each step's losses on both paths
                logs = {}
                for kind in ("plain", "fast"):
                    torch.manual_seed(0)
                    with M.plain_paths(kind == "plain"):
                        coaches[kind].global_step = step
                        logs[kind] = coaches[kind].train_step(batch)
                worst = max(abs(logs["plain"][k] - logs["fast"][k]) / max(1.0, abs(logs["plain"][k]))
                            for k in logs["plain"])
                lines.append(f"check ({labels[(mode, step)]}): {len(logs['plain'])} logged losses, plain vs fast: "
                             f"max relative difference {worst:.2e}")
            for step in steps:
                def call(kind: str, step: int = step) -> Callable[[], None]:
                    def run() -> None:
                        coaches[kind].global_step = step
                        coaches[kind].train_step(batch)
                    return in_mode(kind == "plain", run)

                flops = count_flops(call("plain"))
                t = interleave({"plain": call("plain"), "fast": call("fast")}, args.reps * 4, sgemm)
                rows.append(row(labels[(mode, step)], t, flops, sgemm))
            del coaches
    return lines + [HEADER] + rows


RUNNERS = {"phase1": section_phase1, "paper": section_paper, "phase2": section_phase2}


def build_parser() -> CliParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each phase-1 cycle (phase 2: 4x this)")
    p.add_argument("--ada-p", type=float, default=0.05, help="fixed ADA probability of the phase-1 rows (default 0.05)")
    p.add_argument("--paper-size", type=int, default=32, help="image size of the paper-channel step (default 32)")
    p.add_argument("--paper-batch", type=int, default=4, help="batch of the paper-channel step (default 4)")
    p.add_argument("--paper-reps", type=int, default=3, help="timed repetitions of the paper-channel step")
    p.add_argument("--json", type=Path, default=None,
                   help="also write every row's raw figures (seconds per step, FLOPs, sgemm rate) to this file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise InputError(f"--sections: unknown section(s) {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    if args.reps < 1 or args.paper_reps < 1:
        raise InputError("--reps and --paper-reps must be >= 1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), allocator {loaded_in_this_process()}, "
          f"load average before: {' '.join(f'{x:.2f}' for x in __import__('os').getloadavg())}")
    sgemm = Sgemm()
    for name in sections:
        t0 = time.perf_counter()
        lines = RUNNERS[name](args, sgemm)
        print(f"\n## {name} ({time.perf_counter() - t0:.0f} s)")
        print("\n".join(lines))
        sys.stdout.flush()
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in __import__('os').getloadavg())}")
    if args.json is not None:
        write_text_atomic(args.json, json.dumps({"allocator": loaded_in_this_process(), "rows": RESULTS}, indent=2))


if __name__ == "__main__":
    run_cli(main)
