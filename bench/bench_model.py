"""Benchmark one StyleGAN2 G+D training step of ``model.py`` against a naive-op baseline.

The step is the non-regularised StyleGAN2 step (D loss softplus(D(fake)) + softplus(−D(real)),
forward + backward; then G loss softplus(−D(G(z))), forward + backward); a second row adds the
regularisers (R1 on reals, path length on W+), which exercise double backward.  Both rows are timed
twice in the same process:

* ``current``: the model as shipped (``op`` picks its fast path: CUDA kernels on GPU, the
  separable pure-PyTorch reference path on CPU);
* ``naive``: the same model with ``upfirdn2d`` and ``fused_leaky_relu`` replaced by textbook
  formulations written here (explicit zero insertion + padding + depthwise conv with the full 2-D kernel
  + slicing; ``leaky_relu(x + b)·√2``).  This is what a straightforward port does.

Printed ratios are naive time / current time (> 1 means the shipped ops are faster).
Usage: ``python -m bench.bench_model [--quick] [--size 64] [--batch 4] [--channel-cap N|0] [--device cpu|cuda]``.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

import model as M
import op.fused_act
from op import conv2d_gradfix
from robustmedseg.cli import CliParser
from robustmedseg.errors import run_cli


# ----------------------------------------------------------------------------------------------
# Naive op formulations (baseline)
# ----------------------------------------------------------------------------------------------
def naive_upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up=1, down=1, pad=(0, 0), impl=None) -> torch.Tensor:
    """Zero insertion → pad/crop → depthwise conv with the flipped full 2-D kernel → keep every down-th."""
    up_x, up_y = (up, up) if isinstance(up, int) else up
    dn_x, dn_y = (down, down) if isinstance(down, int) else down
    px0, px1, py0, py1 = (pad[0], pad[1], pad[0], pad[1]) if len(pad) == 2 else pad
    b, c, h, w = x.shape
    k = kernel if kernel.ndim == 2 else torch.outer(kernel, kernel)
    y = x.reshape(b * c, 1, h, 1, w, 1)
    y = F.pad(y, [0, up_x - 1, 0, 0, 0, up_y - 1]).reshape(b * c, 1, h * up_y, w * up_x)
    y = F.pad(y, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    y = y[:, :, max(-py0, 0):y.shape[2] - max(-py1, 0), max(-px0, 0):y.shape[3] - max(-px1, 0)]
    y = F.conv2d(y, k.flip((0, 1)).view(1, 1, *k.shape).to(y.dtype))
    y = y[:, :, ::dn_y, ::dn_x]
    return y.reshape(b, c, y.shape[2], y.shape[3])


def naive_fused_leaky_relu(x: torch.Tensor, bias: Optional[torch.Tensor] = None, negative_slope: float = 0.2,
                           scale: float = 2 ** 0.5, impl=None) -> torch.Tensor:
    """``leaky_relu(x + b)·scale`` with the bias broadcast over dim 1."""
    if bias is not None:
        x = x + bias.view(1, -1, *([1] * (x.ndim - 2))).to(x.dtype)
    return F.leaky_relu(x, negative_slope) * scale


@contextlib.contextmanager
def naive_ops() -> Iterator[None]:
    """Temporarily route model.py (and FusedLeakyReLU) through the naive ops."""
    saved = (M.upfirdn2d, M.fused_leaky_relu, op.fused_act.fused_leaky_relu)
    M.upfirdn2d, M.fused_leaky_relu, op.fused_act.fused_leaky_relu = (
        naive_upfirdn2d, naive_fused_leaky_relu, naive_fused_leaky_relu)
    try:
        yield
    finally:
        M.upfirdn2d, M.fused_leaky_relu, op.fused_act.fused_leaky_relu = saved


# ----------------------------------------------------------------------------------------------
# Training steps
# ----------------------------------------------------------------------------------------------
def make_models(size: int, cap: Optional[int], device: torch.device) -> Tuple[M.Generator, M.Discriminator]:
    torch.manual_seed(0)
    return (M.Generator(size, channel_cap=cap).to(device), M.Discriminator(size, channel_cap=cap).to(device))


def make_batch(g: M.Generator, batch: int, device: torch.device):
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(batch, 1, g.size, g.size, generator=gen).to(device)
    z = torch.randn(batch, g.style_dim, generator=gen).to(device)
    c = g.condition([i % g.n_domains for i in range(batch)], [i % g.n_zbins for i in range(batch)])
    e = torch.randn(batch, g.clip_dim, generator=gen).to(device)
    return real, z, (c, e)


def plain_step(g, d, real, z, labels) -> None:
    """D loss fwd+bwd on (real, detached fake), then G loss fwd+bwd."""
    g.zero_grad(set_to_none=True)
    d.zero_grad(set_to_none=True)
    with torch.no_grad():
        fake, _ = g([z], labels)
    d_loss = F.softplus(d(fake, labels)).mean() + F.softplus(-d(real, labels)).mean()
    d_loss.backward()
    fake, _ = g([z], labels)
    F.softplus(-d(fake, labels)).mean().backward()


def reg_step(g, d, real, z, labels) -> None:
    """R1 on reals (with no_weight_gradients) and path length on W+, each fwd + double backward."""
    g.zero_grad(set_to_none=True)
    d.zero_grad(set_to_none=True)
    real = real.detach().requires_grad_(True)
    with conv2d_gradfix.no_weight_gradients():
        score = d(real, labels)
        (grad,) = torch.autograd.grad(score.sum(), real, create_graph=True)
    (5.0 * grad.pow(2).flatten(1).sum(1).mean()).backward()
    img, lat = g([z], labels, return_latents=True)
    noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
    (grad,) = torch.autograd.grad((img * noise).sum(), lat, create_graph=True)
    grad.pow(2).sum(2).mean(1).sqrt().mean().backward()


def time_it(fn: Callable[[], None], reps: int, device: torch.device) -> float:
    """Median wall time (s) of ``reps`` calls after one warm-up call."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_parser() -> CliParser:
    ap = CliParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (2 instead of 5)")
    ap.add_argument("--size", type=int, default=64, help="image size (default 64)")
    ap.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    ap.add_argument("--channel-cap", type=int, default=None,
                    help="cap every channel count (default: 64 on CPU, paper channels on CUDA; 0 = paper channels)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--no-reg", action="store_true", help="skip the R1 + path-length row")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cap = args.channel_cap if args.channel_cap is not None else (None if device.type == "cuda" else 64)
    cap = None if cap == 0 else cap
    reps = 2 if args.quick else 5
    g, d = make_models(args.size, cap, device)
    real, z, labels = make_batch(g, args.batch, device)

    with torch.no_grad():
        torch.manual_seed(2)
        ref, _ = g([z], labels, randomize_noise=False)
        with naive_ops():
            alt, _ = g([z], labels, randomize_noise=False)
    diff = float((ref - alt).abs().max())

    rows: Dict[str, Callable[[], None]] = {"G+D step (D loss + G loss, fwd+bwd)": lambda: plain_step(g, d, real, z, labels)}
    if not args.no_reg:
        rows["regularisation step (R1 + path length)"] = lambda: reg_step(g, d, real, z, labels)

    threads = torch.get_num_threads()
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{threads} threads'}), "
          f"torch {torch.__version__}, size={args.size}, batch={args.batch}, "
          f"channels={'paper' if cap is None else f'capped at {cap}'}, reps={reps} (median)")
    print(f"max |image(current) - image(naive)| = {diff:.2e}")
    print(f"{'case':42s} {'current ms':>11s} {'naive ms':>10s} {'naive/current':>14s}")
    for name, fn in rows.items():
        fast = time_it(fn, reps, device)
        with naive_ops():
            slow = time_it(fn, reps, device)
        print(f"{name:42s} {fast * 1e3:11.1f} {slow * 1e3:10.1f} {slow / fast:14.2f}")
    return 0


if __name__ == "__main__":
    run_cli(main)
