"""A local Fed-BioMed federation on this machine: N nodes + the researcher component (demo, tests, bench).

One folder (``--root``) holds everything::

    ROOT/federation.json      manifest: port, researcher root, nodes (name, root, id, dataset, pid, log)
    ROOT/researcher/          researcher component (train.py --researcher-dir ROOT/researcher)
    ROOT/nodes/<name>/        one node component per site; its dataset is the site's LMDB folder
    ROOT/logs/<name>.log      node output

``up`` creates the components (``fedbiomed component create``; server/researcher address
127.0.0.1 and a free port, written into the components' config files), registers each site's LMDB
folder with the tags (non-interactive ``DatasetManager``), starts every node as one process
(``python -m fedbiomed.node.node_pm``) that this tool owns, records the PIDs, and waits until each
node log shows that it listens for tasks. ``down`` stops the recorded PIDs (SIGTERM, then SIGKILL).
In Python: ``with LocalFederation(root).up({"h1": lmdb1, ...}) as fed: ...``.

Every node has secure aggregation enabled in its ``etc/config.ini`` (``[security]
secure_aggregation = True``, so ``train.py --secagg`` works); ``--secagg-required`` (all nodes) or
``LocalFederation(..., secagg_required={"name", ...})`` also sets ``force_secure_aggregation =
True``: such a node refuses any round that is not securely aggregated.

Training-plan approval is ON on every node (``training_plan_approval = True``,
``allow_default_training_plans = False``), as in a real deployment: a node runs only a plan whose
hash it has approved.  ``up`` approves exactly the project's ``training_plan.py``
(``FactoryTrainingPlan``, the source Fed-BioMed ships and hashes: its ``init_dependencies`` lines
and the class) on each node, and prints the hash; after editing the plan, run ``approve`` again
(the nodes refuse the edited plan until then).  ``--no-plan-approval`` turns approval off, for
throwaway runs only: such nodes execute any code a researcher sends.

Each node process gets ``OMP_NUM_THREADS`` (``--threads``, default 1), ``FBM_NODE_COMPONENT_ROOT``
(so the node-local factory state goes to ``<node>/var/robustmedseg``) and this project on its
``PYTHONPATH`` (the nodes import the same code as the researcher).

A real multi-hospital deployment does not use this tool: each hospital runs its own node (see the
README section "Real deployment").
"""
from __future__ import annotations

import argparse
import configparser
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

from robustmedseg.allocator import allocator_env
from robustmedseg.cli import CliParser
from robustmedseg.errors import InputError, run_cli
from robustmedseg.io import write_text_atomic

DEFAULT_TAGS = ("#im2im",)
DEFAULT_PLAN = "training_plan:FactoryTrainingPlan"  # module:Class of the plan the nodes approve
READY_MARK = "Starting task listeners"
MANIFEST = "federation.json"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def project_pythonpath(env: Mapping[str, str]) -> str:
    """``PYTHONPATH`` of ``env`` with this checkout first, so child processes import the same code."""
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([str(PROJECT_ROOT)] + rest)


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def component_id(root: Path) -> str:
    """The component id (``[default] id``) from ``<root>/etc/config.ini``."""
    cfg = configparser.ConfigParser()
    if not cfg.read(root / "etc" / "config.ini"):
        raise InputError("not a Fed-BioMed component (no etc/config.ini)", root)
    return cfg["default"]["id"]


def _db_path(root: Path) -> Path:
    cfg = configparser.ConfigParser()
    cfg.read(root / "etc" / "config.ini")
    return (root / "etc" / cfg["default"]["db"]).resolve()


def set_node_security(root: Path, secure_aggregation: bool = True, force_secure_aggregation: bool = False,
                      training_plan_approval: Optional[bool] = None) -> None:
    """Write the node's security settings into ``<root>/etc/config.ini`` ([security]): secure
    aggregation, and (unless None) training-plan approval (with approval on, Fed-BioMed's default
    plans are not accepted either)."""
    path = Path(root) / "etc" / "config.ini"
    cfg = configparser.ConfigParser()
    if not cfg.read(path):
        raise InputError("not a Fed-BioMed component (no etc/config.ini)", root)
    if not cfg.has_section("security"):
        cfg.add_section("security")
    cfg["security"]["secure_aggregation"] = str(bool(secure_aggregation))
    cfg["security"]["force_secure_aggregation"] = str(bool(force_secure_aggregation))
    if training_plan_approval is not None:
        cfg["security"]["training_plan_approval"] = str(bool(training_plan_approval))
        cfg["security"]["allow_default_training_plans"] = str(not training_plan_approval)
    text = io.StringIO()
    cfg.write(text)
    write_text_atomic(path, text.getvalue())


def plan_source(spec: str = DEFAULT_PLAN) -> str:
    """The source Fed-BioMed ships to the nodes for the plan class ``module:Class`` (its
    ``init_dependencies`` lines and the class source): what a node hashes to check approval."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        plan_class = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise InputError(f"cannot import the training plan {spec!r} ({err})") from None
    return plan_class().source()


def approve_plan(node_root: Path, spec: str = DEFAULT_PLAN) -> Dict[str, str]:
    """Approve the plan ``spec`` (by the hash of its source) on one node component; idempotent.

    Returns ``{"id", "hash", "status"}`` (status: ``approved`` now or ``already approved``)."""
    from fedbiomed.common.constants import TrainingPlanApprovalStatus
    from fedbiomed.node.training_plan_security_manager import TrainingPlanSecurityManager

    from .fedbiomed_compat import training_plan_hash

    cfg = configparser.ConfigParser()
    if not cfg.read(Path(node_root) / "etc" / "config.ini"):
        raise InputError("not a Fed-BioMed component (no etc/config.ini)", node_root)
    manager = TrainingPlanSecurityManager(
        db=str(_db_path(Path(node_root))), node_id=cfg["default"]["id"], node_name=cfg["default"].get("name", ""),
        hashing=cfg["security"].get("hashing_algorithm", "SHA256"), tp_approval=True)
    source = plan_source(spec)
    digest = training_plan_hash(manager, source)
    approved, entry = manager.check_training_plan_status(source, TrainingPlanApprovalStatus.APPROVED)
    if approved:
        return {"id": entry["training_plan_id"], "hash": digest, "status": "already approved"}
    _, entry = manager.check_training_plan_status(source, None)
    if entry:  # known to the node but pending or rejected
        manager.approve_training_plan(entry["training_plan_id"])
        return {"id": entry["training_plan_id"], "hash": digest, "status": "approved"}
    folder = Path(node_root) / "var" / "approved_plans"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / f"{spec.partition(':')[2]}-{digest[:12]}.py"
    write_text_atomic(copy, source)
    plan_id = manager.register_training_plan(name=copy.stem, description=f"{spec} approved by the local tool",
                                             path=str(copy))
    return {"id": plan_id, "hash": digest, "status": "approved"}


def register_dataset(node_root: Path, path: Path, name: str, tags: Sequence[str]) -> str:
    """Register ``path`` (an LMDB folder) on the node as a custom dataset; idempotent by tags."""
    from fedbiomed.node.dataset_manager import DatasetManager

    manager = DatasetManager(path=str(_db_path(node_root)))
    for entry in manager.dataset_table.search_by_tags(list(tags)):
        if Path(entry["path"]).resolve() == path.resolve():
            return entry["dataset_id"]
        raise InputError(f"node already has a dataset with tags {list(tags)} at {entry['path']}", node_root)
    return manager.add_database(name=name, data_type="custom", tags=list(tags),
                                description=f"robustmedseg LMDB of {name}", path=str(path.resolve()))


def _pid_alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child still "exists": treat it as dead
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class LocalNode:
    name: str
    root: str
    node_id: str
    dataset: str
    log: str
    pid: Optional[int] = None
    secagg_required: bool = False
    plan_approval: bool = True


@dataclass
class Manifest:
    port: int
    researcher_root: str
    tags: List[str] = field(default_factory=lambda: list(DEFAULT_TAGS))
    threads: int = 1
    nodes: List[LocalNode] = field(default_factory=list)
    approved_plan: Optional[Dict[str, str]] = None  # {"spec", "hash"} of the plan approved on the nodes

    @classmethod
    def load(cls, root: Path) -> "Manifest":
        path = root / MANIFEST
        if not path.is_file():
            raise InputError(f"no local federation here (missing {MANIFEST}); run 'up' first", root)
        try:
            raw = json.loads(path.read_text())
            nodes = [LocalNode(**n) for n in raw.pop("nodes", [])]
            return cls(nodes=nodes, **raw)
        except (ValueError, TypeError, AttributeError) as err:
            raise InputError(f"not a readable federation manifest ({' '.join(str(err).split())[:160]})", path) from None

    def save(self, root: Path) -> None:
        write_text_atomic(root / MANIFEST, json.dumps(asdict(self), indent=2) + "\n")


class LocalFederation:
    """Create, start and stop a local federation under ``root`` (see module docstring)."""

    def __init__(self, root: Path, port: Optional[int] = None, threads: int = 1,
                 tags: Sequence[str] = DEFAULT_TAGS, secagg_required: Union[bool, Iterable[str]] = False,
                 plan_approval: bool = True, plan: str = DEFAULT_PLAN, log=print):
        """``secagg_required``: True (every node) or the names of the nodes that refuse any round
        without secure aggregation (``[security] force_secure_aggregation``); ``plan_approval``:
        training-plan approval on the nodes (default on; off only for throwaway runs), with ``plan``
        (``module:Class``) approved by :meth:`create`; ``log`` prints the approval step."""
        self.root = Path(root).resolve()
        self._plan_approval, self._plan, self._log = bool(plan_approval), plan, log
        self._port, self._threads, self._tags = port, int(threads), list(tags)
        self._secagg_required = secagg_required if isinstance(secagg_required, bool) else set(secagg_required)
        self._procs: Dict[str, subprocess.Popen] = {}
        self.manifest: Optional[Manifest] = Manifest.load(self.root) if (self.root / MANIFEST).is_file() else None

    # ---------------------------------------------------------------- environment
    @property
    def researcher_root(self) -> Path:
        return self.root / "researcher"

    def researcher_env(self, base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        """Environment for a researcher process of this federation (train.py, tests)."""
        m = self._require()
        env = dict(os.environ if base is None else base)
        env.update(FBM_RESEARCHER_COMPONENT_ROOT=m.researcher_root, FBM_SERVER_HOST="127.0.0.1",
                   FBM_SERVER_PORT=str(m.port))
        return env

    def _node_env(self, node: LocalNode) -> Dict[str, str]:
        m = self._require()
        env = dict(os.environ)
        env.update(FBM_RESEARCHER_IP="127.0.0.1", FBM_RESEARCHER_PORT=str(m.port),
                   FBM_NODE_COMPONENT_ROOT=node.root, OMP_NUM_THREADS=str(m.threads),
                   MKL_NUM_THREADS=str(m.threads), PYTHONPATH=project_pythonpath(env))
        env.pop("FBM_RESEARCHER_COMPONENT_ROOT", None)
        return allocator_env(env)  # TCMalloc/jemalloc when installed ($RMS_ALLOCATOR; robustmedseg/allocator.py)

    def _require(self) -> Manifest:
        if self.manifest is None:
            raise InputError(f"no local federation here (missing {MANIFEST}); run 'up' first", self.root)
        return self.manifest

    # ---------------------------------------------------------------- create
    def create(self, datasets: Mapping[str, Path]) -> Manifest:
        """Create missing components and register the datasets (idempotent)."""
        if not datasets:
            raise InputError("at least one --dataset NAME=LMDB is needed")
        for name, path in datasets.items():
            if not Path(path).is_dir():
                raise InputError("dataset folder not found", path)
            if not name.replace("-", "").replace("_", "").isalnum():
                raise InputError(f"node name '{name}' must be alphanumeric (with - or _)")
        if self.root.exists() and not self.root.is_dir():
            raise InputError("is a file; --root names the federation folder", self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        if self.manifest is None:
            self.manifest = Manifest(port=self._port or free_port(), researcher_root=str(self.researcher_root),
                                     tags=self._tags, threads=self._threads)
        m = self.manifest
        jobs = []
        if not (self.researcher_root / "etc" / "config.ini").is_file():
            jobs.append(self._create_component(["-c", "researcher", "-p", str(self.researcher_root)],
                                               {"FBM_SERVER_HOST": "127.0.0.1", "FBM_SERVER_PORT": str(m.port)}))
        known = {n.name for n in m.nodes}
        for name in datasets:
            node_root = self.root / "nodes" / name
            if name not in known and not (node_root / "etc" / "config.ini").is_file():
                jobs.append(self._create_component(
                    ["-c", "node", "-p", str(node_root), "-n", name],
                    {"FBM_RESEARCHER_IP": "127.0.0.1", "FBM_RESEARCHER_PORT": str(m.port)}))
        for proc, cmd in jobs:
            out, _ = proc.communicate()
            if proc.returncode:
                raise InputError(f"'fedbiomed component create {' '.join(cmd)}' failed: {out.strip()[-300:]}")
        # Fed-BioMed's node database objects are per-process singletons: one process per node.
        regs = [(name, subprocess.Popen(
            [sys.executable, "-m", "robustmedseg.federation.local", "register", "--node", str(self.root / "nodes" / name),
             "--path", str(Path(path).resolve()), "--name", name, "--tags", ",".join(m.tags)],
            env=self._tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            for name, path in datasets.items()]
        for name, proc in regs:
            out, _ = proc.communicate()
            if proc.returncode:
                lines = [ln for ln in out.strip().splitlines() if ln.startswith("error:")] or out.strip().splitlines()[-1:]
                raise InputError(f"registering the dataset of node {name} failed: {' '.join(lines)}")
        for name, path in datasets.items():
            node_root = self.root / "nodes" / name
            if name not in known:
                m.nodes.append(LocalNode(name=name, root=str(node_root), node_id=component_id(node_root),
                                         dataset=str(Path(path).resolve()), log=str(self.root / "logs" / f"{name}.log")))
        for node in m.nodes:
            if node.name in datasets:
                required = self._secagg_required if isinstance(self._secagg_required, bool) \
                    else node.name in self._secagg_required
                set_node_security(Path(node.root), secure_aggregation=True, force_secure_aggregation=required,
                                  training_plan_approval=self._plan_approval)
                node.secagg_required = required
                node.plan_approval = self._plan_approval
        m.save(self.root)
        if self._plan_approval:
            self.approve([n.name for n in m.nodes if n.name in datasets], self._plan)
        else:
            self._log("training-plan approval is OFF on nodes " + ", ".join(datasets) + " (--no-plan-approval): "
                      "they run any plan a researcher sends; use this for throwaway runs only")
        return m

    def approve(self, names: Optional[Iterable[str]] = None, plan: str = DEFAULT_PLAN) -> str:
        """Approve ``plan`` (``module:Class``, default the project's training_plan.py) on the nodes
        (all by default), one process per node; prints and returns the hash."""
        m = self._require()
        nodes = [n for n in m.nodes if names is None or n.name in set(names)]
        procs = [(node, subprocess.Popen(
            [sys.executable, "-m", "robustmedseg.federation.local", "approve-node", "--node", node.root,
             "--plan", plan], env=self._tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            for node in nodes]
        digests = set()
        for node, proc in procs:
            out, _ = proc.communicate()
            if proc.returncode:
                lines = [ln for ln in out.strip().splitlines() if ln.startswith("error:")] or out.strip().splitlines()[-1:]
                raise InputError(f"approving the training plan on node {node.name} failed: {' '.join(lines)}")
            result = json.loads(out.strip().splitlines()[-1])
            digests.add(result["hash"])
        if len(digests) > 1:
            raise InputError(f"the nodes computed different hashes for {plan}: {sorted(digests)}")
        digest = digests.pop() if digests else ""
        m.approved_plan = {"spec": plan, "hash": digest}
        m.save(self.root)
        self._log(f"training plan {plan} approved on nodes {', '.join(n.name for n in nodes)} "
                  f"(sha256 of its source {digest}); the nodes refuse any other plan")
        return digest

    @staticmethod
    def _tool_env() -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FBM_")}
        env["PYTHONPATH"] = project_pythonpath(env)
        return env

    @staticmethod
    def _create_component(args: List[str], extra_env: Mapping[str, str]):
        fedbiomed = Path(sys.executable).with_name("fedbiomed")
        exe = [str(fedbiomed)] if fedbiomed.exists() else [sys.executable, "-m", "fedbiomed.cli"]
        cmd = ["component", "create", *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FBM_")}
        env.update(extra_env)
        proc = subprocess.Popen(exe + cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return proc, cmd

    # ---------------------------------------------------------------- start / stop
    def node(self, name: str) -> LocalNode:
        for node in self._require().nodes:
            if node.name == name or node.node_id == name:
                return node
        raise InputError(f"no node named '{name}' in this federation")

    def start(self, names: Optional[Iterable[str]] = None, timeout: float = 180.0) -> None:
        """Start the nodes (all by default) that are not running; wait until they listen."""
        m = self._require()
        started = []
        for node in m.nodes:
            if names is not None and node.name not in set(names):
                continue
            if _pid_alive(node.pid):
                continue
            log = open(node.log, "a")
            proc = subprocess.Popen([sys.executable, "-m", "fedbiomed.node.node_pm", "--config", node.root,
                                     "--node-args", "{}"], env=self._node_env(node), cwd=node.root,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            node.pid = proc.pid
            self._procs[node.name] = proc
            started.append((node, Path(node.log).stat().st_size if Path(node.log).exists() else 0))
        m.save(self.root)
        self._wait_ready(started, timeout)

    def _wait_ready(self, started: List, timeout: float) -> None:
        pending = {node.name: (node, offset) for node, offset in started}
        deadline = time.time() + timeout
        while pending:
            for name, (node, offset) in list(pending.items()):
                with open(node.log, "rb") as handle:
                    handle.seek(offset)
                    text = handle.read().decode("utf-8", "replace")
                if READY_MARK in text:
                    del pending[name]
                elif not _pid_alive(node.pid):
                    self.stop()
                    raise InputError(f"node {name} exited during start-up; see its log", node.log)
            if pending and time.time() > deadline:
                self.stop()
                raise InputError(f"nodes {sorted(pending)} not ready after {timeout:.0f} s; see their logs",
                                 Path(self.root / "logs"))
            if pending:
                time.sleep(0.25)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one node process (e.g. to simulate a crash)."""
        node = self.node(name)
        if node.pid and _pid_alive(node.pid):
            os.kill(node.pid, sig)
        self._reap(node, timeout=5.0)

    def _reap(self, node: LocalNode, timeout: float) -> bool:
        proc = self._procs.get(node.name)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc is not None and proc.poll() is not None:
                return True
            if proc is None and not _pid_alive(node.pid):
                return True
            time.sleep(0.1)
        return False

    def stop(self, names: Optional[Iterable[str]] = None, grace: float = 15.0) -> None:
        """Stop recorded node processes: SIGTERM, then SIGKILL after ``grace`` seconds."""
        m = self._require()
        targets = [n for n in m.nodes if (names is None or n.name in set(names)) and _pid_alive(n.pid)]
        for node in targets:
            os.kill(node.pid, signal.SIGTERM)
        for node in targets:
            if not self._reap(node, grace) and _pid_alive(node.pid):
                os.kill(node.pid, signal.SIGKILL)
                self._reap(node, 5.0)
        for node in m.nodes:
            if names is None or node.name in set(names):
                node.pid = None
                self._procs.pop(node.name, None)
        m.save(self.root)

    def status(self) -> List[Dict[str, object]]:
        return [{"name": n.name, "id": n.node_id, "pid": n.pid, "running": _pid_alive(n.pid),
                 "dataset": n.dataset, "log": n.log, "secagg_required": n.secagg_required,
                 "plan_approval": n.plan_approval} for n in self._require().nodes]

    # ---------------------------------------------------------------- context manager
    def up(self, datasets: Mapping[str, Path], timeout: float = 180.0) -> "LocalFederation":
        self.create(datasets)
        self.start(timeout=timeout)
        return self

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.manifest is not None:
            self.stop()


# -------------------------------------------------------------------- CLI


def _dataset_arg(text: str) -> tuple:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=LMDB_FOLDER, got '{text}'")
    return name, Path(path)


def build_parser() -> CliParser:
    p = CliParser(prog="python -m robustmedseg.federation.local", command="robustmedseg.federation.local",
                                description="Local Fed-BioMed federation (N nodes + researcher) on this machine.")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create components, register datasets, start the nodes and wait for them")
    up.add_argument("--root", type=Path, required=True, help="folder of the federation (created if needed)")
    up.add_argument("--dataset", type=_dataset_arg, action="append", required=True, metavar="NAME=LMDB",
                    help="one site: node name and its prepare_data.py LMDB folder (repeat per site)")
    up.add_argument("--port", type=int, default=None, help="researcher port on 127.0.0.1 (default: a free port)")
    up.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each node (default 1)")
    up.add_argument("--tags", default=",".join(DEFAULT_TAGS), help="dataset tags, comma separated (default #im2im)")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the nodes (default 180)")
    up.add_argument("--secagg-required", dest="secagg_required", action="store_true",
                    help="every node refuses rounds without secure aggregation (force_secure_aggregation; "
                         "secure aggregation itself is always enabled on the nodes)")
    up.add_argument("--plan", default=DEFAULT_PLAN, metavar="MODULE:CLASS",
                    help=f"training plan the nodes approve (default {DEFAULT_PLAN}, the project's plan)")
    up.add_argument("--no-plan-approval", dest="plan_approval", action="store_false",
                    help="turn training-plan approval OFF on the nodes: they then run ANY plan a researcher "
                         "sends. For throwaway runs only (default: approval on, the project's plan approved)")
    ap = sub.add_parser("approve", help="approve the training plan (again, e.g. after editing it) on every node "
                                        "of the federation; prints its hash")
    ap.add_argument("--root", type=Path, required=True, help="folder of the federation")
    ap.add_argument("--plan", default=DEFAULT_PLAN, metavar="MODULE:CLASS",
                    help=f"training plan to approve (default {DEFAULT_PLAN})")
    apn = sub.add_parser("approve-node", help="approve a training plan on one node component (used by 'up')")
    apn.add_argument("--node", type=Path, required=True, help="node component folder")
    apn.add_argument("--plan", default=DEFAULT_PLAN, metavar="MODULE:CLASS", help="training plan")
    down = sub.add_parser("down", help="stop the nodes started by 'up' (SIGTERM, then SIGKILL)")
    down.add_argument("--root", type=Path, required=True, help="folder of the federation")
    st = sub.add_parser("status", help="print the nodes, their PIDs and whether they run (JSON)")
    st.add_argument("--root", type=Path, required=True, help="folder of the federation")
    env = sub.add_parser("env", help="print the shell exports a researcher process of this federation needs")
    env.add_argument("--root", type=Path, required=True, help="folder of the federation")
    reg = sub.add_parser("register", help="register one LMDB folder on one node component (used by 'up')")
    reg.add_argument("--node", type=Path, required=True, help="node component folder")
    reg.add_argument("--path", type=Path, required=True, help="LMDB folder (prepare_data.py output)")
    reg.add_argument("--name", required=True, help="dataset name (the site name)")
    reg.add_argument("--tags", default=",".join(DEFAULT_TAGS), help="comma-separated tags (default #im2im)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "up":
        fed = LocalFederation(args.root, port=args.port, threads=args.threads,
                              tags=[t for t in args.tags.split(",") if t], secagg_required=args.secagg_required,
                              plan_approval=args.plan_approval, plan=args.plan)
        fed.up(dict(args.dataset), timeout=args.timeout)
        for row in fed.status():
            required = ", secure aggregation required" if row["secagg_required"] else ""
            print(f"node {row['name']} {row['id']} pid {row['pid']} log {row['log']}{required}")
        print(f"researcher component: {fed.researcher_root} (port {fed.manifest.port})")
    elif args.command == "down":
        LocalFederation(args.root).stop()
        print("nodes stopped")
    elif args.command == "approve":
        LocalFederation(args.root).approve(plan=args.plan)
    elif args.command == "approve-node":
        print(json.dumps(approve_plan(args.node, args.plan)))
    elif args.command == "register":
        dataset_id = register_dataset(args.node, args.path, args.name, [t for t in args.tags.split(",") if t])
        print(f"dataset {dataset_id} registered on {args.node}")
    elif args.command == "status":
        print(json.dumps(LocalFederation(args.root).status(), indent=2))
    else:
        env = LocalFederation(args.root).researcher_env({})
        for key in sorted(env):
            print(f"export {key}={env[key]}")
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``rms-federation``): :func:`main` with the one-line error policy."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
