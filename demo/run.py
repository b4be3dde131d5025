"""One-command demo of the whole pipeline on the embedded phantom: ``python -m demo.run`` (``make demo``).

Stages (each runs the project's real command-line tools as subprocesses; the output of stage
``<name>`` goes to ``OUT/logs/<name>.log``):

1. ``phantom``       3-site brain phantom (``python -m demo.phantom``) + montage PNG
2. ``preprocess``    each site to 32 px slices (``python -m MultiMedSeg.preprocess``), and the target site
                     with every training volume labelled (the target-supervised upper bound)
3. ``prepare_data``  one LMDB per site (``prepare_data.py``, CLIP off unless ``--clip-model``); the few
                     labelled target slices (``python -m demo.fewshot``)
4. ``evaluator``     fidelity evaluator: a classifier of real slices (``python -m robustmedseg.fidelity``)
5. ``federated``     3 local Fed-BioMed nodes, ``train.py`` (fidelity per round), ``save_global_model.py``;
                     nodes always stopped
6. ``pretrain``      segmenters: source only (site 0), target only, target supervised (``MultiMedSeg/pretrain.py``)
7. ``generate``      synthetic labelled source volumes (``generate_volumes.py``)
8. ``adapt``         adaptation to the target site with the real, then the synthetic source (``MultiMedSeg/train.py``)
9. ``inference``     target test volumes with the five models (``MultiMedSeg/inference.py``)
10. ``fidelity``     fidelity of the final generator (``python -m robustmedseg.fidelity score``)
11. ``predict``      the target test scans stored as NRRD in another axis order (``python -m demo.reorient``),
                     segmented like new scans (``MultiMedSeg/predict.py``)
12. ``report``       ``OUT/REPORT.md`` and ``OUT/summary.json`` with figures, the five-row Dice/Hausdorff
                     table and the gap closed (``python -m demo.report``)

``--preset vessels`` runs the same stages on the vascular phantom (``python -m demo.phantom --task vessels``)
with the original's vessel settings, without the predict stage; its report (:mod:`demo.vessel_report`) scores
the vessel class (Dice, clDice, thin-vessel detection, HD95) and shows intensity projections.

A finished stage leaves ``OUT/.stages/<name>.json`` (its wall time); ``--resume`` skips those.
``--full`` prints the paper-scale commands instead of running anything.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from demo.stages import PRESETS, SITES, DemoConfig, Stage, build_stages, paper_commands, shell_line
from robustmedseg import allocator
from robustmedseg.cli import CliParser
from robustmedseg.errors import InputError, run_cli
from robustmedseg.io import write_text_atomic

MARKERS = ".stages"
RUN_INFO = "demo.json"


class StageFailed(Exception):
    """A stage's command exited with a non-zero status."""

    def __init__(self, stage: str, log: Path, status: int):
        super().__init__(f"stage '{stage}' failed (exit status {status}); see {log}")
        self.stage, self.log, self.status = stage, log, status


def build_parser() -> CliParser:
    p = CliParser(
        prog="python -m demo.run", command="demo.run",
        description="Run the whole pipeline (phantom -> federated data factory -> segmentation pretraining -> "
                    "synthetic volumes -> adaptation -> inference -> REPORT.md) on the embedded phantom data "
                    "with tiny CPU settings (about 13 min on 2 cores; --quick about 3 min).",
        epilog="Every stage calls the real command-line tools; their commands are at the top of each "
               "OUT/logs/<stage>.log. Use --full to see the paper-scale commands for your own data.")
    p.add_argument("--out", type=Path, default=Path("demo_output"),
                   help="output folder (default demo_output); refused if it exists unless --resume or --overwrite")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="settings: 'default' (32 px, < 20 min on 2 cores), 'quick' (smoke configuration used by the "
                        "test suite, a few minutes, numbers meaningless), 'quality' (64 px slices of a 3 mm phantom, "
                        "the default schedules; about 46 min on 2 CPU cores, see BENCHMARKS.md), 'vessels' (the vessel "
                        "case: 64 px slices of the 3 mm vascular phantom with brain masks, weight maps and the "
                        "original's vessel settings; vessel Dice, clDice, thin-vessel detection, HD95 and "
                        "projections in the report; docs/demo.md#vessels), 'vessels-quick' (its smoke "
                        "configuration, tests/test_demo_vessels.py)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--full", action="store_true",
                   help="print the paper-scale commands (GPU, your own data) and exit without running anything")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted demo in --out: skip stages that finished (OUT/.stages/)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing demo folder --out and start again")
    p.add_argument("--target", type=int, choices=[s for s in SITES if s != 0], default=2,
                   help="target site of the adaptation (default 2, PET-like: the largest domain gap)")
    p.add_argument("--clip-model", default="none",
                   help="open_clip model for prepare_data.py's clip_mean.npy (default none: CLIP weights cannot "
                        "be downloaded here; e.g. ViT-L-14 with --clip-pretrained)")
    p.add_argument("--clip-pretrained", default=None,
                   help="local CLIP weights file (or cached open_clip tag) passed to prepare_data.py")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every training stage (data factory, segmenters, synthetic volumes; default 0). "
                        "The phantom, the splits and the fidelity evaluator stay the same for every seed. The same "
                        "seed, code and --threads give the same numbers and weights on CPU (docs/demo.md)")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of every command (default 1). On a 2-core machine shared with other "
                        "work, 2 threads were measured up to 5x SLOWER than 1 (OpenMP threads wait for each other)")
    p.add_argument("--allocator", default=None,
                   help="memory allocator of every command: 'auto' (default; TCMalloc or jemalloc when installed, "
                        "e.g. apt install libtcmalloc-minimal4: training steps 1.15-1.35x faster here, identical "
                        "results), 'system' (glibc malloc) or the path of a shared library; default: "
                        "$RMS_ALLOCATOR or auto (robustmedseg/allocator.py)")
    p.add_argument("--print-commands", action="store_true",
                   help="print the demo's own command lines (with the chosen settings) and exit")
    return p


# ----------------------------------------------------------------------------------------- folder handling

def _is_demo_folder(out: Path) -> bool:
    return (out / RUN_INFO).is_file() or (out / MARKERS).is_dir()


def prepare_folder(out: Path, cfg: DemoConfig, args: argparse.Namespace) -> None:
    """Create ``out`` (fresh), or accept it for ``--resume``; refuse anything else."""
    info = {"config": cfg.name, "target": args.target, "seed": args.seed, "clip_model": args.clip_model,
            "clip_pretrained": args.clip_pretrained}
    if out.exists():
        if args.resume:
            if not _is_demo_folder(out):
                raise InputError("--resume: not a demo output folder (no demo.json)", out)
            old = json.loads((out / RUN_INFO).read_text()) if (out / RUN_INFO).is_file() else info
            old.setdefault("seed", 0)  # folders made before --seed existed ran with seed 0
            if old != info:
                raise InputError(f"--resume: this folder was made with other settings {old}; "
                                 "use the same flags or --overwrite", out)
            return
        if not args.overwrite:
            raise InputError("output folder already exists (pass --resume to continue it or --overwrite "
                             "to start again)", out)
        if not _is_demo_folder(out) and any(out.iterdir()):
            raise InputError("--overwrite: refusing to delete a non-empty folder that is not a demo output "
                             "(no demo.json)", out)
        shutil.rmtree(out)
    (out / MARKERS).mkdir(parents=True)
    (out / "logs").mkdir()
    write_text_atomic(out / RUN_INFO, json.dumps(info, indent=2) + "\n")


def marker(out: Path, stage: str) -> Path:
    return out / MARKERS / f"{stage}.json"


def remove_outputs(out: Path, stage: Stage) -> None:
    """Delete what a previous, unfinished attempt of ``stage`` left (the CLIs refuse existing outputs)."""
    for rel in stage.outputs:
        path = out / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# ----------------------------------------------------------------------------------------- running

THREADS = {"n": 1}
#: the memory allocator preloaded into every command (robustmedseg/allocator.py); set by main
ALLOCATOR: Dict[str, Optional[str]] = {"choice": None}


def default_threads() -> int:
    """CPU cores this process may use (the default of ``--threads``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def child_env(threads: Optional[int] = None) -> Dict[str, str]:
    """The environment of every command: no stray Fed-BioMed variables, ``threads`` torch/OpenMP threads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FBM_")}
    n = THREADS["n"] if threads is None else threads
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(max(1, n))
    env["PYTHONUNBUFFERED"] = "1"
    return allocator.allocator_env(env, ALLOCATOR["choice"])


def _terminate(signum, frame) -> None:  # SIGTERM behaves like Ctrl-C: stop the child, stop the nodes
    raise KeyboardInterrupt


class Progress:
    """Stage lines on stdout; a live elapsed counter on a terminal, a heartbeat line otherwise."""

    def __init__(self, stream: TextIO = sys.stdout, heartbeat: float = 60.0):
        self.stream, self.tty, self.heartbeat = stream, stream.isatty(), heartbeat
        self.label, self.t0, self.last = "", 0.0, 0.0

    def start(self, label: str) -> None:
        self.label, self.t0 = label, time.monotonic()
        self.last = self.t0
        self._print(f"{label} ...", final=not self.tty)

    def tick(self, what: str) -> None:
        now = time.monotonic()
        if self.tty:
            self._print(f"{self.label} ... {now - self.t0:6.0f} s  {what}", final=False)
        elif now - self.last >= self.heartbeat:
            self.last = now
            self._print(f"    {now - self.t0:.0f} s  {what}", final=True)

    def done(self, text: str) -> None:
        self._print(f"{self.label} {text}", final=True)

    def _print(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:  # interrupted: stop the child before leaving
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_command(cmd: Sequence[str], log: TextIO, progress: Progress, what: str,
                threads: Optional[int] = None) -> int:
    """Run one command with stdout/stderr appended to ``log``; returns its exit status."""
    log.write(f"\n$ {shell_line(cmd)}\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=child_env(threads),
                            cwd=os.getcwd())
    try:
        while True:
            try:
                status = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                progress.tick(what)
                continue
            log.write(f"# exit status {status} after {time.monotonic() - t0:.1f} s\n")
            log.flush()
            return status
    finally:
        _stop(proc)


def run_parallel(cmds: Sequence[Sequence[str]], log: TextIO, log_path: Path, progress: Progress, lanes: int,
                 total_threads: int) -> Tuple[int, int]:
    """Run ``cmds`` at most ``lanes`` at a time, each with ``total_threads // lanes`` threads (at least 1).

    Each command writes to its own part file; when it ends, the part is appended to ``log`` (so the
    stage log holds every command's output in one piece).  Returns ``(index, status)`` of the first
    failure, or ``(-1, 0)``.  On a failure the commands still running are stopped.
    """
    pending = list(enumerate(cmds))
    running: List[Tuple[int, subprocess.Popen, Path, Any, float]] = []
    lanes = max(1, min(lanes, len(cmds)))
    threads = max(1, total_threads // lanes)
    failed = (-1, 0)
    try:
        while pending or running:
            while pending and len(running) < lanes and failed[0] < 0:
                k, cmd = pending.pop(0)
                part = log_path.with_name(f".{log_path.stem}.{k}.part")
                fh = open(part, "w")
                fh.write(f"\n$ {shell_line(cmd)}\n")
                fh.flush()
                proc = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=child_env(threads),
                                        cwd=os.getcwd())
                running.append((k, proc, part, fh, time.monotonic()))
            if not running:
                break
            time.sleep(1.0)
            names = ", ".join(_short(cmds[k]) for k, *_ in running)
            progress.tick(f"{len(running)} running ({names}), {len(pending)} waiting")
            for item in list(running):
                k, proc, part, fh, t0 = item
                status = proc.poll()
                if status is None:
                    continue
                fh.write(f"# exit status {status} after {time.monotonic() - t0:.1f} s\n")
                fh.close()
                log.write(part.read_text())
                log.flush()
                part.unlink()
                running.remove(item)
                if status and failed[0] < 0:
                    failed = (k, status)
                    pending.clear()
    finally:
        for k, proc, part, fh, _ in running:
            _stop(proc)
            fh.close()
            if part.exists():
                log.write(part.read_text() + "# stopped\n")
                part.unlink()
        log.flush()
    return failed


def _short(cmd: Sequence[str]) -> str:
    return Path(cmd[1]).name if cmd[1] != "-m" else cmd[2]


def federation_cli(action: str, root: Path, datasets: Optional[Dict[str, str]] = None) -> List[str]:
    cmd = [sys.executable, "-m", "robustmedseg.federation.local", action, "--root", str(root)]
    for name, path in (datasets or {}).items():
        cmd += ["--dataset", f"{name}={path}"]
    return cmd + (["--threads", "1"] if action == "up" else [])


def stop_federation(root: Path, log: TextIO, progress: Progress) -> None:
    """Stop the local nodes (CLI ``down``; in-process fallback if the CLI fails)."""
    if not (root / "federation.json").is_file():
        return
    if run_command(federation_cli("down", root), log, progress, "stopping the nodes") != 0:
        from robustmedseg.federation.local import LocalFederation

        LocalFederation(root).stop()


def children_cpu() -> float:
    """User + system CPU seconds of the finished child processes of this process (and their children)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(stage: Stage, out: Path, progress: Progress) -> float:
    """Run every command of ``stage`` (nodes up around them if needed); returns the wall time."""
    log_path = out / "logs" / f"{stage.name}.log"
    t0 = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"=== stage {stage.name}: {stage.title} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        fed_root = out / "federation"
        try:
            if stage.federation is not None:
                status = run_command(federation_cli("up", fed_root, stage.federation), log, progress,
                                     "starting 3 Fed-BioMed nodes")
                if status:
                    raise StageFailed(stage.name, log_path, status)
            if stage.parallel > 1 and len(stage.commands) > 1:
                k, status = run_parallel(stage.commands, log, log_path, progress, stage.parallel, THREADS["n"])
                if status:
                    raise StageFailed(stage.name, log_path, status)
            else:
                for k, cmd in enumerate(stage.commands, 1):
                    what = f"command {k}/{len(stage.commands)}: {_short(cmd)}"
                    status = run_command(cmd, log, progress, what, threads=stage.threads or THREADS["n"])
                    if status:
                        raise StageFailed(stage.name, log_path, status)
        finally:
            if stage.federation is not None:
                stop_federation(fed_root, log, progress)
        seconds = time.monotonic() - t0
        log.write(f"=== stage {stage.name} done in {seconds:.1f} s\n")
    return seconds


def _load() -> float:
    """1-minute load average (the machine may be shared; reported next to the timings)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def run_pipeline(out: Path, stages: List[Stage], resume: bool, cfg: DemoConfig) -> Dict[str, float]:
    progress = Progress()
    timings: Dict[str, float] = {}
    t_all = time.monotonic()
    print(f"demo ({cfg.name} settings) -> {out}   [load average {_load():.2f}, "
          f"OMP_NUM_THREADS={THREADS['n']} per command, allocator {allocator.describe(ALLOCATOR['choice'])}]",
          flush=True)
    for i, stage in enumerate(stages, 1):
        label = f"[{i}/{len(stages)}] {stage.name:<13}"
        done = marker(out, stage.name)
        if resume and done.is_file():
            timings[stage.name] = float(json.loads(done.read_text())["seconds"])
            print(f"{label} already done ({timings[stage.name]:.0f} s), skipped", flush=True)
            continue
        progress.start(f"{label} {stage.title}")
        if stage.federation is not None:  # nodes left running by a killed earlier attempt
            with open(out / "logs" / f"{stage.name}.log", "a") as log:
                stop_federation(out / "federation", log, progress)
        remove_outputs(out, stage)
        if stage.name == "report":  # the report reads the timings of the other stages
            write_text_atomic(out / MARKERS / "timings.json", json.dumps(timings, indent=2) + "\n")
        cpu0 = children_cpu()
        seconds = run_stage(stage, out, progress)
        timings[stage.name] = seconds
        write_text_atomic(done, json.dumps({"seconds": seconds, "cpu_seconds": children_cpu() - cpu0,
                                            "load": _load(), "threads": THREADS["n"],
                                            "allocator": allocator.describe(ALLOCATOR["choice"]),
                                            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        progress.done(f"done in {seconds:.1f} s  (total {time.monotonic() - t_all:.0f} s)")
    write_text_atomic(out / MARKERS / "timings.json", json.dumps(timings, indent=2) + "\n")
    return timings


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.full:
        try:
            print(paper_commands())
        except BrokenPipeError:  # e.g. piped into head
            pass
        return 0
    cfg = PRESETS["quick" if args.quick else args.preset]
    out = args.out.resolve()
    try:
        stages = build_stages(out, cfg, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                              target=args.target, seed=args.seed)
    except ValueError as err:
        raise InputError(str(err)) from err
    if args.print_commands:
        for stage in stages:
            print(f"# {stage.name}: {stage.title}")
            for cmd in stage.commands:
                print(shell_line(cmd))
        return 0
    if args.resume and args.overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    if args.threads < 1:
        raise InputError("--threads must be >= 1")
    if not 0 <= args.seed < 2**31:
        raise InputError(f"--seed must be in [0, 2**31), got {args.seed}")
    THREADS["n"] = args.threads
    allocator.resolve(args.allocator)  # a path that is not a library: one line, before anything runs
    ALLOCATOR["choice"] = args.allocator
    prepare_folder(out, cfg, args)
    signal.signal(signal.SIGTERM, _terminate)
    t0 = time.monotonic()
    try:
        run_pipeline(out, stages, args.resume, cfg)
    except StageFailed as err:
        if sys.stdout.isatty():  # end the live progress line
            print()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted (the command running was stopped, and the Fed-BioMed nodes if they were up). "
              "Continue with: python -m demo.run --resume "
              f"--out {args.out} --preset {cfg.name} --seed {args.seed}", file=sys.stderr)
        return 130
    print(f"demo finished in {time.monotonic() - t0:.0f} s: {out / 'REPORT.md'}")
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-demo``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
