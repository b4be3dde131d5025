"""Mutation testing of the core modules with mutmut 3 (``make mutation``; not part of ``make test``).

For each module below, the checkout (tracked and untracked, not ignored files) is copied to
``build/mutation/<name>/``, a ``setup.cfg`` restricts mutmut to that module (``only_mutate``) and to the
module's fast tests (``pytest_add_cli_args_test_selection``; tests that need the session-wide phantom fixtures are left
out: every mutant runs in a new pytest session, which would rebuild them), and ``mutmut run`` is started there
(mutmut first records which tests reach which function, then runs, for every mutant, only the tests that
reach the mutated function, stopping at the first failure). The worktree itself is never modified.

Results: ``build/mutation/<name>/mutants/mutmut-cicd-stats.json`` (counts) and
``build/mutation/summary.json`` / ``summary.md`` (score per module = killed / (killed + survived +
no tests + timeout); the list of surviving mutants, ``mutmut show <name>`` in the module's folder prints
the diff of one). ``docs/testing.md`` records the scores and reviews the survivors.

Usage::

    python tools/mutation.py                 # every module, one after the other
    python tools/mutation.py restore metrics # some modules
    python tools/mutation.py --list          # the modules and their test selections
    python tools/mutation.py --sample 150 op # a seeded random sample of 150 mutants (score with a 95 % interval)

Needs ``mutmut`` 3.8 in the interpreter (``make mutation`` installs it, without the ``textual`` UI).
Run it niced (``make mutation`` does): it keeps one core busy for a long time.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "build" / "mutation"

# name -> (files to mutate (globs, relative to the repository), fast tests that should kill the mutants)
MODULES: Dict[str, Tuple[List[str], List[str]]] = {
    "op": (["op/*"], ["tests/test_ops.py", "tests/test_values_ops.py",
                      "tests/test_properties.py::test_upfirdn2d_matches_its_definition"]),
    "factory": (["robustmedseg/factory/*"], [
        "tests/test_training_plan.py", "tests/test_values_ada.py", "tests/test_values_factory.py",
        "tests/test_values_resume.py"]),
    "data": (["robustmedseg/data/*"], [
        "tests/test_lmdb_dataset.py", "tests/test_prepare_data.py", "tests/test_values_data.py",
        "tests/test_values_restore.py", "tests/test_preprocess.py::test_legacy_conversion",
        "tests/test_preprocess.py::test_slice_names", "tests/test_preprocess.py::test_group_non_contiguous",
        "tests/test_preprocess.py::test_bad_slice_files",
        "tests/test_properties.py::test_zbins_follow_the_rank_formula_whatever_the_order_and_gaps",
        # needs the session-wide phantom fixtures, rebuilt for every mutant: too slow here
        "--deselect", "tests/test_prepare_data.py::test_chain_preprocessed_sites_to_lmdb",
        "--deselect", "tests/test_prepare_data.py::test_chain_phantom_volume_depth_covers_all_zbins"]),
    "restore": (["MultiMedSeg/data/restore.py"], [
        "tests/test_values_restore.py", "tests/test_properties.py::test_preprocess_restore_round_trip_is_exact"]),
    "metrics": (["MultiMedSeg/training/metrics.py"], [
        "tests/test_values_metrics.py", "tests/test_mms_training.py::test_binary_scores_edge_cases_and_spacing",
        "tests/test_mms_training.py::test_selection_score_takes_best_branch",
        "tests/test_mms_training.py::test_consider_only_vessels_within_brain_scores_label_2_only",
        "tests/test_mms_training.py::test_best_index_keeps_k_best_as_json"]),
    "generation": (["MultiMedSeg/generation.py"], [
        "tests/test_generate_volumes.py", "tests/test_values_generation.py",
        "tests/test_properties.py::test_latent_path_has_the_documented_slice_count_and_exact_bins"]),
}
# packages copied into mutmut's mutants/ folder (importable, unmutated unless listed in only_mutate), and
# the other files the tests import
SOURCE_PATHS = ["op", "robustmedseg", "MultiMedSeg", "demo"]
ALSO_COPY = ["model.py", "training_plan.py", "train.py", "prepare_data.py", "save_global_model.py",
             "generate_volumes.py", "bench"]


def checkout_files() -> List[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return [f for f in out if f and (REPO / f).is_file()]


def prepare(name: str, isolation: str) -> Path:
    globs, tests = MODULES[name]
    work = OUT / name
    if work.exists():
        shutil.rmtree(work)
    for rel in checkout_files():
        if rel.startswith(("docs/img/", ".ci/")):
            continue
        dst = work / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dst)
    lines = ["[mutmut]",
             "source_paths =", *(f"    {p}" for p in SOURCE_PATHS),
             "only_mutate =", *(f"    {g}" for g in globs),
             "also_copy =", *(f"    {p}" for p in ALSO_COPY),
             "pytest_add_cli_args_test_selection =", *(f"    {t}" for t in tests),
             "pytest_add_cli_args =", "    -p", "    no:cacheprovider", "    -m", "    not slow and not cuda",
             f"process_isolation = {isolation}", ""]
    (work / "setup.cfg").write_text("\n".join(lines))
    return work


def survivors(work: Path, env: Dict[str, str]) -> List[str]:
    out = subprocess.run([sys.executable, "-c", "from mutmut.__main__ import cli; cli()", "results"], cwd=work,
                         env=env, capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip() and ":" in line]


GENERATE = ("import os; os.makedirs('mutants', exist_ok=True); from mutmut.utils.file_utils import copy_src_dir; "
            "from mutmut.__main__ import create_mutants; copy_src_dir(); create_mutants(1)")


def all_mutants(work: Path, env: Dict[str, str]) -> List[str]:
    """Generate the mutants of ``work`` (no test run) and return their names."""
    subprocess.run([sys.executable, "-c", GENERATE], cwd=work, env=env, check=True, capture_output=True)
    names: List[str] = []
    for meta in sorted((work / "mutants").rglob("*.py.meta")):
        names += sorted(json.loads(meta.read_text())["exit_code_by_key"])
    return names


def run(name: str, isolation: str = "fork", sample: int = 0, seed: int = 0) -> Dict[str, object]:
    work = prepare(name, isolation)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.time()
    chosen: List[str] = []
    population = 0
    if sample:
        names = all_mutants(work, env)
        population = len(names)
        chosen = sorted(random.Random(seed).sample(names, min(sample, len(names))))
    log = open(work / "mutmut.log", "w")
    proc = subprocess.run([sys.executable, "-c", "from mutmut.__main__ import cli; cli()", "run", "--max-children",
                           "1", *chosen], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    subprocess.run([sys.executable, "-c", "from mutmut.__main__ import cli; cli()", "export-cicd-stats"], cwd=work,
                   env=env, capture_output=True)
    stats_path = work / "mutants" / "mutmut-cicd-stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    killed = int(stats.get("killed", 0)) + int(stats.get("timeout", 0))
    tested = killed + int(stats.get("survived", 0)) + int(stats.get("no_tests", 0))
    score = 100.0 * killed / tested if tested else None
    interval = None
    if sample and tested:  # 95 % Wilson interval of a sampled score
        p, n, z = killed / tested, tested, 1.96
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
        interval = [round(100 * (centre - half), 1), round(100 * min(1.0, centre + half), 1)]
    return {"module": name, "files": MODULES[name][0], "returncode": proc.returncode, "seconds": round(seconds),
            "stats": stats, "score": None if score is None else round(score, 1), "sampled": len(chosen),
            "population": population or int(stats.get("total", 0)), "ci95": interval,
            "survivors": survivors(work, env)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", choices=[[], *MODULES], metavar="MODULE",
                        help=f"modules to mutate (default: all of {', '.join(MODULES)})")
    parser.add_argument("--list", action="store_true", help="print the modules and their tests, then exit")
    parser.add_argument("--sample", type=int, default=0, metavar="N",
                        help="run a seeded random sample of N mutants per module (0: all); the score then comes "
                             "with a 95 %% (Wilson) interval")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample")
    parser.add_argument("--isolation", choices=["fork", "forkserver"], default="fork",
                        help="mutmut process_isolation: fork (default, fastest; the tests run on CPU with one thread) "
                             "or forkserver")
    args = parser.parse_args(argv)
    if args.list:
        for name, (globs, tests) in MODULES.items():
            print(f"{name}: {' '.join(globs)}\n    tests: {' '.join(tests)}")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    summary_path = OUT / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for name in args.modules or list(MODULES):
        print(f"mutation: {name} ...", flush=True)
        result = run(name, args.isolation, args.sample, args.seed)
        summary[name] = result
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"mutation: {name}: score {result['score']}% {result['stats']} in {result['seconds']} s", flush=True)
    rows = ["| module | mutants | run | killed | survived | no tests | timeout | score | time |", "|---" * 9 + "|"]
    for name, r in summary.items():
        s = r["stats"]
        run_count = sum(int(s.get(k, 0)) for k in ("killed", "survived", "no_tests", "timeout"))
        score = f"{r['score']} %" + (f" (95 % CI {r['ci95'][0]}–{r['ci95'][1]})" if r.get("ci95") else "")
        rows.append(f"| {name} | {r.get('population', s.get('total', '?'))} | {run_count} | {s.get('killed', 0)} | "
                    f"{s.get('survived', 0)} | {s.get('no_tests', 0)} | {s.get('timeout', 0)} | {score} | "
                    f"{r['seconds']} s |")
    (OUT / "summary.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
