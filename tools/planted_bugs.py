"""Plant, one at a time, the six plausible bugs of issue 16 that the suite used to miss; run the tests named
for each (fast ones, ``-m "not slow"``), report which fail, restore the file. Run from the repository root
with a clean working tree: ``python tools/planted_bugs.py [INDEX ...]``. docs/testing.md records the result.
"""
import os
import subprocess
import sys
from pathlib import Path
BUGS = [
 ("ADA gate inverted", "robustmedseg/factory/ada.py",
  "keep = torch.rand(value.shape[0], device=value.device) < prob", "keep = torch.rand(value.shape[0], device=value.device) >= prob",
  ["tests/test_values_ada.py", "tests/test_training_plan.py"]),
 ("restore ignores the z offset", "MultiMedSeg/data/restore.py",
  "full[first:stop] = vol", "full[:stop - first] = vol",
  ["tests/test_values_restore.py", "tests/test_properties.py", "tests/test_preprocess.py"]),
 ("HD95 = plain Hausdorff", "MultiMedSeg/training/metrics.py",
  'funcs = {"hd": hd, "hd95": hd95}', 'funcs = {"hd": hd, "hd95": hd}',
  ["tests/test_values_metrics.py", "tests/test_mms_training.py"]),
 ("every volume synthesised with domain 0", "MultiMedSeg/generation.py",
  "w = bin_latents(self.generator, z.to(self.device), self.label, self.encoding)",
  "w = bin_latents(self.generator, z.to(self.device), 0, self.encoding)",
  ["tests/test_values_generation.py", "tests/test_generate_volumes.py"]),
 ("every volume seeded identically", "MultiMedSeg/generation.py",
  "rng = torch.Generator().manual_seed(derived_seed(self.seed, index))",
  "rng = torch.Generator().manual_seed(derived_seed(self.seed, 0))",
  ["tests/test_values_generation.py", "tests/test_generate_volumes.py"]),
 ("phase-2 resume drops the optimiser state", "MultiMedSeg/training/coach.py",
  '            self.optimizer.load_state_dict(payload["optimizer"])\n            self.optimizer_seg.load_state_dict(payload["optimizer_seg"])\n',
  "            pass  # planted: optimiser state dropped\n",
  ["tests/test_values_resume.py", "tests/test_mms_training.py"]),
]
ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)
env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
only = sys.argv[1:]
for i, (name, path, old, new, tests) in enumerate(BUGS):
    if only and str(i) not in only:
        continue
    src = Path(path).read_text()
    assert src.count(old) == 1, (name, src.count(old))
    Path(path).write_text(src.replace(old, new))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", *tests],
                           capture_output=True, text=True, env=env)
        failed = [l.split(" - ")[0] for l in r.stdout.splitlines() if l.startswith("FAILED")]
        summary = r.stdout.strip().splitlines()[-1]
        print(f"## {name}: {summary}")
        for f in failed:
            print("   ", f)
    finally:
        Path(path).write_text(src)
subprocess.run(["git", "status", "--short"])  # nothing: every file restored
