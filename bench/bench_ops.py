"""Benchmark of the reference (pure-PyTorch) ops against naive formulations.

Times forward and forward+backward of ``op.upfirdn2d`` and
``op.fused_leaky_relu`` (``impl='ref'``) on feature-map shapes of the
64-512 px StyleGAN2 model, against the textbook formulations written below
(zero insertion, pad/crop, full-resolution depthwise convolution with the
flipped kernel, subsampling; bias add + leaky ReLU + multiply). Both run in
the same process, interleaved, so the printed ratio is meaningful on a shared
machine. Outputs are checked to agree before timing.

Usage (from the repository root)::

    python -m bench.bench_ops            # full shapes
    python -m bench.bench_ops --quick    # smaller shapes, fewer repetitions
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from op import fused_leaky_relu, upfirdn2d
from op.upfirdn import parse_params
from robustmedseg.cli import CliParser
from robustmedseg.errors import run_cli

Shape = Tuple[int, int, int, int]
Op = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- naive baselines


def zero_insert(x: torch.Tensor, ux: int, uy: int) -> torch.Tensor:
    """Insert ``u - 1`` zeros after every sample along H and W (differentiable)."""
    b, c, h, w = x.shape
    y = F.pad(x.reshape(b, c, h, 1, w, 1), [0, ux - 1, 0, 0, 0, uy - 1])
    return y.reshape(b, c, h * uy, w * ux)


def naive_upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int, down: int, pad: Sequence[int]) -> torch.Tensor:
    """Literal definition: zero insertion, pad/crop, full-res true convolution, subsample."""
    (ux, uy), (dx, dy), (px0, px1, py0, py1) = parse_params(up, down, pad)
    u = zero_insert(x, ux, uy)
    u = F.pad(u, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    u = u[:, :, max(-py0, 0): u.shape[2] - max(-py1, 0), max(-px0, 0): u.shape[3] - max(-px1, 0)]
    c = x.shape[1]
    weight = kernel.flip((0, 1)).to(x.dtype).expand(c, 1, *kernel.shape)
    return F.conv2d(u, weight, groups=c)[:, :, ::dy, ::dx]


def naive_fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Bias add, leaky ReLU, gain: three separate ops."""
    return F.leaky_relu(x + bias.view(1, -1, 1, 1), 0.2) * math.sqrt(2)


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One benchmark row: an op, its naive formulation, and an input shape."""

    name: str
    shape: Shape
    ref: Op
    naive: Op


def blur_kernel(gain: float = 1.0) -> torch.Tensor:
    """outer([1,3,3,1]) normalised to sum 1, times ``gain`` (docs/method.md#building-blocks)."""
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = torch.outer(k, k)
    return k / k.sum() * gain


def fir_case(name: str, shape: Shape, kernel: torch.Tensor, up: int, down: int, pad: Tuple[int, int]) -> Case:
    return Case(
        f"{name} up{up} down{down} pad{pad}",
        shape,
        lambda x: upfirdn2d(x, kernel, up, down, pad, impl="ref"),
        lambda x: naive_upfirdn2d(x, kernel, up, down, pad),
    )


def act_case(shape: Shape) -> Case:
    bias = torch.randn(shape[1], requires_grad=True)
    return Case(
        "fused_leaky_relu",
        shape,
        lambda x: fused_leaky_relu(x, bias, impl="ref"),
        lambda x: naive_fused_leaky_relu(x, bias),
    )


def build_cases(quick: bool) -> List[Case]:
    """Shapes of the 64-512 px generator/discriminator feature maps (batch 4, cm=2)."""
    k, k4 = blur_kernel(), blur_kernel(4.0)
    if quick:
        up_shapes: List[Shape] = [(4, 512, 16, 16), (4, 128, 64, 64)]
        down_shapes: List[Shape] = [(4, 512, 32, 32), (4, 128, 128, 128)]
        blur_shapes: List[Shape] = [(4, 512, 33, 33), (4, 128, 129, 129)]
        act_shapes: List[Shape] = [(4, 512, 32, 32), (4, 128, 128, 128)]
    else:
        up_shapes = [(4, 512, 32, 32), (4, 128, 128, 128), (4, 64, 256, 256)]
        down_shapes = [(4, 512, 64, 64), (4, 128, 256, 256), (4, 64, 512, 512)]
        blur_shapes = [(4, 512, 65, 65), (4, 128, 257, 257), (4, 64, 513, 513)]
        act_shapes = [(4, 512, 64, 64), (4, 128, 256, 256), (4, 64, 512, 512)]
    cases = [fir_case("upsample", s, k4, 2, 1, (2, 1)) for s in up_shapes]
    cases += [fir_case("downsample", s, k, 1, 2, (1, 1)) for s in down_shapes]
    cases += [fir_case("blur", s, k4, 1, 1, (1, 1)) for s in blur_shapes]
    cases += [act_case(s) for s in act_shapes]
    return cases


# --------------------------------------------------------------------------- timing


def time_op(fn: Op, x: torch.Tensor, grad: torch.Tensor, backward: bool) -> float:
    """Seconds for one forward (and backward) call."""
    start = time.perf_counter()
    if backward:
        y = fn(x)
        y.backward(grad)
    else:
        with torch.no_grad():
            fn(x)
    return time.perf_counter() - start


def measure(case: Case, reps: int, backward: bool) -> Tuple[float, float]:
    """Median milliseconds of (ref, naive), interleaved, after one warm-up each."""
    x = torch.randn(case.shape, requires_grad=True)
    with torch.no_grad():
        out_ref, out_naive = case.ref(x), case.naive(x)
    if out_ref.shape != out_naive.shape or not torch.allclose(out_ref, out_naive, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"{case.name}: ref and naive outputs differ")
    grad = torch.randn_like(out_ref)
    del out_ref, out_naive
    ref_t, naive_t = [], []
    time_op(case.ref, x, grad, backward)
    time_op(case.naive, x, grad, backward)
    for _ in range(reps):
        ref_t.append(time_op(case.ref, x, grad, backward))
        naive_t.append(time_op(case.naive, x, grad, backward))
        x.grad = None
    return statistics.median(ref_t) * 1e3, statistics.median(naive_t) * 1e3


def build_parser() -> CliParser:
    parser = CliParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes and 3 repetitions")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per row (default 5, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads value (default: torch's)")
    parser.add_argument("--filter", default="", help="only rows whose name contains this substring")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 5)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, float32 CPU, median of {reps}, "
          "impl='ref' vs naive formulation (same process, interleaved)")
    header = f"{'op':<40} {'shape':<20} {'fwd ref':>9} {'fwd naive':>10} {'x':>6} {'f+b ref':>9} {'f+b naive':>10} {'x':>6}"
    print(header)
    print("-" * len(header))
    for case in build_cases(args.quick):
        if args.filter not in case.name:
            continue
        fr, fn = measure(case, reps, backward=False)
        br, bn = measure(case, reps, backward=True)
        shape = "x".join(str(s) for s in case.shape)
        print(f"{case.name:<40} {shape:<20} {fr:9.1f} {fn:10.1f} {fn / fr:6.2f} {br:9.1f} {bn:10.1f} {bn / br:6.2f}",
              flush=True)
    print("times in ms; x = naive / ref (higher is better)")


if __name__ == "__main__":
    run_cli(main)
