"""Researcher-side orchestration of the data factory (used by ``train.py``).

Fed-BioMed's researcher package creates/loads the researcher component at
``FBM_RESEARCHER_COMPONENT_ROOT`` *when it is imported*, and its ``Requests`` object is a
per-process singleton: call :func:`use_researcher_component` first, and run one researcher
scenario per process. Fed-BioMed's experiment methods normally print a banner and call
``sys.exit`` on errors; :func:`use_researcher_component` sets ``FBM_DEBUG`` after the import so that
exceptions reach ``train.py``, which reports them in one line.

Secure aggregation (``train.py --secagg``): :func:`create_experiment` / :func:`resume_experiment`
switch Fed-BioMed's LOM secure aggregation on (fresh keys at every start or resume) and ship the
encoding settings to the nodes in ``model_args``; :mod:`.experiment` decodes the masked sums and
:mod:`.secagg` documents the codec.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import torch

from robustmedseg.errors import InputError
from robustmedseg.factory.config import FactoryConfig

from . import fedbiomed_compat as fbm
from . import secagg as codec

log = logging.getLogger(__name__)


class FederationError(InputError):
    """A federation-level failure (node died, nodes missing, Fed-BioMed error): one line, reported by
    ``run_cli`` like bad input (``error: ...``, exit status 2)."""


@contextlib.contextmanager
def reported_failures(clean_up: Callable[[], Optional[str]]) -> Iterator[None]:
    """The failure policy of a researcher run, in ``run_cli``'s terms: on any exception ``clean_up()``
    runs first (it returns a note for the user, or None); bad input, operating-system errors and
    interruptions then go on unchanged (an interruption prints the note), a :class:`FederationError`
    gets the note appended, and any other error (Fed-BioMed's own) becomes a one-line
    :class:`FederationError` naming its type instead of a traceback."""
    try:
        yield
    except BaseException as err:  # noqa: BLE001 - re-raised below, one way or another
        note = clean_up()
        if isinstance(err, KeyboardInterrupt) and note:
            print(note, file=sys.stderr, flush=True)
        if not isinstance(err, Exception) or (isinstance(err, (InputError, OSError))
                                              and not isinstance(err, FederationError)):
            raise
        message = str(err) if isinstance(err, FederationError) else \
            f"Fed-BioMed: {type(err).__name__}: {' '.join(str(err).split()) or type(err).__name__}"
        raise FederationError(f"{message}{f' ({note})' if note else ''}") from err


def is_researcher_component(root: Path) -> bool:
    """Whether ``root`` holds a Fed-BioMed component (its ``etc/config.ini``)."""
    return (Path(root) / "etc" / "config.ini").is_file()


def _quiet_fedbiomed(record: logging.LogRecord) -> bool:
    """Fed-BioMed's INFO/DEBUG records are dropped unless ``--verbose`` (its errors reach the user
    through train.py's one-line message)."""
    return record.levelno >= logging.WARNING


def use_researcher_component(root: Path, verbose: bool = False) -> Any:
    """Point Fed-BioMed at the researcher component ``root`` (Fed-BioMed creates it if missing: callers
    check :func:`is_researcher_component` first) and import it."""
    import warnings

    root = Path(root).resolve()
    os.environ["FBM_RESEARCHER_COMPONENT_ROOT"] = str(root)
    os.environ.pop("FBM_DEBUG", None)
    # opacus (imported by Fed-BioMed's plans) warns about its RNG at import: not this project's concern
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    from fedbiomed.common.logger import logger as fbm_logger

    if not verbose:  # importing the config resets the level to INFO and logs a banner: filter, not level
        fbm.filter_fedbiomed_logs(_quiet_fedbiomed)
    from fedbiomed.researcher.config import config

    fbm_logger.setLevel("INFO" if verbose else "WARNING")

    os.environ["FBM_DEBUG"] = "1"  # exceptions propagate instead of sys.exit (checked at call time)
    return config


# ------------------------------------------------------------------------ nodes


def wait_for_nodes(min_nodes: int, expected: Optional[Sequence[str]] = None, timeout: float = 120.0,
                   hint: str = "", report_every: float = 10.0) -> List[str]:
    """Ping until ``expected`` nodes (or at least ``min_nodes``) answer; return the online node ids.

    Every ``report_every`` seconds of waiting a progress line goes to stderr (:func:`await_nodes`);
    ``hint`` is appended to the timeout message (e.g. where the node logs are)."""
    from fedbiomed.researcher.config import config
    from fedbiomed.researcher.requests import Requests

    reqs = Requests(config)
    return await_nodes(reqs.ping_nodes, min_nodes, expected, timeout, report_every,
                       where=f"researcher component {config.root}", hint=hint)


def await_nodes(ping: Callable[[], Sequence[str]], min_nodes: int, expected: Optional[Sequence[str]] = None,
                timeout: float = 120.0, report_every: float = 10.0, where: str = "", hint: str = "",
                clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                report: Optional[Callable[[str], None]] = None) -> List[str]:
    """The waiting loop of :func:`wait_for_nodes` (``ping()`` -> the node ids answering): returns them
    once enough answered; a line ``waiting for nodes: K of N answered (...), S s left`` every
    ``report_every`` seconds; :class:`FederationError` after ``timeout`` seconds."""
    if report is None:
        def report(line: str) -> None:
            print(line, file=sys.stderr, flush=True)
    start = clock()
    deadline, next_report = start + timeout, start + report_every
    need_n = len(set(expected)) if expected else min_nodes
    while True:
        online = sorted(ping())
        if expected and set(expected) <= set(online):
            return online
        if not expected and len(online) >= min_nodes:
            return online
        now = clock()
        if now > deadline:
            need = f"nodes {sorted(set(expected) - set(online))}" if expected else f"{min_nodes} nodes"
            raise FederationError(
                f"waited {timeout:.0f} s for {need} but {len(online)} answered ({', '.join(online) or 'none'}): "
                f"check that the nodes run and use this researcher's address" + (f" ({where})" if where else "")
                + (f"; {hint}" if hint else ""))
        if report_every > 0 and now >= next_report:
            report(f"waiting for nodes: {len(online)} of {need_n} answered ({', '.join(online) or 'none yet'}), "
                   f"{max(0.0, deadline - now):.0f} s left")
            next_report = now + report_every
        sleep(1.0)


def local_logs_hint(researcher_dir: Path) -> str:
    """If ``researcher_dir`` belongs to a local federation (robustmedseg.federation.local), where its node logs are."""
    manifest = Path(researcher_dir).resolve().parent / "federation.json"
    if not manifest.is_file():
        return ""
    try:
        logs = [n["log"] for n in json.loads(manifest.read_text()).get("nodes", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return "node logs: " + ", ".join(logs) if logs else ""


def node_names(exp: Any) -> Dict[str, str]:
    """node id -> registered dataset name (the site name) from the experiment's federated dataset."""
    names = {}
    data = exp.training_data().data() if exp.training_data() is not None else {}
    for node_id, entries in data.items():
        entry = entries[0] if isinstance(entries, list) and entries else entries
        names[node_id] = entry.get("name", node_id) if isinstance(entry, dict) else node_id
    return names


def describe(node_id: str, names: Mapping[str, str]) -> str:
    return f"{names[node_id]} ({node_id})" if node_id in names and names[node_id] != node_id else node_id


# ------------------------------------------------------------------------ experiment


@dataclass
class Schedule:
    """What a run (fresh or resumed) trains: total round limit, updates per round and the like."""

    rounds: int
    num_updates: int
    batch: int
    lr: float
    max_nodes: int = 2
    weighting: str = "uniform"
    seed: int = 0
    use_gpu: bool = False
    secagg: bool = False
    secagg_clip: Optional[float] = None  # None: secagg.DEFAULT_CLIP

    def training_args(self) -> Dict[str, Any]:
        # no random_seed: a fixed seed would replay the same random stream every round (docs/differences.md#d9-7);
        # the nodes seed themselves from model_args["seed"] and persist their RNG state.
        return {"num_updates": int(self.num_updates), "loader_args": {"batch_size": int(self.batch)},
                "optimizer_args": {"lr": float(self.lr)}, "log_interval": 0, "use_gpu": bool(self.use_gpu)}


def initial_global_state(cfg: FactoryConfig) -> Dict[str, torch.Tensor]:
    """The global model before round 1: G, D and G_ema initialised from ``cfg.seed`` (reproducible)."""
    from robustmedseg.factory.network import FactoryModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        return FactoryModel(cfg).state_dict()


def create_experiment(cfg: FactoryConfig, schedule: Schedule, tags: Sequence[str], plan_class: type,
                      nodes: Optional[Sequence[str]] = None) -> Any:
    """A new Fed-BioMed Experiment of the training plan ``plan_class`` (breakpoints on, FedAverage,
    k-of-N sampling, secure aggregation if ``schedule.secagg``).  ``train.py`` passes
    ``training_plan.FactoryTrainingPlan``: the plan is a top-level module that Fed-BioMed ships to
    the nodes, so this library does not import it."""
    from fedbiomed.researcher.aggregators import FedAverage

    from .experiment import FactoryExperiment, lom_secure_aggregation
    from .strategy import SampleAtMostK

    run_id = uuid.uuid4().hex[:12] if cfg.run_id in ("", "default") else cfg.run_id
    cfg = FactoryConfig.from_model_args({**cfg.to_model_args(), "run_id": run_id,
                                         **secagg_model_args(schedule.secagg, schedule.secagg_clip, schedule.weighting)})
    exp = FactoryExperiment(tags=list(tags), nodes=list(nodes) if nodes else None, training_plan_class=plan_class,
                            model_args=cfg.to_model_args(), training_args=schedule.training_args(),
                            aggregator=FedAverage(),
                            node_selection_strategy=SampleAtMostK(schedule.max_nodes, schedule.seed, schedule.weighting),
                            round_limit=schedule.rounds, save_breakpoints=True, retain_full_history=False,
                            secagg=lom_secure_aggregation() if schedule.secagg else False)
    if not exp.all_federation_nodes():
        raise FederationError(f"no node has a dataset tagged {list(tags)}")
    apply_site_keys(exp)
    exp.training_plan().set_model_params(initial_global_state(cfg))
    check_secagg_nodes(exp)
    return exp


def site_keys(exp: Any) -> Dict[str, str]:
    """Node id -> the site's stable identity: the name its dataset was registered under
    (``fedbiomed node dataset add``; ``--dataset NAME=...`` of the local tool). Node ids are drawn
    when a node component is created; dataset names are chosen by the sites, so the same sites give
    the same keys in every deployment. Two nodes with the same dataset name are told apart by their
    node id (then their streams depend on the ids)."""
    data = exp.training_data().data() if exp.training_data() is not None else {}
    names = {node: str((entry or {}).get("name") or node)[:200] for node, entry in data.items()}
    counts: Dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {node: name if counts[name] == 1 else f"{name}@{node}" for node, name in names.items()}


def apply_site_keys(exp: Any) -> Dict[str, str]:
    """Give the site keys to the node-selection strategy (draw and averaging order) and to the nodes
    (``model_args["site_keys"]``: the seed of each node's random stream). Keeps the weights."""
    keys = site_keys(exp)
    exp.strategy().set_site_keys(keys)
    if exp.model_args().get("site_keys") != keys:
        exp.set_model_args({**exp.model_args(), "site_keys": dict(keys)}, keep_weights=True)
    return keys


def secagg_model_args(active: bool, clip: Optional[float], weighting: str) -> Dict[str, Any]:
    """The ``model_args`` entries that tell the nodes how to encode their update (see :mod:`.secagg`)."""
    if active and clip is not None and not clip > 0:
        raise InputError(f"--secagg-clip must be > 0, got {clip}")
    return {"secagg_clip": float(clip if clip is not None else codec.DEFAULT_CLIP) if active else 0.0,
            "secagg_weighting": weighting}


def check_secagg_nodes(exp: Any) -> None:
    """Secure aggregation needs at least 2 nodes in every round."""
    if not exp.secagg.active:
        return
    available = len(exp.all_federation_nodes())
    per_round = min(exp.strategy().max_nodes, available)
    if per_round < 2:
        raise FederationError(f"secure aggregation needs at least 2 nodes per round, but only {per_round} can be "
                              f"sampled ({available} node(s) with data, --max-nodes-per-round "
                              f"{exp.strategy().max_nodes}): start more nodes or drop --secagg")


def configure_secagg(exp: Any, active: Optional[bool], clip: Optional[float]) -> Dict[str, Any]:
    """Secure aggregation of a resumed experiment: on (``active`` True, or None and on in the
    breakpoint) with a fresh LOM controller, so that new keys are agreed and no mask of the
    breakpoint's rounds is reused; else off. Returns the ``model_args`` entries to apply."""
    from .experiment import lom_secure_aggregation

    on = bool(exp.secagg.active) if active is None else bool(active)
    previous = float(exp.model_args().get("secagg_clip") or 0.0)
    exp.set_secagg(lom_secure_aggregation() if on else False)
    weighting = exp.strategy().weighting
    return secagg_model_args(on, clip if clip is not None else (previous or None), weighting)


def resume_experiment(breakpoint: Optional[str], model_updates: Mapping[str, Any],
                      training_updates: Mapping[str, Any], strategy_updates: Mapping[str, Any],
                      rounds: Optional[int], secagg: Optional[bool] = None,
                      secagg_clip: Optional[float] = None) -> Any:
    """Load a breakpoint (None: latest), apply the changed settings and refresh the node list.

    The federation is searched again by tags, so nodes that are gone (e.g. the node that died in
    the failed round) are not sampled any more, and nodes that came back are. ``secagg`` None
    keeps the breakpoint's secure-aggregation setting (with new keys), True/False switches it.
    """
    from .experiment import FactoryExperiment

    exp = FactoryExperiment.load_breakpoint(breakpoint)
    exp.set_retain_full_history(False)  # memory and breakpoint size stay bounded over hundreds of rounds
    if strategy_updates:
        exp.strategy().update_settings(**strategy_updates)
    model_updates = {**model_updates, **configure_secagg(exp, secagg, secagg_clip)}
    if any(exp.model_args().get(k) != v for k, v in model_updates.items()):
        exp.set_model_args({**exp.model_args(), **model_updates}, keep_weights=True)
    if training_updates:
        args = dict(exp.training_args())
        for key, value in training_updates.items():
            if isinstance(value, dict):
                args[key] = {**args.get(key, {}), **value}
            else:
                args[key] = value
        exp.set_training_args(args)
    exp.set_training_data(None, from_tags=True)
    if not exp.all_federation_nodes():
        raise FederationError(f"no node with a dataset tagged {exp.tags()} answered")
    apply_site_keys(exp)
    check_secagg_nodes(exp)
    if rounds is not None:
        if rounds <= exp.round_current():
            raise InputError(f"--rounds {rounds} must exceed the rounds already run ({exp.round_current()})")
        exp.set_round_limit(rounds)
    else:
        exp.set_round_limit(max(exp.round_current(), exp.round_limit() or 0))
    return exp


def breakpoint_dirs(exp: Any) -> List[str]:
    root = Path(exp.experimentation_path())
    return sorted(str(p) for p in root.glob("breakpoint_*") if p.is_dir())


# ------------------------------------------------------------------------ monitoring


class NodeMetrics:
    """Receives the nodes' metric feedback (Fed-BioMed monitoring channel) -> TensorBoard + summaries."""

    def __init__(self, writer: Any, names: Mapping[str, str]):
        self.writer, self.names = writer, dict(names)
        self.last: Dict[str, Dict[str, float]] = {}

    def __call__(self, msg: Mapping[str, Any]) -> None:
        metric = {k: float(v) for k, v in (msg.get("metric") or {}).items()}
        node = msg.get("node_id", "?")
        self.last.setdefault(node, {}).update(metric)  # a round's last message may carry only some keys
        if self.writer is not None:
            step = int(metric.get("step", msg.get("iteration", 0)))
            name = self.names.get(node, msg.get("node_name") or node)
            for key, value in metric.items():
                if key != "step":
                    self.writer.add_scalar(f"node/{name}/{key}", value, step)

    def round_summary(self, nodes: Sequence[str]) -> Dict[str, float]:
        """Mean over ``nodes`` of their latest metrics."""
        rows = [self.last[n] for n in nodes if n in self.last]
        keys = sorted({k for r in rows for k in r if k != "step"})
        return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


@dataclass
class RoundReport:
    round: int
    seconds: float
    nodes: List[str]
    metrics: Dict[str, float] = field(default_factory=dict)
    sample: Optional[str] = None
    node_train_s: Dict[str, float] = field(default_factory=dict)
    node_cpu_s: Dict[str, float] = field(default_factory=dict)
    fidelity: Dict[str, float] = field(default_factory=dict)


def node_training_times(exp: Any, index: int, key: str = "rtime_training") -> Dict[str, float]:
    """Per-node local training time of round ``index`` from the training replies: wall time
    (``rtime_training``) or CPU time of the node process (``ptime_training``)."""
    replies = (exp.training_replies() or {}).get(index, {})
    return {node: float((reply.get("timing") or {}).get(key, float("nan"))) for node, reply in replies.items()}


def prune_experiment(exp: Any, keep: int) -> None:
    """Bound the researcher's disk use: keep the newest ``keep`` breakpoints (0 = all) and delete the
    node-reply parameter files and training-plan copies that no kept breakpoint references.

    Fed-BioMed writes every node reply's parameters to the experiment folder and never deletes
    them (at 512 px ~0.4 GB per node per round), and a copy of the plan (``model_<uuid>.py``) at
    every breakpoint, each breakpoint linking to its own.  With ``keep`` 0 every breakpoint is kept,
    but the files of no breakpoint (a failed round's replies, unused plan copies) still go.
    """
    import shutil

    folders = breakpoint_dirs(exp)
    if keep > 0:
        for old in folders[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        folders = folders[-keep:]
    referenced = set()
    for folder in folders:
        for state_file in Path(folder).glob("breakpoint_*.json"):
            text = state_file.read_text()
            referenced.update(Path(p).name for p in _mpk_paths(text))
        for link in Path(folder).glob("model_*.py"):  # the breakpoint's link to its plan copy
            target = os.readlink(link) if link.is_symlink() else link.name
            referenced.add(Path(target).name)
    _pin_plan_source(exp)
    root = Path(exp.experimentation_path())
    for path in list(root.glob("params_*.mpk")) + list(root.glob("model_*.py")):
        if path.name not in referenced:
            path.unlink(missing_ok=True)


def _pin_plan_source(exp: Any) -> None:
    """Keep the source of the experiment's live plan class readable after its file is pruned.

    Fed-BioMed re-reads the plan's source (``inspect.getsource``) every round, from the file it
    imported the class from: a plan copy in the experiment folder, or the link in the breakpoint a
    resume started from.  Pruning deletes both in time, so the source is pinned in ``linecache``
    (an entry without a modification time is never invalidated)."""
    import inspect
    import linecache

    try:
        path = inspect.getsourcefile(type(exp.training_plan()))
        if path and (path not in linecache.cache or linecache.cache[path][1] is not None):
            text = Path(path).read_text()
            linecache.cache[path] = (len(text), None, text.splitlines(True), path)
    except (OSError, TypeError):
        pass


def _mpk_paths(text: str) -> List[str]:
    import re

    return re.findall(r'"([^"]+\.mpk)"', text)


def researcher_grid(exp: Any, out_dir: Path, round_: int, n_sample: int, seed: int) -> Path:
    """PNG grid from the aggregated g_ema after a round (researcher side, no data involved)."""
    from robustmedseg.factory.samples import generate_grid, save_grid

    g_ema = exp.training_plan().model().g_ema
    images = generate_grid(g_ema, n_sample, seed=seed)
    return save_grid(images, Path(out_dir) / f"round_{round_:05d}.png", nrow=g_ema.n_domains)


def run_rounds(exp: Any, metrics: NodeMetrics, writer: Any, sample_dir: Optional[Path], n_sample: int, seed: int,
               on_round: Callable[[RoundReport], None], keep_breakpoints: int = 3,
               fidelity: Optional[Callable[[Any], Dict[str, float]]] = None, fidelity_every: int = 1) -> int:
    """Run until the round limit; one :class:`RoundReport` per round. Returns rounds run.

    ``fidelity``: called every ``fidelity_every`` rounds (and after the last one) with the aggregated
    ``g_ema``; its scalars go to TensorBoard under ``fidelity/`` and into the round report.
    """
    from fedbiomed.common.exceptions import FedbiomedSecaggError, FedbiomedSecureAggregationError

    from .strategy import NodeFailureError

    names = node_names(exp)
    done = 0
    while exp.round_current() < exp.round_limit():
        index = exp.round_current()
        start = time.time()
        try:
            exp.run_once()
        except NodeFailureError as err:
            refused = [n for n in err.nodes if codec.NODE_REFUSAL in err.reasons[n]]
            if refused:
                raise FederationError(secagg_refusal(exp, refused, names, index)) from err
            unapproved = [n for n in err.nodes if "Training plan is not" in err.reasons[n]]
            if unapproved:
                who = ", ".join(describe(n, names) for n in unapproved)
                raise FederationError(
                    f"round {index + 1} refused: node {who} has not approved this training plan (the hash of "
                    f"training_plan.py differs from the approved one); review the plan, then approve it on each "
                    f"node (fedbiomed node -p NODE_DIR training-plan approve; a local federation: python -m "
                    f"robustmedseg.federation.local approve --root ROOT). {_after_failure(index)}") from err
            nodes = ", ".join(f"{describe(n, names)}: {err.reasons[n]}" for n in err.nodes)
            raise FederationError(f"round {index + 1} failed, node {nodes}. {_after_failure(index)}") from err
        except (FedbiomedSecaggError, FedbiomedSecureAggregationError, codec.SecaggDecodeError) as err:
            sampled = ", ".join(describe(n, names) for n in (exp.strategy().sampled(index) or []))
            raise FederationError(
                f"round {index + 1}: secure aggregation failed with nodes {sampled}: {' '.join(str(err).split())}. "
                f"{_after_failure(index)}") from err
        seconds = time.time() - start
        sampled = exp.strategy().sampled(index) or []
        report = RoundReport(round=index + 1, seconds=seconds, nodes=[describe(n, names) for n in sampled],
                             metrics=metrics.round_summary(sampled), node_train_s=node_training_times(exp, index),
                             node_cpu_s=node_training_times(exp, index, "ptime_training"))
        prune_experiment(exp, keep_breakpoints)
        last = exp.round_current() >= exp.round_limit()
        if fidelity is not None and ((index + 1) % max(1, fidelity_every) == 0 or last):
            report.fidelity = fidelity(exp.training_plan().model().g_ema)
        if writer is not None:
            writer.add_scalar("round/seconds", seconds, index + 1)
            if report.node_train_s:
                writer.add_scalar("round/node_train_seconds_max", max(report.node_train_s.values()), index + 1)
            for key, value in report.metrics.items():
                writer.add_scalar(f"train/{key}", value, index + 1)
            for key, value in report.fidelity.items():
                writer.add_scalar(f"fidelity/{key}", value, index + 1)
            writer.flush()
        if sample_dir is not None:
            report.sample = str(researcher_grid(exp, sample_dir, index + 1, n_sample, seed))
        on_round(report)
        done += 1
    return done


def fidelity_scorer(path: Path, n_per_domain: int, seed: int) -> Callable[[Any], Dict[str, float]]:
    """Researcher-side fidelity of the aggregated ``g_ema`` with a frozen evaluator file (no image involved).

    The evaluator (:mod:`robustmedseg.fidelity`) holds a classifier and feature statistics of
    held-out real slices; the same noise seed every round, so the curve shows the model, not the draw.
    """
    from robustmedseg.fidelity import Evaluator, scalar_summary

    evaluator = Evaluator.load(Path(path))

    def score(g_ema: Any) -> Dict[str, float]:
        return scalar_summary(evaluator.score(g_ema, n_per_domain=n_per_domain, seed=seed))

    score.evaluator = evaluator  # type: ignore[attr-defined]
    return score


def _after_failure(index: int) -> str:
    """What the user can do after round ``index + 1`` failed."""
    if index == 0:
        return "No round completed, so there is nothing to resume: fix the cause and rerun train.py without --resume"
    return (f"The last breakpoint (round {index}) is intact: rerun train.py with --resume to continue with the "
            "nodes still up")


def abandon_experiment(exp: Any, fresh: bool, keep: int) -> Optional[str]:
    """Clean up after a failed or interrupted run; returns a note for the user (or None).

    A new experiment that completed no round is removed entirely: an experiment folder without a
    breakpoint is useless, and it would become the "latest experiment" of a later ``--resume``.
    Otherwise the files of the failed round (node replies, plan copies) are pruned as after a round.
    """
    import shutil

    try:
        if fresh and not breakpoint_dirs(exp):
            shutil.rmtree(exp.experimentation_path(), ignore_errors=True)
            return "the experiment folder of this run was removed"
        prune_experiment(exp, keep)
    except Exception:  # noqa: BLE001 - clean-up must never hide the original error
        return None
    return None


def attach_metrics(exp: Any, writer: Any) -> NodeMetrics:
    """Route the nodes' metric messages of this experiment to :class:`NodeMetrics` (replaces the
    stock monitor, whose per-message console banners would drown the progress lines)."""
    handler = NodeMetrics(writer, node_names(exp))
    fbm.experiment_requests(exp).add_monitor_callback(exp.id, handler)
    return handler


def secagg_refusal(exp: Any, nodes: Sequence[str], names: Mapping[str, str], index: int) -> str:
    """One line explaining why nodes refused a round over their secure-aggregation setting."""
    who = ", ".join(describe(n, names) for n in nodes)
    if exp.secagg.active:
        return (f"node {who} refused round {index + 1}: secure aggregation is disabled on it ([security] "
                f"secure_aggregation = False in its etc/config.ini or FBM_SECURITY_SECURE_AGGREGATION=False); its "
                f"operator must enable it, or run without --secagg")
    again = "train.py --resume --secagg" if index > 0 else "train.py --secagg"
    return (f"node {who} requires secure aggregation ([security] force_secure_aggregation = True) and refused "
            f"round {index + 1} of this plain experiment: rerun with {again}")


def secagg_info(exp: Any) -> Dict[str, Any]:
    args = exp.model_args()
    return {"active": bool(exp.secagg.active), "scheme": exp.secagg.scheme.name if exp.secagg.active else None,
            "clip": float(args.get("secagg_clip") or 0.0), "resolution": codec.resolution(args.get("secagg_clip") or 0),
            "weighting": args.get("secagg_weighting", "uniform")}


def write_run_info(path: Path, exp: Any, extra: Mapping[str, Any]) -> None:
    from robustmedseg.io import write_text_atomic

    info = {"experiment_id": exp.id, "experimentation_path": exp.experimentation_path(),
            "round_current": exp.round_current(), "round_limit": exp.round_limit(),
            "model_args": exp.model_args(), "training_args": dict(exp.training_args()),
            "strategy": exp.strategy().settings(),
            "sampled": {str(k): v for k, v in exp.strategy().history().items()},
            "secagg": secagg_info(exp),
            "breakpoints": breakpoint_dirs(exp), **extra}
    write_text_atomic(path, json.dumps(info, indent=2, default=str) + "\n")


def previous_rounds(path: Path, experiment_id: str, upto: int) -> List[Dict[str, Any]]:
    """Round timings already recorded in ``run.json`` for this experiment (resumed runs append)."""
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return []
    if info.get("experiment_id") != experiment_id:
        return []
    return [r for r in info.get("rounds", []) if isinstance(r, dict) and int(r.get("round", 0)) <= upto]


def tensorboard_writer(directory: Optional[Path]) -> Any:
    if directory is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    Path(directory).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(directory))


class RunRecord:
    """What one ``train.py`` run leaves in its work folder: TensorBoard events (``writer``) and
    ``run.json`` (settings, sampling history, breakpoints and one row per round, appended to the rows
    of earlier runs of the same experiment).  A run that completed no round leaves none of it behind:
    :meth:`close` removes its event file and the folders it created, if they stayed empty."""

    def __init__(self, workdir: Path, tensorboard: Optional[Path] = None):
        self.workdir = Path(workdir)
        board = Path(tensorboard) if tensorboard is not None else self.workdir / "tensorboard"
        self._made = [d for d in (self.workdir, board) if not d.exists()]
        before = set(board.glob("events.out.tfevents.*"))
        self.writer = tensorboard_writer(board)
        self._events = sorted(set(board.glob("events.out.tfevents.*")) - before)  # this writer's file
        self.rounds: List[Dict[str, Any]] = []

    def start(self, exp: Any) -> None:
        """Continue the round rows of ``run.json`` for ``exp`` (a resumed run appends)."""
        self.rounds = previous_rounds(self.workdir / "run.json", exp.id, exp.round_current())

    def add(self, report: "RoundReport") -> None:
        row = {"round": report.round, "seconds": report.seconds, "node_train_s": report.node_train_s,
               "node_cpu_s": report.node_cpu_s}
        if report.fidelity:
            row["fidelity"] = report.fidelity
        self.rounds.append(row)

    def close(self, exp: Any, completed: bool, extra: Mapping[str, Any]) -> None:
        """Close the writer; write ``run.json`` if a round exists to describe, else remove this run's traces."""
        self.writer.close()
        if completed or breakpoint_dirs(exp):
            write_run_info(self.workdir / "run.json", exp, {**extra, "rounds": self.rounds})
            return
        for events in self._events:
            events.unlink(missing_ok=True)
        for folder in reversed(self._made):  # the folders this run created, if they stayed empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def final_state_dict(exp: Any) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in exp.training_plan().model().state_dict().items()}
