"""The prepared device check (bench/bench_gpu_check.py) runs end to end on CPU as a dry run of its structure."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bench.bench_gpu_check", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_gpu_check_dry_run_on_cpu_prints_one_markdown_table() -> None:
    res = _run("--device", "cpu", "--tiny")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("| check | configuration | result |") and lines[1] == "|---|---|---|---|"
    assert all(ln.startswith("| ") and ln.endswith(" |") and ln.count(" | ") == 3 for ln in lines[2:]), lines
    rows = [ln.strip("| ").split(" | ") for ln in lines[2:]]
    checks = [r[0] for r in rows]
    for expected, count in (("device", 1), ("CUDA extension build", 2), ("kernel self-check", 4),
                            ("CUDA op tests", 1), ("op timing", 5), ("phase 1 node update", 4),
                            ("phase 2 pretraining step (intra)", 1), ("phase 2 adaptation step", 6), ("total", 1)):
        assert checks.count(expected) == count, (expected, checks)
    results = " ".join(r[2] for r in rows)
    assert "FAILED" not in results and "skipped (time" not in results, res.stdout
    assert all(r[2].startswith("ok:") for r in rows if r[0] == "kernel self-check")
    assert "skipped" in [r for r in rows if r[0] == "CUDA op tests"][0][2]  # no CUDA here: pytest skips them
    assert all("img/s" in r[2] for r in rows if r[0].startswith("phase"))


def test_gpu_check_rejects_unknown_section() -> None:
    res = _run("--device", "cpu", "--sections", "env,bogus")
    assert res.returncode == 2 and "error: unknown section(s) bogus" in res.stderr
