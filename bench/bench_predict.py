"""Benchmark: prediction at paper scale on a CPU (issue 23, target 4) -- a hospital without a GPU.

One synthetic 512 x 512 slice stack goes through ``predict.py``'s own segmentation code
(:func:`MultiMedSeg.segment_scans.segment_scan`: :class:`~MultiMedSeg.ensemble.Ensemble` ``predict_volume``,
the inter/intra blend, labels) with a ``--members``-member ensemble of paper-size networks
(:class:`~MultiMedSeg.models.psp.PSPConfig` defaults: StyleGAN2 decoder at 512 px, channel multiplier 2,
IR-SE-50 encoder at 256 px, two domains) with random weights (timing only).  The members share one
decoder, as the members of a frozen-decoder run do once :func:`~MultiMedSeg.ensemble.load_ensemble`
has shared equal decoders (the paper trains the encoder and heads only).

Printed / written (``--json``):

* ``sgemm``: the same-process 1024 x 1024 float32 matmul rate (GFLOP/s, median), measured before and
  after the runs;
* ``flops_per_slice``: FLOPs of one slice through the whole ensemble, counted with
  ``torch.utils.flop_counter.FlopCounterMode`` on one member and one slice (every member has the same
  architecture; adapted runs do two passes per member: intra and inter);
* ``full``: wall time of ``--slices`` slices at full 512 x 512 resolution through ``segment_scan``
  (``--batch-size`` slices per forward, predict's ``--test_batch_size``), seconds per slice, the
  extrapolation to a ``--volume-slices`` volume (network time only: reading, preprocessing, restoring
  and writing a scan are not included), achieved GFLOP/s and its fraction of sgemm, and the peak
  resident memory of the process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, read right after
  the run; the variants run later with one member and smaller batches);
* ``variants``: one member, ``--variant-batch`` slices per call, ``--reps`` interleaved repetitions,
  median seconds per slice and the ratio to today's path (``baseline``: ``torch.no_grad``, float32,
  contiguous, ``--threads`` threads): ``inference_mode``, ``batch1`` (one slice per forward),
  ``channels_last`` (4-d weights and the input), ``threads2`` (2 intra-op threads), ``bf16`` (CPU
  autocast to bfloat16; its largest probability difference and label agreement with float32 are
  printed); each variant's largest difference from the baseline's probabilities is printed;
* ``ceiling``: the rate of the dominant op alone (the decoder's 3 x 3, 64 -> 64 convolution at
  512 x 512) and, from one profiled forward, the share of time spent in convolutions vs everything
  else (element-wise adds, bilinear up-sampling, copies, 1 x 1 convolutions that take PyTorch's
  slow path).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_predict --json /tmp/bench_predict.json
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_predict --preset tiny --slices 4   # seconds
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from MultiMedSeg.ensemble import Ensemble, Member
from MultiMedSeg.models.psp import PSP, PSPConfig
from MultiMedSeg.segment_scans import segment_scan
from robustmedseg.cli import CliParser
from robustmedseg.errors import run_cli
from robustmedseg.errors import InputError
from robustmedseg.io import write_text_atomic

PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": {},  # PSPConfig defaults: the paper's sizes
    "tiny": dict(output_size=32, style_dim=32, n_mlp=2, channel_cap=16, encoder_depth=10, encoder_base_channels=8,
                 encoder_input_size=16),
}
WEIGHTS = (0.6, 0.4)  # the paper's inter/intra weights


def build_ensemble(preset: str, members: int, seed: int = 0) -> Ensemble:
    """``members`` adapted (two-domain) networks with random weights sharing one decoder, feature scale 1."""
    config = PSPConfig(src_tgt_domains=[0, 1], n_domains=3, **PRESETS[preset])
    torch.manual_seed(seed)
    first = PSP(config).eval()
    first.compute_latent_avg(512, seed=seed)
    nets = [first]
    for i in range(1, members):
        torch.manual_seed(seed + i)
        net = PSP(config)
        net.decoder = first.decoder  # as load_ensemble shares equal decoders
        net.latent_avg.copy_(first.latent_avg)
        net.latent_avg_valid.copy_(first.latent_avg_valid)
        nets.append(net.eval())
    return Ensemble([Member(n, 1.0, None) for n in nets], torch.device("cpu"))


def synthetic_slices(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size) float32 slices in [-1, 1]: a noisy ellipse whose radius changes with z, -1 outside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    out = np.full((n, size, size), -1.0, np.float32)
    for z in range(n):
        r = 0.3 + 0.5 * np.sin(np.pi * (z + 1) / (n + 1))
        inside = (xx / r) ** 2 + (yy / (0.8 * r)) ** 2 < 1
        out[z][inside] = np.clip(0.2 * rng.standard_normal(inside.sum()) + 0.1 * np.cos(8 * xx[inside]), -1, 1)
    return out


def gemm_rate(n: int = 1024, reps: int = 10, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median GFLOP/s of an n x n float32 matmul in this process (``clock``: wall or CPU time)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t = clock()
        a @ b
        times.append(clock() - t)
    return 2 * n ** 3 / max(statistics.median(times), 1e-9) / 1e9


def count_flops(ensemble: Ensemble, x: torch.Tensor, label: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        ensemble.predict_batch(x, label)
    return int(counter.get_total_flops())


def batch_of(slices: np.ndarray, config: PSPConfig, k: int) -> tuple:
    """The first k slices as predict feeds them: pooled to the encoder size, target-domain labels."""
    x = torch.from_numpy(slices[:k, None])
    x = F.adaptive_avg_pool2d(x, config.encoder_input_size)  # the face pool of eval_transform's size
    label = torch.tensor([[0.0, 1.0]]).expand(k, 2)
    return x, label


def channels_last_copy(ensemble: Ensemble) -> Ensemble:
    members = []
    for m in ensemble:
        net = copy.deepcopy(m.net)
        for module in net.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
        members.append(Member(net, m.feature_scale, None))
    return Ensemble(members, torch.device("cpu"))


VARIANTS = ("baseline", "inference_mode", "batch1", "channels_last", "threads2", "bf16")


def variants(ensemble: Ensemble, slices: np.ndarray, batch: int, reps: int, threads: int,
             chosen: Sequence[str] = VARIANTS) -> Dict[str, Any]:
    """Per-slice seconds of today's path and its variants on the first member (interleaved reps)."""
    one = Ensemble([ensemble[0]], torch.device("cpu"))
    cl = channels_last_copy(one)
    config = one.config
    x, label = batch_of(slices, config, batch)

    def call(ens: Ensemble, xx: torch.Tensor, ll: torch.Tensor, mode: str = "no_grad", bf16: bool = False,
             n_threads: int = threads) -> Dict[str, torch.Tensor]:
        torch.set_num_threads(n_threads)
        grad = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        try:
            with grad, amp:
                out = ens.predict_batch(xx, ll)
            return {k: v.float().clone() for k, v in out.items()}
        finally:
            torch.set_num_threads(threads)

    def per_slice(fn: Callable[[], Dict[str, torch.Tensor]], n: int) -> tuple:
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        return (time.perf_counter() - t) / n, (time.process_time() - c) / n, out

    xcl = x.contiguous(memory_format=torch.channels_last)
    runs: Dict[str, Callable[[], tuple]] = {
        "baseline": lambda: per_slice(lambda: call(one, x, label), batch),
        "inference_mode": lambda: per_slice(lambda: call(one, x, label, "inference_mode"), batch),
        "batch1": lambda: per_slice(lambda: _concat([call(one, x[i:i + 1], label[i:i + 1]) for i in range(batch)]),
                                    batch),
        "channels_last": lambda: per_slice(lambda: call(cl, xcl, label), batch),
        "threads2": lambda: per_slice(lambda: call(one, x, label, n_threads=2), batch),
        "bf16": lambda: per_slice(lambda: call(one, x, label, bf16=True), batch),
    }
    runs = {k: v for k, v in runs.items() if k == "baseline" or k in chosen}
    runs["baseline"]()  # warm-up (allocator, oneDNN primitives)
    times: Dict[str, List[float]] = {k: [] for k in runs}
    cpu: Dict[str, List[float]] = {k: [] for k in runs}
    outs: Dict[str, Dict[str, torch.Tensor]] = {}
    for rep in range(reps):
        for name, fn in runs.items():
            t, c, out = fn()
            times[name].append(t)
            cpu[name].append(c)
            outs[name] = out
            print(f"  rep {rep}: {name:15s} {t:8.3f} s/slice wall, {c:8.3f} s/slice CPU", flush=True)
    base, base_cpu = statistics.median(times["baseline"]), statistics.median(cpu["baseline"])
    ref = outs["baseline"]
    result: Dict[str, Any] = {}
    for name in runs:
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        diff = max(float((outs[name][k] - ref[k]).abs().max()) for k in ("intra", "inter"))
        agree = {k: float((outs[name][k].argmax(1) == ref[k].argmax(1)).float().mean()) for k in ("intra", "inter")}
        result[name] = {"s_per_slice": med, "cpu_s_per_slice": med_cpu, "times": times[name], "cpu_times": cpu[name],
                        "speedup_vs_baseline": base / med, "cpu_speedup_vs_baseline": base_cpu / med_cpu,
                        "max_prob_diff": diff, "label_agreement": agree}
    return result


def _concat(parts: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def ceiling(ensemble: Ensemble, slices: np.ndarray, reps: int) -> Dict[str, Any]:
    """The dominant op alone, and the conv / other split of one profiled forward of one member."""
    size = ensemble.config.output_size
    ch = min(64 * ensemble.config.channel_multiplier // 2, ensemble.config.channel_cap or 10 ** 9)
    x = torch.randn(1, ch, size, size)
    w = torch.randn(ch, ch, 3, 3) * 0.05
    F.conv2d(x, w, padding=1)
    times = []
    for _ in range(max(3, reps)):
        t = time.process_time()  # CPU time: the machine may be shared
        F.conv2d(x, w, padding=1)
        times.append(time.process_time() - t)
    conv_rate = 2 * ch * ch * 9 * size * size / max(statistics.median(times), 1e-9) / 1e9
    from torch.profiler import profile

    xb, label = batch_of(slices, ensemble.config, 1)
    net = ensemble[0].net
    with torch.no_grad(), profile() as prof:
        net(xb, label, resize=False)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    conv = sum(e.self_cpu_time_total for e in prof.key_averages() if "conv" in e.key)
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    return {"conv3x3_shape": [1, ch, size, size], "conv3x3_gflops_cpu_time": conv_rate,
            "profile_conv_share": conv / total if total else None,
            "profile_top_ops": [(e.key, round(e.self_cpu_time_total / 1e6, 3), e.count) for e in top]}


def build_parser() -> CliParser:
    p = CliParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="network sizes (default: the paper's)")
    p.add_argument("--members", type=int, default=5, help="ensemble members (default 5, the paper's)")
    p.add_argument("--slices", type=int, default=8,
                   help="slices of the measured run at full resolution (default 8: one batch of predict's default)")
    p.add_argument("--batch-size", type=int, default=8, help="slices per forward of the full run (predict's default 8)")
    p.add_argument("--volume-slices", type=int, default=180, help="slices of the volume the time is extrapolated to")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (torch.set_num_threads)")
    p.add_argument("--variant-batch", type=int, default=2, help="slices per call of the variant comparison")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions of each variant")
    p.add_argument("--skip-variants", action="store_true", help="only the full run")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma list of the variants compared with the baseline (default all: {','.join(VARIANTS)})")
    p.add_argument("--json", type=Path, default=None, help="write the numbers as JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    for flag, v in (("--members", a.members), ("--slices", a.slices), ("--batch-size", a.batch_size),
                    ("--threads", a.threads), ("--variant-batch", a.variant_batch), ("--reps", a.reps)):
        if v < 1:
            raise InputError(f"{flag} must be >= 1, got {v}")
    torch.set_num_threads(a.threads)
    import os

    res: Dict[str, Any] = {"preset": a.preset, "members": a.members, "threads": a.threads,
                           "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                           "loadavg_start": os.getloadavg()}
    t = time.perf_counter()
    ensemble = build_ensemble(a.preset, a.members)
    res["build_s"] = time.perf_counter() - t
    size = ensemble.config.output_size
    res["config"] = ensemble.config.to_dict()
    res["params_per_member_M"] = sum(p.numel() for p in ensemble[0].net.parameters()) / 1e6
    slices = synthetic_slices(max(a.slices, a.variant_batch), size)
    res["sgemm_gflops_before"] = gemm_rate()
    res["sgemm_gflops_cpu_before"] = gemm_rate(clock=time.process_time)
    print(f"{a.preset}: {a.members} members ({res['params_per_member_M']:.1f} M parameters each, one decoder), "
          f"{size}x{size} slices, {a.threads} thread(s); sgemm {res['sgemm_gflops_before']:.1f} GFLOP/s", flush=True)
    x1, l1 = batch_of(slices, ensemble.config, 1)
    flops_one = count_flops(Ensemble([ensemble[0]], torch.device("cpu")), x1, l1)
    res["flops_per_slice"] = flops_one * a.members
    print(f"FLOPs per slice through the ensemble: {res['flops_per_slice'] / 1e9:.1f} G "
          f"({flops_one / 2e9:.1f} G per member and pass, intra + inter)", flush=True)

    done = [0]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t, c = time.perf_counter(), time.process_time()
    out = segment_scan(slices[:a.slices], ensemble, True, WEIGHTS, a.batch_size,
                       progress=lambda n: done.__setitem__(0, done[0] + n))
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert done[0] == a.slices * a.members and out["labels"].shape == (a.slices, size, size)
    per_slice = wall / a.slices
    rate = res["flops_per_slice"] / per_slice / 1e9
    cpu_rate = res["flops_per_slice"] / (cpu / a.slices) / 1e9
    res["full"] = {"slices": a.slices, "batch_size": a.batch_size, "wall_s": wall, "s_per_slice": per_slice,
                   "cpu_s": cpu, "cpu_s_per_slice": cpu / a.slices, "gflops_cpu_time": cpu_rate,
                   "volume_slices": a.volume_slices, "volume_s_extrapolated": per_slice * a.volume_slices,
                   "gflops": rate, "peak_rss_MiB": rss / 1024, "rss_before_run_MiB": rss0 / 1024}
    print(f"full run: {a.slices} slices in {wall:.1f} s = {per_slice:.2f} s/slice -> "
          f"{per_slice * a.volume_slices / 60:.1f} min for {a.volume_slices} slices; {rate:.1f} GFLOP/s = "
          f"{rate / res['sgemm_gflops_before']:.0%} of sgemm; peak RSS {rss / 1024:.0f} MiB", flush=True)
    print(f"  CPU time {cpu:.1f} s = {cpu / a.slices:.2f} s/slice: {cpu_rate:.1f} GFLOP/s = "
          f"{cpu_rate / res['sgemm_gflops_cpu_before']:.0%} of sgemm on CPU time "
          f"({res['sgemm_gflops_cpu_before']:.1f} GFLOP/s)", flush=True)
    if not a.skip_variants:
        chosen = [v.strip() for v in a.variants.split(",") if v.strip()]
        unknown = sorted(set(chosen) - set(VARIANTS))
        if unknown:
            raise InputError(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
        res["variants"] = variants(ensemble, slices, a.variant_batch, a.reps, a.threads, chosen)
        per_member = res["flops_per_slice"] / a.members
        for name, v in res["variants"].items():
            v["gflops"] = per_member / v["s_per_slice"] / 1e9
            v["gflops_cpu_time"] = per_member / v["cpu_s_per_slice"] / 1e9
            print(f"{name:15s} {v['s_per_slice']:7.3f} s/slice/member wall (x{v['speedup_vs_baseline']:.2f}), "
                  f"{v['cpu_s_per_slice']:7.3f} CPU (x{v['cpu_speedup_vs_baseline']:.2f}); "
                  f"{v['gflops']:.1f} GFLOP/s wall, {v['gflops_cpu_time']:.1f} CPU; max |dp| {v['max_prob_diff']:.2g}; "
                  f"labels agree {min(v['label_agreement'].values()):.4f}", flush=True)
        res["ceiling"] = ceiling(ensemble, slices, a.reps)
        c = res["ceiling"]
        print(f"ceiling: conv3x3 {c['conv3x3_shape']} alone {c['conv3x3_gflops_cpu_time']:.1f} GFLOP/s (CPU time); convolutions take "
              f"{c['profile_conv_share']:.0%} of a forward; top ops {c['profile_top_ops']}", flush=True)
    res["sgemm_gflops_after"] = gemm_rate()
    res["sgemm_gflops_cpu_after"] = gemm_rate(clock=time.process_time)
    res["loadavg_end"] = os.getloadavg()
    print(f"sgemm after {res['sgemm_gflops_after']:.1f} GFLOP/s; load average {res['loadavg_end']}")
    if a.json:
        write_text_atomic(a.json, json.dumps(res, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
