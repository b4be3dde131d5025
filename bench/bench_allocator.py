"""The memory allocator's effect on the training steps (issue 23): glibc ``malloc`` vs TCMalloc / jemalloc.

An allocator is chosen when a process starts (``LD_PRELOAD``), so it cannot be switched inside one process
as the other levers of ``bench/bench_steps.py`` are. This bench runs ``bench.bench_steps --json`` in two
fresh single-threaded processes **side by side**, one with the system allocator and one with the allocator
compared, so that both see the same machine at the same time (other jobs, frequency), once per allocator
and round (``--rounds``). Each process times, besides the plain and the fast path of every step, a 1024x1024
float32 sgemm in the same loop (printed as a check that the pair saw the same machine). Ratios are taken
within each pair and their median over the rounds is printed.

Rows: for each step and pair, the plain path with the system allocator (the code as it was before issue 23,
the baseline of its targets), the fast path with the system allocator, and both paths with the preloaded
allocator; the ratio column is baseline / row, within the pair. Two processes need two free cores.

Usage (repo root)::

    OMP_NUM_THREADS=1 python -m bench.bench_allocator [--sections phase1,phase2] [--rounds 3] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from robustmedseg import allocator
from robustmedseg.cli import CliParser
from robustmedseg.errors import InputError, run_cli


def build_parser() -> CliParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="phase1", help="bench_steps sections to time (default phase1; "
                                                         "phase2 adds the phase-2 steps)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs one side-by-side pair (system + allocator) per allocator")
    p.add_argument("--reps", type=int, default=3, help="--reps of each bench_steps process")
    p.add_argument("--allocators", default=None,
                   help="comma-separated libraries to compare with the system allocator (default: each of "
                        f"{', '.join(allocator.CANDIDATES)} found on this machine)")
    return p


def candidates(arg: Optional[str]) -> Dict[str, str]:
    """name -> library path of the allocators to compare (besides ``system``)."""
    if arg:
        libs = [allocator.resolve(a.strip()) for a in arg.split(",") if a.strip()]
    else:
        libs = [allocator.find_library(n) for n in allocator.CANDIDATES]
    found: Dict[str, str] = {}
    for lib in libs:
        if lib is None:
            continue
        found.setdefault(allocator.short_name(lib.name) or lib.name, str(lib))
    return found


def start(choice: str, sections: str, reps: int, out: Path) -> subprocess.Popen:
    env = allocator.allocator_env({k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, choice)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "bench.bench_steps", "--sections", sections, "--reps", str(reps), "--json", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, name: str, out: Path) -> Dict[str, object]:
    log, _ = proc.communicate()
    if proc.returncode:
        raise InputError(f"bench_steps with allocator {name} failed (exit {proc.returncode}):\n{log[-2000:]}")
    data = json.loads(out.read_text())
    if data["allocator"] != name:
        raise InputError(f"the bench process ran with {data['allocator']}, expected {name}")
    return data


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.rounds < 1 or args.reps < 1:
        raise InputError("--rounds and --reps must be >= 1")
    libs = candidates(args.allocators)
    if not libs:
        raise InputError("no TCMalloc or jemalloc found (e.g. apt install libtcmalloc-minimal4 libjemalloc2); "
                         "nothing to compare with the system allocator")
    print(f"allocators compared with the system's: {', '.join(f'{k} ({v})' for k, v in libs.items())}; "
          f"{args.rounds} rounds; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    # pairs[lib][step]: per round, (system row, lib row), each (plain_s, fast_s, sgemm_gflops)
    pairs: Dict[str, Dict[str, List[tuple]]] = {k: {} for k in libs}
    with tempfile.TemporaryDirectory(prefix="bench_alloc_") as tmp:
        for r in range(args.rounds):
            for name, lib in libs.items():
                outs = {k: Path(tmp) / f"{k}_{name}_{r}.json" for k in ("system", name)}
                procs = {"system": start("system", args.sections, args.reps, outs["system"]),
                         name: start(lib, args.sections, args.reps, outs[name])}
                data = {k: finish(procs[k], k, outs[k]) for k in procs}
                for a, b in zip(data["system"]["rows"], data[name]["rows"]):
                    pairs[name].setdefault(a["step"], []).append(
                        tuple((x["plain_s"], x["fast_s"], x["sgemm_gflops"]) for x in (a, b)))
                print(f"round {r + 1}/{args.rounds}: system and {name} side by side, done", flush=True)
    print("\n| step | pair | run | median ms | sgemm GFLOP/s | plain path + system malloc / this |")
    print("|---|---|---|---:|---:|---:|")
    for name in libs:
        for step, rounds in pairs[name].items():
            def line(label: str, side: int, col: int) -> str:
                ratio = statistics.median(pair[0][0] / pair[side][col] for pair in rounds)
                ms = statistics.median(pair[side][col] for pair in rounds)
                rate = statistics.median(pair[side][2] for pair in rounds)
                return f"| {step} | system + {name} | {label} | {1e3 * ms:.1f} | {rate:.0f} | **{ratio:.2f}x** |"

            print(line("plain path, system malloc", 0, 0))
            print(line("fast path, system malloc", 0, 1))
            print(line(f"plain path, {name}", 1, 0))
            print(line(f"fast path, {name}", 1, 1))
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    run_cli(main)
