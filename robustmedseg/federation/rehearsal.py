"""Deployment rehearsal: the researcher and three hospitals on separate network hosts, built with the
commands of docs/phase1.md#real-multi-hospital-deployment, then network faults (``make rehearsal``).

    python -m robustmedseg.federation.rehearsal --out rehearsal_output [--faults all|none|cut,slow,...]

Needs root (network namespaces; :mod:`robustmedseg.federation.netns`).  Every host is a namespace of
a private virtual network created here; every component is created, configured and started inside
its own host with the documented commands (``fedbiomed component create`` with the researcher's
address in its certificate, ``prepare_data.py``, ``fedbiomed node dataset add``, plan approval by
hash, ``force_secure_aggregation`` on one node, ``fedbiomed node start``), then ``train.py --secagg``
runs a few tiny rounds and ``save_global_model.py`` exports the factory, which must load and sample.
Faults (each must end in one line naming the node, and ``train.py --resume`` must then continue):

* ``cut``      a sampled node's link is cut mid-round, then restored;
* ``slow``     a node's link is slowed (``tc``) for a whole round: the round must complete;
* ``restart``  a node's host is killed mid-round (SIGKILL), the node started again;
* ``researcher`` the researcher is killed between two rounds;
* ``release``  a node runs another release of the plan (it approved another hash): refused by name;
* ``impostor`` a fourth host runs a node claiming the id of node hosp1 (its own certificate and keys), with
  and without secure aggregation; then, with its own id, pointed at an address of the researcher's host
  that its certificate does not carry.

Writes ``OUT/REHEARSAL.md`` (each step with its command line, wall time and outcome) and
``OUT/rehearsal.json``; logs under ``OUT/logs``.  Every namespace, process and address is removed at
the end, also on failure and on Ctrl-C / SIGTERM.
"""
from __future__ import annotations

import configparser
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from robustmedseg.cli import CliParser
from robustmedseg.errors import InputError, run_cli
from robustmedseg.io import write_text_atomic

from .local import PROJECT_ROOT, READY_MARK, project_pythonpath
from .netns import VirtualNetwork, namespaces_available

FAULTS = ("cut", "slow", "restart", "researcher", "release", "impostor")
TINY = ["--size", "32", "--latent", "32", "--n_mlp", "2", "--channel-cap", "16", "--n_sample", "2", "--augment",
        "--batch", "4", "--sample-every", "1000", "--log-every", "1000"]
PORT = 50151
HOSPITALS = ("hosp1", "hosp2", "hosp3")  # Fed-BioMed refuses dataset names under 3 characters


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FBM_")}
    env["PYTHONPATH"] = project_pythonpath(env)  # each host "installs" this release
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MKL_NUM_THREADS"] = env["OMP_NUM_THREADS"]
    env.update(extra or {})
    return env


def _fedbiomed() -> List[str]:
    exe = Path(sys.executable).with_name("fedbiomed")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fedbiomed.cli"]


def error_lines(text: str) -> List[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def write_sites(root: Path, n_sites: int, seed: int, size: int = 32, volumes: int = 2, depth: int = 8) -> List[Path]:
    """Tiny slice folders, one per hospital (a bright disc whose contrast and brightness depend on the site):
    the input of ``prepare_data.py``. Deterministic in ``seed``."""
    import numpy as np

    from robustmedseg.data.slices import save_slice

    folders = []
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    for site in range(n_sites):
        rng = np.random.default_rng([seed, site])
        folder = root / f"slices_{site + 1}"
        for v in range(volumes):
            for z in range(depth):
                radius = 0.3 + 0.5 * np.sin(np.pi * (z + 1) / (depth + 1))
                disc = (xx ** 2 + yy ** 2 < radius ** 2).astype(np.float32)
                img = -1 + disc * (0.6 + 0.4 * site) + rng.normal(0, 0.05 + 0.05 * site, (size, size))
                save_slice(folder / f"v{v}_slice{z:03d}.npz", np.clip(img, -1, 1).astype(np.float32))
        folders.append(folder)
    return folders


@dataclass
class Step:
    name: str
    command: str
    seconds: float
    ok: bool
    outcome: str


@dataclass
class Rehearsal:
    """State of one rehearsal (see the module docstring)."""

    out: Path
    seed: int = 0
    rounds: int = 2
    updates: int = 8
    log: Any = print
    net: VirtualNetwork = field(default=None)  # type: ignore[assignment]
    steps: List[Step] = field(default_factory=list)
    faults: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    nodes: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    procs: List[subprocess.Popen] = field(default_factory=list)
    hosts: Dict[str, str] = field(default_factory=dict)  # further hosts: name -> namespace
    exports: Dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ paths
    @property
    def researcher_dir(self) -> Path:
        return self.out / "researcher" / "fbm-researcher"

    @property
    def workdir(self) -> Path:
        return self.out / "researcher" / "factory_run"

    def node_dir(self, name: str) -> Path:
        return self.out / name / "fbm-node"

    def ns(self, name: str) -> str:
        if name == "researcher":
            return self.net.researcher
        if name in HOSPITALS:
            return self.net.nodes[HOSPITALS.index(name)]
        return self.hosts[name]

    def logfile(self, name: str) -> Path:
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        return self.out / "logs" / f"{name}.log"

    # ------------------------------------------------------------------ running commands
    def run(self, host: str, argv: Sequence[str], name: str, env: Optional[Dict[str, str]] = None,
            expect: int = 0, timeout: float = 600.0) -> subprocess.CompletedProcess:
        """``argv`` inside ``host``'s namespace, waited for; recorded as a step; output in the step's log."""
        t0 = time.time()
        res = subprocess.run(self.net.command(self.ns(host), argv), env=_env(env), capture_output=True, text=True,
                             timeout=timeout, cwd=self.out)
        self.logfile(name).write_text(f"$ {' '.join(argv)}\n{res.stdout}\n--- stderr\n{res.stderr}")
        ok = res.returncode == expect
        line = (error_lines(res.stderr) or [ln for ln in res.stdout.splitlines() if ln.strip()][-1:] or [""])[-1]
        self.record(name, argv, time.time() - t0, ok, f"exit {res.returncode}: {line}")
        if not ok:
            raise InputError(f"step {name} ended with exit {res.returncode} (expected {expect}): {line}",
                             self.logfile(name))
        return res

    def parallel(self, jobs: Sequence[tuple]) -> None:
        """``[(host, argv, name, env), ...]`` started together, each waited for and recorded."""
        started = []
        for host, argv, name, env in jobs:
            log = open(self.logfile(name), "w")
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            started.append((name, argv, self.net.popen(self.ns(host), argv, _env(env), log=log, cwd=self.out),
                            time.time(), log))
        failed = []
        for name, argv, proc, t0, log in started:
            rc = proc.wait(timeout=900)
            log.close()
            text = self.logfile(name).read_text()
            line = (error_lines(text) or [ln for ln in text.splitlines() if ln.strip()][-1:] or [""])[-1]
            self.record(name, argv, time.time() - t0, rc == 0, f"exit {rc}: {line[:200]}")
            if rc:
                failed.append(f"{name} (exit {rc}: {line[:200]})")
        if failed:
            raise InputError(f"steps failed: {'; '.join(failed)}", self.out / "logs")

    def record(self, name: str, argv: Sequence[str], seconds: float, ok: bool, outcome: str) -> None:
        command = " ".join(str(a) for a in argv).replace(str(self.out) + "/", "")
        self.steps.append(Step(name, command, round(seconds, 1), ok, outcome))
        self.log(f"{'ok  ' if ok else 'FAIL'} {name} ({seconds:.1f} s): {outcome[:160]}")

    # ------------------------------------------------------------------ setup (docs/phase1.md, as written)
    def setup(self) -> None:
        ip = self.net.researcher_ip
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        for name in HOSPITALS:
            (self.out / name).mkdir(exist_ok=True)
        (self.out / "researcher").mkdir(exist_ok=True)
        for k, folder in enumerate(write_sites(self.out / "data", len(HOSPITALS), self.seed), start=1):
            target = self.out / HOSPITALS[k - 1] / "slices"
            if not target.exists():
                folder.rename(target)
        self.record("site slices", ["write_sites"], time.time() - t0, True, "3 sites x 16 slices of 32 px")
        # 2. researcher component with its address in the certificate; 3. each hospital's node component
        jobs = [("researcher", [*_fedbiomed(), "component", "create", "-c", "researcher", "-p",
                                str(self.researcher_dir)], "create researcher",
                 {"FBM_SERVER_HOST": ip, "FBM_SERVER_PORT": str(PORT)})]
        for k, name in enumerate(HOSPITALS):
            jobs.append((name, [*_fedbiomed(), "component", "create", "-c", "node", "-p", str(self.node_dir(name)),
                                "-n", name], f"create node {name}",
                         {"FBM_RESEARCHER_IP": ip, "FBM_RESEARCHER_PORT": str(PORT)}))
            jobs.append((name, [sys.executable, str(PROJECT_ROOT / "prepare_data.py"), str(self.out / name / "slices"),
                                "--out", str(self.out / name / "lmdb"), "--size", "32", "--label", str(k),
                                "--clip-model", "none", "--quiet"], f"prepare_data {name}", None))
        self.parallel(jobs)
        self.check_certificate()
        jobs = []
        for name in HOSPITALS:
            spec = self.out / name / "dataset.json"
            spec.write_text(json.dumps({"name": name, "data_type": "custom", "tags": "#im2im",
                                        "description": f"LMDB of hospital {name}",
                                        "path": str(self.out / name / "lmdb")}))
            jobs.append((name, [*_fedbiomed(), "node", "-p", str(self.node_dir(name)), "dataset", "add", "--file",
                                str(spec)], f"dataset add {name}", None))
        self.parallel(jobs)
        # 4. plan approval on; 5. secure aggregation (forced on h3): the operator edits etc/config.ini
        for name in HOSPITALS:
            self.configure_node(name, force_secagg=(name == HOSPITALS[2]))
            self.nodes[name] = {"id": self.node_id(name), "ip": self.net.node_ip(HOSPITALS.index(name) + 1)}
        self.record("edit etc/config.ini", ["[security] training_plan_approval = True, allow_default_training_plans = "
                                            "False, secure_aggregation = True; hosp3: force_secure_aggregation = True"],
                    0.0, True, "3 nodes configured")
        jobs = [(name, [sys.executable, "-m", "robustmedseg.federation.local", "approve-node", "--node",
                        str(self.node_dir(name))], f"approve plan {name}", None) for name in HOSPITALS]
        self.parallel(jobs)
        hashes = set()
        for name in HOSPITALS:
            result = json.loads(self.logfile(f"approve plan {name}").read_text().strip().splitlines()[-1])
            self.nodes[name]["plan"] = result
            hashes.add(result["hash"])
        if len(hashes) != 1:
            raise InputError(f"the nodes computed different plan hashes: {sorted(hashes)}")
        # 6. start each node
        for name in HOSPITALS:
            self.start_node(name)
        self.wait_ready(HOSPITALS)

    def check_certificate(self) -> None:
        """The researcher's server certificate carries its address (step 2 of the deployment)."""
        from cryptography import x509

        pem = self.researcher_dir / "etc" / "certs" / "server_certificate.pem"
        cert = x509.load_pem_x509_certificate(pem.read_bytes())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            addresses = [str(a) for a in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(
                x509.DNSName)
        except x509.ExtensionNotFound:
            addresses = []
        ok = self.net.researcher_ip in addresses
        self.exports["certificate"] = {"subject": cert.subject.rfc4514_string(), "addresses": addresses}
        self.record("researcher certificate", [f"x509 {pem.name}"], 0.0, ok,
                    f"subject {cert.subject.rfc4514_string()}, addresses {addresses}")
        if not ok:
            raise InputError(f"the researcher's certificate does not carry its address {self.net.researcher_ip}", pem)

    def configure_node(self, name: str, force_secagg: bool) -> None:
        self.configure_node_at(self.node_dir(name), force_secagg)

    def node_id(self, name: str) -> str:
        cfg = configparser.ConfigParser()
        cfg.read(self.node_dir(name) / "etc" / "config.ini")
        return cfg["default"]["id"]

    def start_node(self, name: str) -> None:
        log = open(self.logfile(f"node {name}"), "a")
        self.nodes.setdefault(name, {})["log_offset"] = log.tell()
        proc = self.net.popen(self.ns(name), [*_fedbiomed(), "node", "-p", str(self.node_dir(name)), "start"],
                              _env(), log=log, cwd=self.out / name)
        log.close()
        self.nodes[name]["started"] = time.time()
        self.procs.append(proc)

    def wait_ready(self, names: Sequence[str], timeout: float = 240.0) -> None:
        t0 = time.time()
        pending = set(names)
        while pending:
            for name in list(pending):
                text = self.logfile(f"node {name}").read_text(errors="replace")[self.nodes[name]["log_offset"]:]
                if READY_MARK in text:
                    pending.discard(name)
            if pending and time.time() - t0 > timeout:
                raise InputError(f"nodes {sorted(pending)} not listening after {timeout:.0f} s", self.out / "logs")
            time.sleep(0.5)
        self.record(f"start node(s) {', '.join(names)}", ["fedbiomed", "node", "-p", "fbm-node", "start"],
                    time.time() - t0, True, "listening for tasks")

    # ------------------------------------------------------------------ researcher
    def train_argv(self, *extra: str) -> List[str]:
        return [sys.executable, str(PROJECT_ROOT / "train.py"), "--researcher-dir", str(self.researcher_dir),
                "--workdir", str(self.workdir), "--min-nodes", "3", "--wait-nodes", "180", *extra]

    def train(self, name: str, *extra: str, expect: int = 0) -> subprocess.CompletedProcess:
        return self.run("researcher", self.train_argv(*extra), name, expect=expect, timeout=900)

    def train_background(self, name: str, *extra: str) -> subprocess.Popen:
        log = open(self.logfile(name), "w")
        proc = self.net.popen(self.net.researcher, self.train_argv(*extra), _env(), log=log, cwd=self.out)
        log.close()
        self.procs.append(proc)
        return proc

    def first_run(self) -> None:
        """The first train.py; while the nodes are connected, the TCP sockets of every host are listed (what a
        firewall must let through)."""
        argv = self.train_argv(*TINY, "--seed", str(self.seed), "--secagg", "--rounds", str(self.rounds),
                               "--num_updates_per_round", str(self.updates), "--max-nodes-per-round", "3")
        name = "train.py (secagg)"
        t0 = time.time()
        proc = self.train_background(name, *argv[len(self.train_argv()):])
        while proc.poll() is None and "node(s) online" not in self.logfile(name).read_text():
            time.sleep(0.2)
        if proc.poll() is None:
            self.sockets()
        rc = proc.wait(timeout=900)
        text = self.logfile(name).read_text()
        line = (error_lines(text) or [ln for ln in text.splitlines() if ln.strip()][-1:] or [""])[-1]
        self.record(name, argv, time.time() - t0, rc == 0, f"exit {rc}: {line}")
        if rc:
            raise InputError(f"step {name} ended with exit {rc}: {line}", self.logfile(name))

    def sockets(self) -> None:
        """Listening TCP sockets and established connections of every host (``ss``), while connected."""
        table: Dict[str, Dict[str, List[str]]] = {}
        for host in ("researcher", *HOSPITALS):
            ns = self.ns(host)
            listen = subprocess.run(self.net.command(ns, ["ss", "-Hltn"]), capture_output=True, text=True).stdout
            est = subprocess.run(self.net.command(ns, ["ss", "-Htn", "state", "established"]), capture_output=True,
                                 text=True).stdout
            table[host] = {"listening": sorted({ln.split()[3] for ln in listen.splitlines() if len(ln.split()) > 3}),
                           "established": sorted({" -> ".join(ln.split()[2:4]) for ln in est.splitlines()
                                                  if len(ln.split()) > 3})}
        self.exports["sockets"] = table
        listening = {h: v["listening"] for h, v in table.items()}
        self.record("sockets while connected", ["ss -ltn; ss -tn state established (each host)"], 0.0, True,
                    f"listening: {json.dumps(listening)}")

    def export(self, name: str = "save_global_model.py", file: str = "final_global_model.pt") -> Path:
        out = self.out / "researcher" / file
        self.run("researcher", [sys.executable, str(PROJECT_ROOT / "save_global_model.py"), "--researcher-dir",
                                str(self.researcher_dir), "--out", str(out)], name)
        return out

    def compare_loopback(self, exported: Path) -> None:
        """The same seed, data (same dataset names) and flags on a loopback federation (local tool, inside an
        isolated host that has only 127.0.0.1): its export must equal the rehearsal's, tensor for tensor."""
        import torch

        from robustmedseg.io import load_torch_file

        self.hosts["loopback"] = self.net.add_host(linked=False)
        root = self.out / "loopback"
        root.mkdir(exist_ok=True)
        datasets = [a for name in HOSPITALS for a in ("--dataset", f"{name}={self.out / name / 'lmdb'}")]
        self.run("loopback", [sys.executable, "-m", "robustmedseg.federation.local", "up", "--root",
                              str(root / "fed"), *datasets], "loopback: local up (127.0.0.1)")
        try:
            self.run("loopback", [sys.executable, str(PROJECT_ROOT / "train.py"), "--researcher-dir",
                                  str(root / "fed" / "researcher"), "--workdir", str(root / "factory_run"),
                                  "--min-nodes", "3", *TINY, "--seed", str(self.seed), "--secagg", "--rounds",
                                  str(self.rounds), "--num_updates_per_round", str(self.updates),
                                  "--max-nodes-per-round", "3"], "loopback: train.py (secagg)", timeout=900)
            out = root / "final_global_model.pt"
            self.run("loopback", [sys.executable, str(PROJECT_ROOT / "save_global_model.py"), "--researcher-dir",
                                  str(root / "fed" / "researcher"), "--out", str(out)],
                     "loopback: save_global_model.py")
        finally:
            self.run("loopback", [sys.executable, "-m", "robustmedseg.federation.local", "down", "--root",
                                  str(root / "fed")], "loopback: local down")
        t0 = time.time()
        a, b = (load_torch_file(p, "factory file", mapping=True) for p in (exported, out))
        worst, differing = 0.0, []
        for part in ("g", "d", "g_ema"):
            for key, value in a[part].items():
                other = b[part][key]
                if value.shape != other.shape or not torch.equal(value, other):
                    differing.append(f"{part}.{key}")
                    if value.shape == other.shape and value.is_floating_point():
                        worst = max(worst, float((value - other).abs().max()))
        equal = not differing and a["args"] == b["args"]
        self.exports["loopback"] = {"equal": equal, "differing_tensors": len(differing), "max_abs_diff": worst}
        self.record("compare with the loopback export", ["torch.equal on every tensor of g, d, g_ema"],
                    time.time() - t0, equal, "identical" if equal else
                    f"{len(differing)} tensor(s) differ (first {differing[:3]}), max |diff| {worst:.3g}")
        if not equal:
            raise InputError(f"the rehearsal's export differs from the loopback federation's ({len(differing)} "
                             f"tensors, max |diff| {worst:.3g})", out)

    def check_export(self, path: Path) -> Dict[str, Any]:
        """The exported factory loads strictly into model.Generator and samples finite images."""
        import torch

        from model import make_condition
        from robustmedseg.factory_file import load_factory_file
        from robustmedseg.io import load_torch_file

        t0 = time.time()
        g, a = load_factory_file(path)  # model.Generator(**args), g_ema loaded strictly
        ckpt = load_torch_file(path, "factory file", mapping=True)
        torch.manual_seed(self.seed)
        with torch.no_grad():
            img, _ = g([torch.randn(3, a["style_dim"])], make_condition([0, 1, 2], 14, a["n_domains"], a["n_zbins"]))
        ok = bool(torch.isfinite(img).all()) and tuple(img.shape) == (3, 1, a["size"], a["size"])
        self.record("load and sample the export", ["model.Generator(**args).load_state_dict(g_ema, strict=True)"],
                    time.time() - t0, ok, f"round {ckpt['meta']['round']}, samples {tuple(img.shape)}")
        if not ok:
            raise InputError("the exported generator does not sample finite images", path)
        return ckpt["meta"]

    def run_info(self) -> Dict[str, Any]:
        return json.loads((self.workdir / "run.json").read_text())

    # ------------------------------------------------------------------ faults
    def _wait_mid_round(self, proc: subprocess.Popen, name: str, timeout: float = 240.0) -> None:
        """Wait until ``name``'s node is training this round (its log shows the training request)."""
        offset = self.nodes[name]["mark"]
        t0 = time.time()
        while time.time() - t0 < timeout:
            text = self.logfile(f"node {name}").read_text(errors="replace")[offset:]
            if "Training plan has been approved by the node" in text:
                return
            if proc.poll() is not None:
                raise InputError(f"train.py ended (exit {proc.returncode}) before the round started",
                                 self.logfile("fault"))
            time.sleep(0.2)
        raise InputError(f"node {name} did not start training within {timeout:.0f} s", self.logfile(f"node {name}"))

    def _mark_logs(self) -> None:
        for name in HOSPITALS:
            self.nodes[name]["mark"] = len(self.logfile(f"node {name}").read_text(errors="replace"))

    def _failed_round(self, fault: str, proc: subprocess.Popen, node: str, t0: float) -> str:
        rc = proc.wait(timeout=600)
        text = self.logfile(f"fault {fault}").read_text()
        lines = error_lines(text)
        ok = rc == 2 and len(lines) == 1 and f"node {node} " in lines[0]
        self.record(f"fault {fault}: train.py", ["train.py --resume ..."], time.time() - t0, ok,
                    f"exit {rc}: {lines[-1] if lines else 'no error line'}")
        self.faults[fault] = {"line": lines[-1] if lines else None, "exit": rc, "one_line_naming_node": ok}
        return lines[-1] if lines else ""

    def _resume(self, fault: str, extra_rounds: int = 1, secagg: bool = False) -> None:
        t0 = time.time()
        target = self.run_info()["round_current"] + extra_rounds
        res = self.train(f"fault {fault}: resume", "--resume", "--rounds", str(target),
                         *(["--secagg"] if secagg else []))
        info = self.run_info()
        ok = info["round_current"] == target
        self.faults.setdefault(fault, {})["resumed_to_round"] = info["round_current"]
        self.faults[fault]["resume_ok"] = ok
        self.faults[fault]["resume_seconds"] = round(time.time() - t0, 1)
        self.faults[fault]["round_lines"] = [ln[:90] for ln in res.stdout.splitlines() if re.match(r"round \d+/", ln)]
        if not ok:
            raise InputError(f"resume after fault {fault} ended at round {info['round_current']}, not {target}: "
                             f"{res.stdout[-300:]}")

    def fault_cut(self) -> None:
        node, k = "hosp1", 1
        target = self.run_info()["round_current"] + 1
        self._mark_logs()
        t0 = time.time()
        proc = self.train_background("fault cut", "--resume", "--rounds", str(target), "--num_updates_per_round",
                                     "400")
        self._wait_mid_round(proc, node)
        self.net.cut(k)
        self.log(f"     link of {node} cut mid-round")
        try:
            self._failed_round("cut", proc, node, t0)
        finally:
            self.net.restore(k)
        self._resume("cut")

    def fault_slow(self) -> None:
        node, k = "hosp2", 2
        how = self.net.slow(k)
        self.faults["slow"] = {"node": node, "how": how}
        t0 = time.time()
        try:
            self._resume("slow")
        finally:
            self.net.unslow(k)
        self.faults["slow"]["command_seconds"] = round(time.time() - t0, 1)

    def fault_restart(self) -> None:
        node = "hosp3"
        target = self.run_info()["round_current"] + 1
        self._mark_logs()
        t0 = time.time()
        proc = self.train_background("fault restart", "--resume", "--rounds", str(target),
                                     "--num_updates_per_round", "400")
        self._wait_mid_round(proc, node)
        self.net.kill_all(self.ns(node))  # the hospital's machine crashes
        self.log(f"     host of {node} killed mid-round")
        self._failed_round("restart", proc, node, t0)
        self.start_node(node)
        self.wait_ready([node])
        self._resume("restart")

    def fault_researcher(self) -> None:
        start = self.run_info()["round_current"]
        t0 = time.time()
        proc = self.train_background("fault researcher", "--resume", "--rounds", str(start + 3))
        deadline = time.time() + 600
        while time.time() < deadline:
            if re.search(rf"round {start + 1}/", self.logfile("fault researcher").read_text()):
                break
            if proc.poll() is not None:
                raise InputError(f"train.py ended (exit {proc.returncode}) before round {start + 1}",
                                 self.logfile("fault researcher"))
            time.sleep(0.2)
        self.net.kill_all(self.net.researcher)  # the researcher's machine dies between rounds
        self.log(f"     researcher killed after round {start + 1}")
        done = self.run_info()["round_current"] if (self.workdir / "run.json").is_file() else None
        self.faults["researcher"] = {"killed_after_round": start + 1, "run_json_round": done}
        self.record("fault researcher: train.py killed", ["kill -9 (every process of the researcher host)"],
                    time.time() - t0, True, f"after round {start + 1}")
        t1 = time.time()
        res = self.train("fault researcher: resume", "--resume", "--rounds", str(start + 3))
        resumed = re.search(r"resumed experiment[^\n]*", res.stdout)
        self.faults["researcher"].update(resumed=resumed.group(0) if resumed else None,
                                         resumed_to_round=self.run_info()["round_current"],
                                         resume_ok=self.run_info()["round_current"] == start + 3,
                                         resume_seconds=round(time.time() - t1, 1))

    def fault_release(self) -> None:
        """h2 runs another release of the plan: it approved that release's hash, not the researcher's."""
        node = "hosp2"
        release = self.out / node / "release_b"
        release.mkdir(exist_ok=True)
        source = (PROJECT_ROOT / "training_plan.py").read_text()
        edited = re.sub(r"(class FactoryTrainingPlan\([^)]*\):\n)", r"\1    RELEASE = 'b'\n", source, count=1)
        (release / "training_plan_b.py").write_text(edited)
        plan_id = self.nodes[node]["plan"]["id"]
        self.run(node, [*_fedbiomed(), "node", "-p", str(self.node_dir(node)), "training-plan", "reject", "--id",
                        plan_id, "--notes", "replaced by release b"], "fault release: reject the researcher's plan")
        self.run(node, [sys.executable, "-m", "robustmedseg.federation.local", "approve-node", "--node",
                        str(self.node_dir(node)), "--plan", "training_plan_b:FactoryTrainingPlan"],
                 "fault release: approve release b", env={"PYTHONPATH": os.pathsep.join([str(release),
                                                                                         str(PROJECT_ROOT)])})
        t0 = time.time()
        target = self.run_info()["round_current"] + 1
        proc = self.train_background("fault release", "--resume", "--rounds", str(target))
        line = self._failed_round("release", proc, node, t0)
        self.faults["release"]["refused_by_hash"] = "has not approved this training plan" in line
        self.run(node, [*_fedbiomed(), "node", "-p", str(self.node_dir(node)), "training-plan", "approve", "--id",
                        plan_id], "fault release: approve the researcher's plan again")
        self._resume("release")

    def fault_impostor(self) -> None:
        """A fourth host runs a node that claims to be hosp1: a node component of its own (own certificate and
        key), whose ``[default] id`` is set to hosp1's id and whose dataset is registered under hosp1's name.
        Recorded: what Fed-BioMed 6.4.1 does (a) with both online, (b) with hosp1 down, (c) the same without
        secure aggregation (hosp3, which requires it, stopped too)."""
        victim, name = "hosp1", "impostor"
        self.hosts[name] = self.net.add_host(linked=True)
        root = self.out / name / "fbm-node"
        ip = self.net.researcher_ip
        self.run(name, [*_fedbiomed(), "component", "create", "-c", "node", "-p", str(root), "-n", victim],
                 "fault impostor: create node", env={"FBM_RESEARCHER_IP": ip, "FBM_RESEARCHER_PORT": str(PORT)})
        path = root / "etc" / "config.ini"
        cfg = configparser.ConfigParser()
        cfg.read(path)
        own_id = cfg["default"]["id"]
        cfg["default"]["id"] = self.nodes[victim]["id"]
        text = io.StringIO()
        cfg.write(text)
        write_text_atomic(path, text.getvalue())
        self.configure_node_at(root, force_secagg=False)
        self.run(name, [sys.executable, str(PROJECT_ROOT / "prepare_data.py"), str(self.out / "hosp2" / "slices"),
                        "--out", str(self.out / name / "lmdb"), "--size", "32", "--label", "0", "--clip-model", "none",
                        "--quiet"], "fault impostor: prepare_data (another site's images, labelled 0)")
        spec = self.out / name / "dataset.json"
        spec.write_text(json.dumps({"name": victim, "data_type": "custom", "tags": "#im2im",
                                    "description": "not hosp1", "path": str(self.out / name / "lmdb")}))
        self.run(name, [*_fedbiomed(), "node", "-p", str(root), "dataset", "add", "--file", str(spec)],
                 "fault impostor: dataset add")
        self.run(name, [sys.executable, "-m", "robustmedseg.federation.local", "approve-node", "--node", str(root)],
                 "fault impostor: approve plan")
        rec: Dict[str, Any] = {"claimed_id": self.nodes[victim]["id"], "own_id_at_creation": own_id}
        self.faults["impostor"] = rec
        log = open(self.logfile("node impostor"), "a")
        self.nodes[name] = {"log_offset": log.tell()}
        proc = self.net.popen(self.hosts[name], [*_fedbiomed(), "node", "-p", str(root), "start"], _env(), log=log,
                              cwd=self.out / name)
        log.close()
        self.procs.append(proc)
        self.wait_ready([name])
        forced = HOSPITALS[2]  # the node that accepts only secure aggregation
        for case in ("both online", "hosp1 down", "plain, hosp1 down"):
            extra: List[str] = []
            if case == "hosp1 down":
                self.net.kill_all(self.ns(victim))
            if case.startswith("plain"):  # without secure aggregation (hosp3 refuses plain rounds: it is stopped)
                self.net.kill_all(self.ns(forced))
                extra = ["--no-secagg", "--min-nodes", "2"]
            t0 = time.time()
            target = self.run_info()["round_current"] + 1
            argv = self.train_argv("--resume", "--rounds", str(target), *extra)
            res = subprocess.run(self.net.command(self.net.researcher, argv), env=_env(), capture_output=True,
                                 text=True, timeout=900, cwd=self.out)
            self.logfile(f"fault impostor ({case})").write_text(res.stdout + "\n--- stderr\n" + res.stderr)
            received = self._node_received_task(name)  # it was sent the plan and the global weights
            line = (error_lines(res.stderr) or ["(no error line)"])[-1]
            rec[case] = {"exit": res.returncode, "line": line if res.returncode else None,
                         "round_current": self.run_info()["round_current"], "impostor_received_task": received}
            self.record(f"fault impostor ({case}): train.py", ["train.py --resume ..."], time.time() - t0, True,
                        f"exit {res.returncode}: {line if res.returncode else 'round completed'}; the impostor "
                        f"{'received the training task' if received else 'received no training task'}")
            self.nodes[name]["log_offset"] = len(self.logfile("node impostor").read_text(errors="replace"))
        self.net.kill_all(self.hosts[name])
        self._wrong_address(name, root, own_id)
        self.start_node(victim)
        self.start_node(forced)
        self.wait_ready([victim, forced])
        self._resume("impostor", secagg=True)

    def _wrong_address(self, name: str, root: Path, own_id: str) -> None:
        """The fourth host's node, with its own id again, pointed at a second address of the researcher's host
        that the researcher's certificate does not carry: does it join?  (hosp1 and hosp3 are down: train.py waits
        for 2 nodes, hosp2 and this one.)"""
        alias = self.net.add_researcher_address(2)
        path = root / "etc" / "config.ini"
        cfg = configparser.ConfigParser()
        cfg.read(path)
        cfg["default"]["id"] = own_id
        cfg["researcher"]["ip"] = alias
        text = io.StringIO()
        cfg.write(text)
        write_text_atomic(path, text.getvalue())
        log = open(self.logfile("node impostor"), "a")
        self.nodes[name]["log_offset"] = log.tell()
        proc = self.net.popen(self.hosts[name], [*_fedbiomed(), "node", "-p", str(root), "start"], _env(), log=log,
                              cwd=self.out / name)
        log.close()
        self.procs.append(proc)
        self.wait_ready([name])
        t0 = time.time()
        target = self.run_info()["round_current"] + 1
        argv = self.train_argv("--resume", "--rounds", str(target), "--no-secagg", "--min-nodes", "2",
                               "--wait-nodes", "40")
        res = subprocess.run(self.net.command(self.net.researcher, argv), env=_env(), capture_output=True,
                             text=True, timeout=900, cwd=self.out)
        self.logfile("fault impostor (wrong address)").write_text(res.stdout + "\n--- stderr\n" + res.stderr)
        online = re.search(r"(\d+) node\(s\) online", res.stdout)
        line = (error_lines(res.stderr) or ["(no error line)"])[-1]
        node_log = self.logfile("node impostor").read_text(errors="replace")[self.nodes[name]["log_offset"]:]
        tls = [ln.strip()[:200] for ln in node_log.splitlines() if re.search(r"(?i)ssl|certificate|handshake", ln)]
        self.faults["impostor"]["wrong address"] = {
            "researcher_address": alias, "certificate_addresses": self.exports.get("certificate", {}).get("addresses"),
            "exit": res.returncode, "line": line, "joined": online is not None and int(online.group(1)) >= 2,
            "node_log_tls_lines": tls[-3:]}
        self.record("fault impostor (wrong address): train.py", ["train.py --resume ... --min-nodes 2"],
                    time.time() - t0, True, f"exit {res.returncode}: {line}")
        self.net.kill_all(self.hosts[name])

    def _node_received_task(self, name: str) -> bool:
        text = self.logfile(f"node {name}").read_text(errors="replace")[self.nodes[name]["log_offset"]:]
        return "Training plan has been approved by the node" in text

    def configure_node_at(self, root: Path, force_secagg: bool) -> None:
        path = root / "etc" / "config.ini"
        cfg = configparser.ConfigParser()
        cfg.read(path)
        sec = cfg["security"]
        sec["training_plan_approval"] = "True"
        sec["allow_default_training_plans"] = "False"
        sec["secure_aggregation"] = "True"
        sec["force_secure_aggregation"] = str(bool(force_secagg))
        text = io.StringIO()
        cfg.write(text)
        write_text_atomic(path, text.getvalue())

    def run_faults(self, faults: Sequence[str]) -> None:
        for fault in faults:
            getattr(self, f"fault_{fault}")()

    # ------------------------------------------------------------------ report
    def report(self, wall: float, error: Optional[str]) -> Dict[str, Any]:
        summary = {"wall_seconds": round(wall, 1), "ok": error is None, "error": error,
                   "network": self.net.describe() if self.net else {}, "researcher_port": PORT,
                   "nodes": self.nodes, "exports": self.exports, "faults": self.faults,
                   "steps": [s.__dict__ for s in self.steps]}
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / "rehearsal.json", json.dumps(summary, indent=2, default=str) + "\n")
        outcome = "completed" if error is None else "FAILED: " + error
        lines = ["# Deployment rehearsal", "", f"Wall time {wall:.0f} s; {outcome}", "",
                 "| step | command | s | ok | outcome |", "|---|---|---:|---|---|"]
        for s in self.steps:
            cmd = s.command if len(s.command) < 160 else s.command[:157] + "..."
            lines.append(f"| {s.name} | `{cmd}` | {s.seconds} | {'yes' if s.ok else 'NO'} | "
                         f"{s.outcome.replace('|', '/')[:220]} |")
        lines += ["", "## Faults", ""]
        for fault, rec in self.faults.items():
            lines.append(f"* **{fault}**: {json.dumps(rec, default=str)}")
        write_text_atomic(self.out / "REHEARSAL.md", "\n".join(lines) + "\n")
        return summary


def rehearse(out: Path, faults: Sequence[str] = FAULTS, seed: int = 0, rounds: int = 2, log=print,
             prefix: Optional[str] = None, compare: bool = True) -> Dict[str, Any]:
    """Run the whole rehearsal (see the module docstring); always removes the virtual network."""
    why = namespaces_available()
    if why:
        raise InputError(f"cannot rehearse here: {why}")
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise InputError("output folder exists and is not empty (choose another --out)", out)
    t0 = time.time()
    r = Rehearsal(out=out, seed=seed, rounds=rounds, log=log)
    previous = _raise_on_termination()  # SIGTERM / SIGHUP clean up like Ctrl-C, also when called from a test
    r.net = VirtualNetwork(len(HOSPITALS), prefix=prefix)
    error: Optional[str] = None
    try:
        r.net.up()
        r.record("virtual network", ["ip netns add / veth / bridge"], time.time() - t0, True,
                 ", ".join(f"{ns} {ip}" for ns, ip in r.net.describe().items()))
        r.setup()
        r.first_run()
        exported = r.export()
        r.check_export(exported)
        if compare:
            r.compare_loopback(exported)
        r.run_faults(faults)
        if faults:
            r.check_export(r.export("save_global_model.py (after the faults)", "final_after_faults.pt"))
    except BaseException as err:  # noqa: BLE001 - recorded, then re-raised after the clean-up
        error = " ".join(str(err).split()) or type(err).__name__
        raise
    finally:
        for proc in r.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
        r.net.down()
        for proc in r.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        summary = r.report(time.time() - t0, error)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return summary


def _raise_on_termination() -> Dict[int, Any]:
    """Make SIGTERM and SIGHUP raise :class:`~robustmedseg.errors.Interrupted` in this (main) thread, so that
    the clean-up of :func:`rehearse` runs; returns the previous handlers (empty outside the main thread)."""
    from robustmedseg.errors import Interrupted

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        for other in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(other, signal.SIG_IGN)  # the clean-up must finish
        raise Interrupted(signum)

    previous: Dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread
            break
    return previous


def build_parser() -> CliParser:
    p = CliParser(prog="python -m robustmedseg.federation.rehearsal",
                  description="Deployment rehearsal: researcher + 3 nodes on separate network namespaces, the "
                              "documented commands, then network faults (needs root).")
    p.add_argument("--out", type=Path, default=Path("rehearsal_output"), help="output folder (new or empty)")
    p.add_argument("--faults", default="all",
                   help=f"comma-separated faults to rehearse, 'all' (default) or 'none': {', '.join(FAULTS)}")
    p.add_argument("--seed", type=int, default=0, help="train.py --seed (default 0)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the first train.py (default 2)")
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the loopback federation whose export must equal the rehearsal's (same seed)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    faults = list(FAULTS) if args.faults == "all" else [] if args.faults == "none" else \
        [f for f in args.faults.split(",") if f]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise InputError(f"--faults: unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    summary = rehearse(args.out, faults, seed=args.seed, rounds=args.rounds, compare=args.compare)
    print(f"rehearsal completed in {summary['wall_seconds']:.0f} s: {args.out / 'REHEARSAL.md'}")
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
