"""The memory allocator given to the commands a run starts (robustmedseg/allocator.py, demo --allocator)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from robustmedseg import allocator
from robustmedseg.errors import InputError

REPO = Path(__file__).resolve().parents[1]
AVAILABLE = [p for p in map(allocator.find_library, allocator.CANDIDATES) if p is not None]


def test_system_preloads_nothing():
    env = allocator.allocator_env({"LD_PRELOAD": "/x/libother.so", "PATH": "/bin"}, "system")
    assert env["LD_PRELOAD"] == "/x/libother.so" and env["PATH"] == "/bin"
    assert env[allocator.ENV_VAR] == "system"
    assert allocator.resolve("system") is None and allocator.describe("system") == "system"


def test_a_path_is_prepended_once_and_recorded(tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    env = allocator.allocator_env({"LD_PRELOAD": f"/x/libother.so:{lib}"}, str(lib))
    assert env["LD_PRELOAD"] == f"{lib}:/x/libother.so"
    assert env[allocator.ENV_VAR] == str(lib)
    assert env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == str(1 << 40)
    assert allocator.describe(str(lib)) == "tcmalloc"
    # the choice travels in the environment: a process started from it resolves the same library
    assert allocator.allocator_env(env)["LD_PRELOAD"] == env["LD_PRELOAD"]


def test_missing_library_is_one_input_error(tmp_path):
    with pytest.raises(InputError) as err:
        allocator.resolve(str(tmp_path / "libnone.so"))
    assert "libnone.so" in str(err.value) and "--allocator" in str(err.value)


def test_auto_takes_the_first_candidate_found():
    expected = AVAILABLE[0] if AVAILABLE else None
    assert allocator.resolve("auto") == expected


def test_demo_refuses_a_bad_allocator_before_running(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "demo.run", "--quick", "--out", str(out), "--allocator",
                           str(tmp_path / "nope.so")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "nope.so" in lines[0], proc.stderr
    assert not out.exists()


CHILD = r"""
import hashlib, torch
from robustmedseg.allocator import loaded_in_this_process
from robustmedseg.factory.config import FactoryConfig
from robustmedseg.factory.network import FactoryModel
from robustmedseg.factory.optim import AlternatingAdam
from robustmedseg.factory.trainer import FactoryTrainer
torch.set_num_threads(1)
cfg = FactoryConfig.from_model_args({"size": 16, "style_dim": 32, "n_mlp": 2, "channel_cap": 16, "augment": True,
                                     "augment_p": 0.2, "r1": 1.0, "lr_mlp": 1.0})
torch.manual_seed(0)
model = FactoryModel(cfg)
opt = AlternatingAdam(model.discriminator.parameters(), model.generator.parameters(), 0.004, cfg.d_reg_every,
                      cfg.g_reg_every)
trainer = FactoryTrainer(model, opt, cfg)
gen = torch.Generator().manual_seed(1)
real = torch.tanh(2 * torch.randn(4, 1, 16, 16, generator=gen))
target = torch.tensor([[0, i % 29] for i in range(4)])
losses = []
for _ in range(8):
    opt.zero_grad()
    loss = trainer.training_step(real, target)
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()).hex())
h = hashlib.sha256()
for p in model.parameters():
    h.update(p.detach().numpy().tobytes())
print(loaded_in_this_process(), " ".join(losses), h.hexdigest())
"""


def _child(choice: str) -> str:
    env = allocator.allocator_env({k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, choice)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not AVAILABLE, reason="no TCMalloc/jemalloc on this machine (apt install libtcmalloc-minimal4)")
def test_preloaded_allocator_is_used_and_changes_no_number():
    """Eight data-factory node updates (D with R1, G with path length, ADA on) from one seed: the same losses
    and weights, bit for bit, with glibc malloc and with each allocator found here."""
    system = _child("system")
    assert system.split()[0] == "system"
    for lib in AVAILABLE:
        other = _child(str(lib))
        assert other.split()[0] == allocator.describe(str(lib)), other
        assert other.split()[1:] == system.split()[1:], (lib, other, system)
